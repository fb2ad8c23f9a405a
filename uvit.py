"""Simple Diffusion's U-ViT (Hoogeboom, Heek & Salimans, "simple diffusion: End-to-end diffusion for
high resolution images", ICML 2023) as equinox modules, NHWC, batched.

The U-ViT is a convolutional U-Net whose lowest resolution is a transformer stack (not the all-token
"U-ViT" of Bao et al. 2023). Reading top to bottom:

- `fourier_features`, `Embedding`: log-SNR `lam` -> Fourier features -> MLP, plus a learned class
  embedding with one extra null row (index `num_classes`) for classifier-free guidance. Their sum
  conditions every block.
- `ResBlock`: GroupNorm, SiLU, 3x3 conv, GroupNorm with embedding-predicted scale/shift, SiLU, 3x3
  conv (zero-initialised), residual. `Downsample` is space-to-depth + 1x1 conv (a matmul, fast on
  CPU); `Upsample` is nearest-neighbour + 3x3 conv (never a transposed conv, ~20x slower on
  XLA:CPU).
- `TransformerBlock`: pre-norm multi-head self-attention + MLP on the lowest-resolution tokens, the
  LayerNorms modulated by the embedding (scale/shift), the residual branches' last layers
  zero-initialised. Each block optionally runs under `jax.checkpoint` (remat). The stack is a plain
  loop, not `lax.scan`, so that XLA's cost analysis (which counts a loop body once) reports the true
  FLOPs.
- `UViT`: stem conv, per-level ResBlocks (encoder), Downsample to the transformer width, learned
  position embedding, transformer stack, Upsample, per-level ResBlocks fed with concatenated skips
  (decoder), GroupNorm/SiLU/3x3-conv head (zero-initialised). It predicts `v = alpha eps - sigma x`.
- `Denoiser`: wraps a `UViT` and returns the x-prediction `alpha z - sigma v` (MATH.md §1), the
  callable `g(z, lam, label)` that mmd.py expects.
- `MLPDenoiser` (`MLPConfig`): the second, tiny model family, the same callable for 2-D points:
  an MLP v-network on `(z, Fourier features of lam, label embedding)`; train.py's `ring2d` preset.

Dropout is omitted: the distillation paper (Salimans et al. 2024, App. B) uses none. `PRESETS` holds
the configurations (`mnist`, `imagenet64`, `imagenet128`); `make_model` builds a `Denoiser` from one
(or an `MLPDenoiser` from an `MLPConfig`).
"""

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from einops import rearrange
from jaxtyping import Array, Float, Int, PRNGKeyArray

from mmd import alpha_sigma

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class UViTConfig:
    """Architecture of a U-ViT. `widths[i]`/`blocks[i]`: channels and ResBlocks of conv level `i`
    (level 0 at the input resolution divided by `patch_size`, each next level halves it); the
    transformer runs at `resolution / (patch_size * 2 ** len(widths))`. Labels run over [0,
    num_classes], `num_classes` being the null label of classifier-free guidance (`num_classes=0`:
    unconditional). `dtype` is the compute dtype (parameters stay float32); `remat` recomputes each
    transformer block in the backward pass."""

    resolution: int
    channels: int
    num_classes: int
    widths: tuple[int, ...]
    blocks: tuple[int, ...]
    transformer_width: int
    transformer_depth: int
    heads: int
    emb_width: int
    patch_size: int = 1
    fourier_features: int = 64
    mlp_ratio: int = 4
    groups: int = 32
    dtype: str = "float32"
    remat: bool = False

    def __post_init__(self):
        if len(self.widths) != len(self.blocks) or not self.widths:
            raise ValueError(
                f"widths {self.widths} and blocks {self.blocks} need one entry per level (>= 1)."
            )
        if self.resolution % (self.patch_size * 2 ** len(self.widths)):
            raise ValueError(
                f"resolution {self.resolution} must be divisible by patch_size * 2**levels = "
                f"{self.patch_size * 2 ** len(self.widths)}; change resolution, patch_size or "
                "widths."
            )
        for w in self.widths:
            if w % min(self.groups, w):
                raise ValueError(f"width {w} is not divisible by GroupNorm groups {self.groups}.")
        if self.transformer_width % self.heads:
            raise ValueError(
                f"transformer_width {self.transformer_width} not divisible by heads {self.heads}."
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} must be one of {sorted(DTYPES)}.")
        if self.num_classes < 0:
            raise ValueError(
                f"num_classes must be >= 0 (0 = unconditional), got {self.num_classes}."
            )

    @property
    def token_resolution(self) -> int:
        """Side length of the transformer's token grid."""
        return self.resolution // (self.patch_size * 2 ** len(self.widths))


MNIST = UViTConfig(
    resolution=32,
    channels=1,
    num_classes=10,
    widths=(96,),
    blocks=(1,),
    transformer_width=192,
    transformer_depth=3,
    heads=3,
    emb_width=128,
    patch_size=2,
)
"""CPU-sized U-ViT for 32x32 MNIST (pad 28 -> 32), ~2.4M parameters, ~0.5 GFLOP per image forward.
The input is folded 2x2 into channels (Simple Diffusion's remedy for high-resolution feature maps),
so the one conv level runs at 16x16 with 96 channels and the transformer at 8x8 tokens of width 192:
wide convs and matmuls keep XLA:CPU near its matmul rate, where 32x32 maps with few channels ran at
a quarter of it."""

IMAGENET64 = UViTConfig(
    resolution=64,
    channels=3,
    num_classes=1000,
    widths=(128, 256),
    blocks=(2, 2),
    transformer_width=1024,
    transformer_depth=23,
    heads=16,
    emb_width=1024,
    dtype="bfloat16",
    remat=True,
)
"""The distillation paper's ~400M "small" U-ViT for ImageNet 64x64 (Salimans et al. 2024, App. B).
Inferred from Simple Diffusion's U-ViT recipe, since neither paper prints this variant's table: base
width 128 with channel multipliers (1, 2) at 64x64 and 32x32, two ResBlocks per level, and the extra
capacity spent on a transformer at 16x16 (Simple Diffusion's finding: scale the 16x16 level), width
1024 (multiplier 8, half the 2B model's 2048), 16 heads of 64, MLP ratio 4, embedding width 1024;
depth 23 brings the total near 400M."""

IMAGENET128 = dataclasses.replace(
    IMAGENET64, resolution=128, widths=(128, 256, 512), blocks=(2, 2, 2), transformer_depth=21
)
"""ImageNet 128x128 variant of `IMAGENET64`: one more conv level (128, 64, 32 -> width 128, 256,
512) so the transformer again sees 16x16 tokens; depth 21 keeps the total near 400M."""

PRESETS = {"mnist": MNIST, "imagenet64": IMAGENET64, "imagenet128": IMAGENET128}


def _normal(key: PRNGKeyArray, shape: tuple[int, ...], fan_in: int) -> Float[Array, "..."]:
    return jax.random.normal(key, shape) / math.sqrt(fan_in)


def _last_axis(v: Float[Array, " n"], ndim: int) -> Float[Array, "..."]:
    """Reshape a per-channel vector to broadcast against an `ndim`-rank array (rank promotion is
    explicit)."""
    return v.reshape((1,) * (ndim - 1) + (-1,))


class Dense(eqx.Module):
    """Affine map on the last axis, computed in the input's dtype."""

    weight: Float[Array, "i o"]
    bias: Float[Array, " o"]

    def __init__(self, n_in: int, n_out: int, *, key: PRNGKeyArray, zero: bool = False):
        self.weight = jnp.zeros((n_in, n_out)) if zero else _normal(key, (n_in, n_out), n_in)
        self.bias = jnp.zeros((n_out,))

    def __call__(self, x: Float[Array, "*s i"]) -> Float[Array, "*s o"]:
        return x @ self.weight.astype(x.dtype) + _last_axis(self.bias.astype(x.dtype), x.ndim)


class Conv(eqx.Module):
    """3x3 'SAME' convolution, NHWC/HWIO, computed in the input's dtype."""

    weight: Float[Array, "3 3 i o"]
    bias: Float[Array, " o"]

    def __init__(self, n_in: int, n_out: int, *, key: PRNGKeyArray, zero: bool = False):
        self.weight = (
            jnp.zeros((3, 3, n_in, n_out)) if zero else _normal(key, (3, 3, n_in, n_out), 9 * n_in)
        )
        self.bias = jnp.zeros((n_out,))

    def __call__(self, x: Float[Array, "b h w i"]) -> Float[Array, "b h w o"]:
        y = jax.lax.conv_general_dilated(
            x,
            self.weight.astype(x.dtype),
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + _last_axis(self.bias.astype(x.dtype), 4)


class GroupNorm(eqx.Module):
    """GroupNorm over (h, w, channels in group) of each example separately; statistics in
    float32."""

    scale: Float[Array, " c"]
    bias: Float[Array, " c"]
    groups: int = eqx.field(static=True)

    def __init__(self, channels: int, groups: int):
        self.scale = jnp.ones((channels,))
        self.bias = jnp.zeros((channels,))
        self.groups = min(groups, channels)

    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h w c"]:
        b, h, w, c = x.shape
        g = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
        mean = jnp.mean(g, axis=(1, 2, 4), keepdims=True)
        var = jnp.mean(jnp.square(g - mean), axis=(1, 2, 4), keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + 1e-6)).reshape(b, h, w, c)
        return (y * _last_axis(self.scale, 4) + _last_axis(self.bias, 4)).astype(x.dtype)


def layer_norm(x: Float[Array, "*s d"]) -> Float[Array, "*s d"]:
    """Parameter-free LayerNorm over the last axis, statistics in float32 (scale/shift come from
    conditioning)."""
    y = x.astype(jnp.float32)
    mean = jnp.mean(y, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(y - mean), axis=-1, keepdims=True)
    return ((y - mean) * jax.lax.rsqrt(var + 1e-6)).astype(x.dtype)


def fourier_features(
    lam: Float[Array, " b"], *, n: int, min_freq: float = 1 / 16, max_freq: float = 16.0
) -> Float[Array, "b n"]:
    """sin/cos of `lam` at `n/2` geometrically spaced angular frequencies: the lowest keeps the
    whole log-SNR range (about [-15, 15] after resolution shifts) within one monotone half-period,
    the highest resolves ~0.1."""
    freqs = jnp.geomspace(min_freq, max_freq, n // 2)
    angles = lam.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class Embedding(eqx.Module):
    """Conditioning vector: MLP of log-SNR Fourier features plus a class embedding (last row = null
    class).

    Labels must lie in [0, num_classes]; inside jit an out-of-range label cannot raise and JAX
    clamps it."""

    mlp_in: Dense
    mlp_out: Dense
    classes: Float[Array, "k e"]
    fourier: int = eqx.field(static=True)

    def __init__(self, config: UViTConfig, *, key: PRNGKeyArray):
        k1, k2, k3 = jax.random.split(key, 3)
        self.mlp_in = Dense(config.fourier_features, config.emb_width, key=k1)
        self.mlp_out = Dense(config.emb_width, config.emb_width, key=k2)
        self.classes = jax.random.normal(k3, (config.num_classes + 1, config.emb_width))
        self.fourier = config.fourier_features

    def __call__(self, lam: Float[Array, " b"], label: Int[Array, " b"]) -> Float[Array, "b e"]:
        h = self.mlp_out(jax.nn.silu(self.mlp_in(fourier_features(lam, n=self.fourier))))
        return h + self.classes[label]


class ResBlock(eqx.Module):
    """Pre-activation ResBlock with scale/shift conditioning on the second GroupNorm."""

    norm1: GroupNorm
    conv1: Conv
    cond: Dense
    norm2: GroupNorm
    conv2: Conv
    skip: Dense | None

    def __init__(self, n_in: int, n_out: int, config: UViTConfig, *, key: PRNGKeyArray):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.norm1 = GroupNorm(n_in, config.groups)
        self.conv1 = Conv(n_in, n_out, key=k1)
        self.cond = Dense(config.emb_width, 2 * n_out, key=k2)
        self.norm2 = GroupNorm(n_out, config.groups)
        self.conv2 = Conv(n_out, n_out, key=k3, zero=True)
        self.skip = Dense(n_in, n_out, key=k4) if n_in != n_out else None

    def __call__(
        self, x: Float[Array, "b h w i"], emb: Float[Array, "b e"]
    ) -> Float[Array, "b h w o"]:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        scale, shift = jnp.split(self.cond(emb)[:, None, None, :], 2, axis=-1)
        h = self.conv2(jax.nn.silu(self.norm2(h) * (1 + scale) + shift))
        return h + (x if self.skip is None else self.skip(x))


def space_to_depth(x: Float[Array, "b h w c"], p: int) -> Float[Array, "b hp wp cp"]:
    """Fold each p x p patch into channels, ordered (patch row, patch column, channel)."""
    return rearrange(x, "b (h p) (w q) c -> b h w (p q c)", p=p, q=p)


def depth_to_space(x: Float[Array, "b h w c"], p: int) -> Float[Array, "b hp wp cp"]:
    """Inverse of `space_to_depth`."""
    return rearrange(x, "b h w (p q c) -> b (h p) (w q) c", p=p, q=p)


class Downsample(eqx.Module):
    """Halve the resolution: 2x2 space-to-depth, then a 1x1 conv to `n_out` channels."""

    proj: Dense

    def __init__(self, n_in: int, n_out: int, *, key: PRNGKeyArray):
        self.proj = Dense(4 * n_in, n_out, key=key)

    def __call__(self, x: Float[Array, "b h w i"]) -> Float[Array, "b h//2 w//2 o"]:
        return self.proj(space_to_depth(x, 2))


class Upsample(eqx.Module):
    """Double the resolution: nearest neighbour, then a 3x3 conv to `n_out` channels."""

    conv: Conv

    def __init__(self, n_in: int, n_out: int, *, key: PRNGKeyArray):
        self.conv = Conv(n_in, n_out, key=key)

    def __call__(self, x: Float[Array, "b h w i"]) -> Float[Array, "b 2*h 2*w o"]:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class TransformerBlock(eqx.Module):
    """Pre-norm self-attention + MLP; the embedding predicts each LayerNorm's scale and shift."""

    cond: Dense
    qkv: Dense
    attn_out: Dense
    mlp_in: Dense
    mlp_out: Dense
    heads: int = eqx.field(static=True)

    def __init__(self, config: UViTConfig, *, key: PRNGKeyArray):
        k1, k2, k3, k4, k5 = jax.random.split(key, 5)
        d = config.transformer_width
        self.cond = Dense(config.emb_width, 4 * d, key=k1)
        self.qkv = Dense(d, 3 * d, key=k2)
        self.attn_out = Dense(d, d, key=k3, zero=True)
        self.mlp_in = Dense(d, config.mlp_ratio * d, key=k4)
        self.mlp_out = Dense(config.mlp_ratio * d, d, key=k5, zero=True)
        self.heads = config.heads

    def __call__(self, x: Float[Array, "b t d"], emb: Float[Array, "b e"]) -> Float[Array, "b t d"]:
        d = x.shape[-1]
        scale1, shift1, scale2, shift2 = jnp.split(self.cond(emb)[:, None, :], 4, axis=-1)
        h = layer_norm(x) * (1 + scale1) + shift1
        # Heads before tokens: XLA:CPU runs the batched matmuls ~2x faster with (b, h) leading.
        q, k, v = rearrange(self.qkv(h), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) / math.sqrt(
            d // self.heads
        )
        weights = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
        attended = rearrange(jnp.einsum("bhqk,bhkd->bhqd", weights, v), "b h t d -> b t (h d)")
        x = x + self.attn_out(attended)
        h = layer_norm(x) * (1 + scale2) + shift2
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(h)))


class UViT(eqx.Module):
    """The v-prediction network `v(z, lam, label)` on a batch of NHWC images."""

    config: UViTConfig = eqx.field(static=True)
    embedding: Embedding
    stem: Conv
    encoder: list[list[ResBlock]]
    downs: list[Downsample]
    position: Float[Array, "t d"]
    transformer: list[TransformerBlock]
    ups: list[Upsample]
    decoder: list[list[ResBlock]]
    head_norm: GroupNorm
    head: Conv

    def __init__(self, config: UViTConfig, *, key: PRNGKeyArray):
        keys = iter(jax.random.split(key, 5 + 2 * sum(config.blocks) + 2 * len(config.widths)))
        p2c = config.patch_size**2 * config.channels
        widths, d = config.widths, config.transformer_width
        self.config = config
        self.embedding = Embedding(config, key=next(keys))
        self.stem = Conv(p2c, widths[0], key=next(keys))
        self.encoder = [
            [ResBlock(w, w, config, key=next(keys)) for _ in range(n)]
            for w, n in zip(widths, config.blocks)
        ]
        nexts = widths[1:] + (d,)
        self.downs = [Downsample(w, w2, key=next(keys)) for w, w2 in zip(widths, nexts)]
        self.position = 0.02 * jax.random.normal(next(keys), (config.token_resolution**2, d))
        self.transformer = [
            TransformerBlock(config, key=k)
            for k in jax.random.split(next(keys), config.transformer_depth)
        ]
        self.ups = [Upsample(w2, w, key=next(keys)) for w, w2 in zip(widths, nexts)]
        self.decoder = [
            [ResBlock(2 * w, w, config, key=next(keys)) for _ in range(n)]
            for w, n in zip(widths, config.blocks)
        ]
        self.head_norm = GroupNorm(widths[0], config.groups)
        self.head = Conv(widths[0], p2c, key=next(keys), zero=True)

    def __call__(
        self, z: Float[Array, "b h w c"], lam: Float[Array, " b"], label: Int[Array, " b"]
    ) -> Float[Array, "b h w c"]:
        cfg = self.config
        if z.shape[1:] != (cfg.resolution, cfg.resolution, cfg.channels):
            raise ValueError(
                f"U-ViT built for {cfg.resolution}x{cfg.resolution}x{cfg.channels} images (NHWC) "
                "got z of shape "
                f"{z.shape}; resize/pad the data or build the model from a matching UViTConfig."
            )
        dtype = DTYPES[cfg.dtype]
        emb = jax.nn.silu(self.embedding(lam, label)).astype(dtype)
        h = self.stem(space_to_depth(z.astype(dtype), cfg.patch_size))
        skips = []
        for blocks, down in zip(self.encoder, self.downs):
            for block in blocks:
                h = block(h, emb)
                skips.append(h)
            h = down(h)
        s = h.shape[1]
        tokens = rearrange(h, "b h w d -> b (h w) d") + self.position.astype(dtype)[None]
        for block in self.transformer:
            tokens = eqx.filter_checkpoint(block)(tokens, emb) if cfg.remat else block(tokens, emb)
        h = rearrange(tokens, "b (h w) d -> b h w d", h=s)
        for blocks, up in reversed(list(zip(self.decoder, self.ups))):
            h = up(h)
            for block in blocks:
                h = block(jnp.concatenate([h, skips.pop()], axis=-1), emb)
        v = self.head(jax.nn.silu(self.head_norm(h)))
        return depth_to_space(v, cfg.patch_size).astype(z.dtype)


class Denoiser(eqx.Module):
    """The denoiser `g(z, lam, label) -> x_pred = alpha z - sigma v` that mmd.py trains and
    samples."""

    net: UViT

    def __call__(
        self, z: Float[Array, "b h w c"], lam: Float[Array, " b"], label: Int[Array, " b"]
    ) -> Float[Array, "b h w c"]:
        alpha, sigma = alpha_sigma(lam.astype(z.dtype))
        v = self.net(z, lam, label)
        return alpha[:, None, None, None] * z - sigma[:, None, None, None] * v


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    """Architecture of an `MLPDenoiser` for points of `dim` coordinates: `depth` hidden layers of
    `width` units; labels run over [0, num_classes], `num_classes` being the null label."""

    dim: int = 2
    num_classes: int = 3
    width: int = 128
    depth: int = 3


class MLPDenoiser(eqx.Module):
    """`x_hat = alpha z - sigma v(z, lam, label)`, v an MLP (SiLU): a denoiser for points.
    Inputs: `z`, 4 sine and 4 cosine features of `lam` (frequencies 0.05..0.4, for lam in about
    [-20, 20]), an 8-wide label embedding with a null row."""

    mlp: eqx.nn.MLP
    embed: eqx.nn.Embedding

    def __init__(self, *, dim: int, width: int, depth: int, num_classes: int, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.embed = eqx.nn.Embedding(num_classes + 1, 8, key=k1)
        self.mlp = eqx.nn.MLP(dim + 8 + 8, dim, width, depth, activation=jax.nn.silu, key=k2)

    def __call__(
        self, z: Float[Array, "b d"], lam: Float[Array, " b"], label: Int[Array, " b"]
    ) -> Float[Array, "b d"]:
        freqs = jnp.asarray([0.05, 0.1, 0.2, 0.4], jnp.float32)
        f = lam[:, None] * freqs[None]
        feats = jnp.concatenate([z, jnp.sin(f), jnp.cos(f), jax.vmap(self.embed)(label)], axis=1)
        v = jax.vmap(self.mlp)(feats)
        alpha = jnp.sqrt(jax.nn.sigmoid(lam))[:, None]
        sigma = jnp.sqrt(jax.nn.sigmoid(-lam))[:, None]
        return alpha * z - sigma * v


def make_model(
    config: UViTConfig | MLPConfig | str, *, key: PRNGKeyArray
) -> Denoiser | MLPDenoiser:
    """Build a `Denoiser` around a fresh `UViT` from a config or a preset name in `PRESETS`, or an
    `MLPDenoiser` from an `MLPConfig`."""
    if isinstance(config, MLPConfig):
        return MLPDenoiser(
            dim=config.dim,
            width=config.width,
            depth=config.depth,
            num_classes=config.num_classes,
            key=key,
        )
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(
                f"unknown preset {config!r}; choose one of {sorted(PRESETS)} or pass a UViTConfig."
            )
        config = PRESETS[config]
    return Denoiser(UViT(config, key=key))


def param_count(model: eqx.Module) -> int:
    """Number of parameters; works on real models and on `eqx.filter_eval_shape` outputs (no
    allocation)."""
    leaves = jax.tree.leaves(model, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    return sum(
        math.prod(x.shape) for x in leaves if isinstance(x, (jax.Array, jax.ShapeDtypeStruct))
    )
