"""The 2-D walkthrough (`python train.py --preset ring2d`): the MLP model family end to end, and the
energy distance it prints against the brute-force reference of tests/toy.py."""

import contextlib
import io
import re

import jax
import numpy as np
import pytest
from PIL import Image
from scipy.stats import wasserstein_distance

import eval as evaluation
import train
import uvit
from experiments import length as length_curves
from toy import energy_distance


@pytest.mark.parametrize("n,m,d", [(1, 1, 2), (7, 5, 2), (50, 80, 3), (2100, 30, 2)])
def test_energy_distance_matches_brute_force(n, m, d):
    rng = np.random.default_rng(n)
    a, b = rng.normal(size=(n, d)), rng.normal(0.3, 2.0, size=(m, d))
    assert evaluation.energy_distance(a, b) == pytest.approx(
        energy_distance(a, b), rel=1e-9, abs=1e-12
    )
    assert evaluation.energy_distance(a, a) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("n,d", [(1, 2), (9, 2), (500, 3)])
def test_radial_w1_is_scipys_wasserstein_distance_of_the_norms(n, d):
    rng = np.random.default_rng(n)
    a, b = rng.normal(size=(n, d)), rng.normal(0.2, 1.5, size=(n, d))
    norms = [np.linalg.norm(x, axis=1) for x in (a, b)]
    assert length_curves.radial_w1(a, b) == pytest.approx(wasserstein_distance(*norms), rel=1e-12)
    assert (
        length_curves.radial_w1(a, a @ np.linalg.qr(rng.normal(size=(d, d)))[0]) < 1e-12
    )  # rotation
    with pytest.raises(ValueError, match="equal sizes, got 9 and 10"):
        length_curves.radial_w1(rng.normal(size=(9, d)), rng.normal(size=(10, d)))


def test_mlp_config_round_trips_through_the_saved_configuration():
    config = train.resolve(train.PRESETS["ring2d"])
    assert train.config_from_dict(train.config_to_dict(config)) == config
    model = uvit.make_model(config.model, key=jax.random.key(0))
    assert isinstance(model, uvit.MLPDenoiser)


def test_ring2d_walkthrough_end_to_end(tmp_path, monkeypatch):
    """Teacher trained on the fly and cached, alternating distillation to k = 4, the figure and
    the printed energy distances. Measured when written (2 CPU cores, ~25 s): undistilled 4-step
    teacher 0.13, 32-step teacher 0.024, student 0.047; fresh data 0.0006, the Gaussian 0.0023."""
    monkeypatch.setattr(train, "CHECKPOINT_DIR", tmp_path / "checkpoints")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train.main(
            [
                "--preset",
                "ring2d",
                "--variant",
                "alternating",
                "--workdir",
                str(tmp_path / "run"),
                "--num-devices",
                "1",
                "--model-width",
                "64",
                "--teacher-steps",
                "1500",
                "--steps",
                "600",
                "--teacher-k",
                "32",
            ]
        )
    out = printed.getvalue()
    assert (tmp_path / "checkpoints" / "ring2d_teacher.eqx").is_file()
    assert Image.open(tmp_path / "run" / train.POINTS_FIGURE).format == "PNG"
    yardstick = float(re.search(r"mean and covariance: ([0-9.]+)\)", out).group(1))
    lines = re.findall(r"^  (\S.*?) +([0-9.]+)$", out, re.MULTILINE)
    distance = {name: float(v) for name, v in lines}
    assert all(np.isfinite(v) for v in distance.values()) and len(distance) == 4, out
    assert distance["data (fresh)"] < yardstick, out  # sampling noise < a wrong (Gaussian) law
    assert distance["teacher, 32 steps"] < 0.25 * distance["teacher, 4 steps"], out
    assert distance["alternating student, 4 steps"] < 0.5 * distance["teacher, 4 steps"], out
    # `python -m experiments length` on the same run: the rings' sharpness by checkpoint, cached,
    # the teacher's references beside it, and sharper than the undistilled 4 steps.
    report = length_curves.run_length(
        length_curves.LengthBench(
            workdirs=(str(tmp_path / "run"),), num_samples=500, out=str(tmp_path)
        )
    )
    refs = dict(re.findall(r"^- teacher, (\d+) steps: w1_radius ([0-9.]+)\.$", report, re.M))
    last = float(re.search(r"last ([0-9.]+) at step 600", report).group(1))
    assert set(refs) == {"4", "32"} and float(refs["32"]) < float(refs["4"]), report
    assert last < 0.75 * float(refs["4"]), report  # measured when written: 0.234 against 0.387
    assert len(list((tmp_path / "run" / "eval").glob("points_k4_n500_seed0_*.json"))) == 1
    assert Image.open(tmp_path / "w1_radius_vs_distill_steps.png").format == "PNG"
    scored = []
    fake = {"w1_radius": 9.0}
    monkeypatch.setattr(
        length_curves, "points_scores", lambda path, **kw: scored.append(path) or fake
    )
    again = length_curves.LengthBench(
        workdirs=(str(tmp_path / "run"),), num_samples=500, out=str(tmp_path)
    )
    assert f"last {last:.4f} at step 600" in length_curves.run_length(again)
    # the student's score came from its cache; only the teacher's two references were recomputed
    assert [p.name for p in scored] == ["ring2d_teacher.eqx"] * 2
