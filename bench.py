"""Benchmarks for this project, one argparse subcommand each; every run prints a table and can write
JSON.

    python bench.py model [--preset mnist] [--batch-size 128] [--repeats 10] [--out model.json]
        Forward and forward+backward (denoising loss gradient) time of a U-ViT preset per batch,
        images/s, FLOPs from XLA's compiled cost analysis, achieved GFLOP/s, and the float32
        2048x2048 matmul rate measured around every timed call, with the ratio between the two.

    python bench.py speed [--preset mnist] [--batch-size 64] [--repeats 5] [--sample-batch 16]
                          [--out speed.json]
        Steady-state step time and images/s of the teacher, alternating and instant data-parallel
        steps of mmd.py at the same global batch, their ratios to the teacher step, XLA's FLOP count
        and GFLOP/s of each step, and the sampling wall time of a 512-step teacher against an 8-step
        student.

    python bench.py inception [--batch-size 32] [--repeats 3] [--out inception.json]
        Inception-v3 (FID's features) on a batch of 299x299 images: images/s, XLA's FLOP count,
        achieved GFLOP/s and its ratio to the float32 matmul rate measured in the same run (last
        line: `inception: X images/s, R of the matmul rate`), and eval.py's whole feature path on
        32x32 grey digits.

    python bench.py sampling [--k 8] [--num-samples 1000] [--batch-sizes 50 200 500] [--out S.json]
        Images/s of train.generate (the shipped MNIST teacher at k steps, the cost of a k-step
        student) at several batch sizes, and one batch's GFLOP/s against the float32 matmul rate.

    python bench.py proxy [--k 2 4 8 16 64] [--num-samples 500] [--out runs/eval-proxy]
        FID, fd_mnist and label accuracy of the shipped MNIST teacher at k sampling steps (one row
        each, cached, resumable), the real-vs-real floor (training vs test digits) and the rank
        correlation of the proxies with FID; writes eval-proxy.md into --out.

    python bench.py quality [--budget small|full] [--out runs/quality-small] [--time-limit MIN]
                            [--rows NAME ...]
        The paper's claims on MNIST: distils students from the shipped teacher
        (checkpoints/mnist_teacher.eqx) and scores teacher and students with eval.py's FID protocol.
        Rows: the teacher at 8 (undistilled), 32, 128 and 512 steps with guidance 0 and 0.1;
        students of both variants with k in {1, 8} (small) or {1, 2, 4, 8} (full), weighting flat
        for k <= 2 and edm otherwise (full adds flat at k = 8). `small` scores 1,000 samples per
        row, `full` 10,000. Each finished row (a trained student, a result JSON) is cached in --out
        and a rerun skips it, so the table can be completed over several runs; `--rows` picks rows,
        so that several processes (e.g. sharing one GPU) can fill one --out. Writes quality.md
        (table and verdicts), quality.json (the rows, schema QUALITY_SCHEMA; for
        docs/results/quality.json), fid_vs_steps.png and instant_loss.png. On a 2-core CPU the cost
        is dominated by sampling the 512-step teacher (about 40 minutes per 1,000 images, twice that
        with guidance) and by Inception (8-20 images/s, `python bench.py inception`); on one H200
        the full budget's rows take about a minute each.

Timings are medians over repeats after a warm-up call (compilation excluded). The 1-minute load
average is reported with every result: on a shared machine, rerun when it is low.
"""

import argparse
import collections
import dataclasses
import functools
import json
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray
from matplotlib.figure import Figure

import data
import eval as evaluation
import inception
import mmd
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

    def timed(variant: str, n: int) -> dict[str, float]:
        aux_opt = opt if variant == "alternating" else None
        programs = mmd.train_steps(  # alternating: one program per phase
            variant,
            static=static,
            mesh=mesh,
            optimizer=opt,
            aux_optimizer=aux_opt,
            teacher_cfg=teacher_cfg,
            distill_cfg=distill_cfg,
            donate=False,
        )
        state = mmd.init_train_state(params=params, optimizer=opt, aux_optimizer=aux_opt)
        args = (frozen, *batch(n), k_step)
        times = [step_seconds(program, state, *args, repeats=repeats) for program in programs]
        flops = statistics.mean(compiled_flops(program, state, *args) for program in programs)
        s = sum(times) / len(times)
        return {"s": s, "images_per_s": n / s, "gflop": flops / 1e9, "gflop_per_s": flops / s / 1e9}

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
    labels = jnp.arange(sample_batch, dtype=jnp.int32) % max(config.num_classes, 1)
    for k in (512, 8):
        sampler = jax.jit(
            lambda key, k=k: mmd.sample(
                model, key, shape=(sample_batch, *shape), labels=labels, num_steps=k, shift=shift
            )
        )
        jax.block_until_ready(sampler(k_sample))
        result[f"sample_{k}_steps_s"] = seconds(sampler, k_sample)
    result["sample_batch"] = sample_batch
    result["sampling_speedup_512_over_8"] = (
        result["sample_512_steps_s"] / result["sample_8_steps_s"]
    )
    result["load_average_1min_after"] = os.getloadavg()[0]
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


# ----------------------------------------------------------------------------------------------
# The MNIST proxy metrics against FID, and sampling throughput


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation of two equally long sequences without ties."""
    ra, rb = (np.argsort(np.argsort(np.asarray(v))).astype(np.float64) for v in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float(ra @ rb / np.sqrt((ra @ ra) * (rb @ rb)))


def _scores(images: np.ndarray, labels: np.ndarray | None, real: dict, *, batch_size: int) -> dict:
    """FID (Inception), fd_mnist against `real`'s statistics; label accuracy against `labels`."""
    inception_features = evaluation.inception_features(
        images, batch_size=batch_size, params=real["params"]
    )
    return {
        "fid": evaluation.frechet_distance(
            *evaluation.feature_stats(inception_features), *real["inception"]
        ),
        "fd_mnist": evaluation.frechet_distance(
            *evaluation.feature_stats(evaluation.mnist_features(images)), *real["mnist"]
        ),
        "label_accuracy": None if labels is None else evaluation.label_accuracy(images, labels),
    }


def bench_proxy(
    *,
    teacher: pathlib.Path,
    steps: Sequence[int],
    num_samples: int,
    batch_size: int,
    seed: int,
    out: pathlib.Path,
) -> str:
    """FID, fd_mnist and label accuracy of the teacher at each number of sampling `steps` (guidance
    0), `num_samples` each against as many MNIST test digits (a fixed random subset); the
    real-vs-real floor (as many training digits) and Spearman's rank correlation of the proxies with
    FID. Rows are cached as JSON in `out` (a rerun skips them); writes `out/eval-proxy.md`."""
    model, run, _ = evaluation.load_model(teacher)
    test, train_set = data.load("mnist", split="test"), data.load("mnist", split="train")
    pick = np.sort(np.random.default_rng(seed).permutation(len(test))[:num_samples])
    real_images = test.images[pick]
    params = inception.inception_params(inception.load_inception_weights())
    real = {
        "params": params,
        "inception": evaluation.feature_stats(
            evaluation.inception_features(real_images, batch_size=batch_size, params=params)
        ),
        "mnist": evaluation.feature_stats(evaluation.mnist_features(real_images)),
    }
    rows = {}
    floor_path = out / f"floor_n{num_samples}.json"
    if not floor_path.exists():
        train_pick = np.sort(
            np.random.default_rng(seed + 1).permutation(len(train_set))[:num_samples]
        )
        floor = _scores(train_set.images[train_pick], None, real, batch_size=batch_size)
        floor["label_accuracy"] = evaluation.label_accuracy(real_images, test.labels[pick])
        write_json(str(floor_path), floor, make_folder=True)
    for k in steps:
        path = out / f"teacher_k{k}_n{num_samples}.json"
        if not path.exists():
            start = time.perf_counter()
            images = train.generate(
                model,
                jax.random.key(seed),
                num_samples=num_samples,
                batch_size=batch_size,
                num_classes=run.model.num_classes,
                num_steps=k,
                shift=mmd.resolution_shift(run.model.resolution),
                guidance=0.0,
                clip=False,
                gamma=0.0,
                null_label=run.model.num_classes,
                image_shape=(run.model.resolution, run.model.resolution, run.model.channels),
            )
            sampling = time.perf_counter() - start
            labels = np.arange(num_samples) % run.model.num_classes
            start = time.perf_counter()
            row = _scores(images, labels, real, batch_size=batch_size)
            row.update(
                sampling_s=sampling,
                scoring_s=time.perf_counter() - start,
                load_1min=os.getloadavg()[0],
            )
            write_json(str(path), row, make_folder=True)
        rows[k] = json.loads(path.read_text())
    return proxy_report(rows, json.loads(floor_path.read_text()), num_samples=num_samples, out=out)


def proxy_report(rows: dict[int, dict], floor: dict, *, num_samples: int, out: pathlib.Path) -> str:
    """The Markdown table of `bench_proxy`, with rank correlations; written to
    `out/eval-proxy.md`."""
    lines = [
        "| sampler | FID | fd_mnist | label accuracy | sampling (s) | scoring (s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for k, r in rows.items():
        lines.append(
            f"| teacher, {k} steps | {r['fid']:.2f} | {r['fd_mnist']:.3f} | "
            f"{r['label_accuracy']:.4f} | "
            f"{r['sampling_s']:.0f} | {r['scoring_s']:.0f} |"
        )
    lines.append(
        f"| real: train vs test digits | {floor['fid']:.2f} | {floor['fd_mnist']:.3f} | "
        f"{floor['label_accuracy']:.4f} (test digits) | — | — |"
    )
    fid = [r["fid"] for r in rows.values()]
    lines += [
        "",
        f"{num_samples} samples per row against {num_samples} MNIST test digits. Spearman rank "
        f"correlation with FID over {len(rows)} samplers: fd_mnist "
        f"{spearman(fid, [r['fd_mnist'] for r in rows.values()]):.2f}, label accuracy "
        f"{spearman(fid, [-r['label_accuracy'] for r in rows.values()]):.2f} (of its negative).",
    ]
    report = "\n".join(lines)
    with data.atomic_path(out / "eval-proxy.md") as tmp:
        tmp.write_text(report + "\n")
    return report


def bench_sampling(
    *,
    teacher: pathlib.Path,
    num_steps: int,
    num_samples: int,
    batch_sizes: Sequence[int],
    repeats: int,
) -> dict:
    """Images/s of train.generate (`num_samples` samples, `num_steps` steps, guidance 0) at each
    batch size, and one batch's GFLOP/s against the float32 matmul rate (`against_matmul`)."""
    load_before = os.getloadavg()[0]
    model, run, _ = evaluation.load_model(teacher)
    shape = (run.model.resolution, run.model.resolution, run.model.channels)
    shift = mmd.resolution_shift(run.model.resolution)
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
            train.generate,
            model,
            jax.random.key(0),
            num_samples=num_samples,
            batch_size=batch,
            num_classes=run.model.num_classes,
            num_steps=num_steps,
            shift=shift,
            guidance=0.0,
            clip=False,
            gamma=0.0,
            null_label=run.model.num_classes,
            image_shape=shape,
        )
        generate(num_samples=batch)  # compiles
        start = time.perf_counter()
        generate()
        result.update(
            {
                f"batch{batch}_images_per_s": num_samples / (time.perf_counter() - start),
                f"batch{batch}_gflop_per_s": timed["gflops_per_s"],
                f"batch{batch}_fraction_of_matmul": timed["fraction_of_matmul"],
            }
        )
    result["load_average_1min_after"] = os.getloadavg()[0]
    return result


# ----------------------------------------------------------------------------------------------
# Quality: the paper's claims on MNIST (FID of teacher and students)

TEACHER_STEPS = (8, 32, 128, 512)
TEACHER_GUIDANCE = (0.0, 0.1)
BUDGETS = {
    "small": {"num_samples": 1000, "ks": (1, 8)},
    "full": {"num_samples": 10_000, "ks": (1, 2, 4, 8)},
}


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the quality table: the teacher at `steps` with `guidance`, or a student of
    `variant` distilled for k = `steps` with `weighting`."""

    variant: str
    steps: int
    guidance: float = 0.0
    weighting: str | None = None

    @property
    def name(self) -> str:
        if self.variant == "teacher":
            return f"teacher-{self.steps}-w{self.guidance:g}"
        return f"{self.variant}-k{self.steps}-{self.weighting}"


def quality_rows(budget: str) -> list[Row]:
    """The rows of a budget, headline first (so a run cut short by --time-limit has the main
    comparison): the 8-step students, the 512-step teacher and the undistilled 8-step teacher (the
    students' starting point), then 1-step students, the other teachers, the rest.

    Weighting as in the paper: flat for k <= 2, EDM otherwise; the full budget adds flat at k =
    8."""
    ks = BUDGETS[budget]["ks"]

    def students(k: int, weighting: str | None = None) -> list[Row]:
        chosen = weighting or ("flat" if k <= 2 else "edm")
        return [Row(v, k, weighting=chosen) for v in ("instant", "alternating")]

    rows = [
        *students(8),
        *(Row("teacher", s, w) for s in (512, 8) for w in TEACHER_GUIDANCE),
        *students(1),
    ]
    rows += [
        Row("teacher", s, w)
        for s in TEACHER_STEPS[::-1]
        if s not in (512, 8)
        for w in TEACHER_GUIDANCE
    ]
    if budget == "full":
        rows += students(8, "flat")
    rows += [r for k in ks if k not in (1, 8) for r in students(k)]
    return rows


def train_student(
    row: Row, *, teacher: pathlib.Path, out: pathlib.Path, steps: int, batch_size: int, seed: int
) -> tuple[pathlib.Path, float]:
    """The final checkpoint of `row`'s student, trained (or resumed) in `out/students/<name>` unless
    finished, and its training wall time from metrics.jsonl (first step's compilation included)."""
    workdir = out / "students" / row.name
    final = workdir / "checkpoints" / f"ckpt_{steps:08d}.eqx"
    if not final.exists():
        config = dataclasses.replace(
            train.PRESETS["mnist"],
            variant=row.variant,
            k=row.steps,
            weighting=row.weighting,
            teacher=str(teacher),
            workdir=str(workdir),
            steps=steps,
            batch_size=batch_size,
            seed=seed,
            resume=True,
            sample_every=max(steps // 5, 1),
            checkpoint_every=max(steps // 10, 1),
        )
        final = train.train(config)
    last = (workdir / "metrics.jsonl").read_text().splitlines()[-1]
    return final, float(json.loads(last)["time"])


def evaluate_row(
    row: Row,
    checkpoint: pathlib.Path,
    *,
    out: pathlib.Path,
    num_samples: int,
    batch_size: int,
    seed: int,
) -> dict:
    """eval.py's record for `row` (FID, precision, recall, fd_mnist, label accuracy against MNIST's
    test split), from `checkpoint`."""
    teacher = row.variant == "teacher"
    return evaluation.evaluate(
        evaluation.EvalConfig(
            checkpoint=str(checkpoint),
            num_samples=num_samples,
            batch_size=batch_size,
            seed=seed,
            out=str(out / "eval" / row.name),
            num_steps=row.steps if teacher else None,
            guidance=row.guidance if teacher else 0.0,
        )
    )


def row_path(out: pathlib.Path, row: Row, num_samples: int) -> pathlib.Path:
    """Where a finished row is cached: its name and sample count (rows of other counts never
    mix)."""
    return out / "rows" / f"{row.name}_n{num_samples}.json"


def load_rows(out: pathlib.Path, rows: Sequence[Row], num_samples: int) -> dict[Row, dict]:
    """The cached results of `rows` that exist."""
    return {
        row: json.loads(row_path(out, row, num_samples).read_text())
        for row in rows
        if row_path(out, row, num_samples).exists()
    }


def quality_table(results: dict[Row, dict]) -> str:
    """Markdown table of finished rows: teacher rows by steps and guidance, then students by k."""
    header = [
        "sampler",
        "steps",
        "weighting",
        "guidance",
        "FID",
        "precision",
        "recall",
        "samples",
        "distillation",
        "train (s)",
        "sampling (s)",
    ]
    order = sorted(
        results,
        key=lambda r: (r.variant != "teacher", r.variant, r.steps, r.guidance, r.weighting or ""),
    )
    lines = [header, ["---"] * len(header)]
    for row in order:
        r = results[row]
        distill = (
            "—"
            if row.variant == "teacher"
            else f"{r['distill_steps']} steps @ {r['distill_batch_size']}"
        )
        train_s = "—" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
        lines.append(
            [
                "teacher" if row.variant == "teacher" else f"{row.variant} student",
                str(row.steps),
                row.weighting or "—",
                f"{row.guidance:g}",
                f"{r['fid']:.2f}",
                f"{r['precision']:.3f}",
                f"{r['recall']:.3f}",
                str(r["num_samples"]),
                distill,
                train_s,
                f"{r['timings_s']['sampling']:.1f}",
            ]
        )
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


QUALITY_SCHEMA = {
    "sampler": str,
    "k": int,
    "weighting": (str, type(None)),
    "guidance": float,
    "gamma": float,
    "lr": (float, type(None)),
    "distill_steps": (int, type(None)),
    "batch_size": (int, type(None)),
    "fid": float,
    "precision": float,
    "recall": float,
    "fd_mnist": (float, type(None)),
    "label_accuracy": (float, type(None)),
    "num_samples": int,
    "device": str,
    "inception_protocol": str,
}
"""The fields of a docs/results/quality.json row and their types (None: not measured or not
applicable)."""


def quality_json_rows(results: dict[Row, dict]) -> list[dict]:
    """One QUALITY_SCHEMA row per finished result, in `quality_table`'s order."""
    order = sorted(
        results,
        key=lambda r: (r.variant != "teacher", r.variant, r.steps, r.guidance, r.weighting or ""),
    )
    rows = []
    for row in order:
        r = results[row]
        student = row.variant != "teacher"
        rows.append(
            validate_quality_row(
                {
                    "sampler": row.variant,
                    "k": row.steps,
                    "weighting": row.weighting,
                    "guidance": float(row.guidance),
                    "gamma": float(r.get("gamma", 0.0)),
                    "lr": float(r["config"]["lr"]) if student else None,
                    "distill_steps": r["distill_steps"] if student else None,
                    "batch_size": r["distill_batch_size"] if student else None,
                    "fid": r["fid"],
                    "precision": r["precision"],
                    "recall": r["recall"],
                    "fd_mnist": r.get("fd_mnist"),
                    "label_accuracy": r.get("label_accuracy"),
                    "num_samples": r["num_samples"],
                    "device": r["machine"]["devices"],
                    "inception_protocol": r["feature_protocol"],
                }
            )
        )
    return rows


def validate_quality_row(row: dict) -> dict:
    """`row` itself if it has exactly QUALITY_SCHEMA's fields with their types and a known
    sampler."""
    if set(row) != set(QUALITY_SCHEMA):
        raise ValueError(
            "quality row fields differ from the schema: missing "
            f"{sorted(set(QUALITY_SCHEMA) - set(row))}"
            f", unknown {sorted(set(row) - set(QUALITY_SCHEMA))}"
        )
    wrong = [
        name
        for name, kind in QUALITY_SCHEMA.items()
        if not isinstance(row[name], kind) or isinstance(row[name], bool)
    ]
    if wrong or row["sampler"] not in ("teacher", "alternating", "instant") or row["k"] < 1:
        raise ValueError(
            f"quality row has wrong types or values in {wrong or ['sampler/k']}: {row}"
        )
    return row


def verdicts(results: dict[Row, dict]) -> list[str]:
    """The paper's claims checked on the finished rows, one sentence each (missing rows are
    named)."""
    lines = []
    for row, r in results.items():
        same = Row("teacher", row.steps, 0.0)
        if row.variant != "teacher" and same in results:
            lines.append(
                f"{row.variant}, k = {row.steps} ({row.weighting}): FID {r['fid']:.2f} against the "
                f"undistilled teacher's {results[same]['fid']:.2f} with the same {row.steps} steps."
            )
    teacher = {
        row: r["fid"] for row, r in results.items() if row.variant == "teacher" and row.steps == 512
    }
    if not teacher:
        return [*lines, "The 512-step teacher rows are not finished: no comparison with them yet."]
    best_row = min(teacher, key=teacher.get)
    best = (
        f"the 512-step teacher's best FID {teacher[best_row]:.2f} (guidance {best_row.guidance:g})"
    )
    for variant in ("alternating", "instant"):
        row = Row(variant, 8, weighting="edm")
        if row not in results:
            lines.append(f"{variant}, k = 8: not finished.")
            continue
        fid = results[row]["fid"]
        outcome = (
            "beats" if fid <= teacher[best_row] else f"is {fid - teacher[best_row]:.2f} worse than"
        )
        lines.append(f"{variant}, k = 8 (edm): FID {fid:.2f} {outcome} {best}.")
    for k in sorted({row.steps for row in results if row.variant != "teacher"}):
        pair = {
            row.variant: results[row]["fid"]
            for row in results
            if row.variant != "teacher"
            and row.steps == k
            and row.weighting == ("flat" if k <= 2 else "edm")
        }
        if len(pair) == 2:
            better = min(pair, key=pair.get)
            lines.append(
                f"k = {k}: alternating {pair['alternating']:.2f}, instant {pair['instant']:.2f} "
                f"({better} better)."
            )
    return lines


def plot_quality(results: dict[Row, dict], path: pathlib.Path) -> None:
    """FID against sampling steps (log scale): a line per teacher guidance, a marker per student."""
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    for guidance in TEACHER_GUIDANCE:
        points = sorted(
            (row.steps, r["fid"])
            for row, r in results.items()
            if row.variant == "teacher" and row.guidance == guidance
        )
        if points:
            ax.plot(
                *zip(*points),
                "o-",
                color="0.3" if guidance == 0 else "0.6",
                label=f"teacher, guidance {guidance:g}",
            )
    styles = {
        ("alternating", "edm"): "s",
        ("alternating", "flat"): "D",
        ("instant", "edm"): "^",
        ("instant", "flat"): "v",
    }
    for (variant, weighting), marker in styles.items():
        points = sorted(
            (row.steps, r["fid"])
            for row, r in results.items()
            if row.variant == variant and row.weighting == weighting
        )
        if points:
            ax.plot(
                *zip(*points),
                marker,
                ms=8,
                ls=":" if len(points) > 1 else "",
                label=f"{variant} student, {weighting}",
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("FID")
    counts = sorted({r["num_samples"] for r in results.values()})
    ax.set_title(f"MNIST, FID on {', '.join(map(str, counts))} samples vs the 10k test digits")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    train.save_figure(fig, path, dpi=110)


def write_report(out: pathlib.Path, rows: Sequence[Row], num_samples: int, header: dict) -> str:
    """quality.md (verdicts and table of the finished rows), fid_vs_steps.png and instant_loss.png
    in `out`."""
    results = load_rows(out, rows, num_samples)
    missing = [row.name for row in rows if row not in results]
    lines = [
        f"# MNIST quality ({header['budget']} budget: FID on {num_samples} samples per row)",
        "",
    ]
    lines += [f"- {line}" for line in verdicts(results)]
    lines += ["", quality_table(results), ""]
    lines += [f"Not finished yet: {', '.join(missing)}." if missing else "All rows finished.", ""]
    machines = collections.Counter(
        f"{r['machine']['devices']}, {r['machine']['cpu_count']} CPU cores, jax "
        f"{r['machine']['jax_version']}"
        for r in results.values()
    )
    protocols = collections.Counter(r["feature_protocol"] for r in results.values())
    lines += [
        f"Teacher {header['teacher']} (step {header['teacher_step']}). Rows computed on: "
        + "; ".join(f"{machine} ({n} rows)" for machine, n in machines.items())
        + ". Inception protocol: "
        + "; ".join(f"`{protocol}` ({n} rows)" for protocol, n in protocols.items())
        + ".",
        "",
    ]
    report = "\n".join(lines)
    with data.atomic_path(out / "quality.md") as tmp:
        tmp.write_text(report)
    with data.atomic_path(out / "quality.json") as tmp:
        tmp.write_text(json.dumps(quality_json_rows(results), indent=1) + "\n")
    if results:
        plot_quality(results, out / "fid_vs_steps.png")
    metrics = out / "students" / Row("instant", 8, weighting="edm").name / "metrics.jsonl"
    if metrics.exists():
        train.plot_losses(metrics, out / "instant_loss.png", variant="instant")
    return report


def bench_quality(
    *,
    budget: str,
    out: pathlib.Path,
    teacher: str,
    distill_steps: int,
    distill_batch_size: int,
    eval_batch_size: int,
    time_limit: float | None,
    seed: int,
    num_samples: int | None = None,
    only: Sequence[str] = (),
) -> str:
    """Run (or resume) every unfinished row of `budget` in headline order (or the rows named in
    `only`, in that order), then write the report of all the budget's rows."""
    start = time.perf_counter()
    num_samples = num_samples or BUDGETS[budget]["num_samples"]
    rows = quality_rows(budget)
    by_name = {row.name: row for row in rows}
    unknown = [name for name in only if name not in by_name]
    if unknown:
        raise ValueError(
            f"unknown --rows {', '.join(unknown)}; the {budget} budget's rows are "
            f"{', '.join(by_name)}"
        )
    base = dataclasses.replace(train.PRESETS["mnist"], teacher=teacher, workdir=str(out))
    teacher_path = train.ensure_teacher(train.resolve(base))
    header = {
        "budget": budget,
        "devices": f"{jax.devices()[0].device_kind} x{jax.device_count()}",
        "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
        "teacher": os.path.relpath(teacher_path),
        "teacher_step": train.read_meta(teacher_path)["step"],
    }
    for row in [by_name[name] for name in only] or rows:
        path = row_path(out, row, num_samples)
        if path.exists():
            continue
        if time_limit is not None and time.perf_counter() - start > 60 * time_limit:
            print(
                f"--time-limit of {time_limit:g} minutes reached: rerun the same command to "
                "continue."
            )
            break
        print(f"== {row.name} ({num_samples} samples)", flush=True)
        checkpoint, train_s = teacher_path, None
        if row.variant != "teacher":
            checkpoint, train_s = train_student(
                row,
                teacher=teacher_path,
                out=out,
                steps=distill_steps,
                batch_size=distill_batch_size,
                seed=seed,
            )
        record = evaluate_row(
            row, checkpoint, out=out, num_samples=num_samples, batch_size=eval_batch_size, seed=seed
        )
        record.update(
            row=dataclasses.asdict(row),
            train_seconds=train_s,
            machine=header,
            distill_steps=None if row.variant == "teacher" else distill_steps,
            distill_batch_size=None if row.variant == "teacher" else distill_batch_size,
        )
        write_json(str(path), record, make_folder=True)
        write_report(out, rows, num_samples, header)
    return write_report(out, rows, num_samples, header)


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


# ----------------------------------------------------------------------------------------------
# Command line: one frozen dataclass per subcommand; train._add_options makes its options.

_field = train._field  # one field helper for every CLI dataclass
_PRESETS = tuple(sorted(uvit.PRESETS))
_TEACHER = "checkpoints/mnist_teacher.eqx"
_OUT = "also write the results as JSON to this path"


@dataclasses.dataclass(frozen=True)
class _Counts:
    """Base of the subcommand settings: every integer but the seed is a count, at least 1."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            values = value if isinstance(value, tuple) else (value,)
            if f.name != "seed" and any(type(v) is int and v < 1 for v in values):
                flag = f.metadata.get("flag") or train._flag(f.name)
                raise ValueError(f"{flag} must be >= 1, got {value}")


@dataclasses.dataclass(frozen=True)
class ModelBench(_Counts):
    """Settings of `python bench.py model`."""

    preset: str = _field("mnist", "U-ViT architecture", choices=_PRESETS)
    batch_size: int = _field(128, "images per timed call")
    repeats: int = _field(10, "timed calls after a warm-up (median)")
    seed: int = _field(0, "seed of the parameters and inputs")
    out: str | None = _field(None, _OUT)


@dataclasses.dataclass(frozen=True)
class SpeedBench(_Counts):
    """Settings of `python bench.py speed`."""

    preset: str = _field("mnist", "U-ViT architecture", choices=_PRESETS)
    batch_size: int = _field(64, "global batch of every step")
    repeats: int = _field(5, "timed steps after a warm-up (median)")
    sample_batch: int = _field(16, "images per sampling call")
    seed: int = _field(0, "seed of the parameters, data and sampling")
    out: str | None = _field(None, _OUT)


@dataclasses.dataclass(frozen=True)
class InceptionBench(_Counts):
    """Settings of `python bench.py inception`."""

    batch_size: int = _field(32, "299x299 images per timed call")
    repeats: int = _field(3, "timed calls after a warm-up (median)")
    out: str | None = _field(None, _OUT)


@dataclasses.dataclass(frozen=True)
class SamplingBench(_Counts):
    """Settings of `python bench.py sampling`."""

    teacher: str = _field(_TEACHER, "teacher checkpoint to sample")
    num_steps: int = _field(8, "sampling steps", flag="--k")
    num_samples: int = _field(1000, "samples per batch size")
    batch_sizes: tuple[int, ...] = _field((50, 200, 500), "global batch sizes, one row each")
    repeats: int = _field(2, "timed runs after a warm-up (median)")
    out: str | None = _field(None, _OUT)


@dataclasses.dataclass(frozen=True)
class ProxyBench(_Counts):
    """Settings of `python bench.py proxy`."""

    teacher: str = _field(_TEACHER, "teacher checkpoint to sample")
    num_steps: tuple[int, ...] = _field(
        (2, 4, 8, 16, 64), "the teacher's sampling steps, one row each", flag="--k"
    )
    num_samples: int = _field(500, "samples per row")
    batch_size: int = _field(100, "global batch of sampling and Inception")
    seed: int = _field(0, "seed of sampling and the sample labels")
    out: str = _field("runs/eval-proxy", "rows cache and report directory")


@dataclasses.dataclass(frozen=True)
class QualityBench(_Counts):
    """Settings of `python bench.py quality`."""

    budget: str = _field(
        "small",
        "small: 1,000 samples per FID, k in {1, 8}; full: 10,000 samples, k in {1, 2, 4, 8}",
        choices=tuple(sorted(BUDGETS)),
    )
    out: str | None = _field(None, "results and cache directory (none: runs/quality-<budget>)")
    teacher: str = _field("auto", f"teacher checkpoint (auto: {_TEACHER}, trained first if absent)")
    distill_steps: int = _field(
        train.PRESETS["mnist"].distill_steps, "training steps of each student"
    )
    distill_batch_size: int = _field(
        train.PRESETS["mnist"].distill_batch_size,
        "global batch of each student's training (instant: both minibatches)",
    )
    eval_batch_size: int = _field(
        200, "global batch of sampling and Inception (results do not depend on it)"
    )
    time_limit: float | None = _field(
        None, "start no new row after this many minutes (a rerun continues)"
    )
    num_samples: int | None = _field(
        None, "samples per FID (none: the budget's); rows are cached per sample count"
    )
    rows: tuple[str, ...] = _field(
        (),
        "run only these rows, in this order; separate processes may run disjoint rows into the "
        f"same --out. Names (small: the first {len(quality_rows('small'))}): "
        + " ".join(row.name for row in quality_rows("full")),
    )
    seed: int = _field(0, "seed of training, sampling and the sample labels")


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


def run_proxy(config: ProxyBench) -> str:
    """The `proxy` subcommand: the report's Markdown."""
    return bench_proxy(
        teacher=pathlib.Path(config.teacher),
        steps=config.num_steps,
        num_samples=config.num_samples,
        batch_size=config.batch_size,
        seed=config.seed,
        out=pathlib.Path(config.out),
    )


def run_sampling(config: SamplingBench) -> dict:
    """The `sampling` subcommand."""
    return bench_sampling(
        teacher=pathlib.Path(config.teacher),
        num_steps=config.num_steps,
        num_samples=config.num_samples,
        batch_sizes=config.batch_sizes,
        repeats=config.repeats,
    )


def run_quality(config: QualityBench) -> str:
    """The `quality` subcommand: the report's Markdown."""
    return bench_quality(
        budget=config.budget,
        out=pathlib.Path(config.out or f"runs/quality-{config.budget}"),
        teacher=config.teacher,
        distill_steps=config.distill_steps,
        distill_batch_size=config.distill_batch_size,
        eval_batch_size=config.eval_batch_size,
        time_limit=config.time_limit,
        seed=config.seed,
        num_samples=config.num_samples,
        only=config.rows,
    )


# name: (settings, runner, one-line help)
COMMANDS: dict[str, tuple[type, Callable[[Any], dict | str], str]] = {
    "model": (ModelBench, run_model, "U-ViT forward / forward+backward speed and FLOP efficiency"),
    "speed": (
        SpeedBench,
        run_speed,
        "teacher / alternating / instant step time and sampling speed-up",
    ),
    "inception": (InceptionBench, run_inception, "Inception-v3 images/s and FLOP efficiency"),
    "sampling": (
        SamplingBench,
        run_sampling,
        "images/s of the sampler (train.generate) by batch size",
    ),
    "proxy": (ProxyBench, run_proxy, "fd_mnist and label accuracy against FID (teacher)"),
    "quality": (
        QualityBench,
        run_quality,
        "FID of the MNIST teacher and distilled students (paper's claims)",
    ),
}


def parse_args(argv: Sequence[str] | None = None) -> tuple[str, Any]:
    """(subcommand, its settings dataclass: defaults plus the options given) of `argv`; a count
    below 1 raises ValueError."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (cls, _, help_text) in COMMANDS.items():
        train._add_options(commands.add_parser(name, help=help_text), cls, cls())
    overrides = vars(parser.parse_args(argv))
    name = overrides.pop("command")
    return name, train._apply(COMMANDS[name][0](), overrides)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and run one benchmark."""
    name, config = parse_args(argv)
    result = COMMANDS[name][1](config)
    if isinstance(result, str):
        print(result)
        return
    print_table(result)
    if config.out:
        write_json(config.out, result)
    if name == "inception":
        print(
            f"inception: {result['images_per_s']:.2f} images/s, "
            f"{result['fraction_of_matmul']:.2f} of the matmul rate"
        )


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError) as error:
        sys.exit(f"bench.py: error: {error}")
