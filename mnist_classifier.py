"""A LeNet-sized MNIST classifier: the in-domain features behind eval.py's `fd_mnist` and
`label_accuracy`.

Network (equinox, NHWC, input `u / 127.5 - 1` of uint8 32x32 grey digits, MNIST's 28x28 padded by 2
as data.py delivers them): 5x5 conv 1->16, ReLU, 2x2 max pool; 5x5 conv 16->32, ReLU, 2x2 max pool;
dense 2048->64, ReLU (the penultimate features, d = 64); dense 64->10. 145,034 parameters (580 kB as
float32).

Training (`train_classifier`, command `python eval.py train-classifier`): Adam, batch 128, learning
rate 1e-3 decayed by a cosine to 0 over `epochs` (8) passes of MNIST's 60k training digits, each
digit shifted by up to 2 pixels at random; initialisation, order and shifts follow the seed. The
shipped weights are `checkpoints/mnist_classifier.eqx`; its README gives the command, seed, wall
time and test accuracy.

`mnist_features(images)` and `mnist_classify(images)` take uint8 NHWC images `(n, h, w, 1|3)`: 32x32
or 28x28 (padded to 32x32), 3 channels averaged to grey.
"""

import functools
import math
import os
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Float32, Int, Int32, PRNGKeyArray, Shaped, UInt8

import data

WEIGHTS = Path(__file__).resolve().parent / "checkpoints" / "mnist_classifier.eqx"
TRAIN_COMMAND = "python eval.py train-classifier"
FEATURE_DIM = 64
SIDE = 32


class LeNet(eqx.Module):
    """Two conv/pool stages (NHWC, HWIO kernels), a 64-wide hidden layer (the features) and 10
    logits."""

    conv1: Float[Array, "5 5 1 16"]
    bias1: Float[Array, " 16"]
    conv2: Float[Array, "5 5 16 32"]
    bias2: Float[Array, " 32"]
    hidden: eqx.nn.Linear
    logits: eqx.nn.Linear

    def __init__(self, *, key: PRNGKeyArray):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.conv1 = jax.random.normal(k1, (5, 5, 1, 16)) * math.sqrt(2 / 25)  # He initialisation
        self.conv2 = jax.random.normal(k2, (5, 5, 16, 32)) * math.sqrt(2 / (25 * 16))
        self.bias1, self.bias2 = jnp.zeros(16), jnp.zeros(32)
        self.hidden = eqx.nn.Linear(8 * 8 * 32, FEATURE_DIM, key=k3)
        self.logits = eqx.nn.Linear(FEATURE_DIM, 10, key=k4)

    def features(self, x: Float[Array, "b 32 32 1"]) -> Float[Array, "b 64"]:
        """Penultimate-layer activations of images scaled to [-1, 1]."""
        h = x
        for kernel, bias in ((self.conv1, self.bias1), (self.conv2, self.bias2)):
            h = jax.lax.conv_general_dilated(
                h, kernel, (1, 1), ((2, 2), (2, 2)), dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
            h = jax.nn.relu(h + bias.reshape(1, 1, 1, -1))
            b, hh, ww, c = h.shape
            h = h.reshape(b, hh // 2, 2, ww // 2, 2, c).max(axis=(2, 4))  # 2x2 max pool
        return jax.nn.relu(jax.vmap(self.hidden)(h.reshape(h.shape[0], -1)))

    def __call__(self, x: Float[Array, "b 32 32 1"]) -> Float[Array, "b 10"]:
        return jax.vmap(self.logits)(self.features(x))


def to_input(images: Shaped[np.ndarray, "*shape"]) -> Float32[np.ndarray, "n 32 32 1"]:
    """Validate uint8 NHWC digits `(n, h, w, 1|3)` and map them to the network's input (grey, 32x32,
    [-1, 1]); anything else raises a ValueError naming that layout."""
    data.check_uint8_images(images, where="the MNIST classifier", sides=(SIDE, 28))
    x = images.astype(np.float32).mean(axis=-1, keepdims=True) / 127.5 - 1.0
    if x.shape[1] == 28:
        x = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=-1.0)
    return x


@functools.cache
def load_classifier(path: Path = WEIGHTS) -> LeNet:
    """The shipped classifier; a missing or unreadable file raises naming it and the command that
    remakes it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"MNIST classifier weights {path} are missing: recreate them with "
            f"`{TRAIN_COMMAND}` (about 3 minutes on a 2-core CPU)"
        )
    try:
        return eqx.tree_deserialise_leaves(path, LeNet(key=jax.random.key(0)))
    except Exception as error:  # noqa: BLE001 (any failure to read means the same to the user)
        raise ValueError(
            f"MNIST classifier weights {path} are unreadable ({type(error).__name__}: "
            f"{error}): recreate them with `{TRAIN_COMMAND}`"
        ) from error


@eqx.filter_jit
def _features(model: LeNet, x: Float[Array, "b 32 32 1"]) -> Float[Array, "b 64"]:
    return model.features(x)


@eqx.filter_jit
def _classify(model: LeNet, x: Float[Array, "b 32 32 1"]) -> Int[Array, " b"]:
    return jnp.argmax(model(x), axis=-1)


def _batched(
    fn, images: Shaped[np.ndarray, "*shape"], batch_size: int, model: LeNet | None
) -> np.ndarray:
    """`fn(model, inputs)` over fixed-size batches (the last one padded), so it compiles once."""
    x = to_input(images)
    model = load_classifier() if model is None else model
    pad = -x.shape[0] % batch_size if x.shape[0] > batch_size else 0
    x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    step = min(batch_size, x.shape[0])
    out = [np.asarray(fn(model, jnp.asarray(x[i : i + step]))) for i in range(0, x.shape[0], step)]
    return np.concatenate(out)[: images.shape[0]]


def mnist_features(
    images: Shaped[np.ndarray, "*shape"], *, batch_size: int = 1000, model: LeNet | None = None
) -> Float32[np.ndarray, "n 64"]:
    """Penultimate-layer features (n, 64) of uint8 NHWC digits (see `to_input`); default model:
    shipped."""
    return _batched(_features, images, batch_size, model).astype(np.float32)


def mnist_classify(
    images: Shaped[np.ndarray, "*shape"], *, batch_size: int = 1000, model: LeNet | None = None
) -> Int32[np.ndarray, " n"]:
    """Predicted digit (n,) int32 of uint8 NHWC digits (see `to_input`); default model: shipped."""
    return _batched(_classify, images, batch_size, model).astype(np.int32)


def _loss(model: LeNet, x: Float[Array, "b 32 32 1"], y: Int[Array, " b"]) -> Float[Array, ""]:
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _shifted(
    images: UInt8[np.ndarray, "b 32 32 1"], rng: np.random.Generator
) -> UInt8[np.ndarray, "b 32 32 1"]:
    """Each digit translated by up to 2 pixels in each direction (into MNIST's blank border)."""
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
    dy, dx = rng.integers(0, 5, (2, images.shape[0]))
    return np.stack([p[y : y + 32, x : x + 32] for p, y, x in zip(padded, dy, dx)])


def train_classifier(
    *, seed: int = 0, epochs: int = 8, batch_size: int = 128, out: str | os.PathLike = WEIGHTS
) -> dict:
    """Train on MNIST's training split (see the module docstring), write the weights atomically to
    `out`, and return {test accuracy, seconds, seed, epochs}. Same seed, same weights on the same
    machine."""
    train_set, test_set = data.load("mnist", split="train"), data.load("mnist", split="test")
    images, y = train_set.images, train_set.labels.astype(np.int32)
    steps = epochs * (len(y) // batch_size)
    optimizer = optax.adam(optax.cosine_decay_schedule(1e-3, steps))
    model = LeNet(key=jax.random.key(seed))
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, opt_state, xb, yb):
        grads = eqx.filter_grad(_loss)(model, xb, yb)
        updates, opt_state = optimizer.update(grads, opt_state, model)
        return eqx.apply_updates(model, updates), opt_state

    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for i in range(len(y) // batch_size):
            batch = np.sort(order[i * batch_size : (i + 1) * batch_size])
            xb = jnp.asarray(to_input(_shifted(images[batch], rng)))
            model, opt_state = step(model, opt_state, xb, jnp.asarray(y[batch]))
    seconds = time.perf_counter() - start
    accuracy = float(np.mean(mnist_classify(test_set.images, model=model) == test_set.labels))
    with data.atomic_path(out) as tmp:
        eqx.tree_serialise_leaves(tmp, model)
    load_classifier.cache_clear()
    return {
        "test_accuracy": accuracy,
        "seconds": seconds,
        "seed": seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "parameters": sum(
            math.prod(a.shape) for a in jax.tree.leaves(eqx.filter(model, eqx.is_array))
        ),
    }
