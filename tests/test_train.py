"""train.py end to end through `main(argv)` on the `tiny` preset (an 8x8 U-ViT) and a synthetic npz set:
outputs of every variant, resume and device-count equivalence, and each fault's message."""

import contextlib
import dataclasses
import io
import json
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

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
        "--variant", variant, "--preset", "tiny", "--data", f"npz:{npz}", "--data-resolution", "none",
        "--workdir", str(workdir), "--steps", str(STEPS), "--batch-size", str(BATCH), "--log-every", "1",
        "--checkpoint-every", "1", "--keep-checkpoints", str(STEPS), "--sample-every", "100",
        "--num-samples", "20", "--teacher-k", "4", "--k", "2", *extra,
    ]


def leaves(path, group="params"):
    """A checkpoint group's leaves, in order."""
    return list(train.read_leaves(path, group).values())


def metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def check_outputs(workdir, variant):
    """Checkpoints of every step, one finite metrics line per step, a sample grid of 20 images in 10 columns."""
    assert [p.name for p in train._checkpoints(workdir)] == [f"ckpt_{s:08d}.eqx" for s in range(1, STEPS + 1)]
    records = metrics(workdir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(np.isfinite(r["grad_norm"]) and np.isfinite(r["lr"]) and r["images_per_s"] > 0 for r in records)
    assert Image.open(workdir / "samples" / f"step_{STEPS:08d}.png").format == "PNG"
    assert Image.open(workdir / "loss.png").format == "PNG"
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["variant"] == variant and saved["batch_size"] == BATCH and saved["model"]["widths"] == [8]
    assert not list(workdir.rglob("*.tmp"))


@pytest.fixture(scope="module")
def auto_run(npz, tmp_path_factory):
    """The default pipeline: `--teacher auto` finds no cached teacher, trains it, caches it, distils."""
    root = tmp_path_factory.mktemp("auto")
    workdir, printed = root / "alternating", io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setattr(train, "CHECKPOINT_DIR", root / "checkpoints")
        train.main(args(npz, workdir, "alternating", "--teacher-steps", str(STEPS), "--teacher-batch-size", str(BATCH)))
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
    # The export holds the final checkpoint's parameter average and its Adam nu; the model loads from either
    # file. The average differs from the last parameters (decay min(0.999, (1+t)/(10+t)) > 0).
    final = teacher / "checkpoints" / f"ckpt_{STEPS:08d}.eqx"
    assert train.read_meta(teacher / "teacher.eqx")["ema"]
    for a, b in zip(leaves(teacher / "teacher.eqx"), leaves(final, "ema"), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, raw) for a, raw in zip(leaves(final, "ema"), leaves(final)))
    nu = {p: x for p, x in train.read_leaves(final, "opt_state").items() if ".nu." in p}
    assert len(nu) == len(leaves(final))
    for a, b in zip(leaves(teacher / "teacher.eqx", "nu"), nu.values(), strict=True):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(a.astype(np.float32), b, rtol=2**-8)
    assert train.read_meta(teacher / "teacher.eqx")["adam"]["count"] == STEPS
    model, config, _ = train.load_checkpoint(teacher / "teacher.eqx")
    assert config.variant == "teacher" and config.steps == STEPS
    x = model(jnp.zeros((2, 8, 8, 1)), jnp.array([0.0, 1.0]), jnp.array([1, 10]))
    assert x.shape == (2, 8, 8, 1) and np.all(np.isfinite(x))


def test_alternating_run(alternating, teacher):
    check_outputs(alternating, "alternating")
    records = metrics(alternating)
    assert ["aux_loss" in r for r in records] == [True, False, True, False]
    assert ["generator_loss" in r and "moment_gap" in r for r in records] == [False, True, False, True]
    # Step 1 updates only the auxiliary, step 2 only the generator: both start as copies of the teacher.
    t = leaves(teacher / "teacher.eqx")
    step1, step2 = (alternating / "checkpoints" / f"ckpt_{s:08d}.eqx" for s in (1, 2))
    assert all(np.array_equal(a, b) for a, b in zip(leaves(step1), t))
    assert not all(np.array_equal(a, b) for a, b in zip(leaves(step1, "aux_params"), t))
    assert not all(np.array_equal(a, b) for a, b in zip(leaves(step2), t))
    assert all(np.array_equal(a, b) for a, b in zip(leaves(step2, "aux_params"), leaves(step1, "aux_params")))


def test_resume_matches_uninterrupted_run(auto_run, alternating, npz, tmp_path, monkeypatch):
    """Kill after step 2 (drop later checkpoints, keep the killed run's metrics lines), resume, compare."""
    monkeypatch.setattr(train, "CHECKPOINT_DIR", auto_run[0] / "checkpoints")
    workdir = tmp_path / "resumed"
    shutil.copytree(alternating, workdir)
    for path in train._checkpoints(workdir)[2:]:
        path.unlink()
    train.main(args(npz, workdir, "alternating", "--resume"))
    final = f"checkpoints/ckpt_{STEPS:08d}.eqx"
    for group in ("params", "aux_params", "opt_state", "aux_opt_state"):
        for a, b in zip(leaves(workdir / final, group), leaves(alternating / final, group), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert [r["step"] for r in metrics(workdir)] == list(range(1, STEPS + 1))
    for a, b in zip(metrics(workdir), metrics(alternating)):
        assert a.get("aux_loss", a.get("generator_loss")) == pytest.approx(b.get("aux_loss", b.get("generator_loss")))


@pytest.fixture(scope="module")
def instant_run(npz, teacher, tmp_path_factory):
    workdir, printed = tmp_path_factory.mktemp("instant"), io.StringIO()
    with contextlib.redirect_stdout(printed):
        train.main(args(npz, workdir, "instant", "--teacher", str(teacher / "teacher.eqx"),
                        "--num-devices", "4"))
    return workdir, printed.getvalue()


@pytest.fixture(scope="module")
def instant(instant_run):
    return instant_run[0]


def test_summary_names_files_that_exist(instant_run):
    workdir, printed = instant_run
    lines = printed[printed.index("Finished instant"):].splitlines()
    assert f"{STEPS} steps in" in lines[0] and "final loss" in lines[0]
    listed = [pathlib.Path(line.strip()) for line in lines[1:-1]]
    assert all(path.exists() for path in listed)
    assert {workdir / "checkpoints" / f"ckpt_{STEPS:08d}.eqx", workdir / "loss.png",
            workdir / "samples" / "teacher_vs_student.png"} <= set(listed)
    assert lines[-1] == f"Next: python eval.py --checkpoint {listed[0]} --num-samples 1000"
    assert "\r" not in printed


def test_instant_run(instant):
    check_outputs(instant, "instant")
    for name in ("step_00000000.png", "teacher_vs_student.png"):
        assert Image.open(instant / "samples" / name).format == "PNG"
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["surrogate"]) for r in metrics(instant))
    # The warm-up used: min(10, 10% of 4 updates) but at least 1.
    assert json.loads((instant / "config.json").read_text())["warmup"] == 1


def test_instant_with_fresh_preconditioner_and_fixed_centring(npz, teacher, tmp_path):
    train.main(args(npz, tmp_path, "instant", "--teacher", str(teacher / "teacher.eqx"), "--steps", "1",
                    "--precond-steps", "2", "--center", "fixed", "--center-steps", "3"))
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
    assert [p.name for p in train._checkpoints(workdir)] == ["ckpt_00000001.eqx"]
    assert all(np.all(np.isfinite(x)) for x in leaves(workdir / "checkpoints" / "ckpt_00000001.eqx"))


def test_mismatched_teacher_lists_leaves(npz, teacher, tmp_path):
    with pytest.raises(train.CheckpointError, match=r"(?s)leaves differ.*stem\.weight: checkpoint float32\[3, 3, 1, 8\], configured float32\[3, 3, 1, 16\]"):
        train.main(args(npz, tmp_path, "instant", "--teacher", str(teacher / "teacher.eqx"), "--model-widths", "16"))


@pytest.mark.parametrize("variant, batch", [("instant", 12), ("teacher", 6)])
def test_indivisible_batch_fails_before_compiling(npz, tmp_path, monkeypatch, variant, batch):
    def never(*a, **k):
        raise AssertionError("compiled a step")

    monkeypatch.setattr(mmd, "make_train_step", never)
    divisor = 8 if variant == "instant" else 4
    with pytest.raises(ValueError, match=f"batch size {batch} is not divisible by {divisor}"):
        train.main(args(npz, tmp_path, variant, "--batch-size", str(batch), "--num-devices", "4", "--teacher", "x"))


def test_run_errors(npz, teacher, tmp_path):
    with pytest.raises(FileNotFoundError, match="teacher checkpoint .*missing.eqx not found"):
        train.main(args(npz, tmp_path, "alternating", "--teacher", str(tmp_path / "missing.eqx")))
    with pytest.raises(ValueError, match="already holds checkpoints; pass --resume"):
        train.main(args(npz, teacher, "teacher"))
    with pytest.raises(ValueError, match="differ from it: lr"):
        train.main(args(npz, teacher, "teacher", "--resume", "--lr", "0.5"))


def test_help_lists_every_field_with_its_default(capsys):
    with pytest.raises(SystemExit):
        train.main(["--preset", "tiny", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    tiny = train.PRESETS["tiny"]
    for name in [f.name for f in train.dataclasses.fields(train.Config) if f.name != "model"]:
        assert f"--{name.replace('_', '-')}" in text
    for f in train.dataclasses.fields(tiny.model):
        assert f"--model-{f.name.replace('_', '-')}" in text
    assert "(default: 200)" in text and "(default: 8)" in text  # tiny's teacher_steps and model resolution


def test_config_round_trips_through_json_and_cli():
    config = train.parse_config(["--preset", "tiny", "--model-widths", "16", "32", "--model-blocks", "1", "2", "--no-regularize-aux",
                                 "--shift", "none", "--k", "4"])
    assert config.model.widths == (16, 32) and config.model.blocks == (1, 2) and not config.regularize_aux and config.k == 4
    assert config.shift == pytest.approx(2 * np.log(64 / 8))  # resolved from the resolution
    assert config.steps == train.PRESETS["tiny"].distill_steps and config.workdir == "runs/tiny-instant"
    assert train.config_from_dict(json.loads(json.dumps(train.config_to_dict(config)))) == config


def test_shipped_mnist_teacher_draws_the_digits_its_labels_ask_for():
    """checkpoints/mnist_teacher.eqx fits the mnist preset, gives a finite positive Lambda, and its 16-step
    samples look like MNIST: on real test digits 85.9% of pixels are background (< -0.9), 8.3% ink (> 0.5),
    and the nearest class-mean image (tests/data/mnist_class_means.npy) names 82% of them correctly."""
    path = train.default_teacher_path("mnist")
    model, config, meta = train.load_checkpoint(path)
    assert meta["ema"] and config.model == train.PRESETS["mnist"].model
    _, precond = train.load_teacher(path, dataclasses.replace(train.PRESETS["mnist"], variant="instant"))
    assert all(bool(jnp.all(jnp.isfinite(p) & (p > 0))) for p in jax.tree.leaves(precond))
    labels = jnp.arange(50, dtype=jnp.int32) % 10
    x = np.asarray(mmd.sample(model, jax.random.key(0), shape=(50, 32, 32, 1), labels=labels, num_steps=16,
                              shift=mmd.resolution_shift(32)))
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
    real_global_batch = train._global_batch

    def global_batch(*a):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_global_batch(*a)

    monkeypatch.setattr(train, "_global_batch", global_batch)
    with contextlib.redirect_stdout(printed), pytest.raises(train.Interrupted):
        train.main(args(npz, workdir, "teacher"))
    names = [p.name for p in train._checkpoints(workdir)]
    assert names == ["ckpt_00000001.eqx", "ckpt_00000002.eqx"]
    (line,) = [line for line in printed.getvalue().splitlines() if line.startswith("Interrupted")]
    checkpoint = workdir / "checkpoints" / "ckpt_00000002.eqx"
    assert f"at step 2; checkpoint {checkpoint}. Resume: " in line
    command = shlex.split(line.split("Resume: ")[1])
    assert command[:2] == ["python", "train.py"] and command[-1] == "--resume"
    monkeypatch.setattr(train, "_global_batch", real_global_batch)
    train.main(command[2:])
    final = f"checkpoints/ckpt_{STEPS:08d}.eqx"
    for group in ("params", "opt_state", "ema"):
        resumed, uninterrupted = leaves(workdir / final, group), leaves(teacher / final, group)
        for a, b in zip(resumed, uninterrupted, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_sigint_in_a_subprocess_exits_130_with_a_checkpoint_and_no_carriage_returns(npz, tmp_path):
    """`python train.py` with output to a pipe: plain progress lines; SIGINT after the first one."""
    workdir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args(npz, workdir, "teacher"),
         "--steps", "1000000", "--checkpoint-every", "1000000", "--log-every", "10"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
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
    assert [p.name for p in train._checkpoints(workdir)] == [f"ckpt_{step:08d}.eqx"]
    assert train.read_meta(train._checkpoints(workdir)[0])["step"] == step


@pytest.mark.parametrize("data, resolution, message", [
    ("folder:{tmp}/absent", "none", "--data folder:.*pass --data-resolution N"),
    ("folder:{tmp}/absent", "8", "--data folder:.*absent does not exist"),
    ("{tmp}/absent", "none", "--data .*unknown data source"),
    ("npz:{tmp}/absent.npz", "none", "--data npz:.*absent.npz does not exist"),
])
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
