"""mmd.py's Algorithm 2 auxiliary, distillation inputs and z_s draws against references that do not
use mmd.py: closed-form Gaussian conditioning on a linear-Gaussian toy, finite differences, the
schedule's closed-form CDF (scipy's Kolmogorov-Smirnov test), Monte Carlo moments; and the shift
from the command line to the losses' settings."""

import dataclasses
import math
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from jax.flatten_util import ravel_pytree

import mmd
import train
from uvit import MLPDenoiser

F32 = jnp.float32
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0


def test_the_suite_runs_on_the_cpu_with_eight_fake_devices():
    """conftest.py forces the CPU platform: on a machine with an accelerator the exact comparisons
    and the 8 fake devices would otherwise silently test another backend."""
    assert os.environ["JAX_PLATFORMS"] == "cpu"
    assert jax.default_backend() == "cpu" and len(jax.devices()) == 8


class Linear(eqx.Module):
    """`x_hat = W z + b`, ignoring the level and the label: a denoiser whose optimum is closed-form
    on jointly Gaussian inputs."""

    w: jax.Array
    b: jax.Array

    def __call__(self, z, lam, label):
        return z @ self.w.T + self.b[None]


def _alpha_sigma(lam):
    """numpy float64 `(alpha, sigma)` from log-SNR: alpha^2 = 1 / (1 + e^-lam)."""
    lam = np.asarray(lam, np.float64)
    return np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam)))


def _conditioning(lam_t, lam_s):
    """`(c_z, c_x, var)` of q(z_s | z_t, x) = N(c_x x + c_z z_t, var): Gaussian conditioning of
    z_t = alpha_{t|s} z_s + sigma_{t|s} e on z_s = alpha_s x + sigma_s e' (not MATH.md's form)."""
    a_t, s_t = _alpha_sigma(lam_t)
    a_s, s_s = _alpha_sigma(lam_s)
    a_ts = a_t / a_s
    c_z = a_ts * s_s**2 / s_t**2  # Cov(z_s, z_t | x) / Var(z_t | x)
    return c_z, a_s - c_z * a_t, s_s**2 - a_ts**2 * s_s**4 / s_t**2


# ---------------------------------------------------------------------------------- §5 auxiliary

LAM_T, LAM_S = -1.0, 1.5
MX = np.array([0.3, -0.2])
LX = np.array([[0.5, 0.0], [0.2, 0.3]])  # x = MX + LX e
A = np.array([[0.9, 0.3], [-0.4, 0.7]])  # generator x_gen = A z_t + C
C = np.array([0.1, -0.3])
T, D = np.array([[0.2, -0.5], [0.6, 0.1]]), np.array([-0.4, 0.2])  # teacher T z + D


def _toy_inputs(key, n):
    """`DistillInputs` of the linear-Gaussian toy at the fixed levels (LAM_T, LAM_S)."""
    kx, ke, kn = jax.random.split(key, 3)
    x = jnp.asarray(MX, F32)[None] + jax.random.normal(kx, (n, 2)) @ jnp.asarray(LX, F32).T
    a_t, s_t = (float(v) for v in _alpha_sigma(LAM_T))
    return mmd.DistillInputs(
        x=x,
        labels=jnp.zeros(n, jnp.int32),
        lam_t=jnp.full((n,), LAM_T, F32),
        lam_s=jnp.full((n,), LAM_S, F32),
        z_t=a_t * x + s_t * jax.random.normal(ke, (n, 2)),
        noise_s=jax.random.normal(kn, (n, 2)),
        noise_real=jnp.zeros((n, 2), F32),
    )


def _conditional_expectation():
    """`(W*, b*)` with E[x_gen | z_s] = W* z_s + b*: all of x, eps, n are Gaussian and every map is
    linear, so the conditional expectation is the linear regression of x_gen on z_s."""
    a_t, s_t = _alpha_sigma(LAM_T)
    c_z, c_x, var = _conditioning(LAM_T, LAM_S)
    sx = LX @ LX.T
    m = c_z * np.eye(2) + c_x * A  # z_s = m z_t + c_x C + sqrt(var) n
    cov_zs = a_t**2 * m @ sx @ m.T + s_t**2 * m @ m.T + var * np.eye(2)
    cov_gz = a_t**2 * A @ sx @ m.T + s_t**2 * A @ m.T
    w = cov_gz @ np.linalg.inv(cov_zs)
    return w, (a_t * A @ MX + C) - w @ (a_t * m @ MX + c_x * C)


def _minimiser_of_auxiliary_loss(cfg, inputs):
    """The minimiser of mmd.auxiliary_loss over linear auxiliaries: the loss is quadratic in
    (W, b), so one Newton step from anywhere lands on it."""
    generator = Linear(jnp.asarray(A, F32), jnp.asarray(C, F32))
    teacher = Linear(jnp.asarray(T, F32), jnp.asarray(D, F32))
    start, unravel = ravel_pytree(Linear(jnp.zeros((2, 2), F32), jnp.zeros(2, F32)))

    def loss(p):
        return mmd.auxiliary_loss(
            unravel(p), generator=generator, teacher=teacher, inputs=inputs, cfg=cfg
        )[0]

    step = jnp.linalg.solve(jax.hessian(loss)(start), jax.grad(loss)(start))
    best = unravel(start - step)
    return np.asarray(best.w, np.float64), np.asarray(best.b, np.float64)


@pytest.mark.parametrize("regularize", [False, True])
def test_auxiliary_optimum_is_the_conditional_expectation_or_its_mixture_with_the_teacher(
    regularize,
):
    """Algorithm 2's L(phi) on a linear-Gaussian toy at fixed levels: its minimiser is E[x_gen |
    z_s] (the regression of x_gen on z_s in closed form), and with the teacher regulariser the
    average of that and the teacher, (E[x_gen | z_s] + g_theta(z_s)) / 2 (MATH.md §5)."""
    cfg = mmd.DistillConfig(num_steps=4, weighting="edm", regularize_aux=regularize)
    w_opt, b_opt = _minimiser_of_auxiliary_loss(cfg, _toy_inputs(jax.random.key(0), 200_000))
    w_star, b_star = _conditional_expectation()
    if regularize:
        w_star, b_star = (w_star + T) / 2, (b_star + D) / 2
    assert np.abs(_conditional_expectation()[0] - T).min() > 0.2  # the two optima are far apart
    np.testing.assert_allclose(w_opt, w_star, atol=0.01)
    np.testing.assert_allclose(b_opt, b_star, atol=0.01)


def test_auxiliary_loss_and_moment_gap_equal_their_definitions_by_hand():
    """Value of L(phi) and the moment gap `mean w ||g_phi - g_theta||^2`, with z_s drawn by hand
    (closed-form conditioning) and w = SNR + 4 per example, on per-example levels."""
    n = 16
    rng = np.random.default_rng(0)
    lam_t = rng.uniform(-6, 2, n)
    lam_s = lam_t + rng.uniform(0.1, 5, n)
    x, eps, noise = (rng.normal(size=(n, 2)) for _ in range(3))
    a_t, s_t = _alpha_sigma(lam_t)
    z_t = a_t[:, None] * x + s_t[:, None] * eps
    f32 = lambda v: jnp.asarray(v, F32)  # noqa: E731
    inputs = mmd.DistillInputs(
        x=f32(x),
        labels=jnp.zeros(n, jnp.int32),
        lam_t=f32(lam_t),
        lam_s=f32(lam_s),
        z_t=f32(z_t),
        noise_s=f32(noise),
        noise_real=f32(0 * noise),
    )
    aux_w, aux_b = np.array([[1.1, 0.2], [0.0, 0.8]]), np.array([0.05, 0.1])
    auxiliary = Linear(jnp.asarray(aux_w, F32), jnp.asarray(aux_b, F32))
    generator = Linear(jnp.asarray(A, F32), jnp.asarray(C, F32))
    teacher = Linear(jnp.asarray(T, F32), jnp.asarray(D, F32))
    x_gen = z_t @ A.T + C
    c_z, c_x, var = _conditioning(lam_t, lam_s)
    z_s = c_z[:, None] * z_t + c_x[:, None] * x_gen + np.sqrt(var)[:, None] * noise
    g_phi, g_theta = z_s @ aux_w.T + aux_b, z_s @ T.T + D
    w = np.exp(lam_s) + 4.0
    gap = np.mean(w * np.sum((g_phi - g_theta) ** 2, 1))
    for regularize in (False, True):
        cfg = mmd.DistillConfig(num_steps=4, weighting="edm", regularize_aux=regularize)
        loss, metrics = mmd.auxiliary_loss(
            auxiliary, generator=generator, teacher=teacher, inputs=inputs, cfg=cfg
        )
        per_example = np.sum((x_gen - g_phi) ** 2, 1)
        if regularize:
            per_example += np.sum((g_theta - g_phi) ** 2, 1)
        assert float(loss) == pytest.approx(np.mean(w * per_example), rel=1e-4)
        assert float(metrics["moment_gap"]) == pytest.approx(gap, rel=1e-4)


def test_auxiliary_gradient_matches_finite_differences():
    """The gradient of L(phi) for an MLP auxiliary, along a random unit direction, equals the
    central difference of the loss's value (both of its terms depend on phi)."""
    inputs = mmd.distill_inputs(
        jax.random.key(1),
        x=jax.random.uniform(jax.random.key(2), (64, 2), minval=-1, maxval=1),
        labels=jnp.zeros(64, jnp.int32),
        num_steps=4,
        shift=0.0,
    )
    nets = [
        MLPDenoiser(dim=2, width=16, depth=2, num_classes=0, key=jax.random.key(i))
        for i in range(3)
    ]
    cfg = mmd.DistillConfig(num_steps=4, weighting="flat")
    params, unravel = ravel_pytree(eqx.filter(nets[0], eqx.is_inexact_array))
    static = eqx.filter(nets[0], eqx.is_inexact_array, inverse=True)

    @jax.jit
    def loss(p):
        aux = eqx.combine(unravel(p), static)
        return mmd.auxiliary_loss(aux, generator=nets[1], teacher=nets[2], inputs=inputs, cfg=cfg)[
            0
        ]

    grad = jax.grad(loss)(params)
    norm = float(jnp.linalg.norm(grad))
    h = 1e-2
    for direction in (grad, jax.random.normal(jax.random.key(3), params.shape)):
        direction = direction / jnp.linalg.norm(direction)
        analytic = float(jnp.vdot(grad, direction))
        numeric = (float(loss(params + h * direction)) - float(loss(params - h * direction))) / (
            2 * h
        )
        assert abs(numeric - analytic) < 2e-3 * norm, (numeric, analytic, norm)
    assert norm > 0.1


# ------------------------------------------------------------------------- §4 distillation inputs


def _edm_u(lam, shift):
    """The inverse of the EDM schedule: the u in [0, 1] at which lam(u) = lam (float64)."""
    a, b = SIGMA_MIN ** (1 / RHO), SIGMA_MAX ** (1 / RHO)
    sbar = np.exp(-(np.asarray(lam, np.float64) - shift) / 2)
    return (sbar ** (1 / RHO) - a) / (b - a)


def _paper_inputs(k, shift, n=20_000):
    x = jnp.asarray(np.random.default_rng(k).uniform(-1, 1, (n, 1)), F32)
    return x, mmd.distill_inputs(
        jax.random.key(k), x=x, labels=jnp.zeros(n, jnp.int32), num_steps=k, shift=shift
    )


@pytest.mark.parametrize("k", [1, 4])
def test_distill_inputs_draw_the_papers_levels(k):
    """§4 after the resolution shift: lam_s has the law of lam(U[0, 1]), CDF 1 - u(l) with u the
    schedule's closed-form inverse (KS test); t = min(s + U[0, 1/k], 1): t - s in [0, 1/k], an
    atom of mass 1/(2k) at t = 1, and below it the CDF of s + U[0, 1/k], x - h/2 (x >= h) or
    x^2 / (2h) (x < h) with h = 1/k, renormalised."""
    shift = mmd.resolution_shift(32)
    _, inputs = _paper_inputs(k, shift)
    u_s, u_t = _edm_u(inputs.lam_s, shift), _edm_u(inputs.lam_t, shift)
    cdf_s = lambda lam: np.clip(1.0 - _edm_u(lam, shift), 0.0, 1.0)  # noqa: E731
    assert scipy.stats.kstest(np.asarray(inputs.lam_s, np.float64), cdf_s).pvalue > 1e-3
    h = 1.0 / k
    gap = u_t - u_s
    assert gap.min() > -1e-4 and gap.max() < h + 1e-4
    top = u_t > 1 - 1e-4
    n = u_t.size
    assert abs(top.mean() - h / 2) < 4 * math.sqrt(h / 2 * (1 - h / 2) / n)

    def cdf_t(v):
        return np.where(v >= h, v - h / 2, v**2 / (2 * h)) / (1 - h / 2)

    assert scipy.stats.kstest(u_t[~top], cdf_t).pvalue > 1e-3


def test_z_t_is_drawn_from_q_of_z_t_given_x():
    """`z_t = alpha_t x + sigma_t eps`: the residual `(z_t - alpha_t x) / sigma_t` is N(0, 1) (KS)
    and uncorrelated with x, at the example's own lam_t."""
    x, inputs = _paper_inputs(3, 0.5)
    a_t, s_t = _alpha_sigma(inputs.lam_t)
    x = np.asarray(x, np.float64)[:, 0]
    residual = (np.asarray(inputs.z_t, np.float64)[:, 0] - a_t * x) / s_t
    assert scipy.stats.kstest(residual, "norm").pvalue > 1e-3
    assert abs(np.corrcoef(residual, x)[0, 1]) < 4 / math.sqrt(x.size)


@pytest.mark.parametrize("lam_t, lam_s", [(-8.0, -7.99), (-3.0, 2.0), (0.5, 12.0)])
def test_draw_zs_has_the_posterior_moments_by_monte_carlo(lam_t, lam_s):
    """`draw_zs` with the noise the inputs carry, one (z_t, x_gen) repeated: sample mean and
    variance against Gaussian conditioning (conditional) and N(alpha_s x_gen, sigma_s^2) (marginal);
    no gradient reaches x_gen."""
    n = 40_000
    z_t1, x_gen1 = np.array([0.7, -1.3]), np.array([-0.4, 0.9])
    inputs = mmd.DistillInputs(
        x=jnp.zeros((n, 2), F32),
        labels=jnp.zeros(n, jnp.int32),
        lam_t=jnp.full((n,), lam_t, F32),
        lam_s=jnp.full((n,), lam_s, F32),
        z_t=jnp.tile(jnp.asarray(z_t1, F32), (n, 1)),
        noise_s=jax.random.normal(jax.random.key(0), (n, 2)),
        noise_real=jnp.zeros((n, 2), F32),
    )
    x_gen = jnp.tile(jnp.asarray(x_gen1, F32), (n, 1))
    c_z, c_x, var = _conditioning(lam_t, lam_s)
    a_s, s_s = _alpha_sigma(lam_s)
    expected = {
        "conditional": (c_z * z_t1 + c_x * x_gen1, var),
        "marginal": (a_s * x_gen1, s_s**2),
    }
    for mode, (mean, variance) in expected.items():
        z_s = np.asarray(mmd.draw_zs(inputs, x_gen, mode=mode), np.float64)
        assert np.all(np.abs(z_s.mean(0) - mean) < 5 * math.sqrt(variance / n) + 1e-6)
        np.testing.assert_allclose(z_s.var(0), variance, rtol=5 * math.sqrt(2 / n))
        grad = jax.grad(lambda g, mode=mode: jnp.sum(mmd.draw_zs(inputs, g, mode=mode)))(x_gen)
        assert not np.any(np.asarray(grad))


# ---------------------------------------------------------------------------------- shift to losses


@pytest.mark.parametrize("variant", ["teacher", "alternating", "instant"])
def test_the_shift_reaches_the_losses_settings(variant):
    """`--shift` (and, without it, the resolution's default 2 log(64 / resolution)) arrives in both
    TeacherConfig and DistillConfig, which the losses read."""
    base = ["--preset", "tiny", "--variant", variant]
    for extra, shift in ((["--shift", "1.25"], 1.25), ([], 2 * math.log(64 / 8))):
        config = train.parse_config(base + extra)
        teacher_cfg, distill_cfg = train.mmd_configs(config)
        assert teacher_cfg.shift == pytest.approx(shift)
        assert distill_cfg.shift == pytest.approx(shift)


# ------------------------------------------------------------------------- §6 data centring


def test_real_data_gradients_are_plain_gradients_of_the_two_losses():
    """mmd.real_data_gradients on one device (axis "data" of size 1) against jax.grad of the
    teacher loss and of the real-pair loss (1/B) sum ||x - g(z)||^2 written here (flat weighting,
    z = alpha_s x + sigma_s n), with the per-example keys fold_in(fold_in(key, i), index) that its
    docstring and `distill_inputs` state."""
    teacher = Linear(w=jnp.asarray(T, F32), b=jnp.asarray(D, F32))
    params, static = eqx.partition(teacher, eqx.is_inexact_array)
    n, key, shift = 6, jax.random.key(3), 0.5
    x = jax.random.normal(jax.random.key(4), (n, 2))
    labels = jnp.zeros(n, jnp.int32)
    tcfg = mmd.TeacherConfig(shift=shift, null_label=1, label_dropout=0.0)
    dcfg = mmd.DistillConfig(num_steps=4, shift=shift, weighting="flat")
    g_teacher, g_real = jax.tree.map(
        lambda a: a[0],
        jax.vmap(
            lambda x, y: mmd.real_data_gradients(
                params, x, y, key, static=static, teacher_cfg=tcfg, distill_cfg=dcfg
            ),
            axis_name="data",
        )(x[None], labels[None]),
    )

    def per_example(i):
        return jax.vmap(lambda j: jax.random.fold_in(jax.random.fold_in(key, i), j))(jnp.arange(n))

    want_teacher = jax.grad(
        lambda p: mmd.teacher_loss(
            eqx.combine(p, static), per_example(0), x=x, labels=labels, cfg=tcfg
        )
    )(params)
    inputs = mmd.distill_inputs(
        per_example(1), x=x, labels=labels, num_steps=4, shift=shift, time_sampling="paper"
    )
    a, s = (jnp.asarray(v, F32)[:, None] for v in _alpha_sigma(inputs.lam_s))
    z = a * x + s * inputs.noise_real

    def real_pair_loss(p):
        return jnp.mean(jnp.sum((x - eqx.combine(p, static)(z, inputs.lam_s, labels)) ** 2, -1))

    want_real = jax.grad(real_pair_loss)(params)
    for got, want in ((g_teacher, want_teacher), (g_real, want_real)):
        for a_, b_ in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a_, b_, rtol=1e-5, atol=1e-6)


def test_fixed_centring_equals_batch_centring_given_the_same_real_gradient():
    """With both minibatches the same, `center="batch"` subtracts one real-data gradient R from both
    G_i; `center="fixed"` given that R must give the same loss value and the same generator gradient
    (and centring must change them: the test is not vacuous)."""
    inputs = _toy_inputs(jax.random.key(5), 16)._replace(
        noise_real=jax.random.normal(jax.random.key(6), (16, 2))
    )
    generator = Linear(w=jnp.asarray(A, F32), b=jnp.asarray(C, F32))
    teacher = Linear(w=jnp.asarray(T, F32), b=jnp.asarray(D, F32))
    precond = jax.tree.map(lambda p: jnp.full_like(p, 0.7), eqx.filter(teacher, eqx.is_array))
    batch = mmd.DistillConfig(num_steps=4, weighting="flat", center="batch")
    z_real = (
        jnp.asarray(_alpha_sigma(LAM_S)[0], F32) * inputs.x
        + jnp.asarray(_alpha_sigma(LAM_S)[1], F32) * inputs.noise_real
    )
    real, _ = mmd.teacher_gradient(
        teacher, x=inputs.x, z_s=z_real, lam_s=inputs.lam_s, labels=inputs.labels, cfg=batch
    )

    def value_and_grad(cfg, real_grad=None):
        return eqx.filter_value_and_grad(
            lambda g: mmd.instant_loss(
                g,
                teacher=teacher,
                precond=precond,
                inputs1=inputs,
                inputs2=inputs,
                cfg=cfg,
                real_grad=real_grad,
            )[0]
        )(generator)

    got = value_and_grad(dataclasses.replace(batch, center="fixed"), real)
    want = value_and_grad(batch)
    plain = value_and_grad(dataclasses.replace(batch, center="none"))
    for a_, b_ in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a_, b_, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got[0], plain[0])
