"""mmd.py against independent references: brute-force Gaussian conditioning, closed-form schedules,
the exact denoiser of a Gaussian mixture, plain double backprop, a Taylor expansion, Monte Carlo,
optax."""

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import optax
import pytest

import mmd
from toy import energy_distance, ring
from uvit import MLPDenoiser

F32 = jnp.float32


def _lams(pairs):
    lam_t, lam_s = (jnp.asarray(v, F32) for v in zip(*pairs))
    return lam_t, lam_s


# ---------------------------------------------------------------------------------------- posterior


def test_posterior_equals_brute_force_gaussian_conditioning():
    rng = np.random.default_rng(0)
    pairs = []
    for gap in [1e-4, 1e-3, 0.1, 1.0, 5.0, 15.0, 30.0]:
        for lam_t in rng.uniform(-15.0, 15.0 - min(gap, 29.0), size=4):
            pairs.append((lam_t, lam_t + gap))
    pairs.append((-15.0, 15.0))
    lam_t, lam_s = _lams(pairs)
    b = lam_t.shape[0]
    x = jnp.asarray(rng.uniform(-1, 1, (b, 3)), F32)
    z_t = jnp.asarray(rng.normal(size=(b, 3)), F32)
    mean, var = mmd.posterior(z_t=z_t, x=x, lam_t=lam_t, lam_s=lam_s)
    assert np.all(np.isfinite(mean)) and np.all(np.isfinite(var))

    for i in range(b):
        # The joint of (z_s, z_t) given x from the Markov chain z_s -> z_t, conditioned by linear
        # algebra.
        lt, ls = np.float64(lam_t[i]), np.float64(lam_s[i])
        a_t, a_s = math.sqrt(1 / (1 + math.exp(-lt))), math.sqrt(1 / (1 + math.exp(-ls)))
        s2_t, s2_s = 1 / (1 + math.exp(lt)), 1 / (1 + math.exp(ls))
        a_ts = a_t / a_s
        cov = np.array([[s2_s, a_ts * s2_s], [a_ts * s2_s, s2_t]])
        gain = cov[0, 1] / cov[1, 1]
        ref_var = cov[0, 0] - gain * cov[1, 0]
        ref_var_stable = s2_s * -math.expm1(lt - ls)  # the same quantity without cancellation
        assert ref_var == pytest.approx(ref_var_stable, rel=1e-6, abs=1e-15)
        ref_mean = a_s * np.asarray(x[i], np.float64) + gain * (
            np.asarray(z_t[i], np.float64) - a_t * np.asarray(x[i], np.float64)
        )
        assert float(var[i]) == pytest.approx(ref_var_stable, rel=2e-5)
        np.testing.assert_allclose(np.asarray(mean[i]), ref_mean, rtol=1e-4, atol=1e-5)


def test_posterior_of_levels_equal_up_to_rounding_is_z_t_itself_not_nan():
    """s within float32 rounding of t (a 7-million-draw ring2d run met one inside jit): lam_t a few
    ulps above lam_s must mean no revealed information (variance 0, z_s = z_t), not a negative
    variance and a NaN z_s."""
    lam_s = jnp.asarray([-5.562294, 0.0, 3.0, 12.4], F32)
    lam_t = jnp.stack([lam_s, jnp.nextafter(lam_s, F32(20)), lam_s + 4e-6])  # equal, 1 ulp, ~8 ulps
    rng = np.random.default_rng(1)
    z_t = jnp.asarray(rng.normal(size=(4, 2)), F32)
    x = jnp.asarray(rng.uniform(-1, 1, (4, 2)), F32)
    for above, posterior in zip(lam_t, (mmd.posterior, jax.jit(mmd.posterior), mmd.posterior)):
        assert np.all(np.asarray(above) >= np.asarray(lam_s))
        mean, var = posterior(z_t=z_t, x=x, lam_t=above, lam_s=lam_s)
        assert np.all(np.asarray(var) == 0.0)
        np.testing.assert_allclose(np.asarray(mean), np.asarray(z_t), rtol=1e-5)  # alpha_s/alpha_t
        noise = jnp.asarray(rng.normal(size=(4, 2)), F32)
        z_s = mmd.ancestral_step(z_t=z_t, x=x, lam_t=above, lam_s=lam_s, noise=noise, gamma=0.3)
        np.testing.assert_allclose(np.asarray(z_s), np.asarray(z_t), rtol=1e-5)


def test_ancestral_step_has_posterior_moments_and_gamma_interpolates_in_log_space():
    lam_t, lam_s = _lams([(-2.0, 1.0)] * 20000)
    x = jnp.full((20000, 1), 0.3, F32)
    z_t = jnp.full((20000, 1), -0.5, F32)
    noise = jax.random.normal(jax.random.key(0), (20000, 1))
    mean, var = mmd.posterior(z_t=z_t, x=x, lam_t=lam_t, lam_s=lam_s)
    draws = mmd.ancestral_step(z_t=z_t, x=x, lam_t=lam_t, lam_s=lam_s, noise=noise)
    assert float(jnp.var(draws)) == pytest.approx(float(var[0]), rel=0.05)
    assert float(jnp.mean(draws)) == pytest.approx(
        float(mean[0, 0]), abs=4 * math.sqrt(float(var[0]) / 20000)
    )
    # gamma = 1 uses sigma_{t|s}^2 = sigma_t^2 (1 - e^(lam_t - lam_s)); gamma = 0.5 the geometric
    # mean.
    s2_ts = 1 / (1 + math.exp(-2.0)) * -math.expm1(-3.0)
    unit = jnp.ones((1, 1), F32)
    for gamma, expected in [(1.0, s2_ts), (0.5, math.sqrt(s2_ts * float(var[0])))]:
        step = mmd.ancestral_step(
            z_t=z_t[:1], x=x[:1], lam_t=lam_t[:1], lam_s=lam_s[:1], noise=unit, gamma=gamma
        )
        assert float(step[0, 0] - mean[0, 0]) ** 2 == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------- schedules


def test_cosine_schedule_endpoints_monotone_and_shift():
    t = jnp.linspace(0.0, 1.0, 1001)
    lam = mmd.logsnr_cosine(t, shift=0.0)
    assert float(lam[0]) == 15.0 and float(lam[-1]) == -15.0
    assert np.all(np.diff(np.asarray(lam)) <= 0) and np.all(np.isfinite(lam))
    assert float(mmd.logsnr_cosine(jnp.asarray(0.5), shift=0.0)) == pytest.approx(0.0, abs=1e-6)
    shift = mmd.resolution_shift(32)
    assert shift == pytest.approx(2 * math.log(2.0)) and mmd.resolution_shift(64) == 0.0
    mid = jnp.linspace(0.2, 0.8, 7)
    np.testing.assert_allclose(
        mmd.logsnr_cosine(mid, shift=shift) - mmd.logsnr_cosine(mid, shift=0.0), shift, atol=1e-5
    )
    # Closed form at t = 1/3: tan(pi/6) = 1/sqrt(3).
    assert float(mmd.logsnr_cosine(jnp.asarray(1 / 3), shift=0.0)) == pytest.approx(
        math.log(3.0), rel=1e-5
    )


def test_edm_schedule_endpoints_monotone_and_shift():
    u = jnp.linspace(0.0, 1.0, 257)
    lam = mmd.logsnr_edm(u, shift=0.0)
    sbar = np.exp(-np.asarray(lam, np.float64) / 2)
    assert sbar[0] == pytest.approx(0.002, rel=1e-5) and sbar[-1] == pytest.approx(80.0, rel=1e-5)
    assert np.all(np.diff(np.asarray(lam)) < 0)
    ref = (0.002 ** (1 / 7) + 0.3 * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
    assert float(mmd.logsnr_edm(jnp.asarray(0.3), shift=0.0)) == pytest.approx(
        -2 * math.log(ref), rel=1e-5
    )
    alpha, _ = mmd.alpha_sigma(lam[-1])
    assert float(alpha) == pytest.approx(1 / math.sqrt(1 + 80.0**2), rel=1e-4)  # about 0.0125
    np.testing.assert_allclose(mmd.logsnr_edm(u, shift=1.5) - lam, 1.5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_time_pairs_keep_the_laws_of_s_and_the_gap(k):
    """Both modes: s ~ U[0, 1] and t - s ~ U[0, 1/k] (paper: before the cap at 1); grid: t on the
    sampler's levels j / k just above s (k = 1: always 1). Kolmogorov-Smirnov against scipy."""
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(k)
    u_s, u_d = (jnp.asarray(rng.uniform(size=100_000), F32) for _ in range(2))
    s, t = (np.asarray(v, np.float64) for v in mmd.time_pair(u_s, u_d, num_steps=k, mode="grid"))
    np.testing.assert_array_equal(s, np.asarray(u_s))
    levels = t * k
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-5)
    assert set(np.round(levels).astype(int)) == set(range(1, k + 1))
    assert stats.kstest((t - s) * k, "uniform").pvalue > 1e-3
    if k == 1:
        np.testing.assert_array_equal(t, 1.0)
    # The edges: s = 0 (level 1/k), s on a level (gap 0), and s one ulp above a level (t >= s).
    edges = jnp.asarray([0.0, 1 / k, np.nextafter(np.float32(1 / k), np.float32(1))], F32)
    s_e, t_e = mmd.time_pair(edges, edges, num_steps=k, mode="grid")
    assert float(t_e[0]) == pytest.approx(1 / k) and bool(jnp.all(t_e >= s_e))
    _, t_100 = mmd.time_pair(jnp.asarray([0.030000001], F32), edges[:1], num_steps=100, mode="grid")
    assert float(t_100[0]) >= 0.030000001
    s, t = (np.asarray(v, np.float64) for v in mmd.time_pair(u_s, u_d, num_steps=k, mode="paper"))
    np.testing.assert_allclose(t, np.minimum(s + np.asarray(u_d) / k, 1.0), atol=1e-6)
    # s is the draw itself (its law through distill_inputs: test_references.py)
    np.testing.assert_array_equal(s, np.asarray(u_s))
    inp = mmd.distill_inputs(
        jax.random.key(k),
        x=jnp.zeros((512, 2)),
        labels=jnp.zeros(512, jnp.int32),
        num_steps=k,
        shift=0.0,
        time_sampling="grid",
    )
    grid = np.asarray(mmd.logsnr_edm(jnp.arange(1, k + 1, dtype=F32) / k, shift=0.0))
    assert np.abs(np.asarray(inp.lam_t)[:, None] - grid[None]).min(axis=1).max() < 1e-4
    assert np.all(np.asarray(inp.lam_s) >= np.asarray(inp.lam_t))


def test_loss_weights():
    lam = jnp.asarray([-3.0, 0.0, 2.0], F32)
    np.testing.assert_allclose(
        mmd.loss_weight(lam, kind="edm"), np.exp([-3.0, 0.0, 2.0]) + 4.0, rtol=1e-6
    )
    # EDM's own form (sbar^2 + sd^2) / (sbar sd)^2 with sbar = exp(-lam / 2).
    sbar = np.exp(-np.asarray(lam) / 2)
    np.testing.assert_allclose(
        mmd.loss_weight(lam, kind="edm"), (sbar**2 + 0.25) / (sbar**2 * 0.25), rtol=1e-5
    )
    np.testing.assert_allclose(mmd.loss_weight(lam, kind="flat"), 1.0)
    x_gen = jnp.zeros((3, 2, 2), F32)
    x_teacher = (
        jnp.asarray([[[0.5, -0.5], [0.5, 0.5]]] * 3, F32)
        * jnp.asarray([1.0, 2.0, 4.0], F32)[:, None, None]
    )
    np.testing.assert_allclose(
        mmd.loss_weight(lam, kind="dmd", x_gen=x_gen, x_teacher=x_teacher),
        [2.0, 1.0, 0.5],
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="edm, flat, dmd"):
        mmd.loss_weight(lam, kind="snr")
    with pytest.raises(ValueError, match="needs x_gen"):
        mmd.loss_weight(lam, kind="dmd")


# ---------------------------------------------------------------------------------------- sampler


def test_many_step_sampler_reproduces_mixture_and_two_steps_do_not():
    mix = ring()
    n = 2000
    labels = jnp.zeros(n, jnp.int32)
    true_a, true_b = mix.draw(jax.random.key(1), n), mix.draw(jax.random.key(2), n)
    baseline = energy_distance(true_a, true_b)  # pure sampling noise at this n (~5e-4)

    def draw(k):
        fn = jax.jit(
            lambda key: mmd.sample(mix, key, shape=(n, 2), labels=labels, num_steps=k, shift=0.0)
        )
        return np.asarray(fn(jax.random.key(0)), np.float64)

    many, two = draw(256), draw(2)
    mean, cov = mix.moments()
    # Standard errors at n = 2000: mean sqrt(var / n) ~ 0.011; the variance of a coordinate of this
    # mixture has sd about var * sqrt(2 / n) ~ 0.008 (a Gaussian bound; the ring is lighter-tailed).
    se_mean = math.sqrt(cov[0, 0] / n)
    se_var = cov[0, 0] * math.sqrt(2 / n)
    assert np.all(np.abs(many.mean(0) - mean) < 4 * se_mean)
    assert np.all(np.abs(np.cov(many.T) - cov) < 4 * se_var)
    assert energy_distance(many, true_a) < 3 * baseline
    assert energy_distance(two, true_a) > 50 * baseline
    assert np.any(np.abs(np.cov(two.T) - cov) > 10 * se_var)


def test_sample_is_per_example_and_batch_invariant():
    mix = ring()
    keys = jax.random.split(jax.random.key(3), 6)
    labels = jnp.zeros(6, jnp.int32)
    full = mmd.sample(mix, keys, shape=(6, 2), labels=labels, num_steps=4, shift=0.0)
    part = mmd.sample(mix, keys[2:5], shape=(3, 2), labels=labels[:3], num_steps=4, shift=0.0)
    np.testing.assert_allclose(full[2:5], part, rtol=1e-6)
    # One key is the batch of keys split(key, 6): example i's draws come from the i-th.
    one = mmd.sample(mix, jax.random.key(3), shape=(6, 2), labels=labels, num_steps=4, shift=0.0)
    np.testing.assert_array_equal(one, full)
    # jaxtyping's dimension check catches this first; without the hook, example_keys raises
    # ValueError.
    with pytest.raises((ValueError, jaxtyping.TypeCheckError)):
        mmd.sample(mix, keys[:4], shape=(6, 2), labels=labels, num_steps=4, shift=0.0)


def test_example_keys_rejects_wrong_count():
    with pytest.raises(ValueError, match="one key or 6 keys"):
        mmd.example_keys(jax.random.split(jax.random.key(0), 4), 6)


def test_guided_denoise_formula_and_needs_null_label():
    def den(z, lam, label):
        return z * (label.astype(F32) + 1.0)[:, None]

    z = jnp.ones((2, 3), F32)
    lam = jnp.zeros(2, F32)
    labels = jnp.asarray([1, 2], jnp.int32)
    x_hat, x_cond = mmd.guided_denoise(den, z, lam, labels, guidance=0.5, clip=False, null_label=0)
    np.testing.assert_allclose(x_cond, [[2.0] * 3, [3.0] * 3])
    np.testing.assert_allclose(x_hat, [[1.5 * 2 - 0.5] * 3, [1.5 * 3 - 0.5] * 3])
    x_hat, _ = mmd.guided_denoise(den, z, lam, labels, guidance=0.5, clip=True, null_label=0)
    np.testing.assert_allclose(x_hat, 1.0)
    with pytest.raises(ValueError, match="null_label"):
        mmd.guided_denoise(den, z, lam, labels, guidance=0.5, clip=False, null_label=None)


# ---------------------------------------------------------------------------------------- teacher
# loss


def test_teacher_loss_is_v_prediction_mse():
    net = MLPDenoiser(dim=2, width=16, depth=2, num_classes=3, key=jax.random.key(0))
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (64, 2)), F32)
    labels = jnp.arange(64, dtype=jnp.int32) % 3
    cfg = mmd.TeacherConfig(shift=0.5, null_label=3, label_dropout=0.25)
    key = jax.random.key(7)
    loss = mmd.teacher_loss(net, key, x=x, labels=labels, cfg=cfg)

    # Independent reimplementation from the same per-example draws, in v-space.
    def draws(k):
        kt, kn, kd = jax.random.split(k, 3)
        return jax.random.uniform(kt), jax.random.normal(kn, (2,)), jax.random.bernoulli(kd, 0.25)

    t, eps, drop = jax.vmap(draws)(jax.random.split(key, 64))
    lam = -2 * jnp.log(jnp.tan(jnp.pi * t / 2)) + 0.5
    alpha, sigma = jnp.sqrt(jax.nn.sigmoid(lam))[:, None], jnp.sqrt(jax.nn.sigmoid(-lam))[:, None]
    z = alpha * x + sigma * eps
    v = alpha * eps - sigma * x
    v_hat = (alpha * z - net(z, lam, jnp.where(drop, 3, labels))) / sigma
    assert float(loss) == pytest.approx(float(jnp.mean(jnp.sum((v - v_hat) ** 2, 1))), rel=1e-4)


# ---------------------------------------------------------------------------------------- instant
# loss


def _setup(seed=0, num_classes=3, b=12, dim=2):
    k = jax.random.split(jax.random.key(seed), 6)
    teacher = MLPDenoiser(dim=dim, width=16, depth=2, num_classes=num_classes, key=k[0])
    generator = MLPDenoiser(dim=dim, width=16, depth=2, num_classes=num_classes, key=k[1])
    x = jax.random.uniform(k[2], (2, b, dim), minval=-1, maxval=1)
    labels = jax.random.randint(k[3], (2, b), 0, num_classes)
    params, _ = eqx.partition(teacher, eqx.is_inexact_array)
    precond = jax.tree.map(
        lambda p: jax.random.uniform(k[4], p.shape, minval=0.5, maxval=2.0), params
    )
    return teacher, generator, x, labels, precond, k[5]


def _inputs(key, x, labels, cfg):
    return [
        mmd.distill_inputs(
            jax.random.fold_in(key, i),
            x=x[i],
            labels=labels[i],
            num_steps=cfg.num_steps,
            shift=cfg.shift,
        )
        for i in (0, 1)
    ]


def _reference_teacher_grad(teacher, x, z_s, lam_s, labels, cfg, real=None):
    """Plain `grad_theta` of the weighted denoising loss, written without mmd's helpers."""
    params, static = eqx.partition(teacher, eqx.is_inexact_array)

    def loss(p, x, z_s):
        t = eqx.combine(p, static)
        cond = t(z_s, lam_s, labels)
        hat = cond
        if cfg.guidance:
            hat = (1 + cfg.guidance) * cond - cfg.guidance * t(
                z_s, lam_s, jnp.full_like(labels, cfg.null_label)
            )
        if cfg.clip:
            hat = jnp.clip(hat, -1, 1)
        g_st = cond + jax.lax.stop_gradient(hat - cond)
        w = mmd.loss_weight(
            lam_s, kind=cfg.weighting, x_gen=x, x_teacher=jax.lax.stop_gradient(hat)
        )
        return jnp.mean(w * jnp.sum((x - g_st) ** 2, axis=1))

    g = jax.grad(loss)(params, x, z_s)
    if real is not None:
        g = jax.tree.map(jnp.subtract, g, jax.grad(loss)(params, *real))
    return g


CASES = [
    mmd.DistillConfig(num_steps=4, weighting="flat"),
    mmd.DistillConfig(num_steps=2, weighting="edm", zs_mode="marginal"),
    mmd.DistillConfig(num_steps=4, weighting="dmd", guidance=0.7, clip=True, null_label=3),
    mmd.DistillConfig(num_steps=8, weighting="flat", center="batch"),
    mmd.DistillConfig(num_steps=4, weighting="edm", instant_form="one_sided"),
]


@pytest.mark.parametrize(
    "cfg", CASES, ids=["flat", "edm-marginal", "dmd-guided-clipped", "centred", "one-sided"]
)
def test_instant_surrogate_gradient_equals_double_backprop(cfg):
    teacher, generator, x, labels, precond, key = _setup()
    inputs1, inputs2 = _inputs(key, x, labels, cfg)
    gen_params, gen_static = eqx.partition(generator, eqx.is_inexact_array)

    def surrogate(p):
        return mmd.instant_loss(
            eqx.combine(p, gen_static),
            teacher=teacher,
            precond=precond,
            inputs1=inputs1,
            inputs2=inputs2,
            cfg=cfg,
        )

    (_, metrics), grad_surrogate = jax.value_and_grad(surrogate, has_aux=True)(gen_params)

    def l2b(p):
        gen = eqx.combine(p, gen_static)
        grads = []
        for inp in (inputs1, inputs2):
            x_gen = gen(inp.z_t, inp.lam_t, inp.labels)
            z_s = mmd.draw_zs(inp, x_gen, mode=cfg.zs_mode)
            real = None
            if cfg.center == "batch":
                real = (inp.x, mmd.diffuse(inp.x, inp.lam_s, inp.noise_real))
            grads.append(
                _reference_teacher_grad(teacher, x_gen, z_s, inp.lam_s, inp.labels, cfg, real)
            )
        if cfg.instant_form == "one_sided":  # the gradient of G_1^T Lambda sg(G_2)
            grads[1] = jax.lax.stop_gradient(grads[1])
        return sum(
            jnp.vdot(a, lam * b)
            for a, lam, b in zip(*(jax.tree.leaves(t) for t in (grads[0], precond, grads[1])))
        )

    value, grad_ref = jax.value_and_grad(l2b)(gen_params)
    assert float(metrics["loss"]) == pytest.approx(float(value), rel=1e-4, abs=1e-7)
    flat_s, flat_r = (
        jnp.concatenate([g.ravel() for g in jax.tree.leaves(t)]) for t in (grad_surrogate, grad_ref)
    )
    assert float(jnp.linalg.norm(flat_r)) > 1e-6
    np.testing.assert_allclose(
        flat_s, flat_r, rtol=2e-4, atol=2e-4 * float(jnp.max(jnp.abs(flat_r)))
    )


def test_alternating_gradient_over_l_converges_to_instant_gradient():
    """Eq. 8: with phi(l) = theta - l Lambda G (G on the other minibatch), grad L(eta) / l -> the
    instant gradient."""
    cfg = mmd.DistillConfig(num_steps=4, weighting="flat")
    teacher, generator, x, labels, precond, key = _setup(seed=1)
    inputs1, inputs2 = _inputs(key, x, labels, cfg)
    t_params, t_static = eqx.partition(teacher, eqx.is_inexact_array)
    gen_params, gen_static = eqx.partition(generator, eqx.is_inexact_array)

    def generated_grad(inp):
        x_gen = generator(inp.z_t, inp.lam_t, inp.labels)
        return _reference_teacher_grad(
            teacher, x_gen, mmd.draw_zs(inp, x_gen, mode="conditional"), inp.lam_s, inp.labels, cfg
        )

    g1, g2 = generated_grad(inputs1), generated_grad(inputs2)

    def alternating_grad(lr):
        total = None
        for inp, g_other in ((inputs1, g2), (inputs2, g1)):
            phi = jax.tree.map(lambda t, lam, g: t - lr * lam * g, t_params, precond, g_other)
            aux = eqx.combine(phi, t_static)
            grad = jax.grad(
                lambda p, aux=aux, inp=inp: mmd.generator_loss(
                    eqx.combine(p, gen_static), auxiliary=aux, teacher=teacher, inputs=inp, cfg=cfg
                )[0]
            )(gen_params)
            total = grad if total is None else jax.tree.map(jnp.add, total, grad)
        return jnp.concatenate([g.ravel() for g in jax.tree.leaves(total)]) / lr

    instant = jax.grad(
        lambda p: mmd.instant_loss(
            eqx.combine(p, gen_static),
            teacher=teacher,
            precond=precond,
            inputs1=inputs1,
            inputs2=inputs2,
            cfg=cfg,
        )[0]
    )(gen_params)
    # L_2b is built from ||.||^2, whose gradient carries a factor 2 that L(eta) does not.
    target = jnp.concatenate([g.ravel() for g in jax.tree.leaves(instant)]) / 2
    errors = [
        float(jnp.linalg.norm(alternating_grad(lr) - target) / jnp.linalg.norm(target))
        for lr in (1e-1, 1e-2, 1e-3)
    ]
    assert errors[2] < 0.02
    assert errors[0] > errors[1] > errors[2]
    assert (
        errors[0] / errors[1] > 5
    )  # first-order convergence: the error shrinks about 10x per decade


class Linear(eqx.Module):
    """A linear 'denoiser' `x_hat = W z + b`: the small problem on which expectations are exact."""

    w: jax.Array
    b: jax.Array

    def __call__(self, z, lam, label):
        return z @ self.w.T + self.b[None]


def test_two_batch_estimate_is_unbiased_and_one_batch_is_not():
    cfg = mmd.DistillConfig(num_steps=4, weighting="flat")
    teacher = Linear(jnp.asarray([[0.8, 0.1], [-0.2, 0.7]], F32), jnp.asarray([0.05, -0.1], F32))
    generator = Linear(jnp.asarray([[0.5, 0.0], [0.3, 0.4]], F32), jnp.asarray([0.3, 0.2], F32))
    precond = Linear(jnp.asarray([[1.0, 2.0], [0.5, 1.5]], F32), jnp.asarray([1.0, 0.7], F32))
    mix = ring()

    def batch_grad(key, b):
        kx, ki = jax.random.split(key)
        x = mix.draw(kx, b)
        inp = mmd.distill_inputs(ki, x=x, labels=jnp.zeros(b, jnp.int32), num_steps=4, shift=0.0)
        x_gen = generator(inp.z_t, inp.lam_t, inp.labels)
        z_s = mmd.draw_zs(inp, x_gen, mode="conditional")
        return inp, mmd.teacher_gradient(
            teacher, x=x_gen, z_s=z_s, lam_s=inp.lam_s, labels=inp.labels, cfg=cfg
        )[0]

    def sqnorm(a, b):
        return sum(
            jnp.vdot(u, lam * v)
            for u, lam, v in zip(*(jax.tree.leaves(t) for t in (a, precond, b)))
        )

    # ||E G||^2_Lambda from one huge batch (its own bias tr(Lambda Cov)/n is ~1e-5 of the value).
    _, g_mean = batch_grad(jax.random.key(0), 200_000)
    target = float(sqnorm(g_mean, g_mean))

    def draws(key):
        k1, k2 = jax.random.split(key)
        inp1, g1 = batch_grad(k1, 4)
        inp2, _ = batch_grad(k2, 4)
        _, metrics = mmd.instant_loss(
            generator, teacher=teacher, precond=precond, inputs1=inp1, inputs2=inp2, cfg=cfg
        )
        _, same = mmd.instant_loss(
            generator, teacher=teacher, precond=precond, inputs1=inp1, inputs2=inp1, cfg=cfg
        )
        return metrics["loss"], same["loss"], sqnorm(g1, g1)

    two, one, by_hand = jax.jit(jax.vmap(draws))(jax.random.split(jax.random.key(1), 20000))
    two, one = np.asarray(two, np.float64), np.asarray(one, np.float64)
    se_two, se_one = two.std() / math.sqrt(two.size), one.std() / math.sqrt(one.size)
    assert abs(two.mean() - target) < 4 * se_two
    # The same minibatch twice gives ||G_1||^2_Lambda, biased by tr(Lambda Cov G) / B: the check
    # above tells the two-batch estimate from a one-batch one.
    np.testing.assert_allclose(one, by_hand, rtol=1e-4, atol=1e-7)
    assert one.mean() - target > 10 * se_one


def _flat(tree):
    return jnp.concatenate([g.ravel() for g in jax.tree.leaves(tree)])


def _mixture_inputs(mix, key, b, *, num_steps):
    """`mmd.distill_inputs` on `b` draws of a toy mixture, unlabelled, shift 0."""
    kx, ki = jax.random.split(key)
    x = mix.draw(kx, b)
    zeros = jnp.zeros(b, jnp.int32)
    return mmd.distill_inputs(ki, x=x, labels=zeros, num_steps=num_steps, shift=0.0)


def test_one_sided_form_has_half_the_expected_gradient_of_the_symmetric_one():
    """Algorithm 3 as printed (eq. 8, `nu = Lambda G_2`, times the 2 of ||.||^2) vs the symmetric
    surrogate, Monte Carlo over independent minibatch pairs on a linear problem: E[one-sided
    gradient] = half of E[symmetric gradient] = half of grad_eta ||E G||^2_Lambda (double backprop
    through one huge batch)."""
    teacher = Linear(jnp.asarray([[0.8, 0.1], [-0.2, 0.7]], F32), jnp.asarray([0.05, -0.1], F32))
    generator = Linear(jnp.asarray([[0.5, 0.0], [0.3, 0.4]], F32), jnp.asarray([0.3, 0.2], F32))
    precond = Linear(jnp.asarray([[1.0, 2.0], [0.5, 1.5]], F32), jnp.asarray([1.0, 0.7], F32))
    gen_params, gen_static = eqx.partition(generator, eqx.is_inexact_array)
    mix = ring()
    forms = {
        form: mmd.DistillConfig(num_steps=4, weighting="flat", instant_form=form)
        for form in ("symmetric", "one_sided")
    }

    def inputs(key, b):
        return _mixture_inputs(mix, key, b, num_steps=4)

    def grad_of(form, inp1, inp2):
        def surrogate(p):
            return mmd.instant_loss(
                eqx.combine(p, gen_static),
                teacher=teacher,
                precond=precond,
                inputs1=inp1,
                inputs2=inp2,
                cfg=forms[form],
            )[0]

        return _flat(jax.grad(surrogate)(gen_params))

    def draws(key):
        k1, k2 = jax.random.split(key)
        inp1, inp2 = inputs(k1, 4), inputs(k2, 4)
        return grad_of("symmetric", inp1, inp2), grad_of("one_sided", inp1, inp2)

    sym, one = (
        np.asarray(a, np.float64)
        for a in jax.jit(jax.vmap(draws))(jax.random.split(jax.random.key(1), 20000))
    )

    # The reference: grad_eta ||E G||^2_Lambda, G by plain double backprop on one huge batch.
    big = inputs(jax.random.key(0), 200_000)

    def sqnorm_of_mean_gradient(p):
        x_gen = eqx.combine(p, gen_static)(big.z_t, big.lam_t, big.labels)
        z_s = mmd.draw_zs(big, x_gen, mode="conditional")
        g = _reference_teacher_grad(teacher, x_gen, z_s, big.lam_s, big.labels, forms["symmetric"])
        return sum(
            jnp.vdot(a, lam * a) for a, lam in zip(jax.tree.leaves(g), jax.tree.leaves(precond))
        )

    target = np.asarray(_flat(jax.grad(sqnorm_of_mean_gradient)(gen_params)), np.float64)
    se_sym, se_one = (a.std(axis=0) / math.sqrt(a.shape[0]) for a in (sym, one))
    assert np.all(np.abs(target) > 10 * se_sym)  # the expected gradient is well resolved
    assert np.all(np.abs(sym.mean(axis=0) - target) < 4 * se_sym + 1e-3 * np.abs(target))
    assert np.all(np.abs(one.mean(axis=0) - 0.5 * target) < 4 * se_one + 1e-3 * np.abs(target))
    # Per draw, the one-sided gradient is the first of the symmetric surrogate's two terms, not
    # half.
    assert not np.allclose(one, 0.5 * sym, rtol=1e-2)


# ----------------------------------------------------------------------------------------
# preconditioner


def test_preconditioner_equals_optax_adam_state():
    rng = np.random.default_rng(0)
    params = {"a": jnp.zeros((3, 2), F32), "b": jnp.zeros(4, F32)}
    grads = [
        jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), F32), params) for _ in range(7)
    ]
    opt = optax.chain(optax.clip_by_global_norm(1e9), optax.adam(1e-3, b1=0.9, b2=0.99, eps=1e-8))
    state = opt.init(params)
    with jax.numpy_dtype_promotion("standard"):  # optax promotes its int32 step count implicitly
        for g in grads:
            _, state = opt.update(g, state, params)
    from_adam = mmd.preconditioner_from_adam(state, b2=0.99, eps=1e-8)
    fresh = mmd.estimate_preconditioner(iter(grads), b2=0.99, eps=1e-8)
    for name in params:
        sq = np.stack([np.asarray(g[name], np.float64) ** 2 for g in grads])
        nu = sum(0.01 * 0.99 ** (6 - i) * sq[i] for i in range(7))
        ref = 1 / (np.sqrt(nu / (1 - 0.99**7)) + 1e-8)
        np.testing.assert_allclose(from_adam[name], ref, rtol=1e-5)
        np.testing.assert_allclose(fresh[name], ref, rtol=1e-5)
    with pytest.raises(ValueError, match="found 0"):
        mmd.preconditioner_from_adam(optax.sgd(0.1).init(params), b2=0.99)


def test_median_relative_eps_against_numpy():
    """eps_mode="median": Lambda = 1 / (sqrt(nu_hat) + eps * median(sqrt(nu_hat))), the median over
    every entry of every array; the fixed form is unchanged. Reference in numpy, float64."""
    rng = np.random.default_rng(1)
    # "c": parameters that never received a gradient.
    nu = {"a": rng.uniform(0, 1e-2, (5, 3)), "b": rng.uniform(0, 1e-6, 4), "c": np.zeros(2)}
    count, b2 = 37, 0.99
    root = {k: np.sqrt(v / (1 - b2**count)) for k, v in nu.items()}
    median = np.median(np.concatenate([r.ravel() for r in root.values()]))
    nu32 = {k: jnp.asarray(v, F32) for k, v in nu.items()}
    relative = mmd.preconditioner(nu32, count=count, b2=b2, eps=0.1, eps_mode="median")
    fixed = mmd.preconditioner(nu32, count=count, b2=b2, eps=1e-8)
    for k in nu:
        np.testing.assert_allclose(relative[k], 1 / (root[k] + 0.1 * median), rtol=1e-5)
        np.testing.assert_allclose(fixed[k], 1 / (root[k] + 1e-8), rtol=1e-5)
    # The paper's form is 1 / eps where nu = 0; the relative one is capped at 1 / (eps * median).
    assert float(jnp.max(fixed["c"])) == pytest.approx(1e8)
    assert float(jnp.max(relative["c"])) == pytest.approx(1 / (0.1 * median), rel=1e-5)
    adam = optax.adam(1e-3, b2=b2).init(nu32)
    adam = (adam[0]._replace(nu=nu32, count=jnp.asarray(count, jnp.int32)), *adam[1:])
    from_adam = mmd.preconditioner_from_adam(adam, b2=b2, eps=0.1, eps_mode="median")
    np.testing.assert_allclose(from_adam["a"], relative["a"], rtol=1e-6)
    with pytest.raises(ValueError, match="fixed, median"):
        mmd.preconditioner(nu32, count=count, b2=b2, eps_mode="mean")


def test_preconditioned_shares_sum_to_one_and_rank_groups():
    precond = {"big": jnp.full(3, 10.0, F32), "small": jnp.ones(4, F32)}
    grads = {"big": jnp.ones(3, F32), "small": jnp.ones(4, F32)}
    shares = mmd.preconditioned_shares(precond, grads)
    assert list(shares) == ["['big']", "['small']"]
    assert shares["['big']"] == pytest.approx(300 / 304) and shares["['small']"] == pytest.approx(
        4 / 304
    )


# ----------------------------------------------------------------------------------------
# optimisers


@pytest.mark.parametrize("b1", [0.0, 0.9])
def test_distill_optimizer_is_clipped_adam_against_numpy(b1):
    """Appendix B's optimiser, written out in float64: clip to global norm 1, then Adam(b1, b2=0.99,
    eps=1e-12) with bias correction, at the warm-up-then-linear-decay rate (warm-up 1 of 10
    updates); b1 = 0 (the paper's) makes each step depend on the current gradient and the squares
    only, b1 > 0 carries momentum."""
    rng = np.random.default_rng(2)
    grads = [rng.normal(size=5) * scale for scale in (0.1, 3.0, 0.2)]  # the second is clipped
    opt = mmd.distill_optimizer(peak_lr=1e-2, total_steps=10, warmup_steps=1, b1=b1)
    params = jnp.zeros(5, F32)
    state = opt.init(params)
    m, v, ref = np.zeros(5), np.zeros(5), np.zeros(5)
    with jax.numpy_dtype_promotion("standard"):  # optax promotes its int32 step count implicitly
        for t, g in enumerate(grads, start=1):
            updates, state = opt.update(jnp.asarray(g, F32), state, params)
            params = params + updates
            g = g / max(1.0, np.linalg.norm(g))
            m, v = b1 * m + (1 - b1) * g, 0.99 * v + 0.01 * g**2
            m_hat, v_hat = m / (1 - b1**t), v / (1 - 0.99**t)
            lr = 1e-2 * min(1.0, (10 - (t - 1)) / 9)  # warm-up 1, then linear decay to 0 at 10
            ref = ref - lr * m_hat / (np.sqrt(v_hat) + 1e-12)
            np.testing.assert_allclose(params, ref, rtol=1e-5, atol=1e-8)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="b1 must be in"):
            mmd.distill_optimizer(peak_lr=1e-2, total_steps=10, b1=bad)


# ----------------------------------------------------------------------------------------
# straight-through


def test_straight_through_value_is_guided_and_gradient_is_unguided():
    teacher = MLPDenoiser(dim=2, width=16, depth=2, num_classes=3, key=jax.random.key(4))
    teacher = jax.tree.map(
        lambda p: 3 * p if eqx.is_inexact_array(p) else p, teacher
    )  # outputs beyond [-1, 1]
    params, static = eqx.partition(teacher, eqx.is_inexact_array)
    z = jax.random.normal(jax.random.key(5), (32, 2))
    lam = jnp.linspace(-4.0, 4.0, 32)
    labels = jnp.arange(32, dtype=jnp.int32) % 3
    r = jax.random.normal(jax.random.key(6), (32, 2))

    def forward(p):
        t = eqx.combine(p, static)
        x_hat, x_cond = mmd.guided_denoise(t, z, lam, labels, guidance=2.0, clip=True, null_label=3)
        return mmd.straight_through(x_hat, x_cond)

    cond = teacher(z, lam, labels)
    guided = jnp.clip(3 * cond - 2 * teacher(z, lam, jnp.full_like(labels, 3)), -1, 1)
    assert float(jnp.mean(jnp.abs(guided) == 1.0)) > 0.1  # clipping is active
    np.testing.assert_allclose(forward(params), guided, rtol=1e-5, atol=1e-6)
    g_st = jax.grad(lambda p: jnp.sum(forward(p) * r))(params)
    g_plain = jax.grad(lambda p: jnp.sum(eqx.combine(p, static)(z, lam, labels) * r))(params)
    for a, b in zip(jax.tree.leaves(g_st), jax.tree.leaves(g_plain)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------- data
# parallel


STEPS = {
    "teacher": mmd.teacher_step,
    "auxiliary": mmd.auxiliary_step,
    "generator": mmd.generator_step,
    "instant": mmd.instant_step,
}


def _run_steps(name, devices, cfg, num_steps=2):
    """`num_steps` updates with one named per-device step in `mmd.data_parallel`, or
    (`alternating`) with the programs of `mmd.train_steps`, picked by update number."""
    teacher, _, x, labels, precond, key = _setup(seed=2, b=16)
    x, labels = x.reshape(32, 2), labels.reshape(32)
    params, static = eqx.partition(teacher, eqx.is_inexact_array)
    mesh = mmd.data_mesh(devices)
    if name == "teacher":
        opt = mmd.teacher_optimizer(peak_lr=1e-2, warmup_steps=1)
        state = mmd.init_train_state(params=params, optimizer=opt, ema=True)
        step_cfg = mmd.TeacherConfig(null_label=3, ema_decay=0.5)
        frozen = mmd.Frozen()
    else:
        opt = mmd.distill_optimizer(peak_lr=1e-2, total_steps=10, warmup_steps=1)
        state = mmd.init_train_state(params=params, optimizer=opt, aux_optimizer=opt)
        # Perturb generator and auxiliary so that distillation has a non-zero gradient at step 0.
        state = state._replace(params=jax.tree.map(lambda p: p * 1.1, state.params))
        if name == "generator":
            state = state._replace(aux_params=jax.tree.map(lambda p: p * 0.9, state.aux_params))
        step_cfg = cfg
        frozen = mmd.Frozen(teacher=params, precond=precond)
    if name == "alternating":
        programs = mmd.train_steps(
            name, static=static, mesh=mesh, optimizer=opt, aux_optimizer=opt, distill_cfg=cfg
        )
    else:
        local = functools.partial(STEPS[name], static=static, optimizer=opt, cfg=step_cfg)
        programs = (mmd.data_parallel(local, mesh=mesh, minibatches=2 if name == "instant" else 1),)
    history = []
    for i in range(num_steps):
        state, metrics = programs[i % len(programs)](
            state, frozen, x, labels, jax.random.fold_in(key, i)
        )
        history.append(jax.tree.map(np.asarray, metrics))
    return jax.tree.map(np.asarray, state), history


@pytest.mark.parametrize("name", ["teacher", "auxiliary", "generator", "instant", "alternating"])
def test_sharded_step_matches_single_device(name):
    cfg = mmd.DistillConfig(
        num_steps=4, weighting="edm", guidance=0.5, null_label=3, center="batch"
    )
    assert len(jax.devices()) == 8
    state8, hist8 = _run_steps(name, jax.devices(), cfg)
    state1, hist1 = _run_steps(name, jax.devices()[:1], cfg)
    for m8, m1 in zip(hist8, hist1):
        assert m8.keys() == m1.keys()
        for metric in m8:
            np.testing.assert_allclose(m8[metric], m1[metric], rtol=2e-4, atol=1e-6, err_msg=metric)
    for a, b in zip(jax.tree.leaves(state8), jax.tree.leaves(state1)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
    assert int(state8.step) == 2
    if name == "alternating":  # auxiliary update first, then the generator's
        assert [float(m["generator_step"]) for m in hist8] == [0.0, 1.0]
    # grad_norm is compared above: a pmean of per-device gradients would make it 8x too large.
    before = jax.tree.leaves(eqx.filter(_setup(seed=2, b=16)[0], eqx.is_inexact_array))
    trained = state8.aux_params if name == "auxiliary" else state8.params
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(trained), before))


def test_aux_steps_gives_the_auxiliary_n_updates_per_generator_update():
    """`train_steps(aux_steps=3)`: of updates 0-7, 0-2 and 4-6 change only the auxiliary's
    parameters, 3 and 7 only the generator's; `aux_steps=0`, and 3 with another variant, are
    refused."""
    teacher, _, x, labels, _, key = _setup(seed=2, b=16)
    x, labels = x.reshape(32, 2), labels.reshape(32)
    params, static = eqx.partition(teacher, eqx.is_inexact_array)
    opt = mmd.distill_optimizer(peak_lr=1e-2, total_steps=10, warmup_steps=1)
    kwargs = dict(static=static, mesh=mmd.data_mesh(jax.devices()[:1]), optimizer=opt)
    kwargs |= dict(aux_optimizer=opt, distill_cfg=mmd.DistillConfig(num_steps=4), donate=False)
    programs = mmd.train_steps("alternating", aux_steps=3, **kwargs)
    state = mmd.init_train_state(params=params, optimizer=opt, aux_optimizer=opt)
    state = state._replace(params=jax.tree.map(lambda p: p * 1.1, state.params))
    changed = []
    for i in range(8):
        new, metrics = programs[i % len(programs)](
            state, mmd.Frozen(teacher=params), x, labels, jax.random.fold_in(key, i)
        )
        moved = [
            any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(n), jax.tree.leaves(o)))
            for n, o in ((new.aux_params, state.aux_params), (new.params, state.params))
        ]
        changed.append((*moved, float(metrics["generator_step"])))
        state = new
    aux, gen = (True, False, 0.0), (False, True, 1.0)
    assert changed == [aux, aux, aux, gen] * 2
    for variant, n in (("alternating", 0), ("instant", 3)):
        with pytest.raises(ValueError, match="aux_steps must be >= 1"):
            mmd.train_steps(variant, aux_steps=n, **kwargs)


@pytest.mark.parametrize("name", ["auxiliary", "generator", "instant"])
def test_every_distillation_step_draws_its_times_as_configured(name, monkeypatch):
    modes = []

    def recording(u_s, u_delta, *, num_steps, mode="paper"):
        modes.append((num_steps, mode))
        return time_pair(u_s, u_delta, num_steps=num_steps, mode=mode)

    time_pair = mmd.time_pair
    monkeypatch.setattr(mmd, "time_pair", recording)
    cfg = mmd.DistillConfig(num_steps=2, weighting="flat", null_label=3, time_sampling="grid")
    _run_steps(name, jax.devices()[:1], cfg, num_steps=1)
    assert modes and set(modes) == {(2, "grid")}


def _averaged_run(variant, num_updates):
    """`(state, trajectory)` after `num_updates` updates of the trained model (the teacher, or the
    generator; alternating with two auxiliary updates before each), averaged with decay 0.3; the
    trajectory is the trained model's parameters before and after each of its updates."""
    teacher, _, x, labels, precond, key = _setup(seed=3, b=16)
    x, labels = x.reshape(32, 2), labels.reshape(32)
    params, static = eqx.partition(teacher, eqx.is_inexact_array)
    cycle = 3 if variant == "alternating" else 1
    if variant == "teacher":
        opt = mmd.teacher_optimizer(peak_lr=1e-2, warmup_steps=1)
        cfgs = dict(teacher_cfg=mmd.TeacherConfig(null_label=3, ema_decay=0.3))
        frozen, start = mmd.Frozen(), params
    else:
        opt = mmd.distill_optimizer(peak_lr=1e-2, total_steps=10, warmup_steps=1)
        cfg = mmd.DistillConfig(num_steps=2, weighting="flat", null_label=3, ema_decay=0.3)
        cfgs = dict(distill_cfg=cfg, aux_optimizer=opt, aux_steps=max(cycle - 1, 1))
        frozen = mmd.Frozen(teacher=params, precond=precond)
        # A perturbed start, so that distillation has a non-zero gradient at step 0.
        start = jax.tree.map(lambda p: p * 1.1, params)
    aux_opt = opt if variant == "alternating" else None
    state = mmd.init_train_state(params=start, optimizer=opt, aux_optimizer=aux_opt, ema=True)
    programs = mmd.train_steps(
        variant, static=static, mesh=mmd.data_mesh(), optimizer=opt, donate=False, **cfgs
    )
    trajectory = [jax.tree.map(np.asarray, state.params)]
    for i in range(num_updates * cycle):
        state, _ = programs[i % cycle](state, frozen, x, labels, jax.random.fold_in(key, i))
        if i % cycle == cycle - 1:
            trajectory.append(jax.tree.map(np.asarray, state.params))
    return state, trajectory


@pytest.mark.parametrize("variant", ["teacher", "instant", "alternating"])
def test_parameter_average_is_the_weighted_sum_of_the_trajectory(variant):
    """After n updates of the trained model the average is sum_i c_i p_i over its trajectory
    p_0..p_n, with c_i the product form of the recursion: c_0 = prod_t d_t, c_i = (1 - d_{i-1})
    prod_{t >= i} d_t, d_t = min(decay, (1+t)/(10+t)), t counting the trained model's updates only
    (alternating: not the auxiliary's)."""
    state, trajectory = _averaged_run(variant, num_updates=5)
    d = [min(0.3, (1 + t) / (10 + t)) for t in range(5)]  # 0.1, 0.18, 0.25, 0.3, 0.3
    c = [np.prod(d)] + [(1 - d[i - 1]) * np.prod(d[i:]) for i in range(1, 6)]
    assert np.isclose(sum(c), 1.0)
    expected = jax.tree.map(lambda *ps: sum(ci * p for ci, p in zip(c, ps)), *trajectory)
    for a, b in zip(jax.tree.leaves(state.ema), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Not trivially so: the model moved, and its average differs from where it ended.
    for other in (trajectory[0], trajectory[-1]):
        pairs = zip(jax.tree.leaves(state.ema), jax.tree.leaves(other), strict=True)
        assert any(not np.allclose(a, b, rtol=1e-3) for a, b in pairs)


def test_distill_config_refuses_an_average_decay_outside_0_1():
    for decay in (-0.1, 1.0):
        with pytest.raises(ValueError, match="ema_decay must be in"):
            mmd.DistillConfig(ema_decay=decay)


def test_non_divisible_batch_raises_before_compiling():
    teacher, *_ = _setup()
    params, static = eqx.partition(teacher, eqx.is_inexact_array)
    opt = mmd.teacher_optimizer(peak_lr=1e-3)
    (step,) = mmd.train_steps(
        "teacher",
        static=static,
        mesh=mmd.data_mesh(),
        optimizer=opt,
        teacher_cfg=mmd.TeacherConfig(null_label=3),
    )
    state = mmd.init_train_state(params=params, optimizer=opt)
    with pytest.raises(ValueError, match="batch size 12 is not divisible by 8"):
        step(
            state,
            mmd.Frozen(),
            jnp.zeros((12, 2), F32),
            jnp.zeros(12, jnp.int32),
            jax.random.key(0),
        )


# ---------------------------------------------------------------------------------------- bad input


def test_bad_names_and_shapes_raise():
    with pytest.raises(ValueError, match="conditional, marginal"):
        mmd.DistillConfig(zs_mode="joint")
    with pytest.raises(ValueError, match="none, batch, fixed"):
        mmd.DistillConfig(center="mean")
    with pytest.raises(ValueError, match="paper, grid"):
        mmd.DistillConfig(time_sampling="uniform")
    with pytest.raises(ValueError, match="teacher, alternating, instant"):
        mmd.train_steps("progressive", static=None, mesh=mmd.data_mesh(), optimizer=optax.sgd(0.1))
    with pytest.raises(jaxtyping.TypeCheckError):
        mmd.posterior(
            z_t=jnp.zeros((3, 2)), x=jnp.zeros((3, 2)), lam_t=jnp.zeros(4), lam_s=jnp.zeros(4)
        )
    with pytest.raises(jaxtyping.TypeCheckError):
        mmd.diffuse(jnp.zeros((3, 2)), jnp.zeros(3, jnp.int32), jnp.zeros((3, 2)))


# ---------------------------------------------------------------------------------------- end to
# end


def _four_step_energy_distance(model, reference):
    """Energy distance of 2,000 unlabelled 4-step samples (key 5) to `reference`."""
    labels = jnp.zeros(2000, jnp.int32)
    sample = jax.jit(
        lambda key: mmd.sample(model, key, shape=(2000, 2), labels=labels, num_steps=4, shift=0.0)
    )
    return energy_distance(sample(jax.random.key(5)), reference)


def test_distillation_end_to_end_on_2d_mixture():
    """Train an MLP teacher on a ring mixture, distill k = 4 with both variants (flat weighting)
    through the data-parallel steps: each 4-step student must at least halve the undistilled 4-step
    sampler's energy distance. (Measured when written: teacher 0.083, alternating 0.0075, instant
    0.022.)"""
    mix, batch = ring(), 256
    labels = jnp.zeros(batch, jnp.int32)
    mesh = mmd.data_mesh(jax.devices()[:1])
    teacher = MLPDenoiser(dim=2, width=256, depth=3, num_classes=0, key=jax.random.key(0))
    params, static = eqx.partition(teacher, eqx.is_inexact_array)
    draw = jax.jit(lambda key: mix.draw(key, batch))

    def train(programs, state, frozen, num_steps, seed):
        for i in range(num_steps):
            key = jax.random.fold_in(jax.random.key(seed), i)
            step = programs[i % len(programs)]
            state, metrics = step(state, frozen, draw(jax.random.fold_in(key, 1)), labels, key)
        assert all(np.isfinite(v) for v in jax.tree.leaves(metrics))
        return state

    opt = mmd.teacher_optimizer(peak_lr=1e-3, warmup_steps=100)
    programs = mmd.train_steps(
        "teacher",
        static=static,
        mesh=mesh,
        optimizer=opt,
        teacher_cfg=mmd.TeacherConfig(null_label=0, label_dropout=0.0),
    )
    t_state = train(
        programs, mmd.init_train_state(params=params, optimizer=opt), mmd.Frozen(), 3000, 1
    )

    reference = mix.draw(jax.random.key(99), 2000)

    def distance(p):
        return _four_step_energy_distance(eqx.combine(p, static), reference)

    undistilled = distance(t_state.params)
    frozen = mmd.Frozen(
        teacher=t_state.params, precond=mmd.preconditioner_from_adam(t_state.opt_state, b2=0.99)
    )
    cfg = mmd.DistillConfig(num_steps=4, weighting="flat")
    for variant, num_steps, lr in [("alternating", 2000, 2e-4), ("instant", 1000, 1e-4)]:
        opt = mmd.distill_optimizer(peak_lr=lr, total_steps=num_steps, warmup_steps=num_steps // 10)
        aux_opt = opt if variant == "alternating" else None
        programs = mmd.train_steps(
            variant, static=static, mesh=mesh, optimizer=opt, aux_optimizer=aux_opt, distill_cfg=cfg
        )
        state = mmd.init_train_state(params=t_state.params, optimizer=opt, aux_optimizer=aux_opt)
        distilled = distance(train(programs, state, frozen, num_steps, 2).params)
        print(f"4-step energy distance: undistilled {undistilled:.4f}, {variant} {distilled:.4f}")
        assert distilled <= 0.5 * undistilled, (variant, distilled, undistilled)
