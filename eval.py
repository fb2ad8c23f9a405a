"""Evaluation: reproducible sampling, FID, precision and recall, and MNIST's in-domain metrics.

The protocol behind every number this file reports:

- **Samples.** Sample `i` (global index, 0-based) uses the key `fold_in(key, i)` and the label
  `i % num_classes`, so the images do not depend on the batch size or the number of devices. Pixels
  map from [-1, 1] to uint8 as `clip(floor(127.5 x + 128), 0, 255)`, i.e. `127.5 (x + 1)` rounded
  half up (EDM's convention).
- **Inception.** inception.py's port of the TF-FID Inception-v3 (pool3, 2048-d); its docstring gives
  the weights, the input scaling and the resize (`inception.FEATURE_PROTOCOL` names them).
- **FID.** Mean and covariance (`ddof=1`) in float64;
  `|mu1 - mu2|^2 + tr C1 + tr C2 - 2 tr (C1^1/2 C2 C1^1/2)^1/2`, both square roots by symmetric
  eigendecompositions with negative round-off eigenvalues clipped to 0.
- **Precision/recall.** Kynkäänniemi et al. 2019, k-NN balls in Inception feature space (k = 3),
  between the samples and an equally large fixed random subset of the reference (all of it if it
  is smaller).
- **MNIST metrics** (models of 32x32x1 MNIST digits): `fd_mnist`, the same Fréchet distance in the
  64-d penultimate features of mnist_classifier.py's LeNet (shipped weights), against the reference
  split; `label_accuracy`, the fraction of class-conditional samples the classifier labels as the
  digit they were asked for. Seconds on a CPU where FID takes minutes; for sweeps, `--no-fid`.
- **Reference.** A split of a data.py source (default: the checkpoint's own data, test split; for
  MNIST its 10k test digits) at the model's resolution. Its statistics are computed once and cached
  (`reference_statistics`) under a name holding the feature extractor, source, split, count and a
  sha256 of the pixels and the extractor's protocol (for Inception: its weights' digest and resize).

Command line (options are generated from `EvalConfig`; `--help` lists them with their costs):

    python eval.py --checkpoint runs/mnist-instant/checkpoints/ckpt_00001000.eqx  # its k steps
    python eval.py --checkpoint checkpoints/mnist_teacher.eqx --k 256 --guidance 1  # teacher
    python eval.py --checkpoint CKPT --no-fid --num-samples 2000  # fd_mnist, label accuracy only
    python eval.py table runs/*/checkpoints/eval/*.json           # Markdown table of results
    python eval.py train-classifier [--seed 0] [--epochs 8]  # remakes the shipped classifier

writes `<stem>.png` (the first 100 samples, one class per column when there are at most 16) and
`<stem>.json` into `--out` (default: `eval/` beside the checkpoint), `<stem>` naming the checkpoint
and every sampling setting. The JSON holds FID, precision, recall, fd_mnist, label_accuracy,
`num_samples` (FID is biased upwards at small counts: compare numbers with the same count), the
reference (source, split, image count, cache files), the sampler settings (steps, guidance, clip,
gamma, shift, seed, batch size), the checkpoint path, step, variant and training configuration,
timings in seconds and software versions. A student samples with its trained k unless `--k` says
otherwise; a teacher with its run's `teacher_k` (64 for MNIST).
"""

import argparse
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import math
import os
import platform
import re
import sys
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jaxtyping import Array, Bool, Float, Float32, Float64, Int, PRNGKeyArray, Shaped, UInt8
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from PIL import Image
from tqdm import tqdm

import checkpoint
import data
import inception
import mmd
import mnist_classifier
import options
import uvit
from mnist_classifier import mnist_classify, mnist_features

# ----------------------------------------------------------------------------------------------
# Sampling: images and 2-D points from `mmd.sample`; image grids and figures.


def to_uint8(x: Float[np.ndarray, "*s"]) -> UInt8[np.ndarray, "*s"]:
    """[-1, 1] -> {0..255} as `clip(floor(127.5 x + 128), 0, 255)` in float64 (EDM's rounding)."""
    if not np.all(np.isfinite(x)):
        raise FloatingPointError(
            f"{np.size(x) - np.isfinite(x).sum()} non-finite sample values: the model "
            "or sampler diverged (check the checkpoint, guidance and clipping)"
        )
    return np.clip(np.floor(127.5 * x.astype(np.float64) + 128.0), 0, 255).astype(np.uint8)


@eqx.filter_jit
def _sample_batch(
    denoiser: Any, keys: mmd.Keys, labels: Int[Array, " b"], settings: dict[str, Any]
) -> Float[Array, "b *dims"]:
    """`mmd.sample` on one sharded batch; `settings` (Python scalars and the shape) are static."""
    return mmd.sample(denoiser, keys, labels=labels, **settings)


def generate(
    denoiser: Callable,
    key: PRNGKeyArray,
    *,
    num_samples: int,
    batch_size: int,
    num_classes: int,
    num_steps: int,
    shift: float,
    guidance: float,
    clip: bool,
    gamma: float,
    null_label: int | None = None,
    image_shape: tuple[int, int, int],
    devices: Sequence[jax.Device] | None = None,
    progress: str | None = None,
) -> UInt8[np.ndarray, "n h w c"]:
    """`num_samples` uint8 images from `mmd.sample`, identical for any batch size and device count.

    Sample `i` uses the key `fold_in(key, i)` and the label `i % num_classes` (class-balanced;
    `num_classes=0` means an unconditional model and every label is 0). The sampler settings go to
    `mmd.sample` unchanged. Batches are split over `devices` (default: all local devices). With a
    network denoiser, bit-identity across per-device batch sizes also needs kernels whose
    per-example results do not depend on the batch size; XLA's usually do, and a change is a
    last-bit float effect.
    """
    if num_samples < 1 or batch_size < 1 or num_classes < 0:
        raise ValueError(
            f"need num_samples >= 1, batch_size >= 1, num_classes >= 0; got "
            f"{num_samples}, {batch_size}, {num_classes}"
        )
    mesh = mmd.data_mesh(list(devices or jax.local_devices()))
    denoiser = data.replicate(denoiser, mesh)
    fold = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(None, 0)))

    def make_inputs(indices: Int[np.ndarray, " b"]) -> tuple[mmd.Keys, Int[Array, " b"]]:
        labels = indices % num_classes if num_classes else np.zeros_like(indices)
        return fold(key, jnp.asarray(indices, jnp.uint32)), jnp.asarray(labels, jnp.int32)

    def run(keys: mmd.Keys, labels: Int[Array, " b"]) -> Float[Array, "b h w c"]:
        settings = dict(
            shape=(labels.shape[0], *image_shape),
            num_steps=num_steps,
            shift=shift,
            guidance=guidance,
            clip=clip,
            gamma=gamma,
            null_label=null_label,
        )
        return _sample_batch(denoiser, keys, labels, settings)

    samples = data.map_batches(
        run, make_inputs, num=num_samples, batch_size=batch_size, mesh=mesh, progress=progress
    )
    return to_uint8(samples)


def tile(
    images: UInt8[np.ndarray, "n h w c"], *, columns: int | None = None
) -> UInt8[np.ndarray, "H W c"]:
    """Images row-major in one array (`columns` default: ceil(sqrt(n))), empty cells black."""
    if images.shape[-1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels (NHWC), got shape {images.shape}")
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = -(-n // columns)
    grid = np.zeros((rows * columns, h, w, c), np.uint8)
    grid[:n] = images
    grid = grid.reshape(rows, columns, h, w, c).transpose(0, 2, 1, 3, 4)
    return grid.reshape(rows * h, columns * w, c)


def save_image_grid(
    images: UInt8[np.ndarray, "n h w c"], path: str | os.PathLike, *, columns: int | None = None
) -> None:
    """Tile images row-major into one PNG, pixel for pixel (`tile`), written atomically."""
    grid = tile(images, columns=columns)
    picture = Image.fromarray(grid[:, :, 0] if grid.shape[-1] == 1 else grid)
    with data.atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")


def save_figure(fig: Figure, path: str | os.PathLike, *, dpi: int) -> None:
    """Lay out a matplotlib figure and write it as PNG, atomically."""
    fig.tight_layout()
    with data.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


def save_titled_grids(
    panels: Sequence[tuple[str, UInt8[np.ndarray, "n h w c"]]],
    path: Path,
    *,
    title: str,
    columns: int | None,
) -> None:
    """Image grids side by side, each under its own title, and an overall title; PNG, atomically."""
    height, width = tile(panels[0][1], columns=columns).shape[:2]
    fig = Figure(figsize=(5.0 * len(panels), 5.0 * height / width + 0.9))
    for ax, (name, images) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        grid = tile(images, columns=columns)
        ax.imshow(
            grid[:, :, 0] if grid.shape[-1] == 1 else grid,
            cmap="gray",
            vmin=0,
            vmax=255,
            interpolation="nearest",
        )
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path, dpi=100)


def energy_distance(a: Float[np.ndarray, "n d"], b: Float[np.ndarray, "m d"]) -> float:
    """Energy distance `2 E|a-b| - E|a-a'| - E|b-b'|` (Szekely & Rizzo; the V-statistic, pairs with
    themselves included), in float64: 0 for equal samples, > 0 in expectation when the laws differ;
    in the units of the points."""

    def mean_distance(x: np.ndarray, y: np.ndarray) -> float:
        total = 0.0
        for i in range(0, len(x), 2048):  # row blocks: 20,000 points stay within 330 MB
            rows = x[i : i + 2048]
            squared = (rows * rows).sum(1)[:, None] + (y * y).sum(1)[None] - 2 * rows @ y.T
            total += float(np.sqrt(np.maximum(squared, 0.0)).sum())
        return total / (len(x) * len(y))

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return 2 * mean_distance(a, b) - mean_distance(a, a) - mean_distance(b, b)


def draw_points(
    model: uvit.MLPDenoiser,
    key: PRNGKeyArray,
    *,
    dim: int,
    num_classes: int,
    shift: float,
    num_steps: int,
    num_points: int,
) -> Float[np.ndarray, "n d"]:
    """`num_points` unguided `num_steps`-step samples of a 2-D model from `key`, labels `i %
    num_classes` (the rings data's classes are equally likely); raises FloatingPointError for
    non-finite samples."""
    labels = jnp.arange(num_points, dtype=jnp.int32) % max(num_classes, 1)
    settings = dict(
        shape=(num_points, dim),
        num_steps=num_steps,
        shift=shift,
        guidance=0.0,
        clip=False,
        gamma=0.0,
        null_label=num_classes,
    )
    keys = jax.random.split(key, num_points)
    points = np.asarray(_sample_batch(model, keys, labels, settings))
    if not np.all(np.isfinite(points)):
        raise FloatingPointError("non-finite samples: the model or sampler diverged")
    return points


NUM_POINTS = 2000  # points per scatter plot and energy distance of a 2-D run's figure


def points_figure(
    samples: dict[str, Float[np.ndarray, "n 2"]],
    *,
    data_source: str,
    seed: int,
    path: Path | None,
    title: str,
    echo: Callable[[str], None] = print,
) -> dict[str, float]:
    """Energy distances of 2-D point sets to `NUM_POINTS` fresh points of `data_source` (its test
    split), echoed as lines, and (with `path`) their scatter plots beside the fresh data's, each
    titled with its distance; a Gaussian of the data's mean and covariance is the yardstick.
    Returns the distances by name."""
    test = data.load(data_source, split="test").images  # fresh: not the training split
    fresh, reference = test[:NUM_POINTS], test[NUM_POINTS : 2 * NUM_POINTS]
    rng = np.random.default_rng(seed)
    gaussian = rng.multivariate_normal(fresh.mean(0), np.cov(fresh.T), size=NUM_POINTS)
    panels = {"data (fresh)": fresh, **samples}
    distances = {name: energy_distance(x, reference) for name, x in panels.items()}
    scale = energy_distance(gaussian, reference)
    yardstick = f"a Gaussian with the data's mean and covariance: {scale:.4f}"
    echo(f"Energy distance to {NUM_POINTS} fresh points ({NUM_POINTS} samples each; {yardstick}):")
    for name, value in distances.items():
        echo(f"  {name:32s} {value:.4f}")
    if path is not None:
        fig = Figure(figsize=(16, 4.6))
        for ax, (name, x) in zip(fig.subplots(1, len(panels)), panels.items()):
            ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.5)
            ax.set(xlim=(-1.2, 1.2), ylim=(-1.2, 1.2), aspect="equal")
            ax.set_title(f"{name}\nenergy distance {distances[name]:.4f}", fontsize=10)
        fig.suptitle(f"{title}\n(energy distance of {yardstick})", fontsize=11)
        save_figure(fig, path, dpi=80)
    return distances


def grid_columns(num_classes: int) -> int | None:
    """Columns of a sample grid: one class per column when there are 2 to 16 classes."""
    return num_classes if 1 < num_classes <= 16 else None


PANELS = {
    "loss": "teacher loss (v-prediction, weighted MSE)",
    "aux_loss": "auxiliary loss L(phi) (auxiliary updates)",
    "moment_gap": "moment gap: mean w ||x_aux - x_teacher||^2",
    "grad_norm": "gradient norm (before clipping to 1)",
    "lr": "learning rate",
}


def plot_losses(metrics_path: Path, out: Path, *, variant: str) -> None:
    """loss.png from metrics.jsonl: one titled panel per quantity a reader of the paper knows
    (instant: the monitor G1^T Lambda G2; alternating: the moment gap and auxiliary loss; teacher:
    its loss), each as single-step values (faint) and their running mean, on a scale where the
    mean's trend shows; the gradient norm and learning rate last. The instant variant's surrogate
    (a number whose gradient is L_2b's) is not shown: its value means nothing."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    monitor = {"loss": "instant monitor G1ᵀ Λ G2 (Algorithm 3)"}
    labels = PANELS | (monitor if variant == "instant" else {})
    names = [n for n in labels if any(n in r for r in records)]
    if not names:
        return
    fig = Figure(figsize=(7.5, 2.3 * len(names)))
    axes = fig.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0]
    for ax, name in zip(axes, names):
        _plot_panel(
            ax,
            np.array([r["step"] for r in records if name in r]),
            np.array([r[name] for r in records if name in r], dtype=np.float64),
            name=name,
            linear=variant == "instant" and name == "loss",
        )
        ax.set_title(labels[name], fontsize=9, loc="left")
    axes[-1].set_xlabel("training step")
    fig.suptitle(f"{variant} run {metrics_path.parent}", fontsize=10)
    save_figure(fig, out, dpi=100)


def _plot_panel(ax: Any, steps: np.ndarray, values: np.ndarray, *, name: str, linear: bool) -> None:
    """Faint single-step values and their running mean; a log scale for positive values unless
    `linear` (the instant monitor, whose one-step values turn negative), with y limits that fit
    the running mean, not the noise."""
    if name == "lr":
        ax.plot(steps, values, ".", ms=2)
        return
    width = max(1, len(values) // 20)
    mean = np.convolve(values, np.ones(width) / width, mode="valid")
    ax.plot(steps, values, ".", ms=2, alpha=0.3, label="single step")
    ax.plot(steps[width - 1 :], mean, lw=1.5, label=f"running mean of {width} steps")
    positive = np.all(values[np.isfinite(values)] > 0) and not linear
    ax.set_yscale("log" if positive else "linear")
    ax.yaxis.set_minor_formatter(NullFormatter())  # labels at powers of 10 only: no overlaps
    finite = mean[np.isfinite(mean)]
    if finite.size and not positive:  # signed one-step estimates: zoom on the running mean
        low, high = finite.min(), finite.max()
        pad = 0.1 * (high - low) or abs(high) or 1.0
        ax.set_ylim(low - pad, high + pad)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")


# ----------------------------------------------------------------------------------------------
# Inception features, batches sharded over devices.


def inception_features(
    images: Shaped[np.ndarray, "*shape"],
    *,
    batch_size: int = 200,
    params: inception.Params | None = None,
    devices: Sequence[jax.Device] | None = None,
    progress: str | None = None,
) -> Float32[np.ndarray, "n 2048"]:
    """Pool3 features of uint8 NHWC images `(n, h, w, 1|3)` of any size (resized as inception.py
    says); anything else raises a ValueError naming that layout.

    `params` defaults to `inception.inception_params(inception.load_inception_weights())`; batches
    are split over `devices` (default: all local devices); `progress` is a progress-bar label (None:
    no bar).
    """
    data.check_uint8_images(images, where="inception_features")
    if images.shape[0] == 0:
        return np.zeros((0, inception.FEATURE_DIM), np.float32)
    mesh = mmd.data_mesh(list(devices or jax.local_devices()))
    if params is None:
        params = inception.inception_params(inception.load_inception_weights())
    params = data.replicate(params, mesh)
    features = data.map_batches(
        lambda x: inception.inception_batch(params, x),
        lambda indices: (inception.resize_for_inception(images[indices]),),
        num=images.shape[0],
        batch_size=batch_size,
        mesh=mesh,
        progress=progress,
    )
    return features.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Statistics: FID, cached reference statistics, precision and recall.


def feature_stats(
    features: Float[np.ndarray, "n d"],
) -> tuple[Float64[np.ndarray, " d"], Float64[np.ndarray, "d d"]]:
    """Mean and covariance (`ddof=1`) of features, in float64."""
    if features.shape[0] < 2 or not np.all(np.isfinite(features)):
        raise ValueError(
            f"need at least 2 finite feature rows, got shape {features.shape} "
            f"with {np.size(features) - np.isfinite(features).sum()} non-finite values"
        )
    x = features.astype(np.float64)
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(
    mu1: Float[np.ndarray, " d"],
    cov1: Float[np.ndarray, "d d"],
    mu2: Float[np.ndarray, " d"],
    cov2: Float[np.ndarray, "d d"],
) -> float:
    """Fréchet distance between Gaussians, float64, with symmetric matrix square roots.

    `tr (C1 C2)^1/2 = tr (S C2 S)^1/2` with `S = C1^1/2`; both roots come from `eigh` of symmetric
    matrices, negative round-off eigenvalues clipped to 0, so the result is real and stable even
    for singular covariances (fewer samples than dimensions).
    """
    mu1, cov1, mu2, cov2 = (np.asarray(a, dtype=np.float64) for a in (mu1, cov1, mu2, cov2))
    d = mu1.shape[0]
    if mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(
            f"statistics disagree in dimension: mu1 {mu1.shape}, cov1 {cov1.shape}, "
            f"mu2 {mu2.shape}, cov2 {cov2.shape} (were both computed from the same features?)"
        )
    if not all(np.all(np.isfinite(a)) for a in (mu1, cov1, mu2, cov2)):
        raise ValueError(
            "frechet_distance got non-finite statistics: check the features they came from"
        )
    eigenvalues, eigenvectors = np.linalg.eigh((cov1 + cov1.T) / 2)
    sqrt1 = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T
    product = sqrt1 @ cov2 @ sqrt1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt)


Statistics = tuple[
    Float32[np.ndarray, "n d"], Float64[np.ndarray, " d"], Float64[np.ndarray, "d d"]
]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive `fcntl` lock on `path` (created if missing), held for the block: processes that
    need the same cache wait for the first one's result instead of computing it again."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_statistics(path: Path, protocol: str) -> Statistics | None:
    """The cached (features, mu, cov) if `path` holds them under `protocol`; None if missing,
    unreadable, truncated (zip CRC) or written under another protocol."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["protocol"]) != protocol:
                return None
            features, mu, cov = f["features"], f["mu"], f["cov"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    d = features.shape[-1]
    if features.ndim != 2 or mu.shape != (d,) or cov.shape != (d, d):
        return None
    return features, mu, cov


def reference_statistics(
    name: str,
    compute_features: Callable[[], Float[np.ndarray, "n d"]],
    *,
    protocol: str,
    cache_dir: str | os.PathLike | None = None,
) -> Statistics:
    """Features, mean and covariance of a reference set, computed once and cached on disk.

    The cache is `reference_<name>.npz` in `inception.resolve_cache_dir(cache_dir)`, written
    atomically (`data.atomic_path`); `compute_features` is called only on a miss. `name` must
    identify the images and the feature extractor exactly; a file that is unreadable or was written
    under another `protocol` is recomputed, never used. A lock file beside it makes concurrent
    processes compute it only once.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ValueError(
            f"reference name {name!r} must be letters, digits, '.', '_' or '-' (it names a file)"
        )
    path = inception.resolve_cache_dir(cache_dir) / f"reference_{name}.npz"
    cached = _read_statistics(path, protocol)
    if cached is not None:
        return cached
    with _file_lock(path.with_suffix(".lock")):
        cached = _read_statistics(path, protocol)  # another process may have written it meanwhile
        if cached is not None:
            return cached
        features = compute_features()
        mu, cov = feature_stats(features)
        with data.atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, features=features, mu=mu, cov=cov, protocol=np.array(protocol))
    return features, mu, cov


# ----------------------------------------------------------------------------------------------
# MNIST's in-domain metrics (mnist_classifier.py's LeNet).


def fd_mnist(
    images: UInt8[np.ndarray, "n h w c"], reference: UInt8[np.ndarray, "m h w c"]
) -> float:
    """Fréchet distance between the classifier's 64-d features of two uint8 digit sets (>= 2
    each)."""
    return frechet_distance(
        *feature_stats(mnist_features(images)), *feature_stats(mnist_features(reference))
    )


def label_accuracy(images: UInt8[np.ndarray, "n h w c"], labels: Int[np.ndarray, " n"]) -> float:
    """Fraction of `images` that the classifier labels as `labels` (the digits they were asked
    for)."""
    labels = np.asarray(labels)
    if labels.shape != images.shape[:1]:
        raise ValueError(
            f"label_accuracy needs one label per image, got {labels.shape} for {images.shape}"
        )
    return float(np.mean(mnist_classify(images) == labels))


def mnist_protocol() -> str:
    """What the classifier's features depend on: its weights file's sha256 (cache key of
    references)."""
    path = mnist_classifier.WEIGHTS
    mnist_classifier.load_classifier()  # a clear error if the file is missing or unreadable
    return f"mnist-classifier LeNet pool2-hidden64 | weights {data.sha256_file(path)[:16]}"


@jax.jit
def _squared_distances(a: Float[Array, "m d"], b: Float[Array, "n d"]) -> Float[Array, "m n"]:
    cross = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(
        jnp.sum(a * a, axis=1)[:, None] + jnp.sum(b * b, axis=1)[None, :] - 2.0 * cross, 0.0
    )


@functools.partial(jax.jit, static_argnames="k")
def _kth_neighbour(
    a: Float[Array, "m d"], points: Float[Array, "n d"], *, k: int
) -> Float[Array, " m"]:
    """Squared distance from each row of `a` (a member of `points`) to its k-th nearest other
    point."""
    return -jax.lax.top_k(-_squared_distances(a, points), k + 1)[0][:, k]


@jax.jit
def _inside_any_ball(
    a: Float[Array, "m d"], centres: Float[Array, "n d"], radii: Float[Array, " n"]
) -> Bool[Array, " m"]:
    return jnp.any(_squared_distances(a, centres) <= radii[None, :], axis=1)


def _by_rows(
    fn: Callable[[Array], Array], rows: Float32[np.ndarray, "m d"], columns: int
) -> np.ndarray:
    """`fn` over fixed-size row blocks (padded), each block against `columns` points: ~128 MiB at a
    time."""
    block = max(1, min(rows.shape[0], (1 << 25) // columns))
    padded = np.concatenate([rows, np.zeros((-rows.shape[0] % block, rows.shape[1]), rows.dtype)])
    return np.concatenate(
        [
            np.asarray(fn(jnp.asarray(padded[i : i + block])))
            for i in range(0, padded.shape[0], block)
        ]
    )[: rows.shape[0]]


def _manifold_coverage(
    queries: Float32[np.ndarray, "m d"], points: Float32[np.ndarray, "n d"], k: int
) -> float:
    """Fraction of `queries` inside the union of k-NN balls around `points`."""
    on_device = jnp.asarray(points)
    radii = jnp.asarray(
        _by_rows(lambda a: _kth_neighbour(a, on_device, k=k), points, points.shape[0])
    )
    inside = _by_rows(lambda a: _inside_any_ball(a, on_device, radii), queries, points.shape[0])
    return float(inside.mean())


def precision_recall(
    features_real: Float[np.ndarray, "n d"], features_fake: Float[np.ndarray, "m d"], *, k: int = 3
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    Each set's manifold is the union of balls around its points, radius = distance to the k-th
    nearest other point of the same set. Precision: fraction of fake points inside the real
    manifold; recall: fraction of real points inside the fake manifold.
    """
    if min(features_real.shape[0], features_fake.shape[0]) <= k:
        raise ValueError(
            f"need more than k={k} points per set, got {features_real.shape[0]} real "
            f"and {features_fake.shape[0]} fake"
        )
    if features_real.shape[1] != features_fake.shape[1]:
        raise ValueError(
            f"feature dimensions differ: {features_real.shape} vs {features_fake.shape}"
        )
    if not (np.all(np.isfinite(features_real)) and np.all(np.isfinite(features_fake))):
        raise ValueError(
            "precision_recall got non-finite features: check the images they came from"
        )
    # Distances are translation invariant; centring reduces cancellation in |a|^2 + |b|^2 - 2ab.
    centre = features_real.astype(np.float64).mean(axis=0)
    real = (features_real - centre).astype(np.float32)
    fake = (features_fake - centre).astype(np.float32)
    return _manifold_coverage(fake, real, k), _manifold_coverage(real, fake, k)


# ----------------------------------------------------------------------------------------------
# Result files.


def software_versions() -> dict[str, str]:
    """Versions of Python and the numerical stack, and the devices, for result files."""
    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "equinox": eqx.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "devices": f"{jax.local_device_count()} x {jax.local_devices()[0].device_kind}",
    }


def write_results(
    path: str | os.PathLike, results: dict[str, Any], *, timings: dict[str, float]
) -> dict[str, Any]:
    """Write `results` plus timings (seconds), software versions and a UTC time stamp as JSON,
    atomically.

    Non-finite numbers raise (JSON has no NaN) rather than writing an unreadable file.
    """
    record = {
        **results,
        "timings_s": timings,
        "software": software_versions(),
        "written_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    text = json.dumps(record, indent=2, allow_nan=False) + "\n"
    with data.atomic_path(path) as tmp:
        Path(tmp).write_text(text)
    return record


# ----------------------------------------------------------------------------------------------
# Command line: evaluate a checkpoint, tabulate results.

GRID_SAMPLES = 100
# Inception-v3 images/s per CPU core (`python -m experiments inception`: 8-20 on 2 cores).
CPU_FEATURE_RATE = 4.0


_field = options.field


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Every setting of `evaluate`; the command line has one option per field."""

    checkpoint: str | None = _field(
        None, "a ckpt_*.eqx or teacher.eqx written by train.py", required=True
    )
    k: int | None = _field(
        None,
        "sampling steps (none: a student's trained k; a teacher's teacher_k, 64 for mnist)",
    )
    guidance: float = _field(0.0, "classifier-free guidance weight w")
    clip: bool = _field(False, "clip the guided prediction to [-1, 1]")
    gamma: float = _field(0.0, "sampling-noise interpolation gamma of the ancestral step")
    num_samples: int = _field(
        10_000, "samples to generate and score (FID is biased upwards at small counts)"
    )
    seed: int = _field(0, "sample i uses fold_in(key(seed), i)")
    batch_size: int = _field(
        200,
        "global batch of sampling and Inception, split over all local devices; "
        "results do not depend on it",
    )
    reference: str | None = _field(
        None, "reference data source as in train.py's --data (none: the checkpoint's own)"
    )
    reference_split: str = _field(
        "test",
        "split of the reference source (MNIST's test split: 10k digits)",
        choices=("train", "test"),
    )
    reference_count: int | None = _field(
        None,
        "score against the first N images of the reference split (none: all); cheaper, but "
        "numbers are comparable only at equal N",
    )
    out: str | None = _field(None, "output directory (none: eval/ next to the checkpoint)")
    precision_recall_k: int = _field(3, "k of the k-NN manifolds of precision and recall")
    fid: bool = _field(
        True, "Inception FID, precision and recall (--no-fid: skip Inception entirely)"
    )
    mnist_metrics: bool = _field(
        True, "fd_mnist and label_accuracy for models of 32x32x1 MNIST digits"
    )
    save_samples: bool = _field(False, "also write every sample (uint8) and label as .npz")

    def __post_init__(self):
        if self.num_samples < 2:
            raise ValueError(
                f"--num-samples must be at least 2 (FID needs a covariance), got {self.num_samples}"
            )
        if (
            self.batch_size < 1
            or (self.k is not None and self.k < 1)
            or self.precision_recall_k < 1
        ):
            raise ValueError(
                f"--batch-size, --k and --precision-recall-k must be >= 1, got {self.batch_size}, "
                f"{self.k}, {self.precision_recall_k}"
            )
        if not all(math.isfinite(v) for v in (self.guidance, self.gamma)):
            raise ValueError(
                f"--guidance and --gamma must be finite, got {self.guidance}, {self.gamma}"
            )
        if self.reference_count is not None and self.reference_count < 2:
            raise ValueError(f"--reference-count must be at least 2, got {self.reference_count}")
        if self.reference_split not in ("train", "test"):
            raise ValueError(
                f"--reference-split must be train or test, got {self.reference_split!r}"
            )


def load_model(path: str | os.PathLike) -> tuple[Callable, dict[str, Any], dict[str, Any]]:
    """`(denoiser, configuration, meta)` of a train.py checkpoint (`checkpoint.load_network`: the
    configuration as its config.json holds it), with messages that say what to pass instead."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("**/*.eqx"))
        hint = f" (it holds {found[-1]})" if found else ""
        raise FileNotFoundError(
            f"--checkpoint {path} is a directory{hint}: pass one checkpoint file, a "
            "ckpt_*.eqx or teacher.eqx written by train.py"
        )
    if not path.exists():
        raise FileNotFoundError(
            f"--checkpoint {path} does not exist: pass a ckpt_*.eqx or teacher.eqx "
            "written by train.py (runs/<preset>-<variant>/checkpoints/, checkpoints/)"
        )
    return checkpoint.load_network(path)


def reference_images(
    source: str, *, split: str, model_shape: tuple[int, int, int], count: int | None = None
) -> tuple[UInt8[np.ndarray, "n h w c"], str]:
    """uint8 images of a data split at the model's resolution (the first `count`, or all), and a
    name identifying them exactly.

    Sources are data.py's; sizes other than the model's are box-downsampled by data.py (as in
    training). The name holds the source, split, resolution, count and a sha256 of the pixels (16
    hex digits).
    """
    dataset = data.load(source, split=split, resolution=model_shape[0])
    images = dataset.images[:count]
    if images.ndim != 4 or images.shape[1:] != model_shape:
        raise ValueError(
            f"reference {source} ({split}) holds images of shape {images.shape[1:]}, the model "
            f"makes {model_shape}: pass --reference with a data source of the model's image shape"
        )
    if images.dtype != np.uint8:
        images = to_uint8(images)  # float [-1, 1] sources, quantised like the samples
    digest = hashlib.sha256(np.ascontiguousarray(images).data).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", source.rsplit("/", 1)[-1]).strip("_.-") or "data"
    return images, f"{slug}-{split}-{images.shape[1]}px-{images.shape[0]}-{digest}"


def _cache_name(kind: str, protocol: str, images_name: str) -> str:
    """`<kind>-<images>-<sha256(protocol)[:8]>`: one file per extractor, weights and image set."""
    return f"{kind}-{images_name}-{hashlib.sha256(protocol.encode()).hexdigest()[:8]}"


def _feature_estimate(num_images: int) -> str:
    """A time estimate for Inception features before any are computed (only on CPUs, where it
    matters)."""
    if jax.default_backend() != "cpu":
        return f"Inception features of {num_images} images (the progress bar shows the rate)"
    seconds = num_images / (CPU_FEATURE_RATE * (os.cpu_count() or 1))
    duration = f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"
    return (
        f"Inception features of {num_images} images: about {duration} on {os.cpu_count()} CPU "
        f"cores (~{CPU_FEATURE_RATE:g} images/s per core, plus compilation)"
    )


def result_stem(config: EvalConfig, k: int) -> str:
    """The file name (no suffix) of `evaluate`'s JSON result and sample grid for `config` sampled
    with `k` steps, in `config.out`."""
    clip = "_clip" if config.clip else ""
    count = "" if config.reference_count is None else f"_ref{config.reference_count}"
    return (
        f"{Path(config.checkpoint).stem}_steps{k}_w{config.guidance:g}"
        f"_gamma{config.gamma:g}{clip}_n{config.num_samples}_seed{config.seed}{count}"
    )


def _is_mnist(shape: tuple[int, int, int], num_classes: int) -> bool:
    return shape == (32, 32, 1) and num_classes in (0, 10)


def _inception_metrics(
    config: EvalConfig,
    images: UInt8[np.ndarray, "n h w c"],
    real_images: UInt8[np.ndarray, "m h w c"],
    images_name: str,
    reference: str,
) -> tuple[dict[str, Any], dict[str, float]]:
    """FID, precision and recall of `images` against the (cached) reference, and their timings."""
    devices, timings = jax.local_devices(), {}
    params = inception.inception_params(inception.load_inception_weights())
    name = _cache_name("inception", inception.FEATURE_PROTOCOL, images_name)
    t0 = time.perf_counter()
    real, mu_real, cov_real = reference_statistics(
        name,
        lambda: inception_features(
            real_images,
            batch_size=config.batch_size,
            params=params,
            devices=devices,
            progress="reference features",
        ),
        protocol=inception.FEATURE_PROTOCOL,
    )
    timings["reference_features"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    fake = inception_features(
        images, batch_size=config.batch_size, params=params, devices=devices, progress="features"
    )
    timings["features"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # k-NN radii shrink as a set grows: compare equal-sized sets (a fixed random subset of the
    # reference).
    subset = np.sort(
        np.random.default_rng(0).permutation(real.shape[0])[: min(real.shape[0], fake.shape[0])]
    )
    precision, recall = precision_recall(real[subset], fake, k=config.precision_recall_k)
    metrics = {
        "fid": frechet_distance(*feature_stats(fake), mu_real, cov_real),
        "precision": precision,
        "recall": recall,
        "reference": {
            "source": reference,
            "split": config.reference_split,
            "num_images": int(real.shape[0]),
            "cache": f"reference_{name}.npz",
            "precision_recall_images": int(subset.shape[0]),
        },
    }
    timings["statistics"] = time.perf_counter() - t0
    return metrics, timings


def _mnist_metrics(
    images: UInt8[np.ndarray, "n h w c"],
    labels: Int[np.ndarray, " n"] | None,
    real_images: UInt8[np.ndarray, "m h w c"],
    images_name: str,
) -> dict[str, Any]:
    """fd_mnist against the (cached) reference and, for class-conditional samples,
    label_accuracy."""
    protocol = mnist_protocol()
    name = _cache_name("mnist", protocol, images_name)
    _, mu_real, cov_real = reference_statistics(
        name, lambda: mnist_features(real_images), protocol=protocol
    )
    return {
        "fd_mnist": frechet_distance(*feature_stats(mnist_features(images)), mu_real, cov_real),
        "label_accuracy": None if labels is None else label_accuracy(images, labels),
        "mnist_reference_cache": f"reference_{name}.npz",
    }


class _Plan(NamedTuple):
    """What `evaluate` resolved from its configuration and the checkpoint before sampling."""

    k: int
    shape: tuple[int, int, int]
    num_classes: int
    shift: float
    reference: str
    mnist: bool
    out: Path
    stem: str


def _plan(config: EvalConfig, run: dict[str, Any]) -> _Plan:
    """Resolve steps, shape, shift, reference and output names from the run's stored configuration
    (`run`); refuse what scoring cannot do."""
    student, model = run["variant"] != "teacher", checkpoint.model_config(run["model"])
    mmd.check_guidance(
        guidance=config.guidance,
        num_classes=model.num_classes,
        label_dropout=None if student else run["label_dropout"],
        where=str(config.checkpoint),
    )
    k = config.k or (run["k"] if student else run["teacher_k"])
    shape = (model.resolution, model.resolution, model.channels)
    if student and k != run["k"]:
        tqdm.write(
            f"Note: this {run['variant']} student was trained for k={run['k']} steps; sampling it "
            f"with {k} queries noise levels it never saw."
        )
    mnist = config.mnist_metrics and _is_mnist(shape, model.num_classes)
    if mnist:
        mnist_protocol()  # fail before sampling if the classifier's weights are missing
    return _Plan(
        k=k,
        shape=shape,
        num_classes=model.num_classes,
        shift=run["shift"],  # train.py stores the value it used (its `resolve`)
        reference=config.reference or run["data"],
        mnist=mnist,
        out=Path(config.out) if config.out else Path(config.checkpoint).parent / "eval",
        stem=result_stem(config, k),
    )


def _sample(
    config: EvalConfig, model: Callable, plan: _Plan
) -> tuple[UInt8[np.ndarray, "n h w c"], Int[np.ndarray, " n"] | None]:
    """Draw `config.num_samples` images (sample i has label i % num_classes); write their grid PNG
    and, with `save_samples`, an npz."""
    num_classes = plan.num_classes
    images = generate(
        model,
        jax.random.key(config.seed),
        num_samples=config.num_samples,
        batch_size=config.batch_size,
        num_classes=num_classes,
        num_steps=plan.k,
        shift=plan.shift,
        guidance=config.guidance,
        clip=config.clip,
        gamma=config.gamma,
        null_label=num_classes,
        image_shape=plan.shape,
        devices=jax.local_devices(),
        progress="sampling",
    )
    labels = np.arange(config.num_samples) % num_classes if num_classes else None
    columns = grid_columns(num_classes)
    save_image_grid(images[:GRID_SAMPLES], plan.out / f"{plan.stem}.png", columns=columns)
    if config.save_samples:
        no_labels = np.zeros(len(images), int)
        with data.atomic_path(plan.out / f"{plan.stem}_samples.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, images=images, labels=no_labels if labels is None else labels)
    return images, labels


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Sample a checkpoint, score it (FID, precision/recall; fd_mnist and label_accuracy for MNIST
    models) against a reference split, write the sample grid PNG and the JSON result; return the
    record."""
    t_start = time.perf_counter()
    if not config.checkpoint:
        raise ValueError(
            "--checkpoint is required: a ckpt_*.eqx or teacher.eqx written by train.py"
        )
    model, run, meta = load_model(config.checkpoint)
    plan = _plan(config, run)
    if config.fid or plan.mnist:
        real_images, images_name = reference_images(
            plan.reference,
            split=config.reference_split,
            model_shape=plan.shape,
            count=config.reference_count,
        )
    if config.fid and min(config.num_samples, real_images.shape[0]) <= config.precision_recall_k:
        raise ValueError(
            f"precision/recall with k={config.precision_recall_k} need more than that many samples "
            f"and reference images; got --num-samples {config.num_samples} and "
            f"{real_images.shape[0]} reference images"
        )
    estimate = f"; then {_feature_estimate(config.num_samples)} (and once the reference's)"
    tqdm.write(
        f"{run['variant']} {config.checkpoint} (step {meta['step']}): {config.num_samples} "
        f"samples, {plan.k} steps, guidance {config.guidance:g}, gamma {config.gamma:g}, "
        f"seed {config.seed}, batch {config.batch_size} on {jax.local_device_count()} "
        f"{jax.local_devices()[0].platform} devices{estimate if config.fid else ''}."
    )
    t0 = time.perf_counter()
    images, labels = _sample(config, model, plan)
    timings = {"sampling": time.perf_counter() - t0}
    metrics: dict[str, Any] = dict.fromkeys(
        ("fid", "precision", "recall", "reference", "fd_mnist", "label_accuracy")
    )
    if config.fid:
        found, more = _inception_metrics(config, images, real_images, images_name, plan.reference)
        metrics.update(found)
        timings.update(more)
    if plan.mnist:
        t0 = time.perf_counter()
        metrics.update(_mnist_metrics(images, labels, real_images, images_name))
        timings["mnist_metrics"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    return _report(config, run, meta, metrics, timings, plan=plan)


def _report(
    config: EvalConfig, run: dict, meta: dict, metrics: dict, timings: dict, *, plan: _Plan
) -> dict[str, Any]:
    """Write the JSON result of `evaluate` and print its one-line summary; return the record."""
    results = {
        "checkpoint": str(config.checkpoint),
        "step": meta["step"],
        "variant": run["variant"],
        "preset": run["preset"],
        "data": run["data"],
        **metrics,
        "num_samples": config.num_samples,
        "precision_recall_k": config.precision_recall_k,
        "feature_protocol": inception.FEATURE_PROTOCOL,
        "steps": plan.k,
        "trained_k": run["k"] if run["variant"] != "teacher" else None,
        "network": checkpoint.network_kind(meta),
        "guidance": config.guidance,
        "clip": config.clip,
        "gamma": config.gamma,
        "shift": plan.shift,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "num_classes": plan.num_classes,
        "image_shape": list(plan.shape),
        "samples_per_s": config.num_samples / timings["sampling"],
        "sample_grid": str(plan.out / f"{plan.stem}.png"),
        "config": run,
    }
    record = write_results(plan.out / f"{plan.stem}.json", results, timings=timings)
    parts = [
        "FID not computed (--no-fid)"
        if metrics["fid"] is None
        else f"FID {metrics['fid']:.3f} ({config.num_samples} samples vs "
        f"{metrics['reference']['num_images']} {metrics['reference']['source']} "
        f"{config.reference_split} images), precision "
        f"{metrics['precision']:.3f}, recall {metrics['recall']:.3f}"
    ]
    if metrics["fd_mnist"] is not None:
        parts.append(f"fd_mnist {metrics['fd_mnist']:.3f}")
    if metrics["label_accuracy"] is not None:
        parts.append(f"label accuracy {metrics['label_accuracy']:.4f}")
    tqdm.write(
        f"{', '.join(parts)}; sampled the {results['network']}, {timings['sampling']:.1f} s, "
        f"total {timings['total']:.1f} s "
        f"-> {plan.out / plan.stem}.json"
    )
    return record


def cell(value: Any, spec: str) -> str:
    """A Markdown table cell: `value` formatted with `spec`, or an em dash when it is None."""
    return "—" if value is None else format(value, spec)


def results_table(results: list[dict]) -> str:
    """A Markdown table of result records (as `write_results` writes them), one row per record, in
    order."""
    header = [
        "checkpoint",
        "variant",
        "steps",
        "guidance",
        "gamma",
        "num samples",
        "FID",
        "precision",
        "recall",
        "sampling (s)",
    ]
    rows = [
        [
            f"{r['checkpoint']} @ {r['step']}".replace("|", "\\|"),
            r["variant"],
            str(r["steps"]),
            cell(r["guidance"], "g"),
            cell(r["gamma"], "g"),
            str(r["num_samples"]),
            cell(r["fid"], ".2f"),
            cell(r["precision"], ".3f"),
            cell(r["recall"], ".3f"),
            cell(r["timings_s"]["sampling"], ".1f"),
        ]
        for r in results
    ]
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def _read_result(path: str) -> dict:
    try:
        record = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no result file {path}: pass JSON files written by `python eval.py --checkpoint ...`"
        ) from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e}): pass result files written by eval.py") from e
    missing = [
        k
        for k in ("checkpoint", "step", "variant", "steps", "num_samples", "fid", "timings_s")
        if k not in record
    ]
    if missing:
        raise ValueError(
            f"{path} lacks {', '.join(missing)}: it is not a result file written by eval.py"
        )
    return record


def parser() -> argparse.ArgumentParser:
    """The command line of `python eval.py` (see `main`): one option per `EvalConfig` field."""
    p = argparse.ArgumentParser(
        prog="eval.py",
        description="Sample a train.py checkpoint and compute FID, precision and recall (and, for "
        "MNIST, fd_mnist and label accuracy) against a reference split; writes a sample grid PNG "
        "and "
        "a JSON result. `python eval.py table R.json ...` prints result files as a Markdown table; "
        "`python eval.py train-classifier [--seed S] [--epochs E]` retrains the MNIST classifier.",
        epilog="Cost: sampling takes num_samples x steps network calls; FID then needs Inception "
        "features of every sample (and once, cached, of the reference split). On a 2-core CPU "
        f"Inception runs at about {2 * CPU_FEATURE_RATE:g} images/s: 10,000 samples take about 20 "
        "minutes of features (GPUs: seconds); the MNIST metrics take seconds. FID is biased "
        "upwards at small sample "
        "counts: compare only numbers with the same --num-samples.",
    )
    options.add_options(p, EvalConfig, EvalConfig())
    return p


def _train_classifier_command(argv: Sequence[str]) -> dict:
    p = argparse.ArgumentParser(
        prog="eval.py train-classifier",
        description=f"Train the MNIST classifier into {mnist_classifier.WEIGHTS}.",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--out", default=str(mnist_classifier.WEIGHTS))
    args = p.parse_args(argv)
    result = mnist_classifier.train_classifier(seed=args.seed, epochs=args.epochs, out=args.out)
    print(json.dumps(result))
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | str:
    """`python eval.py --checkpoint CKPT [...]` (returns the result record), `python eval.py table
    R.json [...]` (prints and returns the Markdown table) or `python eval.py train-classifier
    [...]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["table"]:
        if len(argv) < 2:
            raise ValueError("usage: python eval.py table RESULT.json [RESULT.json ...]")
        table = results_table([_read_result(path) for path in argv[1:]])
        print(table)
        return table
    if argv[:1] == ["train-classifier"]:
        return _train_classifier_command(argv[1:])
    return evaluate(dataclasses.replace(EvalConfig(), **vars(parser().parse_args(argv))))


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError) as error:
        sys.exit(f"eval.py: error: {error}")
