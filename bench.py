"""Benchmarks for this project, one argparse subcommand each; every run prints a table and can write JSON.

    python bench.py model [--preset mnist] [--batch-size 128] [--repeats 10] [--out model.json]
        Forward and forward+backward (denoising loss gradient) time of a U-ViT preset per batch, images/s,
        FLOPs from XLA's compiled cost analysis, achieved GFLOP/s, and the float32 2048x2048 matmul rate
        measured around every timed call, with the ratio between the two.

    python bench.py speed [--preset mnist] [--batch-size 64] [--repeats 5] [--sample-batch 16] [--out speed.json]
        Steady-state step time and images/s of the teacher, alternating and instant data-parallel steps of
        mmd.py at the same global batch, their ratios to the teacher step, XLA's FLOP count and GFLOP/s of
        each step, and the sampling wall time of a 512-step teacher against an 8-step student.

Timings are medians over repeats after a warm-up call (compilation excluded). The 1-minute load average is
reported with every result: on a shared machine, rerun when it is low.
"""

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

import data
import mmd
import uvit
from mmd import alpha_sigma


def seconds(fn: Callable, *args) -> float:
    """Wall time of one call of `fn(*args)`, outputs blocked on."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def against_matmul(fn: Callable, *args, flops: float, repeats: int, n: int = 2048) -> dict[str, float]:
    """Median wall time of `fn(*args)` and its GFLOP/s as a fraction of the float32 n x n matmul rate.

    Each repeat times the model call between two matmul measurements (median of 3 products each) and takes
    the ratio against their mean, so load from other processes on a shared machine mostly cancels."""
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
    """FLOPs of one call of `jax.jit(fn)(*args)` from XLA's cost analysis of the compiled program."""
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0]
    if not analysis or "flops" not in analysis:
        raise RuntimeError("XLA's cost analysis reported no FLOP count on this backend; count FLOPs by hand.")
    return float(analysis["flops"])


def denoising_loss(
    model: uvit.Denoiser,
    x: Float[Array, "b h w c"],
    lam: Float[Array, " b"],
    label: Int[Array, " b"],
    eps: Float[Array, "b h w c"],
) -> Float[Array, ""]:
    """Mean squared x-prediction error on `z = alpha x + sigma eps`: the work of one teacher training step."""
    alpha, sigma = alpha_sigma(lam)
    z = alpha[:, None, None, None] * x + sigma[:, None, None, None] * eps
    return jnp.mean(jnp.square(model(z, lam, label) - x))


def run_header(*, preset: str, batch_size: int, model: eqx.Module, load_before: float) -> dict:
    """What every result records about the run: preset, batch, parameter count, machine, JAX, load."""
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
    """Time forward and forward+backward of a preset at `batch_size`; FLOPs, GFLOP/s and matmul ratio."""
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
        return jax.value_and_grad(lambda q: denoising_loss(eqx.combine(q, static), x, lam, label, eps))(p)

    fwd_args, fb_args = (params, z, lam, label), (params, x, lam, label, eps)
    fwd_flops, fb_flops = compiled_flops(forward, *fwd_args), compiled_flops(forward_backward, *fb_args)
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
    """Median wall time of `step(state, *args)` (not donating), after a warm-up call that compiles it."""
    jax.block_until_ready(step(state, *args))
    return statistics.median(seconds(step, state, *args) for _ in range(repeats))


def bench_speed(*, preset: str, batch_size: int, repeats: int, sample_batch: int, key: PRNGKeyArray) -> dict:
    """Teacher vs alternating vs instant step time at equal global batch, and 512- vs 8-step sampling time.

    The instant step's global batch holds its two minibatches (B/2 each); it is also timed at 2B, i.e.
    with minibatches as large as the teacher's batch. The alternating step is timed in both phases
    (auxiliary update, generator update) and reported as their mean, the cost per step of a run.
    """
    load_before = os.getloadavg()[0]
    config = uvit.PRESETS[preset]
    k_model, k_x, k_label, k_step, k_sample = jax.random.split(key, 5)
    model = uvit.make_model(config, key=k_model)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    mesh = mmd.data_mesh()
    shape = (config.resolution, config.resolution, config.channels)
    shift = mmd.resolution_shift(config.resolution)

    def batch(n: int) -> tuple[Array, Array]:
        x = jax.random.uniform(jax.random.fold_in(k_x, n), (n, *shape), minval=-1.0, maxval=1.0)
        return x, jax.random.randint(jax.random.fold_in(k_label, n), (n,), 0, config.num_classes)

    teacher_cfg = mmd.TeacherConfig(shift=shift, null_label=config.num_classes)
    distill_cfg = mmd.DistillConfig(num_steps=8, shift=shift, null_label=config.num_classes)
    frozen = mmd.Frozen(teacher=params, precond=jax.tree.map(jnp.ones_like, params))
    opt = mmd.distill_optimizer(peak_lr=1e-4, total_steps=1000, warmup_steps=10)

    def timed(variant: str, n: int, phases: tuple[int, ...] = (0,)) -> dict[str, float]:
        aux_opt = opt if variant == "alternating" else None
        step = mmd.make_train_step(
            variant, static=static, mesh=mesh, optimizer=opt, aux_optimizer=aux_opt,
            teacher_cfg=teacher_cfg, distill_cfg=distill_cfg, donate=False,
        )
        state = mmd.init_train_state(params=params, optimizer=opt, aux_optimizer=aux_opt)
        args = (frozen, *batch(n), k_step)
        times = [
            step_seconds(step, state._replace(step=jnp.asarray(p, jnp.int32)), *args, repeats=repeats) for p in phases
        ]
        programs = getattr(step, "phases", (step,))  # alternating: one program per phase
        flops = statistics.mean(compiled_flops(program, state, *args) for program in programs)
        s = sum(times) / len(times)
        return {"s": s, "images_per_s": n / s, "gflop": flops / 1e9, "gflop_per_s": flops / s / 1e9}

    rows = {
        "teacher": timed("teacher", batch_size),
        "alternating": timed("alternating", batch_size, phases=(0, 1)),
        "instant": timed("instant", batch_size),
        "instant_2B": timed("instant", 2 * batch_size),
    }
    result = run_header(preset=preset, batch_size=batch_size, model=model, load_before=load_before)
    for name, row in rows.items():
        result.update({f"{name}_{k}": v for k, v in row.items()})
        result[f"{name}_over_teacher"] = row["s"] / rows["teacher"]["s"]
    labels = jnp.arange(sample_batch, dtype=jnp.int32) % max(config.num_classes, 1)
    for k in (512, 8):
        sampler = jax.jit(
            lambda key, k=k: mmd.sample(model, key, shape=(sample_batch, *shape), labels=labels, num_steps=k, shift=shift)
        )
        jax.block_until_ready(sampler(k_sample))
        result[f"sample_{k}_steps_s"] = seconds(sampler, k_sample)
    result["sample_batch"] = sample_batch
    result["sampling_speedup_512_over_8"] = result["sample_512_steps_s"] / result["sample_8_steps_s"]
    result["load_average_1min_after"] = os.getloadavg()[0]
    return result


def write_json(path: str, result: dict) -> None:
    """Write `result` as JSON atomically (temporary file in the same folder, then rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"output folder {folder} does not exist; create it or choose another --out.")
    with data.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(result, indent=2))


def print_table(result: dict) -> None:
    """One `name: value` line per result entry."""
    for name, value in result.items():
        print(f"{name:40s} {value:.4g}" if isinstance(value, float) else f"{name:40s} {value}")


def run_model(args: argparse.Namespace) -> dict:
    """The `model` subcommand."""
    return bench_model(
        preset=args.preset, batch_size=args.batch_size, repeats=args.repeats, key=jax.random.key(args.seed)
    )


def run_speed(args: argparse.Namespace) -> dict:
    """The `speed` subcommand."""
    return bench_speed(
        preset=args.preset, batch_size=args.batch_size, repeats=args.repeats,
        sample_batch=args.sample_batch, key=jax.random.key(args.seed),
    )


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and run one benchmark."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    model = commands.add_parser("model", help="U-ViT forward / forward+backward speed and FLOP efficiency")
    model.add_argument("--preset", default="mnist", choices=sorted(uvit.PRESETS))
    model.add_argument("--batch-size", type=positive_int, default=128)
    model.add_argument("--repeats", type=positive_int, default=10)
    model.add_argument("--seed", type=int, default=0)
    model.set_defaults(run=run_model)
    speed = commands.add_parser("speed", help="teacher / alternating / instant step time and sampling speed-up")
    speed.add_argument("--preset", default="mnist", choices=sorted(uvit.PRESETS))
    speed.add_argument("--batch-size", type=positive_int, default=64, help="global batch of every step")
    speed.add_argument("--repeats", type=positive_int, default=5)
    speed.add_argument("--sample-batch", type=positive_int, default=16, help="images per sampling call")
    speed.add_argument("--seed", type=int, default=0)
    speed.set_defaults(run=run_speed)
    for command in (model, speed):
        command.add_argument("--out", help="also write the results as JSON to this path")
    args = parser.parse_args(argv)
    result = args.run(args)
    print_table(result)
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
