"""Tests for eval.py against independent references: TorchScript oracle features, scipy's sqrtm,
brute-force k-NN manifolds, closed-form resizing and per-example sampling."""

import json
import os
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from PIL import Image
from test_train import args as train_args  # train.py's tiny-preset command line

import checkpoint
import eval as ev
import mmd
import train


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Keep every cache these tests write out of the user's home directory."""
    monkeypatch.setenv("MMD_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


# ----------------------------------------------------------------------------------------------
# Fréchet distance


def _random_stats(rng: np.random.Generator, d: int) -> tuple[np.ndarray, np.ndarray]:
    a = rng.normal(size=(d, 2 * d))
    return rng.normal(size=d), a @ a.T / (2 * d)


def test_frechet_distance_of_identical_statistics_is_zero():
    mu, cov = _random_stats(np.random.default_rng(0), 64)
    assert abs(ev.frechet_distance(mu, cov, mu, cov)) < 1e-9 * np.trace(cov)


def test_frechet_distance_matches_textbook_formula_with_scipy_sqrtm():
    rng = np.random.default_rng(1)
    mu1, cov1 = _random_stats(rng, 32)
    mu2, cov2 = _random_stats(rng, 32)
    covmean = scipy.linalg.sqrtm(cov1 @ cov2).real
    textbook = np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean)
    assert ev.frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(textbook, rel=1e-9)


def test_frechet_distance_of_translation_is_squared_mean_difference():
    rng = np.random.default_rng(2)
    mu, cov = _random_stats(rng, 32)
    shift = rng.normal(size=32)
    assert ev.frechet_distance(mu, cov, mu + shift, cov) == pytest.approx(shift @ shift, rel=1e-8)


def test_feature_stats_from_samples_give_population_frechet_distance():
    """Samples of two different Gaussians: the distance between their feature_stats approaches the
    closed-form distance between the populations (scipy's sqrtm); feature_stats equals numpy's
    mean and unbiased (ddof 1) covariance."""
    rng = np.random.default_rng(3)
    (mu1, cov1), (mu2, cov2) = _random_stats(rng, 8), _random_stats(rng, 8)
    root = scipy.linalg.sqrtm(cov1 @ cov2).real
    population = np.sum((mu1 - mu2) ** 2) + np.trace(cov1 + cov2) - 2 * np.trace(root)

    def draw(mu, cov, n):
        return (mu + rng.normal(size=(n, 8)) @ np.linalg.cholesky(cov).T).astype(np.float32)

    fid = ev.frechet_distance(
        *ev.feature_stats(draw(mu1, cov1, 20000)), *ev.feature_stats(draw(mu2, cov2, 20000))
    )
    assert population > np.trace(cov1)  # mean and covariance both contribute
    assert fid == pytest.approx(population, rel=0.03)
    few = draw(mu1, cov1, 5)
    mean, cov = ev.feature_stats(few)
    few = few.astype(np.float64)
    np.testing.assert_allclose(mean, few.sum(0) / 5, rtol=1e-12)
    centred = few - few.sum(0) / 5
    np.testing.assert_allclose(cov, centred.T @ centred / 4, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="non-finite"):
        ev.feature_stats(np.full((3, 8), np.nan, np.float32))


# ----------------------------------------------------------------------------------------------
# Precision and recall


def _brute_force_precision_recall(
    real: np.ndarray, fake: np.ndarray, k: int
) -> tuple[float, float]:
    def coverage(queries, points):
        radii = [
            sorted(np.linalg.norm(p - q) for j, q in enumerate(points) if j != i)[k - 1]
            for i, p in enumerate(points)
        ]
        return np.mean(
            [any(np.linalg.norm(q - p) <= r for p, r in zip(points, radii)) for q in queries]
        )

    return coverage(fake, real), coverage(real, fake)


def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(40, 5)).astype(np.float32)
    fake = (rng.normal(size=(30, 5)) + 1.5).astype(np.float32)
    expected = _brute_force_precision_recall(real.astype(np.float64), fake.astype(np.float64), k=3)
    assert all(0.05 < e < 0.95 for e in expected)  # a case where the balls actually decide
    assert ev.precision_recall(real, fake, k=3) == pytest.approx(expected, abs=1e-12)


def test_precision_recall_identical_and_shifted_sets():
    features = np.random.default_rng(5).normal(size=(500, 64)).astype(np.float32)
    assert ev.precision_recall(features, features, k=3) == (1.0, 1.0)
    # k-NN radii here are about 8; a shift of norm 12 leaves the balls.
    precision, recall = ev.precision_recall(features, features + 1.5, k=3)
    assert precision < 0.1 and recall < 0.1


# ----------------------------------------------------------------------------------------------
# Sampling: the same images whatever the batch size and device count


CLASS_MEANS = jnp.array([-0.6, 0.0, 0.6, 0.0])  # classes 0, 1, 2 and the null class 3
DATA_STD = 0.05


def _gaussian_denoiser(z, lam, labels):
    """Exact E[x | z] for x ~ N(mean[label], DATA_STD^2 I)."""
    alpha, sigma = mmd.alpha_sigma(lam.reshape(-1, 1, 1, 1))
    m = CLASS_MEANS[labels].reshape(-1, 1, 1, 1)
    gain = alpha * DATA_STD**2 / (alpha**2 * DATA_STD**2 + sigma**2)
    return m + gain * (z - alpha * m)


SAMPLER = dict(
    num_classes=3,
    num_steps=4,
    shift=0.0,
    guidance=0.5,
    clip=True,
    gamma=0.3,
    null_label=3,
    image_shape=(4, 4, 1),
)


def _generate(batch_size: int, devices: list) -> np.ndarray:
    return ev.generate(
        _gaussian_denoiser,
        jax.random.key(7),
        num_samples=11,
        batch_size=batch_size,
        devices=devices,
        **SAMPLER,
    )


def test_generate_is_invariant_to_batch_size_and_device_count():
    devices = jax.local_devices()
    assert len(devices) == 8
    reference = _generate(8, devices)
    assert reference.shape == (11, 4, 4, 1) and reference.dtype == np.uint8
    np.testing.assert_array_equal(_generate(3, devices[:1]), reference)
    np.testing.assert_array_equal(_generate(5, devices[:4]), reference)
    # Sample i is mmd.sample on its own key fold_in(key, i) and label i % 3.
    settings = {k: v for k, v in SAMPLER.items() if k not in ("num_classes", "image_shape")}
    for i in (0, 4, 10):
        x = mmd.sample(
            _gaussian_denoiser,
            jax.random.fold_in(jax.random.key(7), i)[None],
            shape=(1, 4, 4, 1),
            labels=jnp.array([i % 3]),
            **settings,
        )
        np.testing.assert_array_equal(ev.to_uint8(np.asarray(x))[0], reference[i])
    # Labels are class balanced: pixel means follow the guided class means (the null class has mean
    # 0).
    pixel_means = reference.reshape(11, -1).mean(axis=1) / 127.5 - 1
    guided = np.asarray(CLASS_MEANS)[np.arange(11) % 3] * (1 + SAMPLER["guidance"])
    np.testing.assert_allclose(pixel_means, guided, atol=0.1)


def test_to_uint8_rounding_and_non_finite_values():
    x = np.array([-1.5, -1.0, -0.999, 0.0, 1 / 255, 0.5, 1.0, 2.0])
    np.testing.assert_array_equal(ev.to_uint8(x), [0, 0, 0, 128, 128, 191, 255, 255])
    with pytest.raises(FloatingPointError, match="non-finite"):
        ev.to_uint8(np.array([0.0, np.nan]))


# ----------------------------------------------------------------------------------------------
# Reference cache, image grid and result files


def test_reference_statistics_are_cached_by_name(tmp_path):
    rng = np.random.default_rng(6)
    features = rng.normal(size=(10, 2048)).astype(np.float32)
    calls = []
    compute = lambda: calls.append(1) or features  # noqa: E731
    first = ev.reference_statistics("toy-10", compute, protocol="p1", cache_dir=tmp_path)
    second = ev.reference_statistics(
        "toy-10", lambda: pytest.fail("cache miss"), protocol="p1", cache_dir=tmp_path
    )
    assert len(calls) == 1 and (tmp_path / "reference_toy-10.npz").exists()
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(second[1], features.astype(np.float64).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(
        second[2], np.cov(features.astype(np.float64), rowvar=False), rtol=1e-12
    )
    with pytest.raises(ValueError, match="names a file"):
        ev.reference_statistics("../escape", compute, protocol="p1", cache_dir=tmp_path)


def test_corrupt_or_mismatched_reference_cache_is_recomputed(tmp_path):
    features = np.random.default_rng(7).normal(size=(6, 4)).astype(np.float32)
    path = tmp_path / "reference_toy.npz"
    ev.reference_statistics("toy", lambda: features, protocol="p1", cache_dir=tmp_path)
    calls = []
    again = lambda: calls.append(1) or features + 1  # noqa: E731
    # Another protocol (e.g. other Inception weights): recomputed and overwritten.
    _, mu, _ = ev.reference_statistics("toy", again, protocol="p2", cache_dir=tmp_path)
    assert calls == [1] and np.allclose(mu, features.mean(axis=0) + 1)
    # A truncated file and a flipped byte (zip CRC) are never used.
    whole = path.read_bytes()
    for broken in (
        whole[: len(whole) // 2],
        whole[:200] + bytes([whole[200] ^ 0xFF]) + whole[201:],
    ):
        path.write_bytes(broken)
        ev.reference_statistics("toy", again, protocol="p2", cache_dir=tmp_path)
    assert calls == [1, 1, 1]
    assert ev.reference_statistics("toy", pytest.fail, protocol="p2", cache_dir=tmp_path)[
        0
    ].shape == (6, 4)


def test_concurrent_processes_compute_a_reference_once(tmp_path):
    script = (
        "import sys, time, numpy as np, eval as ev\n"
        "def compute():\n"
        "    open(sys.argv[1] + '/calls', 'a').write('x'); time.sleep(1.0)\n"
        "    return np.ones((3, 2), np.float32) * np.arange(3)[:, None]\n"
        "ev.reference_statistics('shared', compute, protocol='p', cache_dir=sys.argv[1])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(ev.__file__).parent), "JAX_PLATFORMS": "cpu"}
    processes = [
        subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], env=env) for _ in range(2)
    ]
    assert [p.wait(timeout=120) for p in processes] == [0, 0]
    assert (tmp_path / "calls").read_text() == "x"


def test_save_image_grid_tiles_row_major(tmp_path):
    images = (
        np.arange(5, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 3, 1), np.uint8) * 40
    )
    ev.save_image_grid(images, tmp_path / "grid.png", columns=3)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (4, 9)
    tiles = grid.reshape(2, 2, 3, 3).transpose(0, 2, 1, 3).reshape(6, 2, 3)
    np.testing.assert_array_equal(tiles[:, 0, 0], [0, 40, 80, 120, 160, 0])


def test_write_results_records_software_and_refuses_nan(tmp_path):
    record = ev.write_results(tmp_path / "r.json", {"fid": 3.5}, timings={"sampling": 1.25})
    loaded = json.loads((tmp_path / "r.json").read_text())
    assert loaded == record and loaded["fid"] == 3.5 and loaded["timings_s"] == {"sampling": 1.25}
    assert (
        loaded["software"]["jax"] == jax.__version__
        and loaded["software"]["numpy"] == np.__version__
    )
    with pytest.raises(ValueError):
        ev.write_results(tmp_path / "bad.json", {"fid": float("nan")}, timings={})
    assert not (tmp_path / "bad.json").exists()


# ----------------------------------------------------------------------------------------------
# Command line: a checkpoint from train.main, sampled and scored by eval.main


REFERENCE_SIZE = (
    16  # as many test images as the CLI tests draw samples: precision/recall use every one
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(teacher.eqx, student checkpoint, npz data) of a 2-step `tiny` teacher trained by train.main
    on random 8x8 images; the student file is train.py's checkpoint format declaring an instant
    student with k = 3."""
    root = tmp_path_factory.mktemp("tiny_run")
    rng = np.random.default_rng(0)
    npz = root / "tiny.npz"
    np.savez(
        npz,
        x=rng.integers(0, 256, (64, 8, 8, 1), dtype=np.uint8),
        y=np.arange(64) % 10,
        x_test=rng.integers(0, 256, (REFERENCE_SIZE, 8, 8, 1), dtype=np.uint8),
        y_test=np.arange(REFERENCE_SIZE) % 10,
    )
    teacher = train.main(train_args(npz, root / "teacher", "teacher", "--steps", "2"))
    model, config, meta = train.load_checkpoint(teacher)
    student = root / "student.eqx"
    student_config = train.dataclasses.replace(config, variant="instant", k=3)
    checkpoint.save(
        student,
        meta={"kind": "instant", "step": 7, "config": train.config_to_dict(student_config)},
        groups={"params": eqx.filter(model, eqx.is_inexact_array)},
    )
    return teacher, student, npz


def _eval(checkpoint, out, *extra):
    return ev.main(
        [
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(out),
            "--num-samples",
            str(REFERENCE_SIZE),
            "--batch-size",
            "8",
            *extra,
        ]
    )


def _grid(record) -> np.ndarray:
    """The samples of a result's grid (16 samples of 8x8 in 10 columns), in sample order."""
    grid = np.asarray(Image.open(record["sample_grid"]))
    assert grid.shape == (2 * 8, 10 * 8)
    return grid.reshape(2, 8, 10, 8).transpose(0, 2, 1, 3).reshape(20, 8, 8)[:REFERENCE_SIZE]


def test_cli_samples_a_teacher_with_its_settings(tiny_run, tmp_path):
    teacher, _, _ = tiny_run
    record = _eval(teacher, tmp_path, "--no-fid", "--guidance", "0.5", "--seed", "3")
    saved = json.loads(
        Path(tmp_path / Path(record["sample_grid"]).with_suffix(".json").name).read_text()
    )
    assert saved == record
    assert (
        record["checkpoint"] == str(teacher)
        and record["step"] == 2
        and record["variant"] == "teacher"
    )
    assert (
        record["steps"] == 4 and record["num_samples"] == REFERENCE_SIZE and record["seed"] == 3
    )  # teacher_k
    assert record["fid"] is None and record["precision"] is None and record["guidance"] == 0.5
    assert record["shift"] == pytest.approx(2 * np.log(64 / 8))
    assert (
        set(record["timings_s"]) == {"sampling", "total"}
        and record["software"]["jax"] == jax.__version__
    )
    # Sample i is mmd.sample on key fold_in(key(seed), i), label i % 10, guided against the null
    # label 10.
    model, _, _ = train.load_checkpoint(teacher)
    for i in (0, 13):
        x = mmd.sample(
            model,
            jax.random.fold_in(jax.random.key(3), i)[None],
            shape=(1, 8, 8, 1),
            labels=jnp.array([i % 10]),
            num_steps=4,
            shift=2 * np.log(64 / 8),
            guidance=0.5,
            null_label=10,
        )
        np.testing.assert_array_equal(_grid(record)[i], ev.to_uint8(np.asarray(x))[0, :, :, 0])


def test_cli_samples_depend_on_the_seed_only(tiny_run, tmp_path):
    teacher, _, _ = tiny_run
    record = _eval(teacher, tmp_path / "a", "--no-fid")
    assert record["network"] == "parameter average"  # the teacher run's average, exported
    first = _grid(record)
    np.testing.assert_array_equal(_grid(_eval(teacher, tmp_path / "b", "--no-fid")), first)
    np.testing.assert_array_equal(
        _grid(_eval(teacher, tmp_path / "c", "--no-fid", "--batch-size", "16")), first
    )
    assert not np.array_equal(
        _grid(_eval(teacher, tmp_path / "d", "--no-fid", "--seed", "1")), first
    )


def test_cli_student_defaults_to_its_trained_steps(tiny_run, tmp_path, capsys):
    _, student, _ = tiny_run
    record = _eval(student, tmp_path, "--no-fid")
    assert record["variant"] == "instant" and record["steps"] == 3 and record["trained_k"] == 3
    assert record["network"] == "parameters"  # the run kept no average (--student-ema 0)
    assert record["step"] == 7 and "never saw" not in capsys.readouterr().out
    assert _eval(student, tmp_path, "--no-fid", "--k", "2")["steps"] == 2
    assert "trained for k=3 steps" in capsys.readouterr().out


def _fake_features(images, **kwargs):
    """A stand-in for Inception: the pixels /255, tiled to 2048 dimensions."""
    return np.tile(
        images.reshape(len(images), -1).astype(np.float32) / 255, (1, 2048 // images[0].size)
    )


def _svd_frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """FID of two equal-size feature sets without a matrix square root: tr (C1 C2)^1/2 is the
    nuclear norm of X1^T X2 / sqrt((n1 - 1)(n2 - 1)) for centred data matrices X1, X2."""
    x1, x2 = real - real.mean(0), fake - fake.mean(0)
    n = len(real) - 1
    cross = np.linalg.svd(x1 @ x2.T / n, compute_uv=False).sum()
    means = np.sum((real.mean(0) - fake.mean(0)) ** 2)
    return float(means + (np.sum(x1**2) + np.sum(x2**2)) / n - 2 * cross)


def test_cli_fid_and_precision_recall_against_cached_reference(
    tiny_run, tmp_path, monkeypatch, capsys
):
    teacher, _, npz = tiny_run
    calls = []
    monkeypatch.setattr(ev.inception, "load_inception_weights", lambda *a, **k: {})
    monkeypatch.setattr(ev.inception, "inception_params", lambda weights: {})
    monkeypatch.setattr(
        ev,
        "inception_features",
        lambda images, **kw: calls.append(len(images)) or _fake_features(images),
    )
    record = _eval(teacher, tmp_path, "--save-samples")
    assert calls == [REFERENCE_SIZE, REFERENCE_SIZE]  # reference, then samples
    with np.load(npz) as f:
        real = _fake_features(f["x_test"]).astype(np.float64)
    with np.load(
        Path(record["sample_grid"]).with_name(Path(record["sample_grid"]).stem + "_samples.npz")
    ) as f:
        samples = f["images"]
        np.testing.assert_array_equal(f["labels"], np.arange(REFERENCE_SIZE) % 10)
    np.testing.assert_array_equal(samples[:, :, :, 0], _grid(record))
    fake = _fake_features(samples).astype(np.float64)
    assert record["fid"] == pytest.approx(_svd_frechet_distance(real, fake), rel=1e-6)
    assert (
        f"FID {record['fid']:.3f} ({REFERENCE_SIZE} samples vs {REFERENCE_SIZE} npz:"
        in capsys.readouterr().out
    )
    assert (record["precision"], record["recall"]) == pytest.approx(
        _brute_force_precision_recall(real, fake, k=3)
    )
    assert (
        record["num_samples"] == REFERENCE_SIZE
        and record["reference"]["num_images"] == REFERENCE_SIZE
    )
    assert record["reference"]["split"] == "test" and record["reference"]["source"] == f"npz:{npz}"
    assert set(record["timings_s"]) >= {"sampling", "features", "reference_features", "total"}
    # The reference features are cached under a name that says what they are (reused: see
    # reference_statistics).
    pattern = f"reference_inception-tiny.npz-test-8px-{REFERENCE_SIZE}-*.npz"
    (cache,) = Path(os.environ["MMD_CACHE_DIR"]).glob(pattern)
    assert record["reference"]["cache"] == cache.name
    with np.load(cache) as f:
        np.testing.assert_array_equal(f["features"], real.astype(np.float32))
    # A second evaluation reads the reference from the cache: Inception runs on the samples only.
    assert _eval(teacher, tmp_path / "again")["fid"] == pytest.approx(record["fid"], rel=1e-12)
    assert calls == [REFERENCE_SIZE] * 3
    # --reference-count scores against the split's first N images: a reference of its own.
    fewer = _eval(teacher, tmp_path / "fewer", "--reference-count", "5")
    assert calls == [REFERENCE_SIZE] * 3 + [5, REFERENCE_SIZE]
    assert fewer["reference"]["num_images"] == 5 and "_ref5" in fewer["sample_grid"]
    with np.load(
        next(Path(os.environ["MMD_CACHE_DIR"]).glob("reference_inception-*-5-*.npz"))
    ) as f:
        np.testing.assert_array_equal(f["features"], real[:5].astype(np.float32))


def test_cli_errors(tiny_run, tmp_path):
    teacher, _, _ = tiny_run
    with pytest.raises(FileNotFoundError, match="missing.eqx does not exist"):
        _eval(tmp_path / "missing.eqx", tmp_path)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a checkpoint written by train.py"):
        _eval(tmp_path / "notes.txt", tmp_path)
    with pytest.raises(ValueError, match="--num-samples must be at least 2"):
        ev.main(["--checkpoint", str(teacher), "--num-samples", "1"])
    with pytest.raises(ValueError, match="precision/recall with k=3 need more"):
        ev.main(["--checkpoint", str(teacher), "--num-samples", "3"])
    rgb = tmp_path / "rgb.npz"
    np.savez(rgb, x=np.zeros((4, 16, 16, 3), np.uint8), x_test=np.zeros((4, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match=r"shape \(8, 8, 3\), the model makes \(8, 8, 1\)"):
        _eval(teacher, tmp_path, "--reference", f"npz:{rgb}")
    assert not list(tmp_path.glob("*.png"))  # every check fails before sampling


RESULTS = [
    {
        "checkpoint": "runs/a|b/ckpt_00000010.eqx",
        "step": 10,
        "variant": "instant",
        "steps": 8,
        "guidance": 0.0,
        "gamma": 0.0,
        "num_samples": 10000,
        "fid": 3.14159,
        "precision": 0.81234,
        "recall": 0.5,
        "timings_s": {"sampling": 12.34},
    },
    {
        "checkpoint": "teacher.eqx",
        "step": 3000,
        "variant": "teacher",
        "steps": 64,
        "guidance": 1.5,
        "gamma": 0.3,
        "num_samples": 16,
        "fid": None,
        "precision": None,
        "recall": None,
        "timings_s": {"sampling": 100.0},
    },
]


def test_results_table_is_markdown_with_one_row_per_result():
    assert ev.results_table(RESULTS).splitlines() == [
        "| checkpoint | variant | steps | guidance | gamma | num samples | FID | precision | "
        "recall | sampling (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        "| runs/a\\|b/ckpt_00000010.eqx @ 10 | instant | 8 | 0 | 0 | 10000 | 3.14 | 0.812 | 0.500 "
        "| 12.3 |",
        "| teacher.eqx @ 3000 | teacher | 64 | 1.5 | 0.3 | 16 | — | — | — | 100.0 |",
    ]


def test_table_command_reads_result_files(tmp_path, capsys):
    paths = []
    for i, result in enumerate(RESULTS):
        paths.append(str(tmp_path / f"r{i}.json"))
        Path(paths[-1]).write_text(json.dumps(result))
    assert ev.main(["table", *paths]) == ev.results_table(RESULTS)
    assert capsys.readouterr().out == ev.results_table(RESULTS) + "\n"
    Path(paths[0]).write_text(json.dumps({"fid": 1.0}))
    with pytest.raises(ValueError, match="lacks checkpoint, step"):
        ev.main(["table", *paths])


def test_help_marks_the_checkpoint_required_without_a_default():
    text = " ".join(ev.parser().format_help().split())
    assert (
        "--checkpoint CHECKPOINT a ckpt_*.eqx or teacher.eqx written by train.py (required)" in text
    )
    assert "(required) (default" not in text and "--seed SEED" in text


def test_cli_without_a_checkpoint_is_refused_by_argparse(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ev.main(["--num-samples", "4"])
    assert exit_info.value.code == 2
    assert "the following arguments are required: --checkpoint" in capsys.readouterr().err
