"""Speed benchmarks: the U-ViT, the three training steps, Inception-v3 and the sampler. Each prints
a table and can write JSON (`python -m experiments model|speed|inception|sampling --help`).

    python -m experiments model [--preset mnist] [--batch-size 128] [--repeats 10] [--out M.json]
        Forward and forward+backward (denoising loss gradient) time of a U-ViT preset per batch,
        images/s, FLOPs from XLA's compiled cost analysis, achieved GFLOP/s, and the float32
        2048x2048 matmul rate measured around every timed call, with the ratio between the two.
    python -m experiments speed [--preset mnist] [--batch-size 64] [--repeats 5] [--sample-batch 16]
        Steady-state step time and images/s of the teacher, alternating and instant data-parallel
        steps of mmd.py at the same global batch, their ratios to the teacher step, XLA's FLOP count
        and GFLOP/s of each step, and the sampling wall time of a 512-step teacher against an 8-step
        student.
    python -m experiments inception [--batch-size 32] [--repeats 3]
        Inception-v3 (FID's features) on a batch of 299x299 images: images/s, XLA's FLOP count,
        achieved GFLOP/s and its ratio to the float32 matmul rate measured in the same run (last
        line: `inception: X images/s, R of the matmul rate`), and eval.py's whole feature path on
        32x32 grey digits.
    python -m experiments sampling [--k 8] [--num-samples 1000] [--batch-sizes 50 200 500]
        Images/s of eval.generate (the shipped MNIST teacher at k steps, the cost of a k-step
        student) at several batch sizes, and one batch's GFLOP/s against the float32 matmul rate.

Timings are medians over repeats after a warm-up call (compilation excluded). The 1-minute load
average is reported with every result: on a shared machine, rerun when it is low.
"""

import dataclasses
import functools
import json
import os
import pathlib
import statistics
import time
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree, UInt8

import data
import eval as evaluation
import inception
import mmd
import options
import train
import uvit
from mmd import alpha_sigma


def seconds(fn: Callable, *args) -> float:
    """Wall time of one call of `fn(*args)`, outputs blocked on."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def against_matmul(
    fn: Callable, *args, flops: float, repeats: int, n: int = 2048
) -> dict[str, float]:
    """Median wall time of `fn(*args)` and its GFLOP/s as a fraction of the float32 n x n matmul
    rate.

    Each repeat times the model call between two matmul measurements (median of 3 products each) and
    takes the ratio against their mean, so load from other processes on a shared machine mostly
    cancels."""
    a = jax.random.normal(jax.random.key(0), (n, n))
    matmul = jax.jit(jnp.matmul)
    jax.block_until_ready((matmul(a, a), fn(*args)))

    def matmul_rate():
        return 2 * n**3 / statistics.median(seconds(matmul, a, a) for _ in range(3)) / 1e9

    times, rates, ratios = [], [], []
    for _ in range(repeats):
        before = matmul_rate()
        times.append(seconds(fn, *args))
        rates.append((before + matmul_rate()) / 2)
        ratios.append(flops / times[-1] / 1e9 / rates[-1])
    return {
        "s": statistics.median(times),
        "gflops_per_s": flops / statistics.median(times) / 1e9,
        "matmul_gflops_per_s": statistics.median(rates),
        "fraction_of_matmul": statistics.median(ratios),
    }


def compiled_flops(fn: Callable, *args) -> float:
    """FLOPs of one call of `jax.jit(fn)(*args)` from XLA's cost analysis of the compiled
    program."""
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0]
    if not analysis or "flops" not in analysis:
        raise RuntimeError(
            "XLA's cost analysis reported no FLOP count on this backend; count FLOPs by hand."
        )
    return float(analysis["flops"])


def denoising_loss(
    model: uvit.Denoiser,
    x: Float[Array, "b h w c"],
    lam: Float[Array, " b"],
    label: Int[Array, " b"],
    eps: Float[Array, "b h w c"],
) -> Float[Array, ""]:
    """Mean squared x-prediction error on `z = alpha x + sigma eps`: the work of one teacher
    training step."""
    alpha, sigma = alpha_sigma(lam)
    z = alpha[:, None, None, None] * x + sigma[:, None, None, None] * eps
    return jnp.mean(jnp.square(model(z, lam, label) - x))


def run_header(*, preset: str, batch_size: int, model: eqx.Module, load_before: float) -> dict:
    """What every result records about the run: preset, batch, parameter count, machine, JAX,
    load."""
    return {
        "preset": preset,
        "batch_size": batch_size,
        "parameters": uvit.param_count(model),
        "devices": f"{jax.devices()[0].platform} x{jax.device_count()}",
        "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
        "load_average_1min_before": load_before,
    }


def bench_model(*, preset: str, batch_size: int, repeats: int, key: PRNGKeyArray) -> dict:
    """Time forward and forward+backward of a preset at `batch_size`; FLOPs, GFLOP/s and matmul
    ratio."""
    load_before = os.getloadavg()[0]
    config = uvit.PRESETS[preset]
    k_model, k_x, k_lam, k_label, k_eps = jax.random.split(key, 5)
    model = uvit.make_model(config, key=k_model)
    shape = (batch_size, config.resolution, config.resolution, config.channels)
    x = jax.random.uniform(k_x, shape, minval=-1.0, maxval=1.0)
    eps = jax.random.normal(k_eps, shape)
    lam = jax.random.uniform(k_lam, (batch_size,), minval=-10.0, maxval=10.0)
    label = jax.random.randint(k_label, (batch_size,), 0, config.num_classes + 1)
    alpha, sigma = alpha_sigma(lam)
    z = alpha[:, None, None, None] * x + sigma[:, None, None, None] * eps

    params, static = eqx.partition(model, eqx.is_array)

    def forward(p, z, lam, label):
        return eqx.combine(p, static)(z, lam, label)

    def forward_backward(p, x, lam, label, eps):
        return jax.value_and_grad(
            lambda q: denoising_loss(eqx.combine(q, static), x, lam, label, eps)
        )(p)

    fwd_args, fb_args = (params, z, lam, label), (params, x, lam, label, eps)
    fwd_flops, fb_flops = (
        compiled_flops(forward, *fwd_args),
        compiled_flops(forward_backward, *fb_args),
    )
    fwd = against_matmul(jax.jit(forward), *fwd_args, flops=fwd_flops, repeats=repeats)
    fb = against_matmul(jax.jit(forward_backward), *fb_args, flops=fb_flops, repeats=repeats)
    result = {
        **run_header(preset=preset, batch_size=batch_size, model=model, load_before=load_before),
        "load_average_1min_after": os.getloadavg()[0],
        "forward_gflop": fwd_flops / 1e9,
        "forward_backward_gflop": fb_flops / 1e9,
        "forward_images_per_s": batch_size / fwd["s"],
        "forward_backward_images_per_s": batch_size / fb["s"],
    }
    result.update({f"forward_{k}": v for k, v in fwd.items()})
    result.update({f"forward_backward_{k}": v for k, v in fb.items()})
    return result


def step_seconds(step: Callable, state: mmd.TrainState, *args, repeats: int) -> float:
    """Median wall time of `step(state, *args)` (not donating), after a warm-up call that compiles
    it."""
    jax.block_until_ready(step(state, *args))
    return statistics.median(seconds(step, state, *args) for _ in range(repeats))


def step_cost(
    variant: str,
    *,
    static: PyTree,
    params: PyTree,
    x: Float[Array, "b h w c"],
    labels: Int[Array, " b"],
    shift: float,
    num_classes: int,
    repeats: int,
    key: PRNGKeyArray,
) -> dict[str, float]:
    """Median seconds, images/s and XLA GFLOP of one training step of `variant` (alternating: the
    mean of its auxiliary and generator programs), k = 8, on the global batch (`x`, `labels`)."""
    teacher_cfg = mmd.TeacherConfig(shift=shift, null_label=num_classes)
    distill_cfg = mmd.DistillConfig(num_steps=8, shift=shift, null_label=num_classes)
    frozen = mmd.Frozen(teacher=params, precond=jax.tree.map(jnp.ones_like, params))
    opt = mmd.distill_optimizer(peak_lr=1e-4, total_steps=1000, warmup_steps=10)
    aux_opt = opt if variant == "alternating" else None
    programs = mmd.train_steps(  # alternating: one program per phase
        variant,
        static=static,
        mesh=mmd.data_mesh(),
        optimizer=opt,
        aux_optimizer=aux_opt,
        teacher_cfg=teacher_cfg,
        distill_cfg=distill_cfg,
        donate=False,
    )
    state = mmd.init_train_state(params=params, optimizer=opt, aux_optimizer=aux_opt)
    args = (frozen, x, labels, key)
    times = [step_seconds(program, state, *args, repeats=repeats) for program in programs]
    flops = statistics.mean(compiled_flops(program, state, *args) for program in programs)
    s = sum(times) / len(times)
    n = x.shape[0]
    return {"s": s, "images_per_s": n / s, "gflop": flops / 1e9, "gflop_per_s": flops / s / 1e9}


def bench_speed(
    *, preset: str, batch_size: int, repeats: int, sample_batch: int, key: PRNGKeyArray
) -> dict:
    """Teacher vs alternating vs instant step time at equal global batch, and 512- vs 8-step
    sampling time.

    The instant step's global batch holds its two minibatches (B/2 each); it is also timed at 2B,
    i.e. with minibatches as large as the teacher's batch. The alternating step is timed in both
    phases (auxiliary update, generator update) and reported as their mean, the cost per step of a
    run.
    """
    load_before = os.getloadavg()[0]
    config = uvit.PRESETS[preset]
    k_model, k_x, k_label, k_step, k_sample = jax.random.split(key, 5)
    model = uvit.make_model(config, key=k_model)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    shape = (config.resolution, config.resolution, config.channels)
    shift = train.resolve(train.Config(model=config)).shift  # the default schedule's
    common = dict(static=static, params=params, shift=shift, num_classes=config.num_classes)

    def timed(variant: str, n: int) -> dict[str, float]:
        x = jax.random.uniform(jax.random.fold_in(k_x, n), (n, *shape), minval=-1.0, maxval=1.0)
        labels = jax.random.randint(jax.random.fold_in(k_label, n), (n,), 0, config.num_classes)
        return step_cost(variant, x=x, labels=labels, repeats=repeats, key=k_step, **common)

    rows = {
        "teacher": timed("teacher", batch_size),
        "alternating": timed("alternating", batch_size),
        "instant": timed("instant", batch_size),
        "instant_2B": timed("instant", 2 * batch_size),
    }
    result = run_header(preset=preset, batch_size=batch_size, model=model, load_before=load_before)
    for name, row in rows.items():
        result.update({f"{name}_{k}": v for k, v in row.items()})
        result[f"{name}_over_teacher"] = row["s"] / rows["teacher"]["s"]
    sampling = dict(shape=shape, num_classes=config.num_classes, shift=shift, key=k_sample)
    result.update(sampling_seconds(model, batch_size=sample_batch, **sampling))
    result["load_average_1min_after"] = os.getloadavg()[0]
    return result


def sampling_seconds(
    model: eqx.Module,
    *,
    shape: tuple[int, ...],
    num_classes: int,
    batch_size: int,
    shift: float,
    key: PRNGKeyArray,
) -> dict:
    """Wall time of one compiled batch of 512- and 8-step ancestral sampling (mmd.sample, labels
    i % num_classes, images of `shape`) and their ratio."""
    labels = jnp.arange(batch_size, dtype=jnp.int32) % max(num_classes, 1)
    result = {"sample_batch": batch_size}
    for k in (512, 8):
        sampler = jax.jit(
            lambda key, k=k: mmd.sample(
                model, key, shape=(batch_size, *shape), labels=labels, num_steps=k, shift=shift
            )
        )
        jax.block_until_ready(sampler(key))
        result[f"sample_{k}_steps_s"] = seconds(sampler, key)
    result["sampling_speedup_512_over_8"] = (
        result["sample_512_steps_s"] / result["sample_8_steps_s"]
    )
    return result


def bench_inception(*, batch_size: int, repeats: int) -> dict:
    """Inception-v3 (inception.py) on one batch of 299x299 RGB uint8 images: images/s, XLA's FLOP
    count, GFLOP/s and its ratio to the float32 matmul rate measured around each call
    (`against_matmul`); then eval.py's whole feature path (resize, transfer, network) on
    `batch_size` 32x32 grey digits."""
    load_before = os.getloadavg()[0]
    params = inception.inception_params(inception.load_inception_weights())
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (batch_size, 299, 299, 3), dtype=np.uint8))
    flops = compiled_flops(inception.inception_batch, params, images)
    network = against_matmul(
        inception.inception_batch, params, images, flops=flops, repeats=repeats
    )
    digits = rng.integers(0, 256, (batch_size, 32, 32, 1), dtype=np.uint8)
    evaluation.inception_features(digits, batch_size=batch_size, params=params)  # compiles
    start = time.perf_counter()
    evaluation.inception_features(digits, batch_size=batch_size, params=params)
    end_to_end = batch_size / (time.perf_counter() - start)
    return {
        "batch_size": batch_size,
        "devices": f"{jax.devices()[0].platform} x{jax.device_count()}",
        "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
        "load_average_1min_before": load_before,
        "gflop_per_image": flops / batch_size / 1e9,
        "images_per_s": batch_size / network["s"],
        **network,
        "features_images_per_s_32px_grey": end_to_end,
        "load_average_1min_after": os.getloadavg()[0],
    }


def plain_samples(
    model: Callable,
    model_config: uvit.UViTConfig,
    *,
    shift: float,
    seed: int,
    num_samples: int,
    batch_size: int,
    num_steps: int,
) -> UInt8[np.ndarray, "n h w c"]:
    """`eval.generate`'s `num_samples` images (uint8, NHWC at the model's resolution and channels)
    of a U-ViT sampled with `num_steps` steps, without guidance, clipping or extra sampling noise
    (gamma 0); sample i has label `i % num_classes` and key `fold_in(key(seed), i)`."""
    return evaluation.generate(
        model,
        jax.random.key(seed),
        num_samples=num_samples,
        batch_size=batch_size,
        num_classes=model_config.num_classes,
        num_steps=num_steps,
        shift=shift,
        guidance=0.0,
        clip=False,
        gamma=0.0,
        null_label=model_config.num_classes,
        image_shape=(model_config.resolution, model_config.resolution, model_config.channels),
    )


def bench_sampling(
    *,
    teacher: pathlib.Path,
    num_steps: int,
    num_samples: int,
    batch_sizes: Sequence[int],
    repeats: int,
) -> dict:
    """Images/s of eval.generate (`num_samples` samples, `num_steps` steps, guidance 0) at each
    batch size, and one batch's GFLOP/s against the float32 matmul rate (`against_matmul`)."""
    load_before = os.getloadavg()[0]
    model, run, _ = train.load_checkpoint(teacher)
    shape = (run.model.resolution, run.model.resolution, run.model.channels)
    shift = run.shift
    result = {
        "num_steps": num_steps,
        "num_samples": num_samples,
        "cpu_count": os.cpu_count(),
        "devices": f"{jax.devices()[0].platform} x{jax.device_count()}",
        "load_average_1min_before": load_before,
    }
    for batch in batch_sizes:
        labels = jnp.arange(batch, dtype=jnp.int32) % run.model.num_classes
        sampler = jax.jit(
            lambda key, batch=batch, labels=labels: mmd.sample(
                model,
                key,
                shape=(batch, *shape),
                labels=labels,
                num_steps=num_steps,
                shift=shift,
                null_label=run.model.num_classes,
            )
        )
        keys = jax.random.split(jax.random.key(0), batch)
        flops = compiled_flops(sampler, keys)
        timed = against_matmul(sampler, keys, flops=flops, repeats=repeats)
        generate = functools.partial(
            plain_samples,
            model,
            run.model,
            shift=shift,
            seed=0,
            batch_size=batch,
            num_steps=num_steps,
        )
        generate(num_samples=batch)  # compiles
        start = time.perf_counter()
        generate(num_samples=num_samples)
        result.update(
            {
                f"batch{batch}_images_per_s": num_samples / (time.perf_counter() - start),
                f"batch{batch}_gflop_per_s": timed["gflops_per_s"],
                f"batch{batch}_fraction_of_matmul": timed["fraction_of_matmul"],
            }
        )
    result["load_average_1min_after"] = os.getloadavg()[0]
    return result


def write_json(path: str, result: dict, *, make_folder: bool = False) -> None:
    """Write `result` as JSON atomically (temporary file in the same folder, then rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    if make_folder:
        os.makedirs(folder, exist_ok=True)
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"output folder {folder} does not exist; create it or choose another --out."
        )
    with data.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(result, indent=2))


def print_table(result: dict) -> None:
    """One `name: value` line per result entry."""
    for name, value in result.items():
        print(f"{name:40s} {value:.4g}" if isinstance(value, float) else f"{name:40s} {value}")


_PRESETS = tuple(sorted(uvit.PRESETS))


TEACHER = "checkpoints/mnist_teacher.eqx"


_OUT = "also write the results as JSON to this path"


@dataclasses.dataclass(frozen=True)
class Counts:
    """Base of the subcommand settings: every integer but the seed is a count, at least 1."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            values = value if isinstance(value, tuple) else (value,)
            if f.name != "seed" and any(type(v) is int and v < 1 for v in values):
                flag = f.metadata.get("flag") or options.flag(f.name)
                raise ValueError(f"{flag} must be >= 1, got {value}")


@dataclasses.dataclass(frozen=True)
class ModelBench(Counts):
    """Settings of `python -m experiments model`."""

    preset: str = options.field("mnist", "U-ViT architecture", choices=_PRESETS)
    batch_size: int = options.field(128, "images per timed call")
    repeats: int = options.field(10, "timed calls after a warm-up (median)")
    seed: int = options.field(0, "seed of the parameters and inputs")
    out: str | None = options.field(None, _OUT)


@dataclasses.dataclass(frozen=True)
class SpeedBench(Counts):
    """Settings of `python -m experiments speed`."""

    preset: str = options.field("mnist", "U-ViT architecture", choices=_PRESETS)
    batch_size: int = options.field(64, "global batch of every step")
    repeats: int = options.field(5, "timed steps after a warm-up (median)")
    sample_batch: int = options.field(16, "images per sampling call")
    seed: int = options.field(0, "seed of the parameters, data and sampling")
    out: str | None = options.field(None, _OUT)


@dataclasses.dataclass(frozen=True)
class InceptionBench(Counts):
    """Settings of `python -m experiments inception`."""

    batch_size: int = options.field(32, "299x299 images per timed call")
    repeats: int = options.field(3, "timed calls after a warm-up (median)")
    out: str | None = options.field(None, _OUT)


@dataclasses.dataclass(frozen=True)
class SamplingBench(Counts):
    """Settings of `python -m experiments sampling`."""

    teacher: str = options.field(TEACHER, "teacher checkpoint to sample")
    k: int = options.field(8, "sampling steps")
    num_samples: int = options.field(1000, "samples per batch size")
    batch_sizes: tuple[int, ...] = options.field((50, 200, 500), "global batch sizes, one row each")
    repeats: int = options.field(2, "timed runs after a warm-up (median)")
    out: str | None = options.field(None, _OUT)


def run_model(config: ModelBench) -> dict:
    """The `model` subcommand."""
    return bench_model(
        preset=config.preset,
        batch_size=config.batch_size,
        repeats=config.repeats,
        key=jax.random.key(config.seed),
    )


def run_speed(config: SpeedBench) -> dict:
    """The `speed` subcommand."""
    return bench_speed(
        preset=config.preset,
        batch_size=config.batch_size,
        repeats=config.repeats,
        sample_batch=config.sample_batch,
        key=jax.random.key(config.seed),
    )


def run_inception(config: InceptionBench) -> dict:
    """The `inception` subcommand."""
    return bench_inception(batch_size=config.batch_size, repeats=config.repeats)


def run_sampling(config: SamplingBench) -> dict:
    """The `sampling` subcommand."""
    return bench_sampling(
        teacher=pathlib.Path(config.teacher),
        num_steps=config.k,
        num_samples=config.num_samples,
        batch_sizes=config.batch_sizes,
        repeats=config.repeats,
    )
