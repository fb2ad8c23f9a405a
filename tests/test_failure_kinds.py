"""Failure kinds from public bug reports of other diffusion and training code, replayed here.

Each row: the kind, the public report it comes from, the test (a `-k` keyword of this file) that
would have caught it here, and the result on this code. Each test was also run against a
deliberately broken copy of the code it covers (named in its commit) and failed there.

| # | kind | source report | test (`-k`) | result |
|---|---|---|---|---|
| 1 | sampler endpoints | diffusers #6477, stablediffusion #345 | `sampler_levels` | passes |
| 2 | schedule endpoints | MONAI #489 | `exact_ends`, `forced_to_the_ends` | passes |
| 3 | guidance convention | diffusers #5882 | `guidance_convention` | passes |
| 4 | denoiser at low noise | diffusers #6833 | `lowest_noise` | passes |
| 5 | learning rate off by one | optax #415 | `update_i` | passes |
| 6 | non-finite gradients | pytorch #46849, optax #1752 | `non_finite` | passes (stops) |
| 7 | same noise on every shard | markean/aimz #292 | `every_device` | passes |
| 8 | data lost or duplicated | google/grain #953, #1129 | `equally_often` | passes |
| 9 | several processes write | NVIDIA/apex #886 | `only_process` | passes |
| 10 | FID depends on storage | pytorch-fid #63 | `stored` | passes |

Notes on what cannot occur here, so is not tested further:
- 1: the sampler has no step to noise level zero to end short of, nor a repeated last level: it
  returns the prediction of its last (lowest-noise) call, at lam(1/k).
- 2: the cosine schedule is clipped on purpose (t to the range giving lam in [-15, 15]; documented
  in `mmd.logsnr_cosine`), and EDM's schedule is finite on all of [0, 1] by construction.
- 6: a step is not skipped: a non-finite gradient norm stops the run before the next checkpoint,
  so no checkpoint holds the parameters or Adam moments it reached.
- 8: `data.batches` batches one endless shuffled stream (no per-epoch remainder to drop or pad),
  and each process takes its slice of the same global batch.
"""

import functools
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import checkpoint
import data
import eval as evaluation
import mmd
import train
import uvit
from mnist_classifier import mnist_features
from uvit import MLPDenoiser

F32 = jnp.float32
ROOT = pathlib.Path(__file__).resolve().parent.parent


def _edm_lam(u, shift):
    """EDM's test-time schedule in float64, written from MATH.md §1.2."""
    a, b = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
    return -2 * 7 * np.log(a + np.asarray(u, np.float64) * (b - a)) + shift


class Recorder(eqx.Module):
    """A deterministic stub denoiser that records every call's (z, lam, label) on the host."""

    scale: jax.Array
    ordered: bool = eqx.field(static=True, default=True)  # False: allowed on several devices

    def __call__(self, z, lam, label):
        jax.debug.callback(_record, z, lam, label, ordered=self.ordered)
        return jnp.tanh(self.scale * z) + 0.01 * lam[:, None]


CALLS = []


def _record(z, lam, label):
    CALLS.append((np.asarray(z), np.asarray(lam), np.asarray(label)))


# ------------------------------------------------------------------------- 1. sampler endpoints


@pytest.mark.parametrize("k", [1, 2, 3, 8, 512])
def test_sampler_levels_and_output_at_its_ends(k):
    """k denoiser calls at k strictly increasing log-SNRs (no zero-width step), the first at the
    schedule's start u = 1 (pure noise), the i-th at lam(i/k); the sample is exactly the last
    call's prediction (no noise added after it, no extra step)."""
    CALLS.clear()
    den = Recorder(jnp.asarray(0.7, F32))
    shift = 0.3
    out = mmd.sample(
        den,
        jax.random.key(k),
        shape=(3, 2),
        labels=jnp.zeros(3, jnp.int32),
        num_steps=k,
        shift=shift,
    )
    jax.effects_barrier()
    assert len(CALLS) == k
    lams = np.asarray([lam for _, lam, _ in CALLS], np.float64)
    assert np.all(lams == lams[:, :1])  # one level per step for the whole batch
    levels = lams[:, 0]
    np.testing.assert_allclose(
        levels, _edm_lam(np.arange(k, 0, -1) / k, shift), rtol=1e-5, atol=1e-5
    )
    assert levels[0] == pytest.approx(-2 * np.log(80.0) + shift, rel=1e-6)
    assert np.all(np.diff(levels) > 0)
    z_last, lam_last, label_last = CALLS[-1]
    np.testing.assert_array_equal(
        out, den(jnp.asarray(z_last), jnp.asarray(lam_last), jnp.asarray(label_last))
    )


# ------------------------------------------------------------------------ 2. schedule endpoints

ENDS = np.array(
    [
        0.0,
        np.nextafter(np.float32(0), np.float32(1)),
        np.nextafter(np.float32(1), np.float32(0)),
        1.0,
    ],
    np.float32,
)


def test_schedules_posterior_and_sampler_are_finite_at_exact_ends():
    """Both schedules, alpha/sigma, the loss weights, the posterior and the ancestral step (gamma 0
    and 0.5) at u = 0, 1 and their float32 neighbours: finite. The cosine's tan(pi t / 2) is
    infinite at t = 1 and 0 at t = 0: it is clipped on purpose to lam in [-15, 15] (documented)."""
    u = jnp.asarray(ENDS)
    cos = mmd.logsnr_cosine(u, shift=0.0)
    np.testing.assert_array_equal(np.asarray(cos)[[0, -1]], [15.0, -15.0])
    for lam in (cos, mmd.logsnr_edm(u, shift=0.0), mmd.logsnr_edm(u, shift=2.0)):
        assert np.all(np.isfinite(lam)) and np.all(np.diff(np.asarray(lam)) <= 0)
        alpha, sigma = mmd.alpha_sigma(lam)
        assert np.all(np.isfinite(alpha)) and np.all(np.isfinite(sigma))
        assert np.all(alpha > 0) and np.all(sigma > 0)
        assert np.all(np.isfinite(mmd.loss_weight(lam, kind="edm")))
        # Every pair of these levels as (t, s), the noisier one as t: adjacent float32 times
        # included (equal levels after rounding, zero posterior variance).
        lam_t, lam_s = (a.ravel() for a in jnp.meshgrid(lam, lam))
        lam_t, lam_s = jnp.minimum(lam_t, lam_s), jnp.maximum(lam_t, lam_s)
        z_t = jnp.ones((lam_t.shape[0], 2), F32)
        mean, var = mmd.posterior(z_t=z_t, x=-z_t, lam_t=lam_t, lam_s=lam_s)
        assert np.all(np.isfinite(mean)) and np.all(np.isfinite(var)) and np.all(var >= 0)
        for gamma in (0.0, 0.5):
            step = mmd.ancestral_step(
                z_t=z_t, x=-z_t, lam_t=lam_t, lam_s=lam_s, noise=z_t, gamma=gamma
            )
            assert np.all(np.isfinite(step))


@pytest.mark.parametrize(
    "s, t",
    [
        (ENDS[0], ENDS[0]),
        (ENDS[0], ENDS[1]),
        (ENDS[0], ENDS[3]),
        (ENDS[2], ENDS[3]),
        (ENDS[3], ENDS[3]),
    ],
)
def test_losses_and_gradients_are_finite_with_times_forced_to_the_ends(s, t, monkeypatch):
    """The teacher loss with t forced to s, and the auxiliary, generator and instant losses with
    the distillation times forced to (s, t): finite values and gradients."""
    nets = [
        MLPDenoiser(dim=2, width=8, depth=1, num_classes=2, key=jax.random.key(i)) for i in range(3)
    ]
    x = jax.random.uniform(jax.random.key(5), (4, 2), minval=-1, maxval=1)
    labels = jnp.asarray([0, 1, 2, 0], jnp.int32)
    cosine = mmd.logsnr_cosine
    monkeypatch.setattr(
        mmd, "logsnr_cosine", lambda u, *, shift: cosine(jnp.full_like(u, s), shift=shift)
    )
    monkeypatch.setattr(
        mmd,
        "time_pair",
        lambda u_s, u_d, *, num_steps, mode="paper": (jnp.full_like(u_s, s), jnp.full_like(u_s, t)),
    )
    params = [eqx.filter(n, eqx.is_inexact_array) for n in nets]

    def finite(value, grads):
        assert np.isfinite(float(value))
        assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))

    tcfg = mmd.TeacherConfig(shift=0.5, null_label=2, label_dropout=0.5)
    finite(
        *eqx.filter_value_and_grad(
            lambda m: mmd.teacher_loss(m, jax.random.key(0), x=x, labels=labels, cfg=tcfg)
        )(nets[0])
    )
    cfg = mmd.DistillConfig(
        num_steps=4, shift=0.5, weighting="edm", guidance=0.5, null_label=2, clip=True
    )
    inputs = [
        mmd.distill_inputs(jax.random.key(i), x=x, labels=labels, num_steps=4, shift=0.5)
        for i in (1, 2)
    ]
    gen, aux, teacher = nets
    finite(
        *eqx.filter_value_and_grad(
            lambda m: mmd.auxiliary_loss(
                m, generator=gen, teacher=teacher, inputs=inputs[0], cfg=cfg
            )[0]
        )(aux)
    )
    finite(
        *eqx.filter_value_and_grad(
            lambda m: mmd.generator_loss(
                m, auxiliary=aux, teacher=teacher, inputs=inputs[0], cfg=cfg
            )[0]
        )(gen)
    )
    precond = jax.tree.map(jnp.ones_like, params[2])
    value, grads = eqx.filter_value_and_grad(
        lambda m: mmd.instant_loss(
            m, teacher=teacher, precond=precond, inputs1=inputs[0], inputs2=inputs[1], cfg=cfg
        )[0]
    )(gen)
    finite(value, grads)


# ------------------------------------------------------------------------ 3. guidance convention


class Fixed(eqx.Module):
    """A stub denoiser with fixed outputs: `cond` for a class label, `uncond` for the null one."""

    cond: jax.Array
    uncond: jax.Array
    null: int = eqx.field(static=True)

    def __call__(self, z, lam, label):
        lead = (1,) * (z.ndim - 1)
        is_null = (label == self.null).reshape(label.shape + lead[1:] + (1,))
        out = jnp.where(is_null, self.uncond.reshape(lead + (-1,)), self.cond.reshape(lead + (-1,)))
        return out + 0 * z


def test_guidance_convention_and_every_caller_uses_one_function(monkeypatch):
    """`g^w = (1 + w) g(z, c) - w g(z, null)` (MATH.md §7): w = 0 gives exactly the conditional
    output; and teacher sampling, the distillation targets (generator loss, instant teacher
    gradient) and evaluation's `generate` all go through `mmd.guided_denoise`."""
    cond, uncond = np.array([0.3, -0.7]), np.array([-0.2, 0.4])
    den = Fixed(jnp.asarray(cond, F32), jnp.asarray(uncond, F32), 2)
    z, lam, labels = jnp.zeros((2, 2), F32), jnp.zeros(2, F32), jnp.asarray([0, 1], jnp.int32)
    x_hat, x_cond = mmd.guided_denoise(den, z, lam, labels, guidance=0.0, clip=False, null_label=2)
    np.testing.assert_array_equal(x_hat, np.broadcast_to(cond.astype(np.float32), (2, 2)))
    np.testing.assert_array_equal(x_cond, x_hat)
    for w in (0.1, 1.0, 3.0):
        x_hat, _ = mmd.guided_denoise(den, z, lam, labels, guidance=w, clip=False, null_label=2)
        np.testing.assert_allclose(x_hat[0], (1 + w) * cond - w * uncond, rtol=1e-6)

    seen = []
    guided = mmd.guided_denoise

    def recording(*args, guidance, **kwargs):
        seen.append(guidance)
        return guided(*args, guidance=guidance, **kwargs)

    monkeypatch.setattr(mmd, "guided_denoise", recording)
    shape = (5, 2)  # a shape no other test compiles, so that every program is traced here
    labels = jnp.zeros(5, jnp.int32)
    mmd.sample(
        den,
        jax.random.key(0),
        shape=shape,
        labels=labels,
        num_steps=2,
        shift=0.0,
        guidance=0.25,
        null_label=2,
    )
    assert seen and set(seen) == {0.25}
    cfg = mmd.DistillConfig(num_steps=2, guidance=0.5, null_label=2)
    inputs = mmd.distill_inputs(
        jax.random.key(1), x=jnp.zeros(shape, F32), labels=labels, num_steps=2, shift=0.0
    )
    seen.clear()
    loss, _ = mmd.generator_loss(den, auxiliary=den, teacher=den, inputs=inputs, cfg=cfg)
    assert seen == [0.5]
    # x_gen = x_aux = cond: the direction x_aux - g^w is w (uncond - cond), 0 without guidance.
    assert float(loss) == pytest.approx(
        float(mmd.loss_weight(inputs.lam_s, kind="edm").mean()) * 0.5 * cond @ (uncond - cond),
        rel=1e-5,
    )
    seen.clear()
    mmd.teacher_gradient(
        den, x=inputs.x, z_s=inputs.z_t, lam_s=inputs.lam_s, labels=labels, cfg=cfg
    )
    assert seen == [0.5]
    seen.clear()
    evaluation.generate(
        den,
        jax.random.key(2),
        num_samples=3,
        batch_size=3,
        num_classes=2,
        num_steps=2,
        shift=0.0,
        guidance=0.75,
        clip=False,
        gamma=0.0,
        null_label=2,
        image_shape=(1, 1, 2),
        devices=jax.devices()[:1],
    )
    assert seen and set(seen) == {0.75}


# ---------------------------------------------------------------- 5. learning-rate off by one


@pytest.mark.parametrize("variant", ["teacher", "instant", "alternating"])
def test_update_i_uses_the_schedule_at_its_count_fresh_and_after_a_resume(
    variant, monkeypatch, tmp_path
):
    """With the schedule `lambda c: c` and a unit gradient, each update moves a parameter by minus
    the rate (Adam's first update of a constant gradient is its sign), so update n of an optimiser
    must move it by -n: also the rate `lr(i)` train.py logs, and also after the optimiser states
    went through a checkpoint at odd step 3 (alternating: the auxiliary's and the generator's
    schedules, two auxiliary updates per cycle)."""
    monkeypatch.setattr(
        mmd, "warmup_linear_schedule", lambda **_: lambda count: jnp.asarray(count, F32)
    )
    extra = ["--aux-steps", "2"] if variant == "alternating" else []
    config = train.parse_config(["--preset", "tiny", "--variant", variant, *extra])
    opt, aux_opt, lr = train.optimizers(config)
    cycle = (aux_opt,) * 2 + (opt,) if variant == "alternating" else (opt,)
    grads = {"w": jnp.ones((), F32)}

    def run(states, first, last):
        moves = []
        for i in range(first, last):
            j = id(cycle[i % len(cycle)])
            with jax.numpy_dtype_promotion("standard"):
                update, states[j] = cycle[i % len(cycle)].update(grads, states[j])
            moves.append(float(update["w"]))
        return moves

    def fresh():
        return {id(o): o.init({"w": jnp.zeros((), F32)}) for o in cycle}

    states = fresh()
    moves = run(states, 0, 3)
    path = tmp_path / "ckpt.eqx"
    checkpoint.save(path, meta={"step": 3}, groups={str(k): v for k, v in states.items()})
    like = fresh()
    resumed = {k: checkpoint.load_group(path, str(k), v) for k, v in like.items()}
    moves += run(resumed, 3, 9)
    counts = [
        sum(cycle[j % len(cycle)] is cycle[i % len(cycle)] for j in range(i)) for i in range(9)
    ]
    np.testing.assert_allclose(moves, -np.asarray(counts, np.float64), rtol=1e-5, atol=1e-7)
    assert [lr(i) for i in range(9)] == counts
    assert moves == run(fresh(), 0, 9)  # the resumed updates equal uninterrupted ones


# ------------------------------------------------------- 6. non-finite gradients through clipping


@jax.custom_jvp
def _poison(w, bad):
    """Value 0; derivative `bad` per unit of w: a finite loss with a chosen gradient. (The value is
    built from `bad` so that it varies over devices as `bad` does, as shard_map's types require.)"""
    return w * jnp.isnan(bad).astype(w.dtype) * 0.0


@_poison.defjvp
def _poison_jvp(primals, tangents):
    w, bad = primals
    return _poison(w, bad), bad * tangents[0]


class Poisoned(eqx.Module):
    """`x_hat = w z`, whose gradient is `bad` wherever an example has label 1: the loss stays
    finite."""

    w: jax.Array
    bad: float = eqx.field(static=True)

    def __call__(self, z, lam, label):
        flagged = jnp.any(label == 1)
        return self.w * z + _poison(self.w, jnp.where(flagged, self.bad, 0.0))


def _bare_run(workdir):
    """A `train.Run` of the tiny teacher preset with only what `train.MetricsLog` reads."""
    return train.Run(
        config=train.parse_config(["--preset", "tiny", "--variant", "teacher"]),
        workdir=workdir,
        devices=[],
        static=None,
        frozen=mmd.Frozen(),
        programs=(),
        batches=None,
        batch_sharding=None,
        learning_rate=lambda i: 0.1,
        train_key=None,
        sample_key=None,
        last_checkpoint=None,
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_gradient_stops_the_run_before_a_checkpoint(bad, tmp_path):
    """A NaN or inf gradient at step s with a finite loss: the step reports a non-finite gradient
    norm (the clipped update would carry it into every parameter and Adam moment), and train.py's
    check of each step's metrics, which runs before any checkpoint is written, stops the run with
    a one-line error naming the step and the last good checkpoint (that the loop checks before it
    writes: test_train.py's non-finite-loss test). Zero gradients through clipping stay finite."""
    model = Poisoned(jnp.asarray(0.5, F32), bad)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    opt = mmd.teacher_optimizer(peak_lr=1e-2, warmup_steps=1)
    cfg = mmd.TeacherConfig(null_label=3, label_dropout=0.0)
    local = functools.partial(mmd.teacher_step, static=static, optimizer=opt, cfg=cfg)
    step = mmd.data_parallel(local, mesh=mmd.data_mesh(num_devices=2), donate=False)
    state = mmd.init_train_state(params=params, optimizer=opt)
    x = jnp.full((4, 2), 0.5, F32)
    state, good = step(state, mmd.Frozen(), x, jnp.zeros(4, jnp.int32), jax.random.key(0))
    assert np.isfinite(float(good["grad_norm"])) and float(good["grad_norm"]) > 0
    _, metrics = step(state, mmd.Frozen(), x, jnp.asarray([0, 1, 0, 0]), jax.random.key(1))
    assert np.isfinite(float(metrics["loss"])) and not np.isfinite(float(metrics["grad_norm"]))

    run = _bare_run(tmp_path)
    log = train.MetricsLog(run)
    log.append(1, good)
    log.append(2, metrics)
    last = tmp_path / "ckpt_00000001.eqx"
    with pytest.raises(
        FloatingPointError, match=r"non-finite grad_norm at step 2 .*ckpt_00000001"
    ) as e:
        log.flush(last)
    assert "\n" not in str(e.value)

    zeros = {"w": jnp.zeros(3, F32)}
    for optimizer in (opt, mmd.distill_optimizer(peak_lr=1e-2, total_steps=10, warmup_steps=1)):
        opt_state = optimizer.init(zeros)
        for _ in range(2):
            with jax.numpy_dtype_promotion("standard"):
                update, opt_state = optimizer.update(zeros, opt_state)
            assert np.all(np.asarray(update["w"]) == 0)
        assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(opt_state))


# ----------------------------------------------------------- 7. the same noise on every device


def _distinct_levels(records):
    return {float(v) for _, lam, _ in records for v in lam}


@pytest.mark.parametrize("name", ["teacher", "generator", "instant"])
def test_every_device_and_step_draws_its_own_noise_times_and_label_dropout(name):
    """On 4 devices, a step's per-example draws (times, so log-SNRs; noise, so z; label dropout)
    differ across devices and across steps: every example of the global batch has its own level,
    its own z for the same x, and the devices' dropout masks are not copies."""
    CALLS.clear()
    model = Recorder(jnp.asarray(0.7, F32), ordered=False)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    mesh = mmd.data_mesh(num_devices=4)
    if name == "teacher":
        opt = mmd.teacher_optimizer(peak_lr=1e-3)
        cfg = mmd.TeacherConfig(null_label=3, label_dropout=0.5)
        local = functools.partial(mmd.teacher_step, static=static, optimizer=opt, cfg=cfg)
        aux_opt, frozen = None, mmd.Frozen()
    else:
        opt = aux_opt = mmd.distill_optimizer(peak_lr=1e-3, total_steps=10)
        cfg = mmd.DistillConfig(num_steps=2, weighting="flat")
        step_fn = mmd.generator_step if name == "generator" else mmd.instant_step
        local = functools.partial(step_fn, static=static, optimizer=opt, cfg=cfg)
        frozen = mmd.Frozen(teacher=params, precond=params)
    minibatches = 2 if name == "instant" else 1
    step = mmd.data_parallel(local, mesh=mesh, minibatches=minibatches, donate=False)
    state = mmd.init_train_state(params=params, optimizer=opt, aux_optimizer=aux_opt)
    batch = 16 * minibatches
    x, labels = jnp.zeros((batch, 2), F32), jnp.ones(batch, jnp.int32)
    levels, masks = [], []
    for i in range(2):
        CALLS.clear()
        step(state, frozen, x, labels, jax.random.key(i))
        jax.effects_barrier()
        levels.append(_distinct_levels(CALLS))
        # Each example's own level (distillation: its lam_s; lam_t may be the shared lam(1)).
        assert len(levels[-1]) >= batch
        z_rows = {tuple(row) for z, _, _ in CALLS for row in z.reshape(len(z), -1).tolist()}
        assert len(z_rows) >= batch
        masks.append({tuple(label.tolist()) for _, _, label in CALLS})
    assert len(levels[0] & levels[1]) <= 1  # at most lam(1), where t = min(s + d, 1) caps
    if name == "teacher":  # the devices' dropout masks differ, and differ from step to step
        assert all(len(m) > 1 and any(3 in mask for mask in m) for m in masks)
        assert masks[0] != masks[1]


# --------------------------------------------------- 8. data lost or duplicated across processes


def test_every_index_is_seen_equally_often_over_one_and_two_processes():
    """A dataset of 22 examples that yield their own indices, global batch 4 (not a divisor of 22),
    over 1 and 2 processes: in 11 global batches (two epochs) every index appears exactly twice,
    every process's batches have the same size, and the processes' parts make up the one-process
    batch."""
    n, batch, steps = 22, 4, 11
    images = np.zeros((n, 2, 2, 1), np.uint8)
    ds = data.Dataset(images=images, labels=np.arange(n, dtype=np.int32), num_classes=n, name="ids")
    streams = {
        count: [
            data.batches(ds, batch_size=batch, seed=3, shard_index=p, shard_count=count)
            for p in range(count)
        ]
        for count in (1, 2)
    }
    seen = {count: [] for count in streams}
    for _ in range(steps):
        parts = {count: [next(it)[1] for it in its] for count, its in streams.items()}
        for count, labels in parts.items():
            assert [len(p) for p in labels] == [batch // count] * count
            seen[count].append(np.concatenate(labels))
        np.testing.assert_array_equal(seen[2][-1], seen[1][-1])
    for count in streams:
        np.testing.assert_array_equal(np.bincount(np.concatenate(seen[count]), minlength=n), 2)


# ------------------------------------------------------------- 4. the denoiser at low noise

V_CAP = (
    50.0  # a generous cap on |v| for the networks below (v-targets alpha eps - sigma x are O(1))
)


def _low_noise_gap(model, z, lam):
    """`max |x_hat(z, lam) - z|` and its closed-form bound `(1 - alpha) max|z| + sigma V_CAP`."""
    x_hat = model(z, jnp.full((z.shape[0],), lam, F32), jnp.zeros(z.shape[0], jnp.int32))
    alpha, sigma = (float(a) for a in mmd.alpha_sigma(jnp.asarray(lam, F32)))
    bound = (1 - alpha) * float(jnp.max(jnp.abs(z))) + sigma * V_CAP
    return float(jnp.max(jnp.abs(x_hat - z))), bound


def test_denoisers_return_about_z_at_the_lowest_noise():
    """At the highest log-SNR the losses and samplers reach (EDM's lam(0) with the shift; the
    cosine's clip 15), `x_hat = alpha z - sigma v` is within `(1 - alpha)|z| + sigma V` of z for the
    generators of both variants (copies of the teacher: the U-ViT `Denoiser`, or `MLPDenoiser` for
    points) with random weights, and for the shipped MNIST teacher."""
    tiny = uvit.UViTConfig(
        resolution=8,
        channels=1,
        num_classes=2,
        widths=(8,),
        blocks=(1,),
        transformer_width=16,
        transformer_depth=1,
        heads=2,
        emb_width=16,
        groups=4,
    )
    net = uvit.make_model(tiny, key=jax.random.key(0))
    leaves, treedef = jax.tree.flatten(eqx.filter(net, eqx.is_inexact_array))
    noisy = [p + 0.3 * jax.random.normal(jax.random.key(i), p.shape) for i, p in enumerate(leaves)]
    net = eqx.combine(
        jax.tree.unflatten(treedef, noisy), eqx.filter(net, eqx.is_inexact_array, inverse=True)
    )
    teacher, config, _ = train.load_checkpoint(ROOT / "checkpoints" / "mnist_teacher.eqx")
    side = config.model.resolution
    digits = jnp.where(jax.random.uniform(jax.random.key(1), (2, side, side, 1)) > 0.7, 1.0, -1.0)
    cases = [
        (net, jax.random.normal(jax.random.key(2), (2, 8, 8, 1)), mmd.resolution_shift(8)),
        (
            MLPDenoiser(dim=2, width=16, depth=2, num_classes=2, key=jax.random.key(3)),
            jax.random.normal(jax.random.key(4), (16, 2)),
            0.0,
        ),
        (teacher, digits, mmd.resolution_shift(side)),
    ]
    for model, z, shift in cases:
        for lam in (float(mmd.logsnr_edm(jnp.asarray(0.0), shift=shift)), 15.0):
            gap, bound = _low_noise_gap(eqx.filter_jit(model), z, lam)
            assert gap <= bound, (type(model).__name__, lam, gap, bound)
            assert bound < 0.15


# ------------------------------------------------------ 10. features and how samples are stored


def test_features_do_not_depend_on_how_samples_are_stored(tmp_path):
    """A float batch on and off the uint8 grid: `to_uint8` rounds to the nearest level (never
    truncates), and the classifier features of the uint8 batch in memory, after an 8-bit PNG round
    trip and after an npz round trip are identical."""
    rng = np.random.default_rng(0)
    levels = rng.integers(0, 256, (6, 28, 28, 1))
    offset = rng.uniform(-0.45, 0.45, levels.shape)
    x = ((levels + offset) / 127.5 - 1.0).astype(np.float32)
    u8 = evaluation.to_uint8(x)
    np.testing.assert_array_equal(u8, levels)
    ends = np.asarray([-1.0, 1.0, -1.2, 1.2], np.float32)
    np.testing.assert_array_equal(evaluation.to_uint8(ends), [0, 255, 0, 255])
    pngs = []
    for i, image in enumerate(u8):
        path = tmp_path / f"{i}.png"
        Image.fromarray(image[..., 0]).save(path)
        pngs.append(np.asarray(Image.open(path))[..., None])
    np.savez(tmp_path / "samples.npz", x=u8)
    stored = {"png": np.stack(pngs), "npz": np.load(tmp_path / "samples.npz")["x"]}
    memory = mnist_features(u8)
    for name, images in stored.items():
        assert images.dtype == np.uint8, name
        np.testing.assert_array_equal(mnist_features(images), memory, err_msg=name)


# ------------------------------------------------------- 9. several processes writing one file


def test_only_process_0_writes_metrics_and_every_process_checks_them(tmp_path, monkeypatch):
    """As process 1 of 2 (jax.process_index patched), the metrics log writes no file but still
    stops on a non-finite value; as process 0 it writes. (train.py's whole loop under two real
    processes, checkpoints, figures and the teacher export included: test_multiprocess.py, which
    checks that process 1's work directory is never created.)"""
    good = {"loss": jnp.asarray(1.0, F32), "grad_norm": jnp.asarray(1.0, F32)}
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    log = train.MetricsLog(_bare_run(tmp_path))
    log.append(1, good)
    log.flush(None)
    assert not list(tmp_path.iterdir())
    log.append(2, {**good, "loss": jnp.asarray(np.nan, F32)})
    with pytest.raises(FloatingPointError, match="non-finite loss at step 2"):
        log.flush(None)
    assert not list(tmp_path.iterdir())
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    log.append(3, good)
    log.flush(None)
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
