"""train.py end to end through `main(argv)` on the `tiny` preset (an 8x8 U-ViT) and a synthetic npz
set: outputs of every variant, resume and device-count equivalence, and each fault's message."""

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import zipfile

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import checkpoint
import data
import eval as evaluation
import mmd
import train

STEPS = 4
BATCH = 16
ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    """64 random 8x8 grey images, labels 0..9."""
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 256, (64, 8, 8, 1), dtype=np.uint8), y=np.arange(64) % 10)
    return path


def args(npz, workdir, variant, *extra):
    return [
        "--variant",
        variant,
        "--preset",
        "tiny",
        "--data",
        f"npz:{npz}",
        "--data-resolution",
        "none",
        "--workdir",
        str(workdir),
        "--steps",
        str(STEPS),
        "--batch-size",
        str(BATCH),
        "--log-every",
        "1",
        "--checkpoint-every",
        "1",
        "--keep-checkpoints",
        str(STEPS),
        "--sample-every",
        "100",
        "--grid-size",
        "20",
        "--teacher-k",
        "4",
        "--k",
        "2",
        *extra,
    ]


def leaves(path, group="params"):
    """A checkpoint group's leaves, in order."""
    return list(checkpoint.read_leaves(path, group).values())


def metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def check_outputs(workdir, variant):
    """Checkpoints of every step, one finite metrics line per step, a sample grid of 20 images in 10
    columns."""
    assert [p.name for p in train.list_checkpoints(workdir)] == [
        f"ckpt_{s:08d}.eqx" for s in range(1, STEPS + 1)
    ]
    records = metrics(workdir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(
        np.isfinite(r["grad_norm"]) and np.isfinite(r["lr"]) and r["images_per_s"] > 0
        for r in records
    )
    assert Image.open(workdir / "samples" / f"step_{STEPS:08d}.png").format == "PNG"
    assert Image.open(workdir / "loss.png").format == "PNG"
    saved = json.loads((workdir / "config.json").read_text())
    assert (
        saved["variant"] == variant
        and saved["batch_size"] == BATCH
        and saved["model"]["widths"] == [8]
    )
    assert not list(workdir.rglob("*.tmp"))


@pytest.fixture(scope="module")
def auto_run(npz, tmp_path_factory):
    """The default pipeline: `--teacher auto` finds no cached teacher, trains it, caches it,
    distils."""
    root = tmp_path_factory.mktemp("auto")
    workdir, printed = root / "alternating", io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setattr(train, "CHECKPOINT_DIR", root / "checkpoints")
        train.main(
            args(
                npz,
                workdir,
                "alternating",
                "--teacher-steps",
                str(STEPS),
                "--teacher-batch-size",
                str(BATCH),
            )
        )
    return root, printed.getvalue()


@pytest.fixture(scope="module")
def teacher(auto_run):
    return auto_run[0] / "alternating" / "teacher"


@pytest.fixture(scope="module")
def alternating(auto_run):
    return auto_run[0] / "alternating"


def test_default_teacher_is_trained_and_cached(auto_run, teacher):
    root, printed = auto_run
    cached = root / "checkpoints" / "tiny_teacher.eqx"
    assert f"No teacher at {cached}" in printed
    assert cached.read_bytes() == (teacher / "teacher.eqx").read_bytes()


def test_teacher_run(teacher):
    check_outputs(teacher, "teacher")
    assert all(np.isfinite(r["loss"]) for r in metrics(teacher))
    # The export holds the final checkpoint's parameter average and its Adam nu; the model loads
    # from either file. The average differs from the last parameters (decay min(0.999, (1+t)/(10+t))
    # > 0).
    final = teacher / "checkpoints" / f"ckpt_{STEPS:08d}.eqx"
    assert checkpoint.read_meta(teacher / "teacher.eqx")["ema"]
    for a, b in zip(leaves(teacher / "teacher.eqx"), leaves(final, "ema"), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, raw) for a, raw in zip(leaves(final, "ema"), leaves(final)))
    nu = {p: x for p, x in checkpoint.read_leaves(final, "opt_state").items() if ".nu." in p}
    assert len(nu) == len(leaves(final))
    for a, b in zip(leaves(teacher / "teacher.eqx", "nu"), nu.values(), strict=True):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(a.astype(np.float32), b, rtol=2**-8)
    assert checkpoint.read_meta(teacher / "teacher.eqx")["adam"]["count"] == STEPS
    model, config, _ = train.load_checkpoint(teacher / "teacher.eqx")
    assert config.variant == "teacher" and config.steps == STEPS
    x = model(jnp.zeros((2, 8, 8, 1)), jnp.array([0.0, 1.0]), jnp.array([1, 10]))
    assert x.shape == (2, 8, 8, 1) and np.all(np.isfinite(x))


def test_alternating_run(alternating, teacher):
    check_outputs(alternating, "alternating")
    records = metrics(alternating)
    assert ["aux_loss" in r for r in records] == [True, False, True, False]
    assert ["generator_loss" in r and "moment_gap" in r for r in records] == [
        False,
        True,
        False,
        True,
    ]
    # Step 1 updates only the auxiliary, step 2 only the generator: both start as copies of the
    # teacher.
    t = leaves(teacher / "teacher.eqx")
    step1, step2 = (alternating / "checkpoints" / f"ckpt_{s:08d}.eqx" for s in (1, 2))
    assert all(np.array_equal(a, b) for a, b in zip(leaves(step1), t))
    assert not all(np.array_equal(a, b) for a, b in zip(leaves(step1, "aux_params"), t))
    assert not all(np.array_equal(a, b) for a, b in zip(leaves(step2), t))
    assert all(
        np.array_equal(a, b)
        for a, b in zip(leaves(step2, "aux_params"), leaves(step1, "aux_params"))
    )


def test_resume_matches_uninterrupted_run(auto_run, alternating, npz, tmp_path, monkeypatch):
    """Kill after step 2 (drop later checkpoints, keep the killed run's metrics lines), resume,
    compare."""
    monkeypatch.setattr(train, "CHECKPOINT_DIR", auto_run[0] / "checkpoints")
    workdir = tmp_path / "resumed"
    shutil.copytree(alternating, workdir)
    for path in train.list_checkpoints(workdir)[2:]:
        path.unlink()
    train.main(args(npz, workdir, "alternating", "--resume"))
    final = f"checkpoints/ckpt_{STEPS:08d}.eqx"
    # Bit-identical on the CPU: same programs, same devices, same inputs (data state and keys are
    # restored, not re-drawn).
    for group in ("params", "aux_params", "opt_state", "aux_opt_state"):
        for a, b in zip(
            leaves(workdir / final, group), leaves(alternating / final, group), strict=True
        ):
            np.testing.assert_array_equal(a, b)
    assert [r["step"] for r in metrics(workdir)] == list(range(1, STEPS + 1))
    for a, b in zip(metrics(workdir), metrics(alternating)):
        assert a.get("aux_loss", a.get("generator_loss")) == b.get(
            "aux_loss", b.get("generator_loss")
        )


@pytest.fixture(scope="module")
def instant_run(npz, teacher, tmp_path_factory):
    workdir, printed = tmp_path_factory.mktemp("instant"), io.StringIO()
    with contextlib.redirect_stdout(printed):
        train.main(
            args(
                npz,
                workdir,
                "instant",
                "--teacher",
                str(teacher / "teacher.eqx"),
                "--num-devices",
                "4",
            )
        )
    return workdir, printed.getvalue()


@pytest.fixture(scope="module")
def instant(instant_run):
    return instant_run[0]


def test_summary_names_files_that_exist(instant_run):
    workdir, printed = instant_run
    lines = printed[printed.index("Finished instant") :].splitlines()
    assert f"{STEPS} steps in" in lines[0] and "final loss" in lines[0]
    listed = [pathlib.Path(line.strip()) for line in lines[1:-1]]
    assert all(path.exists() for path in listed)
    assert {
        workdir / "checkpoints" / f"ckpt_{STEPS:08d}.eqx",
        workdir / "loss.png",
        workdir / "samples" / "teacher_vs_student.png",
    } <= set(listed)
    python = train.python_command("eval.py")
    assert lines[-1] == f"Next: {python} --checkpoint {listed[0]} --num-samples 1000"
    assert "\r" not in printed


def test_instant_run(instant):
    check_outputs(instant, "instant")
    for name in ("step_00000000.png", "teacher_vs_student.png"):
        assert Image.open(instant / "samples" / name).format == "PNG"
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["surrogate"]) for r in metrics(instant))
    # The warm-up used: min(10, 10% of 4 updates) but at least 1.
    assert json.loads((instant / "config.json").read_text())["warmup"] == 1


def test_instant_with_fresh_preconditioner_and_fixed_centring(npz, teacher, tmp_path):
    train.main(
        args(
            npz,
            tmp_path,
            "instant",
            "--teacher",
            str(teacher / "teacher.eqx"),
            "--steps",
            "1",
            "--precond-steps",
            "2",
            "--center",
            "fixed",
            "--center-steps",
            "3",
        )
    )
    (record,) = metrics(tmp_path)
    assert np.isfinite(record["loss"]) and np.isfinite(record["grad_norm"])
    assert json.loads((tmp_path / "config.json").read_text())["center"] == "fixed"


def test_one_and_eight_devices_agree(teacher, npz, tmp_path):
    """The teacher run (all 8 fake devices) again on one device."""
    workdir = tmp_path / "one"
    train.main(args(npz, workdir, "teacher", "--num-devices", "1"))
    for a, b in zip(leaves(workdir / "teacher.eqx"), leaves(teacher / "teacher.eqx"), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(metrics(workdir), metrics(teacher), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(npz, tmp_path):
    workdir = tmp_path / "diverge"
    with pytest.raises(FloatingPointError, match=r"non-finite .* at step 2 .*ckpt_00000001\.eqx"):
        train.main(args(npz, workdir, "teacher", "--teacher-lr", "1e30", "--teacher-warmup", "1"))
    assert [p.name for p in train.list_checkpoints(workdir)] == ["ckpt_00000001.eqx"]
    assert all(
        np.all(np.isfinite(x)) for x in leaves(workdir / "checkpoints" / "ckpt_00000001.eqx")
    )


def test_mismatched_teacher_lists_leaves(npz, teacher, tmp_path):
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"(?s)leaves differ.*stem\.weight: checkpoint float32\[3, 3, 1, 8\], "
        r"configured float32\[3, 3, 1, 16\]",
    ):
        train.main(
            args(
                npz,
                tmp_path,
                "instant",
                "--teacher",
                str(teacher / "teacher.eqx"),
                "--model-widths",
                "16",
            )
        )


@pytest.mark.parametrize("variant, batch", [("instant", 12), ("teacher", 6)])
def test_indivisible_batch_fails_before_compiling(npz, tmp_path, monkeypatch, variant, batch):
    def never(*a, **k):
        raise AssertionError("compiled a step")

    monkeypatch.setattr(mmd, "train_steps", never)
    divisor = 8 if variant == "instant" else 4
    with pytest.raises(ValueError, match=f"batch size {batch} is not divisible by {divisor}"):
        train.main(
            args(
                npz,
                tmp_path,
                variant,
                "--batch-size",
                str(batch),
                "--num-devices",
                "4",
                "--teacher",
                "x",
            )
        )


def test_run_errors(npz, teacher, tmp_path):
    with pytest.raises(FileNotFoundError, match="teacher checkpoint .*missing.eqx not found"):
        train.main(args(npz, tmp_path, "alternating", "--teacher", str(tmp_path / "missing.eqx")))
    with pytest.raises(ValueError, match="already holds checkpoints; pass --resume"):
        train.main(args(npz, teacher, "teacher"))
    with pytest.raises(ValueError, match="differ from it: --lr"):
        train.main(args(npz, teacher, "teacher", "--resume", "--lr", "0.5"))
    with pytest.raises(ValueError, match="steps.*cannot be extended"):
        train.main(args(npz, teacher, "teacher", "--resume", "--steps", "99"))


def test_help_lists_every_field_with_its_default(capsys):
    with pytest.raises(SystemExit):
        train.main(["--preset", "tiny", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    tiny = train.PRESETS["tiny"]
    for name in [f.name for f in train.dataclasses.fields(train.Config) if f.name != "model"]:
        assert f"--{name.replace('_', '-')}" in text
    for f in train.dataclasses.fields(tiny.model):
        assert f"--model-{f.name.replace('_', '-')}" in text
    assert (
        "(default: 200)" in text and "(default: 8)" in text
    )  # tiny's teacher_steps and model resolution
    assert "(default: none)" in text and "(default: None)" not in text  # as `--steps none` is typed


def test_help_lists_the_options_in_sections(capsys):
    """`--help` groups the options: run, data, teacher, the paper's distillation options, the
    study's options, output, model; each section lists its own fields."""
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = capsys.readouterr().out
    titles = [f"{title}:" for title, _ in train.GROUPS.values()]
    starts = [text.index(title) for title in titles]
    assert starts == sorted(starts)  # the sections in GROUPS' order
    sections = dict(zip(train.GROUPS, [text[a:b] for a, b in zip(starts, starts[1:] + [None])]))
    assert (
        "--instant-form" in sections["distillation"]
        and "--precond-steps" in sections["distillation"]
    )
    assert all(
        f"--{name}" in sections["study"]
        for name in (
            "aux-steps",
            "b1",
            "student-ema",
            "time-sampling",
            "center",
            "precond-eps-mode",
        )
    )
    assert "--config FILE" in sections["run"] and "--model-widths" in sections["model"]
    assert "--grid-size" in sections["output"] and "--num-samples NUM_SAMPLES" not in text


def test_config_file_replays_a_run_and_later_options_override_it(teacher, tmp_path):
    """`--config WORKDIR/config.json --steps 2` runs the recorded run again for 2 steps in a new
    workdir: every other setting as recorded (the warm-up recomputed for the new length)."""
    recorded = train.read_config(teacher / "config.json")
    replay = tmp_path / "replay"
    argv = ["--config", str(teacher / "config.json"), "--steps", "2", "--workdir", str(replay)]
    config = train.parse_config(argv)
    assert (config.steps, config.workdir, config.resume) == (2, str(replay), False)
    same = dataclasses.replace(config, steps=recorded.steps, workdir=recorded.workdir)
    assert dataclasses.replace(same, warmup=recorded.warmup) == recorded
    train.main(argv)
    assert [p.name for p in train.list_checkpoints(replay)] == [
        "ckpt_00000001.eqx",
        "ckpt_00000002.eqx",
    ]
    assert train.read_config(replay / "config.json") == config
    # without --workdir the replay goes beside the recorded run, never into it
    assert train.parse_config(argv[:4]).workdir == f"{recorded.workdir}-replay"
    with pytest.raises(FileNotFoundError, match="no configuration file"):
        train.parse_config(["--config", str(tmp_path / "absent.json")])


def test_the_default_run_states_the_warmup_it_uses(capsys):
    """The paper's 1000 warm-up updates are capped at 10% of the generator's updates: the default
    run (1000 steps) warms up over 100, which --help and the resolved configuration state."""
    assert train.parse_config([]).warmup == 100
    assert train.parse_config(["--steps", "20000"]).warmup == 1000
    assert train.parse_config(["--variant", "alternating"]).warmup == 50  # 500 generator updates
    with pytest.raises(SystemExit):
        train.main(["--help"])
    assert "(the default run: 100)" in " ".join(capsys.readouterr().out.split())


def test_configs_of_earlier_versions_load_under_the_new_names():
    """`checkpoint.RENAMED`: the shipped teacher's config says `teacher_sample_steps` and
    `num_samples` (the grid's size), read as `teacher_k` and `grid_size`."""
    meta = checkpoint.read_meta(train.default_teacher_path("mnist"))
    assert {"teacher_sample_steps", "num_samples"} <= set(meta["config"])
    config = train.config_from_dict(meta["config"])
    assert config.teacher_k == meta["config"]["teacher_sample_steps"]
    assert config.grid_size == meta["config"]["num_samples"]


def test_config_round_trips_through_json_and_cli():
    config = train.parse_config(
        [
            "--preset",
            "tiny",
            "--model-widths",
            "16",
            "32",
            "--model-blocks",
            "1",
            "2",
            "--no-regularize-aux",
            "--shift",
            "none",
            "--k",
            "4",
            "--time-sampling",
            "grid",
        ]
    )
    assert (
        config.model.widths == (16, 32)
        and config.model.blocks == (1, 2)
        and not config.regularize_aux
        and config.k == 4
    )
    _, distill_cfg = train.mmd_configs(config)
    assert distill_cfg.time_sampling == "grid" and distill_cfg.num_steps == 4
    assert config.shift == pytest.approx(2 * np.log(64 / 8))  # resolved from the resolution
    assert (
        config.steps == train.PRESETS["tiny"].distill_steps
        and config.workdir == "runs/tiny-instant"
    )
    assert train.config_from_dict(json.loads(json.dumps(train.config_to_dict(config)))) == config


def test_b1_reaches_both_distillation_optimizers():
    """`--b1 0.5`: after gradients g and then -g (norm < 1, so unclipped), Adam with bias
    correction gives m_hat = g then -g/3 and v_hat = g^2 both times, so the updates are -lr_1
    sign(g) and +lr_2 / 3 sign(g), for the generator's and the auxiliary's optimiser alike."""
    config = train.parse_config(["--preset", "tiny", "--variant", "alternating", "--b1", "0.5"])
    assert config.b1 == 0.5
    opt, aux_opt, lr = train.optimizers(config)
    g = jnp.asarray([0.3, -0.2, 0.1], jnp.float32)
    # Update i of the run: the auxiliary's updates are the even ones, the generator's the odd.
    for optimizer, first, second in ((opt, lr(1), lr(3)), (aux_opt, lr(0), lr(2))):
        state = optimizer.init(g)
        with jax.numpy_dtype_promotion("standard"):  # optax's int32 step count
            u1, state = optimizer.update(g, state, g)
            u2, _ = optimizer.update(-g, state, g)
        np.testing.assert_allclose(u1, -first * np.sign(g), rtol=1e-5)
        np.testing.assert_allclose(u2, second / 3 * np.sign(g), rtol=1e-5)
    with pytest.raises(ValueError, match=r"--b1 must be in \[0, 1\)"):
        train.parse_config(["--preset", "tiny", "--b1", "1"])


def test_student_ema_averages_the_generator_and_is_what_is_loaded(npz, teacher, tmp_path):
    """`--student-ema 0.5`, alternating, 4 steps: generator updates at steps 2 and 4 (p1, p2) from
    the teacher's parameters p0. With d_t = min(0.5, (1+t)/(10+t)) over generator updates the
    average is d_1 (d_0 p0 + (1 - d_0) p1) + (1 - d_1) p2; checkpoints keep it, and loading a
    checkpoint (what eval.py samples) gives it, not the raw generator. Refused for a teacher."""
    workdir = tmp_path / "run"
    teacher_file = str(teacher / "teacher.eqx")
    train.main(args(npz, workdir, "alternating", "--teacher", teacher_file, "--student-ema", "0.5"))
    ckpt = [workdir / "checkpoints" / f"ckpt_{s:08d}.eqx" for s in range(1, STEPS + 1)]
    p0, p1, p2 = leaves(teacher / "teacher.eqx"), leaves(ckpt[1]), leaves(ckpt[3])
    d0, d1 = 0.1, 2 / 11
    expected = [d1 * (d0 * a + (1 - d0) * b) + (1 - d1) * c for a, b, c in zip(p0, p1, p2)]
    for got, want in zip(leaves(ckpt[3], "ema"), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert all(np.array_equal(a, b) for a, b in zip(leaves(ckpt[0], "ema"), p0, strict=True))
    assert not all(np.allclose(a, b) for a, b in zip(leaves(ckpt[3], "ema"), p2, strict=True))
    model, _, _ = train.load_checkpoint(ckpt[3])
    loaded = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
    assert all(np.array_equal(a, b) for a, b in zip(loaded, leaves(ckpt[3], "ema"), strict=True))
    with pytest.raises(ValueError, match="--student-ema is for distillation"):
        train.parse_config(["--preset", "tiny", "--variant", "teacher", "--student-ema", "0.5"])
    with pytest.raises(ValueError, match=r"--student-ema must be in \[0, 1\)"):
        train.parse_config(["--preset", "tiny", "--student-ema", "1"])


def test_auto_trained_teacher_drops_the_distillation_only_options(tmp_path, monkeypatch):
    """`--teacher auto` without a cached teacher trains one from the distillation command's
    settings, less the options a teacher run refuses (`--aux-steps`, `--student-ema`)."""

    class Started(Exception):
        pass

    def fake_train(config):
        train.check_variant_options(config)
        raise Started(config)

    monkeypatch.setattr(train, "CHECKPOINT_DIR", tmp_path / "checkpoints")
    monkeypatch.setattr(train, "train", fake_train)
    distill = ["--variant", "alternating", "--aux-steps", "2", "--student-ema", "0.5"]
    config = train.parse_config(["--preset", "tiny", *distill, "--workdir", str(tmp_path / "run")])
    with pytest.raises(Started) as started:
        train.ensure_teacher(config)
    teacher = started.value.args[0]
    assert (teacher.variant, teacher.aux_steps, teacher.student_ema) == ("teacher", 1, 0.0)


def test_aux_steps_cycles_the_rates_and_reaches_the_programs(npz, teacher, tmp_path, monkeypatch):
    """`--aux-steps 2`, 60 steps: 20 generator updates (each third step), 40 auxiliary ones, each
    with its own warm-up-then-decay schedule; the warm-up is 10% of the generator's updates (2;
    3 if it counted every second step); set_up asks mmd.train_steps for two auxiliary programs a
    cycle. Refused with another variant, also when a resumed run's saved variant is alternating."""
    extra = ("--teacher", str(teacher / "teacher.eqx"), "--aux-steps", "2", "--steps", "60")
    config = train.parse_config(args(npz, tmp_path / "run", "alternating", *extra))
    assert config.warmup == 2
    _, _, lr = train.optimizers(config)
    gen, aux = (
        mmd.warmup_linear_schedule(peak_lr=rate, warmup_steps=2, total_steps=n)
        for rate, n in ((config.lr, 20), (config.aux_lr, 40))
    )
    expected = []
    for c in map(jnp.asarray, range(20)):
        expected += [float(aux(2 * c)), float(aux(2 * c + 1)), float(gen(c))]
    np.testing.assert_allclose([lr(i) for i in range(60)], expected)
    seen = {}
    monkeypatch.setattr(mmd, "train_steps", lambda variant, **kw: seen.update(kw) or ())
    train.set_up(config)
    assert seen["aux_steps"] == 2
    # The saved configuration (alternating) decides, not the preset's default variant (instant).
    resume = ["--preset", "tiny", "--workdir", config.workdir, "--resume", "--aux-steps", "2"]
    assert train.parse_config(resume) == dataclasses.replace(config, resume=True)
    with pytest.raises(ValueError, match="--aux-steps is for --variant alternating, not instant"):
        train.parse_config(["--preset", "tiny", "--aux-steps", "2"])


def test_shipped_mnist_teacher_draws_the_digits_its_labels_ask_for():
    """checkpoints/mnist_teacher.eqx fits the mnist preset, gives a finite positive Lambda, and its
    16-step samples look like MNIST: on real test digits 85.9% of pixels are background (< -0.9),
    8.3% ink (> 0.5), and the nearest class-mean image (tests/data/mnist_class_means.npy) names 82%
    of them correctly."""
    path = train.default_teacher_path("mnist")
    model, config, meta = train.load_checkpoint(path)
    assert meta["ema"] and config.model == train.PRESETS["mnist"].model
    _, precond = train.load_teacher(
        path, dataclasses.replace(train.PRESETS["mnist"], variant="instant")
    )
    assert all(bool(jnp.all(jnp.isfinite(p) & (p > 0))) for p in jax.tree.leaves(precond))
    labels = jnp.arange(50, dtype=jnp.int32) % 10
    x = np.asarray(
        mmd.sample(
            model,
            jax.random.key(0),
            shape=(50, 32, 32, 1),
            labels=labels,
            num_steps=16,
            shift=mmd.resolution_shift(32),
        )
    )
    assert 0.75 < np.mean(x < -0.9) < 0.95 and 0.03 < np.mean(x > 0.5) < 0.15
    means = np.load(pathlib.Path(__file__).parent / "data" / "mnist_class_means.npy")
    nearest = np.argmin(((x[:, None] - means[None]) ** 2).reshape(50, 10, -1).sum(-1), axis=1)
    assert np.mean(nearest == np.asarray(labels)) >= 0.6


def test_sigint_checkpoints_the_step_and_the_printed_command_resumes_exactly(
    npz, teacher, tmp_path, monkeypatch
):
    """SIGINT during step 2 of 4: the step finishes, ckpt 2 is written, the printed command resumes,
    and the final state equals the uninterrupted teacher run's (the `teacher` fixture: same options,
    8 devices)."""
    workdir, calls, printed = tmp_path / "stopped", [], io.StringIO()
    real_global_batch = train.global_batch

    def global_batch(*a):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_global_batch(*a)

    monkeypatch.setattr(train, "global_batch", global_batch)
    with contextlib.redirect_stdout(printed), pytest.raises(train.Interrupted):
        train.main(args(npz, workdir, "teacher"))
    names = [p.name for p in train.list_checkpoints(workdir)]
    assert names == ["ckpt_00000001.eqx", "ckpt_00000002.eqx"]
    (line,) = [line for line in printed.getvalue().splitlines() if line.startswith("Interrupted")]
    saved = workdir / "checkpoints" / "ckpt_00000002.eqx"
    assert f"at step 2; checkpoint {saved}. Resume: " in line
    command = shlex.split(line.split("Resume: ")[1])
    assert command[:2] == shlex.split(train.python_command("train.py"))
    assert command[-1] == "--resume"
    monkeypatch.setattr(train, "global_batch", real_global_batch)
    train.main(command[2:])
    final = f"checkpoints/ckpt_{STEPS:08d}.eqx"
    for group in ("params", "opt_state", "ema"):
        resumed, uninterrupted = leaves(workdir / final, group), leaves(teacher / final, group)
        for a, b in zip(resumed, uninterrupted, strict=True):
            np.testing.assert_array_equal(a, b)  # bit-identical on the CPU


def test_sigint_in_a_subprocess_exits_130_with_a_checkpoint_and_no_carriage_returns(npz, tmp_path):
    """`python train.py` with output to a pipe: plain progress lines; SIGINT after the first one."""
    workdir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *args(npz, workdir, "teacher"),
            "--steps",
            "1000000",
            "--checkpoint-every",
            "1000000",
            "--log-every",
            "10",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
    )
    output = b""
    while b"teacher step 1/" not in output:
        chunk = process.stdout.readline()
        assert chunk, output.decode()
        output += chunk
    process.send_signal(signal.SIGINT)
    output += process.communicate(timeout=300)[0]
    text = output.decode()
    assert process.returncode == 130, text
    assert "\r" not in text
    (line,) = [line for line in text.splitlines() if line.startswith("Interrupted at step ")]
    step = int(line.split()[3].rstrip(";"))
    assert [p.name for p in train.list_checkpoints(workdir)] == [f"ckpt_{step:08d}.eqx"]
    assert checkpoint.read_meta(train.list_checkpoints(workdir)[0])["step"] == step


@pytest.mark.parametrize(
    "data, resolution, message",
    [
        ("folder:{tmp}", "none", "--data folder:.*pass --data-resolution N"),
        ("folder:{tmp}/absent", "none", "--data folder:.*absent does not exist"),
        ("{tmp}/absent", "none", "--data .*unknown data source"),
        ("npz:{tmp}/absent.npz", "none", "--data npz:.*absent.npz does not exist"),
    ],
)
def test_data_errors_name_the_flag_before_anything_is_written(
    npz, tmp_path, data, resolution, message
):
    workdir = tmp_path / "run"
    argv = args(npz, workdir, "teacher")
    argv[argv.index("--data") + 1] = data.format(tmp=tmp_path)
    argv[argv.index("--data-resolution") + 1] = resolution
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train.main(argv)
    assert not workdir.exists()


def test_config_errors_are_one_line_before_anything_is_written(npz, tmp_path, capsys):
    workdir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        train.main(args(npz, workdir, "instnat"))
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "invalid choice: 'instnat'" in line and "python train.py --help" in line
    with pytest.raises(ValueError, match="--k must be >= 1"):
        train.main(args(npz, workdir, "teacher", "--k", "0"))
    with pytest.raises(FileNotFoundError, match="teacher checkpoint"):
        train.main(args(npz, workdir, "instant", "--teacher", str(tmp_path / "absent.eqx")))
    assert not workdir.exists()


# --- Nothing lost, nothing silent ---------------------------------------------------------------


def with_meta(src, dst, **changes):
    """A copy of checkpoint `src` whose meta.json config has `changes` (members copied as is)."""
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w") as new:
        for name in old.namelist():
            content = old.read(name)
            if name == "meta.json":
                meta = json.loads(content)
                meta["config"].update(changes)
                content = json.dumps(meta).encode()
            new.writestr(name, content)
    return dst


def member_offset(path, member):
    """Where a stored zip member's bytes start in the file (after its local header)."""
    info = zipfile.ZipFile(path).getinfo(member)
    raw = path.read_bytes()
    start = info.header_offset + 30
    return (
        start
        + int.from_bytes(raw[start - 4 : start - 2], "little")
        + int.from_bytes(raw[start - 2 : start], "little")
    )


def flip(path, position):
    raw = bytearray(path.read_bytes())
    raw[position] ^= 0x10
    path.write_bytes(bytes(raw))


@pytest.fixture
def never_compile(monkeypatch):
    def never(*a, **k):
        raise AssertionError("compiled a step")

    monkeypatch.setattr(mmd, "train_steps", never)


def test_inputs_later_stages_cannot_take_are_refused_before_anything_is_written(
    npz, teacher, tmp_path, monkeypatch, never_compile
):
    """A 4-channel npz (sample grids and Inception take 1 or 3 channels), and data or a
    teacher that does not fit the model: each refused with its message, no work dir created."""
    rgba = tmp_path / "rgba.npz"
    np.savez(rgba, x=np.zeros((64, 8, 8, 4), np.uint8), y=np.arange(64) % 10)
    # No cached teacher: --teacher auto would train one first.
    monkeypatch.setattr(train, "CHECKPOINT_DIR", tmp_path / "no-teachers")
    workdir = tmp_path / "run"
    dropout0 = with_meta(teacher / "teacher.eqx", tmp_path / "dropout0.eqx", label_dropout=0.0)
    paths, q = {"rgba": rgba, "npz": npz}, shlex.quote
    channels = r"--model-channels 4: sample grids and FID .* 1 or 3 channels"
    cases = [
        ("rgba", "teacher", "--model-channels 4", channels),
        ("rgba", "instant", "--model-channels 4", channels),
        ("rgba", "teacher", "", r"rgba.npz/train has 4-channel images; .* take 1 or 3 channels"),
        (
            "npz",
            "teacher",
            "--model-num-classes 5",
            r"has 10 classes, the model 5: pass --model-num-classes 10",
        ),
        (
            "npz",
            "teacher",
            "--model-resolution 16",
            r"has images \(8, 8, 1\), the model expects \(16, 16, 1\)",
        ),
        (
            "npz",
            "instant",
            "--guidance 2 --label-dropout 0",
            r"teacher to be trained .* label dropout 0",
        ),
        (
            "npz",
            "instant",
            f"--teacher {q(str(dropout0))} --guidance 2",
            r"dropout0.eqx was trained with label dropout 0, so its null label never learned",
        ),
        (
            "npz",
            "alternating",
            f"--teacher {q(str(teacher / 'teacher.eqx'))} --model-heads 4",
            r"teacher.eqx was trained with another model \(heads\): pass --model-heads 2",
        ),
        (
            "npz",
            "instant",
            f"--teacher {q(str(teacher / 'checkpoints'))}",
            r"teacher directory .*checkpoints holds no teacher.eqx; pass --teacher a teacher.eqx",
        ),
    ]
    for name, variant, extra, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            train.main(args(paths[name], workdir, variant, *shlex.split(extra)))
        assert not workdir.exists(), (variant, extra)


def test_teacher_may_be_a_run_directory_and_must_be_a_teacher(teacher, alternating, tmp_path):
    config = train.parse_config(
        ["--preset", "tiny", "--variant", "alternating", "--teacher", str(teacher)]
    )
    assert train.ensure_teacher(config) == teacher / "teacher.eqx"
    train.check_teacher(config)
    (tmp_path / "unfinished" / "checkpoints").mkdir(parents=True)
    shutil.copy(
        teacher / "checkpoints" / "ckpt_00000002.eqx", tmp_path / "unfinished" / "checkpoints"
    )
    with pytest.raises(
        FileNotFoundError,
        match=r"holds no teacher.eqx \(the run is unfinished: resume it, or "
        r"pass .*unfinished/checkpoints/ckpt_00000002.eqx\)",
    ):
        train.ensure_teacher(dataclasses.replace(config, teacher=str(tmp_path / "unfinished")))
    student = alternating / "checkpoints" / f"ckpt_{STEPS:08d}.eqx"
    with pytest.raises(
        checkpoint.CheckpointError, match="is a checkpoint of a alternating run, not of a teacher"
    ):
        train.check_teacher(dataclasses.replace(config, teacher=str(student)))


def test_eval_refuses_guidance_on_a_teacher_without_label_dropout(teacher, tmp_path):
    dropout0 = with_meta(teacher / "teacher.eqx", tmp_path / "dropout0.eqx", label_dropout=0.0)
    with pytest.raises(ValueError, match="dropout0.eqx was trained with label dropout 0"):
        evaluation.main(
            ["--checkpoint", str(dropout0), "--guidance", "1", "--no-fid", "--num-samples", "4"]
        )
    assert not (tmp_path / "eval").exists()


def test_every_flipped_byte_and_truncation_is_detected_or_harmless(teacher, tmp_path):
    """A flipped byte anywhere in a checkpoint (headers, members, central directory) either changes
    nothing that is read or raises a one-line CheckpointError naming the file; every flipped byte
    inside a member is caught. A truncated file or another format raise one too."""
    original = teacher / "teacher.eqx"
    expected = {g: checkpoint.read_leaves(original, g) for g in ("params", "nu")}
    raw = original.read_bytes()
    archive = zipfile.ZipFile(original)
    data_ranges = [
        (member_offset(original, m), archive.getinfo(m).compress_size) for m in archive.namelist()
    ]
    in_data = {
        start + i for start, size in data_ranges for i in np.linspace(0, size - 1, 40).astype(int)
    }
    near_headers = {max(0, start + d) for start, _ in data_ranges for d in range(-64, 4)}
    positions = sorted(in_data | near_headers | set(range(len(raw) - 220, len(raw))))
    damaged, harmless = tmp_path / "damaged.eqx", set()
    for position in positions:
        damaged.write_bytes(raw)
        flip(damaged, position)
        try:
            for group, leaves_ in expected.items():
                for a, b in zip(
                    checkpoint.read_leaves(damaged, group).values(), leaves_.values(), strict=True
                ):
                    np.testing.assert_array_equal(a, b)
            harmless.add(position)
        except checkpoint.CheckpointError as e:
            assert str(e).startswith(f"{damaged}") and "\n" not in str(e)
    # Every flipped byte of meta.json, params.eqx and nu.eqx is caught (CRC-32).
    assert not harmless & in_data
    for content, message in [
        (raw[: len(raw) // 2], "meta.json cannot be read .*BadZipFile"),
        (b"not a zip", "meta.json cannot be read"),
        (None, "has format 'other', expected 'mmd-jax-checkpoint-1'"),
    ]:
        if content is None:
            with zipfile.ZipFile(damaged, "w") as archive:
                archive.writestr("meta.json", json.dumps({"format": "other"}))
        else:
            damaged.write_bytes(content)
        with pytest.raises(checkpoint.CheckpointError, match=f"damaged.eqx.*{message}"):
            train.load_checkpoint(damaged)


def test_resume_skips_a_damaged_checkpoint_and_tolerates_leftovers(teacher, npz, tmp_path, capsys):
    """The newest checkpoint has a flipped byte in params.eqx, metrics.jsonl lacks step 3 and ends
    in a cut line, a temporary file of a killed write lies in checkpoints/: --resume continues from
    step 3, says what it skipped and dropped, and ends with the uninterrupted run's parameters."""
    workdir = tmp_path / "resumed"
    shutil.copytree(teacher, workdir)
    (workdir / "teacher.eqx").unlink()
    newest = workdir / "checkpoints" / f"ckpt_{STEPS:08d}.eqx"
    flip(newest, member_offset(newest, "params.eqx") + 100)
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    (workdir / "metrics.jsonl").write_text("\n".join(lines[:2] + lines[3:]) + "\n" + lines[3][:50])
    leftover = workdir / "checkpoints" / f".ckpt_{STEPS:08d}.eqx.123.{'0' * 32}.tmp"
    leftover.write_bytes(b"partial")
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"ckpt_00000004.eqx: params.eqx cannot be read .*Bad CRC-32",
    ):
        checkpoint.read_leaves(newest, "params")
    train.main(args(npz, workdir, "teacher", "--resume"))
    out = " ".join(capsys.readouterr().out.split())
    assert "Skipping damaged checkpoint ckpt_00000004.eqx (kept for inspection)" in out
    assert "from ckpt_00000003.eqx (step 3)" in out
    assert (
        "dropped 1 lines after step 3 (the checkpoint resumed from) and 1 unreadable lines" in out
    )
    assert (
        "1 of steps 1..3 have no line" in out
        and f"Removed 1 temporary files of interrupted writes: {leftover}" in out
    )
    assert [r["step"] for r in metrics(workdir)] == [1, 2, 4] and not leftover.exists()
    for a, b in zip(leaves(workdir / "teacher.eqx"), leaves(teacher / "teacher.eqx"), strict=True):
        np.testing.assert_array_equal(a, b)  # bit-identical on the CPU


def test_sigkill_between_writing_and_renaming_a_checkpoint_then_resume(teacher, npz, tmp_path):
    """A real SIGKILL (data.atomic_path's test hook) after checkpoint 3 is written, before its
    rename: --resume continues from checkpoint 2 and ends with the uninterrupted run's
    parameters."""
    workdir = tmp_path / "killed"
    env = {**os.environ, "MMD_KILL_BEFORE_RENAME": "ckpt_00000003.eqx", "PYTHONPATH": str(ROOT)}
    killed = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args(npz, workdir, "teacher")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [p.name for p in train.list_checkpoints(workdir)] == [
        "ckpt_00000001.eqx",
        "ckpt_00000002.eqx",
    ]
    assert len(data.temporary_files(workdir / "checkpoints")) == 1
    train.main(args(npz, workdir, "teacher", "--resume"))
    assert [r["step"] for r in metrics(workdir)] == list(range(1, STEPS + 1))
    assert not list(workdir.rglob("*.tmp"))
    for a, b in zip(leaves(workdir / "teacher.eqx"), leaves(teacher / "teacher.eqx"), strict=True):
        np.testing.assert_array_equal(a, b)  # bit-identical on the CPU


def test_resume_with_no_intact_checkpoint_says_so(teacher, npz, tmp_path, never_compile):
    workdir = tmp_path / "all-damaged"
    shutil.copytree(teacher, workdir)
    for path in train.list_checkpoints(workdir):
        path.write_bytes(path.read_bytes()[:1000])  # truncated
    with pytest.raises(checkpoint.CheckpointError, match=r"no intact checkpoint in .*damaged/"):
        train.main(args(npz, workdir, "teacher", "--resume"))
    assert len(train.list_checkpoints(workdir)) == STEPS  # kept for inspection


def test_printed_commands_run_from_the_working_directory(tmp_path, monkeypatch):
    script = pathlib.Path(train.__file__).resolve().with_name("eval.py")
    monkeypatch.chdir(script.parent)
    assert shlex.split(train.python_command("eval.py"))[1] == "eval.py"
    monkeypatch.chdir(tmp_path)  # elsewhere: the script's absolute path, the interpreter by name
    assert shlex.split(train.python_command("eval.py")) == ["python", str(script)]


def test_resume_from_a_checkpoint_returned_in_parts(auto_run, alternating, npz, tmp_path):
    """experiments/gpu/resume_parts.sh rebuilds a checkpoint that a device call returned split into
    parts (with its sha256) in a fresh work directory; resuming there ends bit-identical to the
    uninterrupted run on the CPU. A damaged part is refused by name before anything is written."""
    ckpt = alternating / "checkpoints" / "ckpt_00000002.eqx"
    blob = ckpt.read_bytes()
    parts, size = tmp_path / "parts", len(blob) // 3 + 1
    parts.mkdir()
    for i in range(0, len(blob), size):
        (parts / f"ckpt.part-{i // size:02d}").write_bytes(blob[i : i + size])
    (parts / "ckpt.name").write_text(f"{ckpt.name} {hashlib.sha256(blob).hexdigest()}\n")
    script = ROOT / "experiments" / "gpu" / "resume_parts.sh"
    workdir = tmp_path / "resumed"
    subprocess.run(["bash", script, parts, workdir, alternating / "config.json"], check=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "CHECKPOINT_DIR", auto_run[0] / "checkpoints")
        train.main(args(npz, workdir, "alternating", "--resume"))
    final = f"checkpoints/ckpt_{STEPS:08d}.eqx"
    for group in ("params", "aux_params", "opt_state", "aux_opt_state"):
        for a, b in zip(
            leaves(workdir / final, group), leaves(alternating / final, group), strict=True
        ):
            np.testing.assert_array_equal(a, b)
    first = parts / "ckpt.part-00"
    first.write_bytes(bytes([first.read_bytes()[0] ^ 1]) + first.read_bytes()[1:])
    broken = subprocess.run(
        ["bash", script, parts, tmp_path / "broken"], capture_output=True, text=True
    )
    assert broken.returncode == 1 and "sha256 mismatch" in broken.stderr
    assert not list((tmp_path / "broken" / "checkpoints").glob("*.eqx"))
