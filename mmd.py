"""Moment Matching Distillation (Salimans et al., NeurIPS 2024): the mathematics as pure functions.

Specification: the project's MATH.md; the section numbers below (§) refer to it, in its order:
§1 schedules and loss weights (+ the teacher's training loss) -> §2 forward process, posterior,
ancestral sampler -> §4 distillation inputs -> §5 Algorithm 2 (alternating) -> §6 Algorithm 3
(instant, two minibatches) and its preconditioner -> §7 guidance, clipping, straight-through -> §10
optimisers -> training steps: one per-device step per variant (`teacher_step`; `auxiliary_step` and
`generator_step` of Algorithm 2; `instant_step` of Algorithm 3) and `data_parallel`, which runs any
of them over devices (shard_map + jit).

Copying: the file from its first line to the end of §10 (the optimisers) is self-contained: copy
it whole, imports included, into your own experiment (it needs jax, equinox, optax, jaxtyping and
numpy). The training-steps section builds on it and can be copied together with it.

Conventions
- Everything is shape-agnostic over data dimensions: arrays are `(b, *dims)`, so the same code
  serves 2-D toy points `(b, 2)` and images `(b, h, w, c)`.
- A *denoiser* is any callable `(z, lam, label) -> x_pred` on a batch, conditioned on log-SNR `lam`
  (never a time index). Where gradients w.r.t. its parameters are needed it must be a pytree (e.g.
  an equinox Module) whose inexact arrays are those parameters.
- Labels are integers; `null_label` is the extra class used for classifier-free guidance.
- Losses sum over data dimensions and average over the batch. With `axis_name` set (inside
  `jax.shard_map`) the batch mean is the global mean over that mesh axis.
- Randomness is drawn per example from keys derived from the example's global index, so results do
  not depend on batch size or device count.
"""

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import AxisType, Mesh
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int, Key, PRNGKeyArray, PyTree, UInt32

Denoiser = Callable[..., Float[Array, "b *dims"]]
Keys = PRNGKeyArray | Key[Array, " b"] | UInt32[Array, "b 2"]

WEIGHTINGS = ("edm", "flat", "dmd")
ZS_MODES = ("conditional", "marginal")
CENTERINGS = ("none", "batch", "fixed")
INSTANT_FORMS = ("symmetric", "one_sided")
TIME_SAMPLINGS = ("paper", "grid")
EPS_MODES = ("fixed", "median")
VARIANTS = ("teacher", "alternating", "instant")


def _check_choice(what: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid names: {', '.join(valid)}")


def _expand(v: Float[Array, " b"], like: Array) -> Array:
    """Reshape a per-example scalar to broadcast against `(b, *dims)` (rank promotion is
    explicit)."""
    return v.reshape(v.shape + (1,) * (like.ndim - 1))


def _sum_dims(x: Float[Array, "b *dims"]) -> Float[Array, " b"]:
    return jnp.sum(x.reshape(x.shape[0], -1), axis=1)


def _batch_mean(v: Float[Array, " b"], axis_name: str | None) -> Float[Array, ""]:
    m = jnp.mean(v)
    return m if axis_name is None else lax.pmean(m, axis_name)


def _tree_vdot(a: PyTree, b: PyTree) -> Float[Array, ""]:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _tree_mul(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(jnp.multiply, a, b)


# ----------------------------------------------------------------------------------------------
# §1 Schedules, in log-SNR


def alpha_sigma(lam: Float[Array, "*s"]) -> tuple[Float[Array, "*s"], Float[Array, "*s"]]:
    """`alpha = sqrt(sigmoid(lam))`, `sigma = sqrt(sigmoid(-lam))` (MATH.md §1)."""
    return jnp.sqrt(jax.nn.sigmoid(lam)), jnp.sqrt(jax.nn.sigmoid(-lam))


def resolution_shift(resolution: int, *, base: float = 64.0) -> float:
    """Simple Diffusion's log-SNR shift `2 log(base / resolution)` (MATH.md §1; `base` is [C])."""
    return 2.0 * math.log(base / resolution)


def logsnr_cosine(
    t: Float[Array, "*s"], *, shift: float, lam_min: float = -15.0, lam_max: float = 15.0
) -> Float[Array, "*s"]:
    """Shifted cosine `lam(t) = -2 log tan(pi t / 2) + shift`, clipped to [lam_min, lam_max]
    (MATH.md §1.1; clip [C])."""
    # Clip t rather than lam: in float32, tan(pi t / 2) is not positive at t = 1.
    t_lo = 2.0 / math.pi * math.atan(math.exp((shift - lam_max) / 2.0))
    t_hi = 2.0 / math.pi * math.atan(math.exp((shift - lam_min) / 2.0))
    t = jnp.clip(t, t_lo, t_hi)
    return jnp.clip(-2.0 * jnp.log(jnp.tan(math.pi * t / 2.0)) + shift, lam_min, lam_max)


def logsnr_edm(
    u: Float[Array, "*s"],
    *,
    shift: float,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
) -> Float[Array, "*s"]:
    """EDM's test-time schedule `lam(u) = -2 log sbar(u) + shift`, u = 1 the noisiest (MATH.md
    §1.2)."""
    a, b = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return -2.0 * rho * jnp.log(a + u * (b - a)) + shift


def loss_weight(
    lam: Float[Array, " b"],
    *,
    kind: str,
    x_gen: Float[Array, "b *dims"] | None = None,
    x_teacher: Float[Array, "b *dims"] | None = None,
    sigma_data: float = 0.5,
) -> Float[Array, " b"]:
    """Loss weighting w(lam) (MATH.md §1): `edm` = SNR + 1/sigma_data^2, `flat` = 1, `dmd` = sg(1 /
    mean|x_gen - x_teacher|).

    `dmd` needs `x_gen` and `x_teacher` (DMD's adaptive normaliser; its form is [D], the 1e-5 floor
    [C]).
    """
    _check_choice("weighting", kind, WEIGHTINGS)
    if kind == "edm":
        return jnp.exp(lam) + 1.0 / sigma_data**2
    if kind == "flat":
        return jnp.ones_like(lam)
    if x_gen is None or x_teacher is None:
        raise ValueError("the 'dmd' weighting needs x_gen and x_teacher")
    diff = jnp.abs(x_gen - x_teacher).reshape(x_gen.shape[0], -1)
    return lax.stop_gradient(1.0 / jnp.maximum(jnp.mean(diff, axis=1), 1e-5))


# ----------------------------------------------------------------------------------------------
# §1, §7 Teacher training


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """Teacher training settings: log-SNR shift, label dropout to `null_label` for guidance, and the
    decay of the parameters' exponential moving average (0: none; [C], see `ema_decay`)."""

    shift: float = 0.0
    null_label: int = 0
    label_dropout: float = 0.1
    ema_decay: float = 0.0


def teacher_loss(
    denoiser: Denoiser,
    key: Keys,
    *,
    x: Float[Array, "b *dims"],
    labels: Int[Array, " b"],
    cfg: TeacherConfig,
    axis_name: str | None = None,
) -> Float[Array, ""]:
    """Simple Diffusion's v-prediction loss with t ~ U[0, 1] on the shifted cosine (MATH.md §1, §7).

    Written in x-space: `||v - v_hat||^2 = ||x - x_hat||^2 / sigma^2 = (1 + SNR) ||x - x_hat||^2`
    [D], since `x_hat = alpha z - sigma v_hat`. Labels are replaced by `null_label` with prob.
    `label_dropout`.
    """
    keys = example_keys(key, x.shape[0])

    def draws(k: PRNGKeyArray) -> tuple[Array, Array, Array]:
        kt, kn, kd = jax.random.split(k, 3)
        return (
            jax.random.uniform(kt),
            jax.random.normal(kn, x.shape[1:]),
            jax.random.bernoulli(kd, cfg.label_dropout),
        )

    t, noise, drop = jax.vmap(draws)(keys)
    lam = logsnr_cosine(t, shift=cfg.shift)
    x_pred = denoiser(diffuse(x, lam, noise), lam, jnp.where(drop, cfg.null_label, labels))
    return _batch_mean((1.0 + jnp.exp(lam)) * _sum_dims((x - x_pred) ** 2), axis_name)


# ----------------------------------------------------------------------------------------------
# §2 Forward process, posterior (eq. 1) and ancestral step (eq. 2)


def diffuse(
    x: Float[Array, "b *dims"], lam: Float[Array, " b"], noise: Float[Array, "b *dims"]
) -> Float[Array, "b *dims"]:
    """Forward process `z = alpha x + sigma eps` (MATH.md §1)."""
    alpha, sigma = alpha_sigma(lam)
    return _expand(alpha, x) * x + _expand(sigma, x) * noise


def posterior(
    *,
    z_t: Float[Array, "b *dims"],
    x: Float[Array, "b *dims"],
    lam_t: Float[Array, " b"],
    lam_s: Float[Array, " b"],
) -> tuple[Float[Array, "b *dims"], Float[Array, " b"]]:
    """Mean and per-example variance of `q(z_s | z_t, x)` for lam_s > lam_t (eq. 1, MATH.md §2).

    `var = sigma_s^2 (1 - e^(lam_t - lam_s))`, `mu = alpha_s [e^(lam_t - lam_s) z_t / alpha_t + (1 -
    e^(lam_t - lam_s)) x]`, with `1 - e^d` as `-expm1(d)` and `alpha_s / alpha_t` in log space, so
    |lam_t - lam_s| from 1e-4 to 30 is exact. `lam_t - lam_s` is capped at 0: for `s` within
    float32 rounding of `t` it came out positive inside jit, and a negative variance made z_s NaN.
    The cap also hides swapped arguments (lam_s < lam_t gives z_t back): pass lam_s >= lam_t.
    """
    # The cap [C]: a ring2d run at batch 4096 drew such a pair after 7 million (s, t) draws.
    d = jnp.minimum(lam_t - lam_s, 0.0)
    revealed = -jnp.expm1(d)
    coef_z = jnp.exp(d + 0.5 * (jax.nn.log_sigmoid(lam_s) - jax.nn.log_sigmoid(lam_t)))
    alpha_s, _ = alpha_sigma(lam_s)
    mean = _expand(coef_z, z_t) * z_t + _expand(alpha_s * revealed, x) * x
    return mean, jax.nn.sigmoid(-lam_s) * revealed


def ancestral_step(
    *,
    z_t: Float[Array, "b *dims"],
    x: Float[Array, "b *dims"],
    lam_t: Float[Array, " b"],
    lam_s: Float[Array, " b"],
    noise: Float[Array, "b *dims"],
    gamma: float = 0.0,
) -> Float[Array, "b *dims"]:
    """One draw `z_s ~ q(z_s | z_t, x_hat)` (eq. 2), its variance interpolated in log space towards
    `sigma_{t|s}^2` by `gamma` (Salimans & Ho 2022's larger sampling noise; the log-space form is
    [C])."""
    mean, _ = posterior(z_t=z_t, x=x, lam_t=lam_t, lam_s=lam_s)
    log_revealed = jnp.log(-jnp.expm1(jnp.minimum(lam_t - lam_s, 0.0)))  # as in `posterior`
    log_var = (
        log_revealed
        + (1.0 - gamma) * jax.nn.log_sigmoid(-lam_s)
        + gamma * jax.nn.log_sigmoid(-lam_t)
    )
    return mean + _expand(jnp.exp(0.5 * log_var), noise) * noise


# ----------------------------------------------------------------------------------------------
# §2 The k-step ancestral sampler


def example_keys(key: Keys, batch: int) -> Key[Array, " b"]:
    """One typed key per example: `key` itself if it is already a batch of `batch` keys, else
    `split(key, batch)`."""
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    if key.shape == ():
        return jax.random.split(key, batch)
    if key.shape != (batch,):
        raise ValueError(
            f"expected one key or {batch} keys (one per example), got key shape {key.shape}"
        )
    return key


def _per_example_normal(
    keys: Key[Array, " b"], salt: int | Int[Array, ""], dims: tuple[int, ...]
) -> Array:
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, salt), dims))(keys)


def sample(
    denoiser: Denoiser,
    key: Keys,
    *,
    shape: tuple[int, ...],
    labels: Int[Array, " b"],
    num_steps: int,
    shift: float,
    guidance: float = 0.0,
    clip: bool = False,
    gamma: float = 0.0,
    null_label: int | None = None,
) -> Float[Array, "b *dims"]:
    """k-step ancestral sampler of MATH.md §2 on the EDM schedule; returns the last prediction.

    `z ~ N(0, I)` at u = 1; for i = k..1: `x_hat = g^w(z, lam(i/k))`, then (i > 1) `z ~
    q(z_{(i-1)/k} | z, x_hat)`. `key` is one key or `shape[0]` keys; with one key per example, each
    example's draws depend only on its own key (so a sample is the same whatever the batch it is
    generated in).
    """
    b, dims = shape[0], tuple(shape[1:])
    keys = example_keys(key, b)

    def level(i: Int[Array, ""]) -> Float[Array, " b"]:
        u = i.astype(jnp.float32) / num_steps
        return jnp.full((b,), logsnr_edm(u, shift=shift))

    def predict(z: Array, i: Int[Array, ""]) -> Array:
        x_hat, _ = guided_denoise(
            denoiser, z, level(i), labels, guidance=guidance, clip=clip, null_label=null_label
        )
        return x_hat

    def body(j: Int[Array, ""], z: Array) -> Array:
        i = num_steps - j
        return ancestral_step(
            z_t=z,
            x=predict(z, i),
            lam_t=level(i),
            lam_s=level(i - 1),
            noise=_per_example_normal(keys, i, dims),
            gamma=gamma,
        )

    z = lax.fori_loop(0, num_steps - 1, body, _per_example_normal(keys, 0, dims))
    return predict(z, jnp.asarray(1))


# ----------------------------------------------------------------------------------------------
# §4 Inputs of one distillation example; §5/§8 drawing z_s


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Distillation settings shared by both variants (MATH.md §4-8; defaults as the paper).

    `num_steps` is the student's k; `regularize_aux` switches the auxiliary's teacher term (§5);
    `center` is the instant variant's data-centring option (§6, [C]); `instant_form` is its
    objective: `symmetric` `G_1^T Lambda G_2` (§6 [D], default) or `one_sided`, Algorithm 3 as
    printed (eq. 8); `time_sampling` draws (s, t): `paper` (§4) or `grid` ([C], `time_pair`);
    `ema_decay` keeps a moving average of the generator's parameters ([C], `update_average`; the
    paper uses none, at batch 2048) in a state made by `init_train_state(ema=True)`; a state
    without one keeps none.
    """

    num_steps: int = 8
    shift: float = 0.0
    weighting: str = "edm"
    zs_mode: str = "conditional"
    guidance: float = 0.0
    clip: bool = False
    null_label: int | None = None
    regularize_aux: bool = True
    center: str = "none"
    instant_form: str = "symmetric"
    time_sampling: str = "paper"
    ema_decay: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("weighting", self.weighting, WEIGHTINGS)
        _check_choice("z_s mode", self.zs_mode, ZS_MODES)
        _check_choice("centring", self.center, CENTERINGS)
        _check_choice("instant form", self.instant_form, INSTANT_FORMS)
        _check_choice("time sampling", self.time_sampling, TIME_SAMPLINGS)
        if self.num_steps < 1:
            raise ValueError(f"num_steps (k) must be >= 1, got {self.num_steps}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


class DistillInputs(NamedTuple):
    """Everything random about a distillation minibatch except the generator's output."""

    x: Float[Array, "b *dims"]  # real data
    labels: Int[Array, " b"]
    lam_t: Float[Array, " b"]  # the generator's level
    lam_s: Float[Array, " b"]  # the auxiliary's / teacher's level, lam_s >= lam_t
    z_t: Float[Array, "b *dims"]  # noised real data (not the student's chain, MATH.md §3)
    noise_s: Float[Array, "b *dims"]  # drives z_s ~ q(z_s | ...)
    noise_real: Float[Array, "b *dims"]  # drives real pairs (x, z_s ~ q(z_s | x)) for centring


def time_pair(
    u_s: Float[Array, "*b"], u_delta: Float[Array, "*b"], *, num_steps: int, mode: str = "paper"
) -> tuple[Float[Array, "*b"], Float[Array, "*b"]]:
    """Times `(s, t)` in [0, 1] from two U[0, 1) draws (MATH.md §4).

    `paper`: `s = u_s`, `t = min(s + u_delta / k, 1)` (§4). `grid` [C]: `t = ceil(k s) / k` (1/k
    at s = 0), the sampler's own level at or just above s (`u_delta` is drawn but unused). `s`
    keeps its law and `t - s` has the law of §4's `u_delta / k` before the cap at 1, now as a
    function of s; the generator meets only the k levels it is sampled at, and for k = 1 `t = 1`,
    as §9 states for one-step methods (where §4's formula gives `t < 1` half the time). Raises
    ValueError for an unknown mode.
    """
    _check_choice("time sampling", mode, TIME_SAMPLINGS)
    if mode == "grid":
        level = jnp.maximum(jnp.ceil(u_s * num_steps), 1.0) / num_steps
        # float32 can round ceil(k s) / k one ulp below s (e.g. k = 100, s = 0.030000001)
        return u_s, jnp.maximum(level, u_s)
    return u_s, jnp.minimum(u_s + u_delta / num_steps, 1.0)


def distill_inputs(
    key: Keys,
    *,
    x: Float[Array, "b *dims"],
    labels: Int[Array, " b"],
    num_steps: int,
    shift: float,
    time_sampling: str = "paper",
) -> DistillInputs:
    """Time sampling of MATH.md §4 (`time_pair`, `time_sampling` `paper` or `grid` [C]) on the EDM
    schedule, and `z_t = alpha_t x + sigma_t eps`."""
    keys = example_keys(key, x.shape[0])

    def draws(k: PRNGKeyArray) -> tuple[Array, ...]:
        ks, kd, ke, kn, kr = jax.random.split(k, 5)
        s, t = time_pair(
            jax.random.uniform(ks), jax.random.uniform(kd), num_steps=num_steps, mode=time_sampling
        )
        normal = lambda kk: jax.random.normal(kk, x.shape[1:])  # noqa: E731
        return s, t, normal(ke), normal(kn), normal(kr)

    s, t, eps, noise_s, noise_real = jax.vmap(draws)(keys)
    lam_s, lam_t = logsnr_edm(s, shift=shift), logsnr_edm(t, shift=shift)
    return DistillInputs(
        x=x,
        labels=labels,
        lam_t=lam_t,
        lam_s=lam_s,
        z_t=diffuse(x, lam_t, eps),
        noise_s=noise_s,
        noise_real=noise_real,
    )


def _inputs_for(
    key: Keys, *, x: Float[Array, "b *dims"], labels: Int[Array, " b"], cfg: DistillConfig
) -> DistillInputs:
    """`distill_inputs` with the time sampling of `cfg` (k, shift, mode), for the steps."""
    return distill_inputs(
        key,
        x=x,
        labels=labels,
        num_steps=cfg.num_steps,
        shift=cfg.shift,
        time_sampling=cfg.time_sampling,
    )


def draw_zs(
    inputs: DistillInputs, x_gen: Float[Array, "b *dims"], *, mode: str
) -> Float[Array, "b *dims"]:
    """`z_s ~ q(z_s | z_t, sg(x_gen))` (`conditional`, Algorithm 2) or `q(z_s | sg(x_gen))`
    (`marginal`, the ablation of §8). z_s never carries gradient."""
    _check_choice("z_s mode", mode, ZS_MODES)
    x_gen = lax.stop_gradient(x_gen)
    if mode == "marginal":
        return diffuse(x_gen, inputs.lam_s, inputs.noise_s)
    mean, var = posterior(z_t=inputs.z_t, x=x_gen, lam_t=inputs.lam_t, lam_s=inputs.lam_s)
    return mean + _expand(jnp.sqrt(var), mean) * inputs.noise_s


# ----------------------------------------------------------------------------------------------
# §5 Algorithm 2: alternating optimisation with an auxiliary denoiser


def auxiliary_loss(
    auxiliary: Denoiser,
    *,
    generator: Denoiser,
    teacher: Denoiser,
    inputs: DistillInputs,
    cfg: DistillConfig,
    axis_name: str | None = None,
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """`L(phi) = w(s) [||sg(x_gen) - g_phi(z_s)||^2 + ||sg(g_theta(z_s)) - g_phi(z_s)||^2]`
    (Algorithm 2).

    The second (teacher-regulariser) term is switched by `cfg.regularize_aux`. Also returns the
    moment gap `mean w ||g_phi - g_theta||^2` (to the unguided teacher) as a metric.
    """
    x_gen = lax.stop_gradient(generator(inputs.z_t, inputs.lam_t, inputs.labels))
    z_s = draw_zs(inputs, x_gen, mode=cfg.zs_mode)
    x_teacher = lax.stop_gradient(teacher(z_s, inputs.lam_s, inputs.labels))
    x_aux = auxiliary(z_s, inputs.lam_s, inputs.labels)
    w = loss_weight(inputs.lam_s, kind=cfg.weighting, x_gen=x_gen, x_teacher=x_teacher)
    per_example = _sum_dims((x_gen - x_aux) ** 2)
    if cfg.regularize_aux:
        per_example = per_example + _sum_dims((x_teacher - x_aux) ** 2)
    gap = _batch_mean(w * _sum_dims(lax.stop_gradient(x_aux - x_teacher) ** 2), axis_name)
    return _batch_mean(w * per_example, axis_name), {"moment_gap": gap}


def generator_loss(
    generator: Denoiser,
    *,
    auxiliary: Denoiser,
    teacher: Denoiser,
    inputs: DistillInputs,
    cfg: DistillConfig,
    axis_name: str | None = None,
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """`L(eta) = w(s) x_gen^T sg(g_phi(z_s) - g_theta^w(z_s))` (Algorithm 2); guidance and clipping
    on the teacher only. Its value is meaningless (only its gradient matters): the metric is the
    moment gap."""
    x_gen = generator(inputs.z_t, inputs.lam_t, inputs.labels)
    z_s = draw_zs(inputs, x_gen, mode=cfg.zs_mode)
    x_aux = auxiliary(z_s, inputs.lam_s, inputs.labels)
    x_hat, x_cond = guided_denoise(
        teacher,
        z_s,
        inputs.lam_s,
        inputs.labels,
        guidance=cfg.guidance,
        clip=cfg.clip,
        null_label=cfg.null_label,
    )
    direction = lax.stop_gradient(x_aux - x_hat)
    w = loss_weight(inputs.lam_s, kind=cfg.weighting, x_gen=x_gen, x_teacher=x_hat)
    gap = _batch_mean(w * _sum_dims(lax.stop_gradient(x_aux - x_cond) ** 2), axis_name)
    return _batch_mean(w * _sum_dims(x_gen * direction), axis_name), {"moment_gap": gap}


# ----------------------------------------------------------------------------------------------
# §6 Algorithm 3: instant moment matching with two minibatches


def teacher_gradient(
    teacher: Denoiser,
    *,
    x: Float[Array, "b *dims"],
    z_s: Float[Array, "b *dims"],
    lam_s: Float[Array, " b"],
    labels: Int[Array, " b"],
    cfg: DistillConfig,
    axis_name: str | None = None,
) -> tuple[PyTree, Float[Array, " b"]]:
    """`G = grad_theta (1/B) sum w ||x - g_theta^ST(z_s)||^2` on pairs `(x, z_s)` held constant
    (MATH.md §6), with the straight-through guided/clipped teacher; the global-batch mean under
    `axis_name`.

    On generated pairs this is the G of eq. 8-9; on real pairs `(x, z_s ~ q(z_s|x))` it is the
    data-centring gradient. Returns `(G, w)`.
    """
    params, static = eqx.partition(teacher, eqx.is_inexact_array)
    x = lax.stop_gradient(x)

    def loss(p: PyTree) -> tuple[Array, Array]:
        x_hat, x_cond = guided_denoise(
            eqx.combine(p, static),
            z_s,
            lam_s,
            labels,
            guidance=cfg.guidance,
            clip=cfg.clip,
            null_label=cfg.null_label,
        )
        w = loss_weight(lam_s, kind=cfg.weighting, x_gen=x, x_teacher=x_hat)
        return _batch_mean(w * _sum_dims((x - straight_through(x_hat, x_cond)) ** 2), axis_name), w

    grads, w = jax.grad(loss, has_aux=True)(params)
    return grads, w


def _teacher_jvp(teacher: Denoiser, z: Array, lam: Array, labels: Array, tangent: PyTree) -> Array:
    """`J_theta(z) v`: the unmodified conditional teacher's derivative along a parameter
    direction."""
    params, static = eqx.partition(teacher, eqx.is_inexact_array)
    _, out = jax.jvp(lambda p: eqx.combine(p, static)(z, lam, labels), (params,), (tangent,))
    return out


def _centred_gradient(
    teacher: Denoiser,
    *,
    inputs: DistillInputs,
    x_gen: Float[Array, "b *dims"],
    z_s: Float[Array, "b *dims"],
    cfg: DistillConfig,
    real_grad: PyTree | None,
    axis_name: str | None,
) -> tuple[PyTree, Float[Array, " b"]]:
    """`(G, w)` on the generated pairs of one minibatch, less the real-data gradient for
    `cfg.center` = `batch` (the same gradient on real pairs of this minibatch) or `fixed`
    (`real_grad`) [C]."""
    grads, w = teacher_gradient(
        teacher,
        x=x_gen,
        z_s=z_s,
        lam_s=inputs.lam_s,
        labels=inputs.labels,
        cfg=cfg,
        axis_name=axis_name,
    )
    if cfg.center == "batch":
        z_real = diffuse(inputs.x, inputs.lam_s, inputs.noise_real)
        real, _ = teacher_gradient(
            teacher,
            x=inputs.x,
            z_s=z_real,
            lam_s=inputs.lam_s,
            labels=inputs.labels,
            cfg=cfg,
            axis_name=axis_name,
        )
        grads = jax.tree.map(jnp.subtract, grads, real)
    elif cfg.center == "fixed":
        grads = jax.tree.map(jnp.subtract, grads, real_grad)
    return grads, w


def instant_loss(
    generator: Denoiser,
    *,
    teacher: Denoiser,
    precond: PyTree,
    inputs1: DistillInputs,
    inputs2: DistillInputs,
    cfg: DistillConfig,
    real_grad: PyTree | None = None,
    axis_name: str | None = None,
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """Surrogate whose gradient is exactly that of `L_2b = G_1^T Lambda G_2` (eq. 9, reading [D]).

    Teacher VJPs and JVPs, no Hessians (MATH.md §6, [D]): `G_i` on minibatch i,
    `u_1 = J(z_s1) Lambda G_2`, `u_2 = J(z_s2) Lambda G_1`, surrogate
    `-(2/B) sum w (x_gen_1 . sg(u_1) + x_gen_2 . sg(u_2))`. `cfg.instant_form="one_sided"` keeps the
    first term only: Algorithm 3 as printed (eq. 8, `nu = Lambda G_2` from the other minibatch)
    times the factor 2 of `||.||^2`, i.e. the gradient of `G_1^T Lambda sg(G_2)`, whose expectation
    is half the symmetric one's. `cfg.center` subtracts real-data gradients from each `G_i` [C].
    Metric `loss` is the value `G_1^T Lambda G_2` (the monitor the paper plots), `surrogate` the
    surrogate's. Raises ValueError for `center="fixed"` without `real_grad`.
    """
    if cfg.center == "fixed" and real_grad is None:
        raise ValueError("center='fixed' needs real_grad (a mean real-data teacher gradient)")
    x_gen1, x_gen2 = jnp.split(  # both minibatches in one batched pass
        generator(
            jnp.concatenate([inputs1.z_t, inputs2.z_t]),
            jnp.concatenate([inputs1.lam_t, inputs2.lam_t]),
            jnp.concatenate([inputs1.labels, inputs2.labels]),
        ),
        [inputs1.x.shape[0]],
    )
    z_s1 = draw_zs(inputs1, x_gen1, mode=cfg.zs_mode)
    z_s2 = draw_zs(inputs2, x_gen2, mode=cfg.zs_mode)
    (G_1, w1), (G_2, w2) = (  # noqa: N806 (the paper's names)
        _centred_gradient(
            teacher,
            inputs=inputs,
            x_gen=x_gen,
            z_s=z_s,
            cfg=cfg,
            real_grad=real_grad,
            axis_name=axis_name,
        )
        for inputs, x_gen, z_s in ((inputs1, x_gen1, z_s1), (inputs2, x_gen2, z_s2))
    )
    u_1 = _teacher_jvp(teacher, z_s1, inputs1.lam_s, inputs1.labels, _tree_mul(precond, G_2))
    term1 = _batch_mean(w1 * _sum_dims(x_gen1 * lax.stop_gradient(u_1)), axis_name)
    if cfg.instant_form == "one_sided":  # G_2 reaches the generator through minibatch 1 only
        surrogate = -2.0 * term1
    else:
        u_2 = _teacher_jvp(teacher, z_s2, inputs2.lam_s, inputs2.labels, _tree_mul(precond, G_1))
        term2 = _batch_mean(w2 * _sum_dims(x_gen2 * lax.stop_gradient(u_2)), axis_name)
        surrogate = -2.0 * (term1 + term2)
    value = lax.stop_gradient(_tree_vdot(G_1, _tree_mul(precond, G_2)))
    return surrogate, {"loss": value, "surrogate": lax.stop_gradient(surrogate)}


# ----------------------------------------------------------------------------------------------
# §6 The preconditioner Lambda (Adam's diagonal preconditioner of the teacher)


def preconditioner(
    nu: PyTree,
    *,
    count: int | Int[Array, ""],
    b2: float,
    eps: float = 1e-8,
    eps_mode: str = "fixed",
) -> PyTree:
    """`Lambda = 1 / (sqrt(nu_hat) + eps')`, `nu_hat = nu / (1 - b2^count)` (MATH.md §6; eps [C]).

    `eps_mode="fixed"`: `eps' = eps` (the paper's Adam form, default); `"median"`:
    `eps' = eps * median of sqrt(nu_hat)` over all parameters [C], which caps Lambda at
    `1 / (eps * median)` where the teacher's gradients were tiny (a fixed 1e-8 lets it reach 1e8).
    Raises ValueError for an unknown mode.
    """
    _check_choice("eps mode", eps_mode, EPS_MODES)
    correction = 1.0 - jnp.asarray(b2, jnp.float32) ** jnp.asarray(count, jnp.float32)
    root = jax.tree.map(lambda v: jnp.sqrt(v / correction), nu)
    if eps_mode == "median":
        eps = eps * jnp.median(jnp.concatenate([r.ravel() for r in jax.tree.leaves(root)]))
    return jax.tree.map(lambda r: 1.0 / (r + eps), root)


def adam_state(opt_state: PyTree) -> optax.ScaleByAdamState:
    """The one optax Adam state inside an optimiser state (e.g. of `teacher_optimizer`'s chain).
    Raises ValueError when there is none or more than one."""
    states = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)
    ]
    if len(states) != 1:
        raise ValueError(
            f"expected one optax Adam state in the optimiser state, found {len(states)}"
        )
    return states[0]


def preconditioner_from_adam(
    opt_state: PyTree, *, b2: float, eps: float = 1e-8, eps_mode: str = "fixed"
) -> PyTree:
    """Lambda from the teacher's optax Adam state (its bias-corrected `nu`), as loaded from a
    checkpoint (MATH.md §6); `eps`, `eps_mode` as in `preconditioner`."""
    adam = adam_state(opt_state)
    return preconditioner(adam.nu, count=adam.count, b2=b2, eps=eps, eps_mode=eps_mode)


def estimate_preconditioner(
    grads: Iterable[PyTree], *, b2: float, eps: float = 1e-8, eps_mode: str = "fixed"
) -> PyTree:
    """A fresh Lambda from a stream of teacher-loss gradients on real data: Adam's EMA of squared
    gradients with no parameter update, bias-corrected (MATH.md §6); `eps`, `eps_mode` as in
    `preconditioner`."""
    nu, count = None, 0
    for g in grads:
        if nu is None:
            nu = jax.tree.map(jnp.zeros_like, g)
        nu = jax.tree.map(lambda n, x: b2 * n + (1.0 - b2) * jnp.square(x), nu, g)
        count += 1
    if nu is None:
        raise ValueError("estimate_preconditioner needs at least one gradient")
    return preconditioner(nu, count=count, b2=b2, eps=eps, eps_mode=eps_mode)


def preconditioned_shares(precond: PyTree, grads: PyTree) -> dict[str, float]:
    """Each parameter array's share of `||Lambda G||^2` (keyed by its pytree path, largest first):
    which parameter groups dominate the direction `Lambda G` along which Algorithm 3 takes teacher
    JVPs (§6)."""
    paths_and_leaves = jax.tree_util.tree_leaves_with_path(_tree_mul(precond, grads))
    sq = {jax.tree_util.keystr(path): float(jnp.sum(jnp.square(v))) for path, v in paths_and_leaves}
    total = sum(sq.values())
    return {k: v / total for k, v in sorted(sq.items(), key=lambda kv: -kv[1])}


# ----------------------------------------------------------------------------------------------
# §7 Classifier-free guidance and clipping; §6 straight-through


def check_guidance(
    *, guidance: float, num_classes: int, label_dropout: float | None, where: str
) -> None:
    """Refuse guidance weight `guidance` != 0 (MATH.md §7) where the null label never trained: an
    unconditional model (`num_classes` 0), or a teacher trained with `label_dropout` 0 (its
    null-label embedding got no gradient). `label_dropout` None: unknown (a student).

    Raises ValueError naming `where`."""
    if guidance == 0.0:
        return
    if num_classes == 0:
        raise ValueError(
            f"{where}: guidance {guidance:g} needs a class-conditional model, this "
            "one is unconditional (num_classes 0); use guidance 0"
        )
    if label_dropout == 0.0:
        raise ValueError(
            f"{where} was trained with label dropout 0, so its null label never "
            f"learned the unconditional model that guidance {guidance:g} uses; use "
            "guidance 0, or a teacher trained with --label-dropout > 0 (default 0.1)"
        )


def guided_denoise(
    denoiser: Denoiser,
    z: Float[Array, "b *dims"],
    lam: Float[Array, " b"],
    labels: Int[Array, " b"],
    *,
    guidance: float,
    clip: bool,
    null_label: int | None,
) -> tuple[Float[Array, "b *dims"], Float[Array, "b *dims"]]:
    """`(clip((1 + w) g(z, c) - w g(z, null)), g(z, c))`: the guided, clipped prediction and the
    plain conditional one (MATH.md §7). The conditional and null passes share one batched call."""
    if guidance == 0.0:
        x_cond = denoiser(z, lam, labels)
        x_hat = x_cond
    else:
        if null_label is None:
            raise ValueError(
                "guidance != 0 needs null_label (the extra class the teacher was trained with)"
            )
        b = z.shape[0]
        both = denoiser(
            jnp.concatenate([z, z]),
            jnp.concatenate([lam, lam]),
            jnp.concatenate([labels, jnp.full_like(labels, null_label)]),
        )
        x_cond, x_null = both[:b], both[b:]
        x_hat = (1.0 + guidance) * x_cond - guidance * x_null
    if clip:
        x_hat = jnp.clip(x_hat, -1.0, 1.0)
    return x_hat, x_cond


def straight_through(
    x_hat: Float[Array, "b *dims"], x_cond: Float[Array, "b *dims"]
) -> Float[Array, "b *dims"]:
    """`g_ST = g(z, c) + sg(g_hat - g(z, c))`: value of the guided/clipped teacher, derivative of
    the plain one (MATH.md §6)."""
    return x_cond + lax.stop_gradient(x_hat - x_cond)


# ----------------------------------------------------------------------------------------------
# §10 Optimisers (paper Appendix B)


def warmup_linear_schedule(
    *, peak_lr: float, warmup_steps: int, total_steps: int | None
) -> Callable[[Int[Array, ""]], Float[Array, ""]]:
    """Linear warm-up to `peak_lr` over `warmup_steps` updates, then linear decay to 0 at
    `total_steps` (Appendix B, MATH.md §10); `total_steps=None` keeps the peak after warm-up (the
    teacher's choice, [C])."""

    def schedule(count: Int[Array, ""]) -> Float[Array, ""]:
        n = jnp.asarray(count, jnp.float32)
        lr = peak_lr * jnp.minimum((n + 1.0) / max(warmup_steps, 1), 1.0)
        if total_steps is None:
            return lr
        return lr * jnp.clip((total_steps - n) / max(total_steps - warmup_steps, 1), 0.0, 1.0)

    return schedule


def distill_optimizer(
    *, peak_lr: float, total_steps: int, warmup_steps: int = 1000, b1: float = 0.0
) -> optax.GradientTransformation:
    """Generator/auxiliary optimiser of Appendix B: global-norm clip 1, Adam(b1=0, b2=0.99,
    eps=1e-12), warm-up then linear decay (MATH.md §10; the peak learning rate is [C]).

    `b1 > 0` adds momentum [C]: the paper's b1 = 0 is set at batch 2048; at small batches each
    update then moves every parameter by about the rate in a mostly random direction.
    Raises ValueError unless 0 <= b1 < 1.
    """
    if not 0.0 <= b1 < 1.0:
        raise ValueError(f"Adam's b1 must be in [0, 1), got {b1}")
    schedule = warmup_linear_schedule(
        peak_lr=peak_lr, warmup_steps=warmup_steps, total_steps=total_steps
    )
    return optax.chain(
        optax.clip_by_global_norm(1.0), optax.adam(schedule, b1=b1, b2=0.99, eps=1e-12)
    )


def teacher_optimizer(
    *,
    peak_lr: float,
    warmup_steps: int = 1000,
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """Teacher optimiser [C]: global-norm clip 1, Adam with warm-up then a constant rate. Its `nu`
    (with this `b2`) later gives the preconditioner Lambda."""
    schedule = warmup_linear_schedule(peak_lr=peak_lr, warmup_steps=warmup_steps, total_steps=None)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule, b1=b1, b2=b2, eps=eps))


# ----------------------------------------------------------------------------------------------
# Training steps: one per-device step per variant (Algorithm 2, Algorithm 3, teacher training), run
# data-parallel by `data_parallel` (jax.shard_map over the mesh axis "data", then jax.jit)


class TrainState(NamedTuple):
    """What a step updates: the trained model (teacher or generator), for `alternating` the
    auxiliary, and with `ema_decay > 0` the moving average of the trained model's parameters (what
    it is sampled with)."""

    step: Int[Array, ""]
    params: PyTree
    opt_state: PyTree
    aux_params: PyTree = None
    aux_opt_state: PyTree = None
    ema: PyTree = None


class Frozen(NamedTuple):
    """What distillation reads but never updates: teacher parameters, Lambda, the fixed centring
    gradient."""

    teacher: PyTree = None
    precond: PyTree = None
    real_grad: PyTree = None


def init_train_state(
    *,
    params: PyTree,
    optimizer: optax.GradientTransformation,
    aux_optimizer: optax.GradientTransformation | None = None,
    ema: bool = False,
) -> TrainState:
    """Step 0. For distillation pass the teacher's parameters: generator and auxiliary start as
    copies of it (§5). With `ema` the moving average of the trained model starts as a copy of
    the initial parameters.

    Copies, so that a step that donates its state never frees the caller's (e.g. the frozen
    teacher's) buffers.
    """

    def copy() -> PyTree:
        return jax.tree.map(jnp.copy, params)

    trained = copy()
    aux = None if aux_optimizer is None else copy()
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=trained,
        opt_state=optimizer.init(trained),
        aux_params=aux,
        aux_opt_state=None if aux_optimizer is None else aux_optimizer.init(aux),
        ema=copy() if ema else None,
    )


def ema_decay(step: Int[Array, ""], *, decay: float) -> Float[Array, ""]:
    """Decay of a parameter average at update `step` (0-based): `min(decay, (1 + t) / (10 + t))`, so
    a short run averages over its recent past (about its last `(10 + t) / 9` updates while the cap
    is not reached) rather than its initialisation ([C], TensorFlow's
    `ExponentialMovingAverage(num_updates=t)`)."""
    t = step.astype(jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + t) / (10.0 + t))


def update_average(
    average: PyTree, params: PyTree, *, step: Int[Array, ""], decay: float
) -> PyTree:
    """The moving average after update `step` (0-based) of the trained model (teacher, or [C] the
    generator): `d a + (1 - d) p` with `d = ema_decay(step)`; `None` (no average kept) stays
    `None`."""
    if average is None:
        return None
    d = ema_decay(step, decay=decay)
    return jax.tree.map(lambda a, p: d * a + (1.0 - d) * p, average, params)


def _global_keys(
    key: PRNGKeyArray, n_local: int, offset: int | Int[Array, ""] = 0
) -> Key[Array, " n"]:
    """Per-example keys `fold_in(key, global index)`, so results do not depend on the device
    count."""
    start = offset + lax.axis_index("data") * n_local
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(start + jnp.arange(n_local))


def _descend(
    loss_fn: Callable[[PyTree], tuple[Array, dict[str, Array]]],
    optimizer: optax.GradientTransformation,
    params: PyTree,
    opt_state: PyTree,
) -> tuple[PyTree, PyTree, dict[str, Array]]:
    """One optimiser step on `loss_fn(params) -> (loss, metrics)`; metrics gain `loss` and
    `grad_norm`."""
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    # optax's Adam bias correction computes `decay ** count` with an int32 count: implicit
    # int->float promotion that strict promotion mode (used to check this file) rejects.
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = optimizer.update(grads, opt_state, params)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}
    return optax.apply_updates(params, updates), opt_state, metrics


def teacher_step(
    state: TrainState,
    frozen: Frozen,
    x: Float[Array, "b *dims"],
    labels: Int[Array, " b"],
    key: PRNGKeyArray,
    *,
    static: PyTree,
    optimizer: optax.GradientTransformation,
    cfg: TeacherConfig,
) -> tuple[TrainState, dict[str, Array]]:
    """One teacher update on this device's slice of the batch: the gradient of the global-batch mean
    `teacher_loss`, then the parameters' moving average (`cfg.ema_decay`). `frozen` is unused."""
    keys = _global_keys(key, x.shape[0])

    def loss(params: PyTree) -> tuple[Array, dict[str, Array]]:
        denoiser = eqx.combine(params, static)
        return teacher_loss(denoiser, keys, x=x, labels=labels, cfg=cfg, axis_name="data"), {}

    params, opt_state, metrics = _descend(loss, optimizer, state.params, state.opt_state)
    average = update_average(state.ema, params, step=state.step, decay=cfg.ema_decay)
    state = state._replace(step=state.step + 1, params=params, opt_state=opt_state, ema=average)
    return state, metrics


def auxiliary_step(
    state: TrainState,
    frozen: Frozen,
    x: Float[Array, "b *dims"],
    labels: Int[Array, " b"],
    key: PRNGKeyArray,
    *,
    static: PyTree,
    optimizer: optax.GradientTransformation,
    cfg: DistillConfig,
) -> tuple[TrainState, dict[str, Array]]:
    """Algorithm 2, the auxiliary's update (the first `aux_steps` of each cycle, see `train_steps`):
    descend `L(phi)` (`auxiliary_loss`) on a fresh minibatch with the auxiliary's `optimizer`; the
    generator and the teacher stay fixed."""
    inputs = _inputs_for(_global_keys(key, x.shape[0]), x=x, labels=labels, cfg=cfg)
    generator, teacher = eqx.combine(state.params, static), eqx.combine(frozen.teacher, static)

    def loss(aux_params: PyTree) -> tuple[Array, dict[str, Array]]:
        auxiliary = eqx.combine(aux_params, static)
        return auxiliary_loss(
            auxiliary,
            generator=generator,
            teacher=teacher,
            inputs=inputs,
            cfg=cfg,
            axis_name="data",
        )

    params, opt_state, metrics = _descend(loss, optimizer, state.aux_params, state.aux_opt_state)
    metrics["generator_step"] = jnp.asarray(0.0)
    return state._replace(step=state.step + 1, aux_params=params, aux_opt_state=opt_state), metrics


def generator_step(
    state: TrainState,
    frozen: Frozen,
    x: Float[Array, "b *dims"],
    labels: Int[Array, " b"],
    key: PRNGKeyArray,
    *,
    static: PyTree,
    optimizer: optax.GradientTransformation,
    cfg: DistillConfig,
    aux_steps: int = 1,
) -> tuple[TrainState, dict[str, Array]]:
    """Algorithm 2, the generator's update (the last step of each cycle of `aux_steps` + 1, see
    `train_steps`): descend `L(eta)` (`generator_loss`) on a fresh minibatch with the generator's
    `optimizer`, then its moving average (`cfg.ema_decay`, counting generator updates); the
    auxiliary and the teacher stay fixed."""
    inputs = _inputs_for(_global_keys(key, x.shape[0]), x=x, labels=labels, cfg=cfg)
    teacher, auxiliary = eqx.combine(frozen.teacher, static), eqx.combine(state.aux_params, static)

    def loss(params: PyTree) -> tuple[Array, dict[str, Array]]:
        generator = eqx.combine(params, static)
        return generator_loss(
            generator,
            auxiliary=auxiliary,
            teacher=teacher,
            inputs=inputs,
            cfg=cfg,
            axis_name="data",
        )

    params, opt_state, metrics = _descend(loss, optimizer, state.params, state.opt_state)
    metrics["generator_step"] = jnp.asarray(1.0)
    update = state.step // (aux_steps + 1)
    average = update_average(state.ema, params, step=update, decay=cfg.ema_decay)
    state = state._replace(step=state.step + 1, params=params, opt_state=opt_state, ema=average)
    return state, metrics


def instant_step(
    state: TrainState,
    frozen: Frozen,
    x: Float[Array, "2 b *dims"],
    labels: Int[Array, "2 b"],
    key: PRNGKeyArray,
    *,
    static: PyTree,
    optimizer: optax.GradientTransformation,
    cfg: DistillConfig,
) -> tuple[TrainState, dict[str, Array]]:
    """Algorithm 3, one generator update: descend `instant_loss` on the two independent minibatches
    `x[0]`, `x[1]` (this device's slices of each), with Lambda and the teacher from `frozen`; then
    the generator's moving average (`cfg.ema_decay`)."""
    n = x.shape[1]
    inputs1 = _inputs_for(_global_keys(key, n), x=x[0], labels=labels[0], cfg=cfg)
    # Minibatch 2's examples are numbered after all of minibatch 1's (n per device).
    inputs2 = _inputs_for(
        _global_keys(key, n, offset=n * lax.axis_size("data")), x=x[1], labels=labels[1], cfg=cfg
    )
    teacher = eqx.combine(frozen.teacher, static)

    def loss(params: PyTree) -> tuple[Array, dict[str, Array]]:
        return instant_loss(
            eqx.combine(params, static),
            teacher=teacher,
            precond=frozen.precond,
            inputs1=inputs1,
            inputs2=inputs2,
            cfg=cfg,
            real_grad=frozen.real_grad,
            axis_name="data",
        )

    params, opt_state, metrics = _descend(loss, optimizer, state.params, state.opt_state)
    average = update_average(state.ema, params, step=state.step, decay=cfg.ema_decay)
    state = state._replace(step=state.step + 1, params=params, opt_state=opt_state, ema=average)
    return state, metrics


def real_data_gradients(
    params: PyTree,
    x: Float[Array, "b *dims"],
    labels: Int[Array, " b"],
    key: PRNGKeyArray,
    *,
    static: PyTree,
    teacher_cfg: TeacherConfig,
    distill_cfg: DistillConfig,
) -> tuple[PyTree, PyTree]:
    """`(grad of teacher_loss, real-data G)` of the teacher on one batch of real data: the stream
    for `estimate_preconditioner` and the mean real-data gradient subtracted by `center="fixed"`
    (MATH.md §6)."""
    teacher = eqx.combine(params, static)
    k_teacher, k_real = (_global_keys(jax.random.fold_in(key, i), x.shape[0]) for i in (0, 1))
    g_teacher = eqx.filter_grad(
        lambda m: teacher_loss(m, k_teacher, x=x, labels=labels, cfg=teacher_cfg, axis_name="data")
    )(teacher)
    inputs = _inputs_for(k_real, x=x, labels=labels, cfg=distill_cfg)
    z_real = diffuse(x, inputs.lam_s, inputs.noise_real)
    g_real, _ = teacher_gradient(
        teacher,
        x=x,
        z_s=z_real,
        lam_s=inputs.lam_s,
        labels=labels,
        cfg=distill_cfg,
        axis_name="data",
    )
    return eqx.filter(g_teacher, eqx.is_inexact_array), g_real


def data_mesh(devices: Sequence[Any] | None = None, *, num_devices: int = 0) -> Mesh:
    """A 1-D mesh with axis "data" over `devices`; else over the first `num_devices` local devices;
    else (`num_devices=0`) over every device of every process. Raises ValueError for an impossible
    count."""
    if devices is None and num_devices == 0:
        devices = jax.devices()
    elif devices is None:
        if jax.process_count() > 1:
            raise ValueError(
                "num_devices selects local devices of a single process; leave it 0 in "
                "multi-process runs"
            )
        if num_devices > jax.local_device_count():
            raise ValueError(
                f"num_devices={num_devices} but only {jax.local_device_count()} "
                "local devices exist; choose fewer"
            )
        devices = jax.local_devices()[:num_devices]
    return Mesh(np.asarray(devices), ("data",), axis_types=(AxisType.Auto,))


def check_batch_size(
    batch_size: int, *, num_devices: int, minibatches: int = 1, num_processes: int = 1
) -> None:
    """Refuse (ValueError) a global batch that the devices, the instant variant's `minibatches` and
    the processes (each loads an equal slice) cannot split evenly."""
    divisor = num_devices * minibatches
    if batch_size % divisor or batch_size % num_processes:
        what = f"{num_devices} devices"
        if minibatches > 1:
            what += f" x {minibatches} minibatches"
        raise ValueError(
            f"batch size {batch_size} is not divisible by {divisor} ({what}); use a "
            f"multiple of {math.lcm(divisor, num_processes)}"
        )


def data_parallel(
    step: Callable, *, mesh: Mesh, minibatches: int = 1, donate: bool = True
) -> Callable:
    """`jit(shard_map(step))`: run a per-device `step(*replicated, x, labels, key)` with the
    replicated arguments (state, frozen, parameters) and `key` on every device and the batch `x`,
    `labels` split over mesh axis "data"; outputs are replicated. With `minibatches=2` (Algorithm 3)
    the batch is first cut into `(2, b/2, ...)`, each minibatch split over the devices. `donate`
    gives the first argument's buffers to XLA. Inside `step`, losses are global-batch means
    (`pmean`), so gradients are those of the global loss. Raises ValueError (before compiling) for
    a batch the devices cannot split."""
    n_dev = mesh.shape["data"]
    batch_spec = P("data") if minibatches == 1 else P(None, "data")

    def run(*args: Any) -> Any:
        *replicated, x, labels, key = args
        check_batch_size(x.shape[0], num_devices=n_dev, minibatches=minibatches)
        if minibatches > 1:
            x = x.reshape((minibatches, x.shape[0] // minibatches) + x.shape[1:])
            labels = labels.reshape(minibatches, -1)
        specs = (P(),) * len(replicated) + (batch_spec, batch_spec, P())
        sharded = jax.shard_map(step, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=True)
        return sharded(*replicated, x, labels, key)

    return jax.jit(run, donate_argnums=(0,) if donate else ())


def train_steps(
    variant: str,
    *,
    static: PyTree,
    mesh: Mesh,
    optimizer: optax.GradientTransformation,
    aux_optimizer: optax.GradientTransformation | None = None,
    teacher_cfg: TeacherConfig | None = None,
    distill_cfg: DistillConfig | None = None,
    aux_steps: int = 1,
    donate: bool = True,
) -> tuple[Callable[..., tuple[TrainState, dict[str, Array]]], ...]:
    """The jitted programs `(state, frozen, x, labels, key) -> (state, metrics)` of a variant;
    update `i` (0-based) runs `programs[i % len(programs)]`: `(teacher_step,)`, `(instant_step,)`,
    or for `alternating` `aux_steps` times `auxiliary_step`, then `generator_step` (§5 alternates
    one of each; more auxiliary updates per generator update are DMD2's two-timescale rule, [C]).
    Programs picked on the host, not one `lax.cond`: XLA:CPU ran the conditional ~6x slower.
    `static` is the non-parameter part of the model (`eqx.partition(model, eqx.is_inexact_array)`).
    Raises ValueError for a missing setting, `aux_steps < 1`, or `aux_steps > 1` for another
    variant."""
    _check_choice("variant", variant, VARIANTS)
    if aux_steps < 1 or (aux_steps != 1 and variant != "alternating"):
        raise ValueError(f"aux_steps must be >= 1 (alternating) or 1, got {aux_steps} ({variant})")
    if variant == "teacher" and teacher_cfg is None:
        raise ValueError("the teacher step needs teacher_cfg")
    if variant != "teacher" and distill_cfg is None:
        raise ValueError(f"the {variant} step needs distill_cfg")
    if variant == "alternating" and aux_optimizer is None:
        raise ValueError("the alternating step needs aux_optimizer")
    if variant == "teacher":
        step = functools.partial(teacher_step, static=static, optimizer=optimizer, cfg=teacher_cfg)
        return (data_parallel(step, mesh=mesh, donate=donate),)
    if variant == "instant":
        step = functools.partial(instant_step, static=static, optimizer=optimizer, cfg=distill_cfg)
        return (data_parallel(step, mesh=mesh, minibatches=2, donate=donate),)
    aux = functools.partial(auxiliary_step, static=static, optimizer=aux_optimizer, cfg=distill_cfg)
    gen = functools.partial(
        generator_step, static=static, optimizer=optimizer, cfg=distill_cfg, aux_steps=aux_steps
    )
    aux_program = data_parallel(aux, mesh=mesh, donate=donate)
    return (aux_program,) * aux_steps + (data_parallel(gen, mesh=mesh, donate=donate),)
