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

    python bench.py quality [--budget small|full] [--out runs/quality-small] [--jobs N]
                            [--no-fid] [--lr LR] [--time-limit MIN] [--rows NAME ...]
                            [--checkpoint last|best] [--select-samples 2000]
        The paper's claims on MNIST (issue 12's targets): distils students from the shipped teacher
        (checkpoints/mnist_teacher.eqx) and scores teacher and students with eval.py's protocol
        (FID, precision, recall, fd_mnist, label accuracy; `--no-fid`: the MNIST metrics only,
        minutes instead of hours on a CPU). Rows (full budget, 38): the teacher at 8, 32, 128 and
        512 steps, and at 128 and 512 steps over guidance {0, 0.1, 0.3} x sampling noise gamma {0,
        0.1, 0.3} (the "teacher's best" the claims compare with); students of both variants at k = 8
        and 4 (flat and edm weighting) and k = 2 and 1 (flat and dmd; at k = 1 also dmd with
        `--time-sampling grid`), 1,000 steps at batch 128 each. `small`: 1,000 samples, k = 8 (edm)
        and 1 (flat), the teacher at 8, 32, 128, 512 steps (and 512 with guidance 0.1), the preset's
        distillation length. Every finished row (a trained student, a result JSON) is cached in
        --out under its name and settings, so a rerun skips it and several runs complete one table;
        `--jobs N` shares the rows among N worker processes (claim files; the reference statistics
        are computed once: eval.reference_statistics' lock file makes the other workers wait for
        them). Writes quality.md (verdicts: holds / fails / missing, and the table), quality.json
        (the rows, schema QUALITY_SCHEMA; for docs/results/quality.json), fid_vs_steps.png (or
        fd_mnist_vs_steps.png), samples.png (the best teacher's and the best student's grid at each
        k, same labels) and instant_loss.png. `--checkpoint best` adds a row per student at its
        best kept checkpoint (the paper reports its best): every checkpoint scored on
        --select-samples samples of sampling seed --seed + 1, the lowest scored again like every
        row, so the reported number is not a minimum over noisy values; verdicts are given at the
        last and at the best checkpoints. `--preset tiny --num-samples 24 --reference-count 200
        --distill-steps 10` is a few-minute dry run of the whole pipeline on a CPU. On a 2-core CPU
        a 1,000-sample row of the 512-step teacher takes about 40 minutes (sampling) and Inception
        8-20 images/s; on one H200 shared by 6-8 workers a full-budget row took 1-6.5 minutes
        (docs/results/study-gpu.md).

    python bench.py length --workdirs RUN [RUN ...] [--steps 200 600 1000] [--num-samples 2000]
                           [--fid] [--out runs/length]
        fd_mnist (with --fid also Inception FID) of every kept checkpoint of train.py distillation
        runs at one fixed sampling seed, against the distillation step (cached per checkpoint);
        writes length.md (each run's best and last, then one row per checkpoint) and
        fd_mnist_vs_distill_steps.png (or fid_vs_distill_steps.png) into --out. For 2-D runs
        (--preset ring2d) the score is w1_radius, the Wasserstein-1 distance between the norms of
        the samples and of as many test points (the rings' sharpness; energy distance recorded
        too), with the runs' teacher at the student's k and at the preset's teacher_k steps as
        reference lines (w1_radius_vs_distill_steps.png); use --num-samples 20000. train.py
        keeps only the last 3 checkpoints unless given --keep-checkpoints N: pass it for a curve.

Timings are medians over repeats after a warm-up call (compilation excluded). The 1-minute load
average is reported with every result: on a shared machine, rerun when it is low.
"""

import argparse
import collections
import dataclasses
import functools
import itertools
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree, UInt8
from matplotlib.figure import Figure
from PIL import Image

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
    shift = mmd.resolution_shift(config.resolution)
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


def _plain_samples(
    model: Callable,
    model_config: uvit.UViTConfig,
    *,
    seed: int,
    num_samples: int,
    batch_size: int,
    num_steps: int,
) -> UInt8[np.ndarray, "n h w c"]:
    """`train.generate`'s `num_samples` images (uint8, NHWC at the model's resolution and channels)
    of a U-ViT sampled with `num_steps` steps, without guidance, clipping or extra sampling noise
    (gamma 0); sample i has label `i % num_classes` and key `fold_in(key(seed), i)`."""
    return train.generate(
        model,
        jax.random.key(seed),
        num_samples=num_samples,
        batch_size=batch_size,
        num_classes=model_config.num_classes,
        num_steps=num_steps,
        shift=mmd.resolution_shift(model_config.resolution),
        guidance=0.0,
        clip=False,
        gamma=0.0,
        null_label=model_config.num_classes,
        image_shape=(model_config.resolution, model_config.resolution, model_config.channels),
    )


def _reference_stats(images: UInt8[np.ndarray, "n h w c"], *, batch_size: int) -> dict:
    """`_scores`' `real` argument for reference `images` (uint8 NHWC): `params` (Inception's),
    `inception` and `mnist` (each a `(mean, covariance)` of `evaluation.feature_stats`)."""
    params = inception.inception_params(inception.load_inception_weights())
    features = evaluation.inception_features(images, batch_size=batch_size, params=params)
    return {
        "params": params,
        "inception": evaluation.feature_stats(features),
        "mnist": evaluation.feature_stats(evaluation.mnist_features(images)),
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
    real = _reference_stats(real_images, batch_size=batch_size)
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
            images = _plain_samples(
                model,
                run.model,
                seed=seed,
                num_samples=num_samples,
                batch_size=batch_size,
                num_steps=k,
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
    """The Markdown table of `bench_proxy`, with Spearman rank correlations of the proxies with FID
    (with fewer than two rows, a sentence saying so instead); written to `out/eval-proxy.md`."""
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
    correlation = (
        f"Spearman rank correlation with FID over {len(rows)} samplers: fd_mnist "
        f"{spearman(fid, [r['fd_mnist'] for r in rows.values()]):.2f}, label accuracy "
        f"{spearman(fid, [-r['label_accuracy'] for r in rows.values()]):.2f} (of its negative)."
        if len(rows) > 1
        else "A rank correlation with FID needs two or more rows (--k)."
    )
    lines += [
        "",
        f"{num_samples} samples per row against {num_samples} MNIST test digits. {correlation}",
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
            _plain_samples, model, run.model, seed=0, batch_size=batch, num_steps=num_steps
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


# ----------------------------------------------------------------------------------------------
# Quality: the paper's claims on MNIST (FID of teacher and students)

TEACHER_CURVE = (8, 32, 128, 512)
"""Teacher sampling steps of the FID-against-steps curve (guidance 0, gamma 0); 8 steps is the
students' undistilled starting point."""
TEACHER_TUNED = tuple(
    (steps, guidance, gamma)
    for steps in (512, 128)
    for guidance in (0.0, 0.1, 0.3)
    for gamma in (0.0, 0.1, 0.3)
)
"""(steps, guidance, gamma) over which the teacher's best many-step score is taken: the claims'
reference, as the paper compares with a teacher of tuned guidance and sampling noise."""
BUDGETS = {
    "small": {
        "num_samples": 1000,
        "students": {8: ("edm",), 1: ("flat",)},
        "grid": {},
        "tuned": ((512, 0.0, 0.0), (512, 0.1, 0.0)),
        "distill": None,  # the preset's steps and batch
    },
    "full": {
        "num_samples": 10_000,
        "students": {
            8: ("edm", "flat"),
            4: ("edm", "flat"),
            2: ("flat", "dmd"),
            1: ("flat", "dmd"),
        },
        "grid": {1: ("dmd",)},
        "tuned": TEACHER_TUNED,
        "distill": (1000, 128),
    },
}
"""Per budget: samples per row, the students' {k: weightings} (the first is the headline one;
flat or dmd for k <= 2 as the paper prescribes), those also trained with `--time-sampling grid`
(k = 1: study-rings.md section 5), the teacher settings of the best-teacher reference, and
(distillation steps, batch) unless the command line sets them."""
CLAIMS = (
    ("alternating", 8, 1.0),
    ("instant", 8, 1.0),
    ("alternating", 4, 1.25),
    (None, 2, 2.0),
    (None, 1, 3.0),
)
"""(variant or None for the better of the two, k, factor): "the student's score <= factor x the
teacher's best" (issue 12's targets). Factor 1 at k = 8 is the paper's claim (its 8-step students
match or beat the tuned teacher); 1.25, 2 and 3 at k = 4, 2, 1 are the project's tolerances for
fewer steps (the paper's 1-step FID is about 2.4x its best 8-step one)."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the quality table: the teacher sampled with `steps` steps, `guidance` and
    `gamma`, or a student of `variant` distilled for k = `steps` with `weighting` and
    `time_sampling` (train.py's `--time-sampling`), scored at its last checkpoint or (`checkpoint`
    "best", `select_checkpoint`) at the one a held-out selection prefers."""

    variant: str
    steps: int
    guidance: float = 0.0
    gamma: float = 0.0
    weighting: str | None = None
    time_sampling: str = "paper"
    checkpoint: str = "last"

    @property
    def name(self) -> str:
        if self.variant == "teacher":
            noise = f"-gamma{self.gamma:g}" if self.gamma else ""
            return f"teacher-{self.steps}-w{self.guidance:g}{noise}"
        grid = "" if self.time_sampling == "paper" else f"-{self.time_sampling}"
        best = "-best" if self.checkpoint == "best" else ""
        return f"{self.variant}-k{self.steps}-{self.weighting}{grid}{best}"

    @property
    def last(self) -> "Row":
        """The row of the same student scored at its last checkpoint (a teacher row: itself)."""
        return dataclasses.replace(self, checkpoint="last")


def with_best(rows: Sequence[Row]) -> list[Row]:
    """`rows` with each student followed by its best-checkpoint row (`checkpoint="best"`)."""
    out = []
    for row in rows:
        out.append(row)
        if row.variant != "teacher":
            out.append(dataclasses.replace(row, checkpoint="best"))
    return out


def quality_rows(budget: str) -> list[Row]:
    """The rows of a budget, headline first (so that a run cut short has the main comparison): the
    8-step students, the 512- and 8-step teachers, the 1-step students; then the tuned teachers,
    the teacher curve and the other students."""
    spec = BUDGETS[budget]
    students = [
        Row(variant, k, weighting=weighting, time_sampling=sampling)
        for sampling, per_k in (("paper", spec["students"]), ("grid", spec["grid"]))
        for k, weightings in per_k.items()
        for weighting in weightings
        for variant in ("instant", "alternating")
    ]
    first = {k: weightings[0] for k, weightings in spec["students"].items()}
    headline = [r for r in students if r.steps == 8 and r.weighting == first[8]]
    headline += [Row("teacher", 512), Row("teacher", 8)]
    headline += [r for r in students if r.steps == 1 and r.weighting == first[1]]
    teachers = [Row("teacher", s, g, n) for s, g, n in spec["tuned"]]
    teachers += [Row("teacher", s) for s in TEACHER_CURVE]
    rest = teachers + sorted(students, key=lambda r: -r.steps)
    return list(dict.fromkeys(headline + rest))


def student_tag(config: "QualityBench") -> str:
    """What a student's result depends on besides its row: learning rates, length, batch, seed."""
    aux = "" if config.aux_lr == config.lr else f"-aux{config.aux_lr:g}"
    return (
        f"lr{config.lr:g}{aux}-{config.distill_steps}x{config.distill_batch_size}-seed{config.seed}"
    )


def run_name(row: Row, config: "QualityBench") -> str:
    """The row's name, with the student settings (`student_tag`) for a student: the name of its
    training folder, its evaluation folder and its cached result."""
    return row.name if row.variant == "teacher" else f"{row.name}-{student_tag(config)}"


def student_workdir(row: Row, config: "QualityBench") -> pathlib.Path:
    """The training folder of `row`'s student, `out/students/<name>-<tag>` (shared by its last-
    and best-checkpoint rows)."""
    return pathlib.Path(config.out) / "students" / run_name(row.last, config)


def train_student(
    row: Row, *, config: "QualityBench", teacher: pathlib.Path
) -> tuple[pathlib.Path, float]:
    """The final checkpoint of `row`'s student, trained (or resumed) in
    `out/students/<name>-<tag>` unless finished, and its training wall time from metrics.jsonl
    (first step's compilation included). The run keeps all its checkpoints (at most ten, every
    10% of the steps), so `bench.py length --workdirs OUT/students/*` gives each one's best and
    last."""
    steps = config.distill_steps
    workdir = student_workdir(row, config)
    final = workdir / "checkpoints" / f"ckpt_{steps:08d}.eqx"
    if not final.exists():
        settings = dataclasses.replace(
            train.PRESETS[config.preset],
            variant=row.variant,
            k=row.steps,
            weighting=row.weighting,
            time_sampling=row.time_sampling,
            lr=config.lr,
            aux_lr=config.aux_lr,
            teacher=str(teacher),
            workdir=str(workdir),
            steps=steps,
            batch_size=config.distill_batch_size,
            # the same values as the preset's distillation defaults, so config.json has one length
            distill_steps=steps,
            distill_batch_size=config.distill_batch_size,
            seed=config.seed,
            resume=True,
            sample_every=max(steps // 5, 1),
            # at most ten checkpoints, all kept: `bench.py length` gives each one's best and last
            checkpoint_every=-(-steps // 10),
            keep_checkpoints=10,
        )
        final = train.train(settings)
    last = (workdir / "metrics.jsonl").read_text().splitlines()[-1]
    return final, float(json.loads(last)["time"])


def evaluate_row(row: Row, checkpoint: pathlib.Path, *, config: "QualityBench") -> dict:
    """eval.py's record for `row` (FID, precision, recall unless --no-fid; fd_mnist and label
    accuracy for MNIST models) against the test split, from `checkpoint`."""
    teacher = row.variant == "teacher"
    return evaluation.evaluate(
        evaluation.EvalConfig(
            checkpoint=str(checkpoint),
            num_samples=config.num_samples,
            batch_size=config.eval_batch_size,
            seed=config.seed,
            # absolute: the result records its sample grid's path
            out=str(pathlib.Path(config.out).resolve() / "eval" / run_name(row, config)),
            num_steps=row.steps if teacher else None,
            guidance=row.guidance,
            gamma=row.gamma,
            fid=config.fid,
            reference_count=config.reference_count,
        )
    )


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def select_checkpoint(row: Row, *, config: "QualityBench") -> tuple[pathlib.Path, dict]:
    """The kept checkpoint of `row`'s student with the lowest score (FID, or fd_mnist with
    --no-fid) on `config.select_samples` samples of sampling seed `config.seed + 1`, and the
    selection's record (metric, samples, seed, chosen step, every checkpoint's score). The
    sampling seed is one the table does not report (the reference test images are the same), so
    the chosen checkpoint's reported score is not the minimum of noisy values; the paper reports
    its best checkpoint at fixed seeds."""
    metric = "fid" if config.fid else "fd_mnist"
    workdir, seed = student_workdir(row, config), config.seed + 1
    scores = checkpoint_scores(
        workdir,
        num_samples=config.select_samples,
        seed=seed,
        fid=config.fid,
        batch_size=config.eval_batch_size,
        reference_count=config.reference_count,
    )
    # a non-finite or missing score (a diverged checkpoint) is never the best
    best = min(scores, key=lambda r: r[metric] if _finite(r.get(metric)) else math.inf)
    selection = {
        "metric": metric,
        "num_samples": config.select_samples,
        "seed": seed,
        "step": best["step"],
        "scores": {str(r["step"]): r.get(metric) for r in scores},
    }
    return workdir / "checkpoints" / f"ckpt_{best['step']:08d}.eqx", selection


def score_row(row: Row, final: pathlib.Path, *, config: "QualityBench") -> dict:
    """`evaluate_row`'s record of `row` at `final` (the teacher, or the student's last
    checkpoint), or for a best-checkpoint row at `select_checkpoint`'s choice, with the selection
    recorded (the last row's record when the choice is `final` and that row was cached since
    `final` was written: the same checkpoint, seed and samples)."""
    if row.checkpoint != "best":
        return evaluate_row(row, final, config=config)
    chosen, selection = select_checkpoint(row, config=config)
    last = row_path(row.last, config)
    if chosen.name == final.name and newer(last, than=final):
        record = json.loads(last.read_text())
    else:
        record = evaluate_row(row, chosen, config=config)
    return {**record, "selection": selection}


def row_path(row: Row, config: "QualityBench") -> pathlib.Path:
    """Where a finished row is cached: its name, the student settings, sample count, seed, metric
    set, reference count and, for a best-checkpoint row, the selection's sample count (rows
    measured differently never mix)."""
    ref = "" if config.reference_count is None else f"_ref{config.reference_count}"
    fid = "" if config.fid else "_nofid"
    select = f"_select{config.select_samples}" if row.checkpoint == "best" else ""
    stem = f"{run_name(row, config)}_n{config.num_samples}_seed{config.seed}{fid}{ref}{select}"
    return pathlib.Path(config.out) / "rows" / f"{stem}.json"


def load_rows(rows: Sequence[Row], config: "QualityBench") -> dict[Row, dict]:
    """The cached results of `rows` that exist."""
    return {
        row: json.loads(row_path(row, config).read_text())
        for row in rows
        if row_path(row, config).exists()
    }


def _ordered(results: dict[Row, dict]) -> list[Row]:
    """Teacher rows by steps, guidance and gamma, then students by variant, k and weighting."""
    return sorted(
        results,
        key=lambda r: (
            r.variant != "teacher",
            r.variant,
            r.steps,
            r.guidance,
            r.gamma,
            r.weighting or "",
            r.time_sampling,
        ),
    )


def _weighting_cell(q: dict) -> str:
    """The weighting, with the time sampling where it is not the paper's."""
    grid = "" if q["time_sampling"] in (None, "paper") else f", t {q['time_sampling']}"
    return (q["weighting"] or "—") + grid


def quality_table(results: dict[Row, dict]) -> str:
    """Markdown table of finished rows (quality_json_rows' fields, plus timings)."""
    header = "sampler | k | weighting | guidance | gamma | lr | distillation | FID | precision | "
    header += "recall | fd_mnist | label acc. | samples | train (s) | sampling (s)"
    lines = [f"| {header} |", "|" + " --- |" * (header.count("|") + 1)]
    for row, q in zip(_ordered(results), quality_json_rows(results)):
        r = results[row]
        distill = "—" if q["distill_steps"] is None else f"{q['distill_steps']} @ {q['batch_size']}"
        if q["checkpoint"] == "best":
            distill = f"best {q['checkpoint_step']} of {distill}, {q['selected_from']} kept"
        cells = [
            q["sampler"],
            str(q["k"]),
            _weighting_cell(q),
            f"{q['guidance']:g}",
            f"{q['gamma']:g}",
            evaluation.cell(q["lr"], "g"),
            distill,
            evaluation.cell(q["fid"], ".2f"),
            evaluation.cell(q["precision"], ".3f"),
            evaluation.cell(q["recall"], ".3f"),
            evaluation.cell(q["fd_mnist"], ".2f"),
            evaluation.cell(q["label_accuracy"], ".3f"),
            str(q["num_samples"]),
            evaluation.cell(r["train_seconds"], ".0f"),
            f"{r['timings_s']['sampling']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


QUALITY_SCHEMA = {
    "sampler": str,
    "k": int,
    "weighting": (str, type(None)),
    "time_sampling": (str, type(None)),
    "guidance": float,
    "gamma": float,
    "lr": (float, type(None)),
    "distill_steps": (int, type(None)),
    "batch_size": (int, type(None)),
    "checkpoint": (str, type(None)),
    "checkpoint_step": (int, type(None)),
    "selected_from": (int, type(None)),
    "fid": (float, type(None)),
    "precision": (float, type(None)),
    "recall": (float, type(None)),
    "fd_mnist": (float, type(None)),
    "label_accuracy": (float, type(None)),
    "num_samples": int,
    "device": str,
    "inception_protocol": str,
}
"""The fields of a docs/results/quality.json row and their types (None: not measured, e.g.
`--no-fid`, or not applicable); a row has FID or fd_mnist. A student row's `checkpoint` is
"last" or "best" (`select_checkpoint`), `checkpoint_step` the distillation step it was saved at,
of `distill_steps`, and `selected_from` (best rows) the number of kept checkpoints compared."""


SCORES = ("fid", "precision", "recall", "fd_mnist", "label_accuracy")
"""The QUALITY_SCHEMA fields copied from eval.py's record (None where not measured)."""


def quality_json_rows(results: dict[Row, dict]) -> list[dict]:
    """One QUALITY_SCHEMA row per finished result, in `quality_table`'s order."""
    rows = []
    for row in _ordered(results):
        r = results[row]
        student = row.variant != "teacher"
        rows.append(
            validate_quality_row(
                {
                    "sampler": row.variant,
                    "k": row.steps,
                    "weighting": row.weighting,
                    "time_sampling": row.time_sampling if student else None,
                    "guidance": float(row.guidance),
                    "gamma": float(row.gamma),
                    "lr": float(r["config"]["lr"]) if student else None,
                    "distill_steps": r["distill_steps"] if student else None,
                    "batch_size": r["distill_batch_size"] if student else None,
                    "checkpoint": row.checkpoint if student else None,
                    "checkpoint_step": r["step"] if student else None,
                    "selected_from": len(r["selection"]["scores"]) if "selection" in r else None,
                    **{name: r.get(name) for name in SCORES},
                    "num_samples": r["num_samples"],
                    "device": r["machine"]["devices"],
                    "inception_protocol": r["feature_protocol"],
                }
            )
        )
    return rows


def validate_quality_row(row: dict) -> dict:
    """`row` itself if it has exactly QUALITY_SCHEMA's fields with their types, a known sampler
    and checkpoint, k >= 1 and a score (FID or fd_mnist); ValueError otherwise."""
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
    if wrong:
        raise ValueError(f"quality row has wrong types in {wrong}: {row}")
    known = row["sampler"] in ("teacher", "alternating", "instant") and row["k"] >= 1
    if not known or row["checkpoint"] not in (None, "last", "best"):
        raise ValueError(f"quality row has an unknown sampler or checkpoint, or k < 1: {row}")
    if row["fid"] is None and row["fd_mnist"] is None:
        raise ValueError(f"quality row has neither fid nor fd_mnist: {row}")
    return row


def _lowest(
    results: dict[Row, dict], metric: str, keep: Callable[[Row], bool]
) -> tuple[Row, float] | None:
    """The kept row with the lowest `metric` (rows without it are skipped), or None. A finite
    score beats a non-finite one (a diverged student), which is returned only when no kept row is
    finite, so that its claim fails rather than goes missing."""
    scores = {
        row: r[metric] for row, r in results.items() if keep(row) and r.get(metric) is not None
    }
    # min() over NaN depends on the order; rank the finite scores first.
    return min(scores.items(), key=lambda item: (not _finite(item[1]), item[1])) if scores else None


def best_teacher(results: dict[Row, dict], metric: str) -> tuple[Row, float] | None:
    """The teacher row with the lowest `metric` among TEACHER_TUNED's settings that finished."""
    tuned = set(TEACHER_TUNED)
    return _lowest(
        results,
        metric,
        lambda row: row.variant == "teacher" and (row.steps, row.guidance, row.gamma) in tuned,
    )


def best_student(
    results: dict[Row, dict],
    metric: str,
    *,
    k: int,
    variants: Sequence[str],
    checkpoints: Sequence[str] = ("last", "best"),
) -> tuple[Row, float] | None:
    """The student row of `variants` at `k` scored at one of `checkpoints` ("last", "best") with
    the lowest `metric` (over weightings)."""
    return _lowest(
        results,
        metric,
        lambda row: row.variant in variants and row.steps == k and row.checkpoint in checkpoints,
    )


def verdicts(
    results: dict[Row, dict], *, metric: str = "fid", checkpoint: str = "last"
) -> list[dict[str, str]]:
    """Issue 12's targets checked on the finished rows, the students scored at their `checkpoint`
    ("last" or "best"): one `{claim, status, detail}` per CLAIMS entry and one for "alternating <=
    instant at k = 4"; status is holds, fails or missing (a row it needs has not finished). Lower
    `metric` is better."""
    teacher = best_teacher(results, metric)
    tuned = sum((r.steps, r.guidance, r.gamma) in set(TEACHER_TUNED) for r in results)
    lines = []
    for variant, k, factor in CLAIMS:
        who = variant or "the better variant"
        claim = f"{who}, k = {k}: {metric} <= {factor:g} x the teacher's best"
        pool = (variant,) if variant else ("alternating", "instant")
        student = best_student(results, metric, k=k, variants=pool, checkpoints=(checkpoint,))
        if teacher is None or student is None:
            missing = "no 128/512-step teacher row" if teacher is None else f"no k = {k} student"
            lines.append({"claim": claim, "status": "missing", "detail": missing})
            continue
        bound = factor * teacher[1]
        lines.append(
            {
                "claim": claim,
                "status": "holds" if student[1] <= bound else "fails",
                "detail": f"{student[0].name} {student[1]:.2f} against {factor:g} x "
                f"{teacher[0].name} {teacher[1]:.2f} = {bound:.2f} (the best of {tuned} tuned "
                f"teacher row{'s' * (tuned != 1)})",
            }
        )
    pair = [
        best_student(results, metric, k=4, variants=(v,), checkpoints=(checkpoint,))
        for v in ("alternating", "instant")
    ]
    claim = f"k = 4: alternating's {metric} <= instant's"
    if None in pair:
        lines.append({"claim": claim, "status": "missing", "detail": "a k = 4 student is missing"})
    else:
        (alt, a), (inst, i) = pair
        status = "holds" if a <= i else "fails"
        detail = f"{alt.name} {a:.2f}, {inst.name} {i:.2f}"
        lines.append({"claim": claim, "status": status, "detail": detail})
    return lines


def against_undistilled(results: dict[Row, dict], *, metric: str = "fid") -> list[str]:
    """One sentence per student whose k has an undistilled teacher row (guidance 0, gamma 0); a
    best-checkpoint row only where its checkpoint is not the last one's."""
    lines = []
    for row in _ordered(results):
        same = Row("teacher", row.steps)
        score = results[row].get(metric)
        step = results[row].get("step")
        repeat = row.checkpoint == "best" and results.get(row.last, {}).get("step") == step
        if row.variant != "teacher" and same in results and score is not None and not repeat:
            lines.append(
                f"{row.name}: {metric} {score:.2f} against the undistilled teacher's "
                f"{results[same][metric]:.2f} with the same {row.steps} steps."
            )
    return lines


def plot_quality(results: dict[Row, dict], path: pathlib.Path, *, metric: str = "fid") -> None:
    """`metric` against sampling steps (log scales): the teacher's curve (guidance 0, gamma 0), its
    tuned best as a dashed line, a marker per student row (open: best checkpoint)."""
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    points = sorted(
        (row.steps, r[metric])
        for row, r in results.items()
        if row.variant == "teacher" and not row.guidance and not row.gamma and r.get(metric)
    )
    if points:
        ax.plot(*zip(*points), "o-", color="0.3", label="teacher, guidance 0, gamma 0")
    best = best_teacher(results, metric)
    if best:
        ax.axhline(best[1], color="0.5", ls="--", lw=1, label=f"teacher's best ({best[0].name})")
    markers = {"edm": "^", "flat": "v", "dmd": "D"}
    for variant, color in (("alternating", "C0"), ("instant", "C3")):
        for (weighting, marker), checkpoint in itertools.product(markers.items(), ("last", "best")):
            points = sorted(
                (row.steps, r[metric])
                for row, r in results.items()
                if (row.variant, row.weighting, row.checkpoint) == (variant, weighting, checkpoint)
                and r.get(metric)
            )
            if points:
                ax.plot(
                    *zip(*points),
                    marker,
                    color=color,
                    ms=8,
                    ls=":",
                    mfc=color if checkpoint == "last" else "none",  # best checkpoint: open
                    label=f"{variant}, {weighting}"
                    + (", best checkpoint" * (checkpoint == "best")),
                )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(metric)
    counts = sorted({r["num_samples"] for r in results.values()})
    ax.set_title(f"MNIST, {metric} on {', '.join(map(str, counts))} samples vs the test digits")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    train.save_figure(fig, path, dpi=110)


def sample_panels(
    results: dict[Row, dict], metric: str, *, out: pathlib.Path | None = None
) -> list[tuple[str, pathlib.Path]]:
    """(title, grid PNG) of the best teacher and of the best student at k = 8, 4, 2 and 1 by
    `metric`, skipping a k without a finished student and rows whose grid file is gone. Every grid
    is eval.py's first 100 samples of the same seed and labels (column = label). With `out`, the
    grid in `out/eval/<its folder>/` is used where it exists, else its recorded (absolute) path: a
    results folder copied from another machine keeps its panels."""
    picks = [("teacher's best", best_teacher(results, metric))]
    picks += [
        (f"best k = {k}", best_student(results, metric, k=k, variants=("alternating", "instant")))
        for k in (8, 4, 2, 1)
    ]
    panels = []
    for what, pick in picks:
        if pick is None or not results[pick[0]].get("sample_grid"):
            continue
        grid = pathlib.Path(results[pick[0]]["sample_grid"])
        beside = None if out is None else out / "eval" / grid.parent.name / grid.name
        grid = beside if beside is not None and beside.exists() else grid
        if grid.exists():
            panels.append((f"{what}: {pick[0].name}\n{metric} {pick[1]:.2f}", grid))
    return panels


def plot_samples(panels: Sequence[tuple[str, pathlib.Path]], path: pathlib.Path) -> None:
    """The panels' sample grids side by side under their titles, one PNG."""
    grids = [(title, np.asarray(Image.open(grid))) for title, grid in panels]
    train.save_titled_grids(
        # one image each, channels as eval.py wrote them (1 or 3; a grey PNG reads as 2-D)
        [(title, grid.reshape(1, *grid.shape[:2], -1)) for title, grid in grids],
        path,
        title="the same labels (column = label) and sampling seed in every panel",
        columns=1,
    )


def verdict_lines(results: dict[Row, dict], *, metric: str, config: "QualityBench") -> list[str]:
    """The report's verdicts (`verdicts`) as Markdown list items; with `config.checkpoint` "best",
    a paragraph on the selection, then the verdicts at the last and at the best checkpoints."""

    def items(checkpoint: str) -> list[str]:
        return [
            f"- **{v['status']}**: {v['claim']}: {v['detail']}"
            for v in verdicts(results, metric=metric, checkpoint=checkpoint)
        ]

    if config.checkpoint == "last":
        return items("last")
    return [
        "Each student has two rows: its last checkpoint and (`-best`) the kept checkpoint with the "
        f"lowest {metric} on {config.select_samples} samples of sampling seed {config.seed + 1}, "
        f"scored like every row on seed {config.seed} (the paper reports its best checkpoint).",
        "",
        "Students at their last checkpoint:",
        "",
        *items("last"),
        "",
        "Students at their best checkpoint:",
        "",
        *items("best"),
    ]


def write_report(rows: Sequence[Row], config: "QualityBench", header: dict) -> str:
    """quality.md (verdicts and table of the finished rows), quality.json, the figure of the score
    against sampling steps, the best rows' sample grids and the 8-step instant student's loss
    curve, in `config.out`."""
    out = pathlib.Path(config.out)
    results = load_rows(rows, config)
    metric = "fid" if config.fid else "fd_mnist"
    missing = [row.name for row in rows if row not in results]
    lines = [f"# MNIST quality ({header['budget']} budget, {config.num_samples} samples per row)"]
    lines += ["", f"Students: {student_tag(config)} (lr, distillation steps x batch, seed).", ""]
    lines += verdict_lines(results, metric=metric, config=config)
    lines += ["", *(f"- {line}" for line in against_undistilled(results, metric=metric))]
    lines += ["", quality_table(results), ""]
    lines += [f"Not finished yet: {', '.join(missing)}." if missing else "All rows finished.", ""]
    machines = collections.Counter(
        f"{r['machine']['devices']}, {r['machine']['cpu_count']} CPU cores, jax "
        f"{r['machine']['jax_version']}"
        for r in results.values()
    )
    protocols = collections.Counter(r["feature_protocol"] for r in results.values())
    provenance = (
        " Rows computed on: "
        + "; ".join(f"{machine} ({n} rows)" for machine, n in machines.items())
        + ". Inception protocol: "
        + "; ".join(f"`{protocol}` ({n} rows)" for protocol, n in protocols.items())
        + "."
    )
    lines += [
        f"Teacher {header['teacher']} (step {header['teacher_step']})."
        + (provenance if results else ""),
        "",
    ]
    report = "\n".join(lines)
    with data.atomic_path(out / "quality.md") as tmp:
        tmp.write_text(report)
    with data.atomic_path(out / "quality.json") as tmp:
        tmp.write_text(json.dumps(quality_json_rows(results), indent=1) + "\n")
    if results:
        plot_quality(results, out / f"{metric}_vs_steps.png", metric=metric)
    panels = sample_panels(results, metric, out=out)
    if panels:
        plot_samples(panels, out / "samples.png")
    for row in rows:
        metrics = student_workdir(row, config) / "metrics.jsonl"
        if row.variant == "instant" and row.steps == 8 and metrics.exists():
            train.plot_losses(metrics, out / "instant_loss.png", variant="instant")
            break
    return report


def _claim(path: pathlib.Path) -> bool:
    """Take the row cached at `path` for this process (an exclusively created `.claim` file beside
    it); False when another worker holds it. Creates the rows folder of a fresh `--out`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path.with_suffix(".claim"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _clear_claims(out: pathlib.Path) -> None:
    for claim in out.glob("rows/*.claim"):
        claim.unlink()


def run_rows(
    rows: Sequence[Row],
    *,
    config: "QualityBench",
    teacher: pathlib.Path,
    header: dict,
    deadline: float | None,
    claim: bool,
) -> None:
    """Train (students) and evaluate every unfinished row in order (with `config.checkpoint`
    "best", each student's best-checkpoint row after its last one), caching each result; stop
    starting rows after `deadline` (time.time()); with `claim`, skip rows another worker took (one
    claim per student: one process trains it)."""
    for row in rows:
        both = with_best([row]) if config.checkpoint == "best" else [row]
        todo = [r for r in both if not row_path(r, config).exists()]
        if not todo:
            continue
        if deadline is not None and time.time() > deadline:
            print("--time-limit reached: rerun the same command to continue.", flush=True)
            return
        if claim and not _claim(row_path(row, config)):
            continue
        print(f"== {row.name} ({config.num_samples} samples)", flush=True)
        checkpoint, train_s = teacher, None
        student = row.variant != "teacher"
        if student:
            checkpoint, train_s = train_student(row, config=config, teacher=teacher)
        for r in todo:
            record = score_row(r, checkpoint, config=config)
            record.update(
                row=dataclasses.asdict(r),
                train_seconds=train_s,
                machine=header,
                distill_steps=config.distill_steps if student else None,
                distill_batch_size=config.distill_batch_size if student else None,
            )
            write_json(str(row_path(r, config)), record, make_folder=True)


def worker_environment(jobs: int, *, cpu_count: int | None = None) -> dict[str, str]:
    """The environment of one of `jobs` worker processes: this one's, with the BLAS thread pools
    (numpy's FID statistics) limited to an equal share of the usable cores unless already set."""
    # Pools spanning all the cores oversubscribe them: four processes on two cores took 20-24 s
    # each for one FID's statistics, 10 s with one thread each.
    if cpu_count is None:
        affinity = getattr(os, "sched_getaffinity", None)
        cpu_count = len(affinity(0)) if affinity else os.cpu_count() or 1
    share = str(max(1, cpu_count // jobs))
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, share)
    return env


def run_workers(config: "QualityBench", *, deadline: float | None) -> None:
    """`config.jobs` processes of `bench.py quality --worker` (`worker_environment`), sharing the
    rows through claim files; each one's output goes to `out/logs/worker<i>.log`. Raises
    RuntimeError naming the log of a worker that failed."""
    logs = pathlib.Path(config.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    minutes = None if deadline is None else max(deadline - time.time(), 0.0) / 60
    settings = dataclasses.replace(config, jobs=1, worker=True, time_limit=minutes)
    argv = [sys.executable, os.path.abspath(__file__), "quality", *_argv(settings)]
    env, procs = worker_environment(config.jobs), []
    for i in range(config.jobs):
        with open(logs / f"worker{i}.log", "a") as log:
            procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env))
    print(f"{config.jobs} workers running: tail -f {logs}/worker*.log", flush=True)
    failed = [i for i, proc in enumerate(procs) if proc.wait() != 0]
    if failed:
        raise RuntimeError(
            f"bench.py quality worker {failed[0]} failed: see {logs}/worker{failed[0]}.log; "
            "rerun the same command to continue"
        )


def _argv(settings: Any) -> list[str]:
    """The command-line options that reproduce a settings dataclass (train._add_options' flags)."""
    argv = []
    for f in dataclasses.fields(settings):
        value, flag = getattr(settings, f.name), f.metadata.get("flag") or train._flag(f.name)
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            argv += [flag, *map(str, value)] if value else []
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def resolve_quality(config: "QualityBench") -> "QualityBench":
    """`config` with its defaults filled in: out, sample count, distillation length and batch (the
    budget's, else the preset's) and learning rates (the preset's)."""
    preset, budget = train.PRESETS[config.preset], BUDGETS[config.budget]
    steps, batch = budget["distill"] or (preset.distill_steps, preset.distill_batch_size)
    return dataclasses.replace(
        config,
        out=config.out or f"runs/quality-{config.budget}",
        num_samples=config.num_samples or budget["num_samples"],
        distill_steps=config.distill_steps or steps,
        distill_batch_size=config.distill_batch_size or batch,
        lr=preset.lr if config.lr is None else config.lr,
        aux_lr=preset.aux_lr if config.aux_lr is None else config.aux_lr,
    )


def bench_quality(config: "QualityBench") -> str:
    """Run (or resume) every unfinished row of the budget in headline order (or the rows named in
    `config.rows`, in that order), in this process or `config.jobs` worker processes, then write
    the report of all the budget's rows and return it."""
    config = resolve_quality(config)
    deadline = None if config.time_limit is None else time.time() + 60 * config.time_limit
    rows = quality_rows(config.budget)
    by_name = {row.name: row for row in rows}
    unknown = [name for name in config.rows if name not in by_name]
    if unknown:
        best = " (a -best row comes with its student's name and --checkpoint best)"
        raise ValueError(
            f"unknown --rows {', '.join(unknown)}; the {config.budget} budget's rows are "
            f"{', '.join(by_name)} (the full budget's: pass --budget full)"
            + (best if any(name.endswith("-best") for name in unknown) else "")
        )
    out = pathlib.Path(config.out)
    base = dataclasses.replace(
        train.PRESETS[config.preset], teacher=config.teacher, workdir=str(out)
    )
    teacher = train.ensure_teacher(train.resolve(base))
    header = {
        "budget": config.budget,
        "devices": f"{jax.devices()[0].device_kind} x{jax.device_count()}",
        "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
        "teacher": os.path.relpath(teacher),
        "teacher_step": train.read_meta(teacher)["step"],
    }
    todo = [by_name[name] for name in config.rows] or rows
    work = dict(config=config, teacher=teacher, header=header, deadline=deadline)
    if config.checkpoint == "best":  # reported after their last-checkpoint rows
        rows = with_best(rows)
    if config.worker:
        run_rows(todo, claim=True, **work)
        return ""
    if config.jobs > 1:
        _clear_claims(out)  # left by killed workers: their rows run again
        run_workers(
            dataclasses.replace(config, rows=tuple(r.name for r in todo)), deadline=deadline
        )
        _clear_claims(out)  # every worker has exited
    else:
        run_rows(todo, claim=False, **work)
    return write_report(rows, config, header)


# ----------------------------------------------------------------------------------------------
# Length: a student's score against distillation steps (issue 12, suspect 1)


def newer(result: pathlib.Path, *, than: pathlib.Path) -> bool:
    """Whether `result` exists and was written no earlier than `than` was (make's rule: a cached
    score of a checkpoint written since, by a run trained again, is stale)."""
    return result.exists() and result.stat().st_mtime >= than.stat().st_mtime


def _checkpoints_by_step(workdir: pathlib.Path, steps: Sequence[int]) -> dict[int, pathlib.Path]:
    """A distillation run's checkpoints by step (only those at `steps` when given); raises
    FileNotFoundError naming the steps it has."""
    if not workdir.is_dir():
        raise FileNotFoundError(f"workdir {workdir} does not exist: pass a train.py workdir")
    by_step = {int(c.stem.split("_")[1]): c for c in (workdir / "checkpoints").glob("ckpt_*.eqx")}
    chosen = sorted(set(steps) & set(by_step) if steps else by_step)
    if not chosen:
        raise FileNotFoundError(
            f"no checkpoints of steps {list(steps)} in {workdir}/checkpoints; it has "
            f"{sorted(by_step)}: pass other --steps"
            if by_step
            else f"no checkpoints in {workdir}/checkpoints: pass a train.py distillation workdir"
        )
    return {step: by_step[step] for step in chosen}


def checkpoint_scores(
    workdir: pathlib.Path,
    *,
    num_samples: int,
    seed: int,
    fid: bool,
    batch_size: int,
    steps: Sequence[int] = (),
    reference_count: int | None = None,
) -> list[dict]:
    """eval.py's record of every checkpoint (or those at `steps`) of a distillation run, by step:
    read from `workdir/eval` when that evaluation exists and is newer than the checkpoint (a run
    trained again is scored again), else computed (fixed sampling seed, so
    the curve compares checkpoints on the same noise and labels; scored against the first
    `reference_count` test images, none: all)."""
    records = []
    for checkpoint in _checkpoints_by_step(workdir, steps).values():
        config = evaluation.EvalConfig(
            checkpoint=str(checkpoint),
            num_steps=train.read_meta(checkpoint)["config"]["k"],  # the student's own k
            num_samples=num_samples,
            seed=seed,
            fid=fid,
            batch_size=batch_size,
            out=str(workdir / "eval"),
            reference_count=reference_count,
        )
        done = workdir / "eval" / f"{evaluation.result_stem(config, config.num_steps)}.json"
        record = json.loads(done.read_text()) if newer(done, than=checkpoint) else None
        if record is None or (fid and record.get("fid") is None):  # --fid needs an FID record
            record = evaluation.evaluate(config)
        records.append(record)
    return sorted(records, key=lambda r: r["step"])


def radial_w1(a: Float[np.ndarray, "n d"], b: Float[np.ndarray, "m d"]) -> float:
    """Wasserstein-1 distance between the distributions of the norms `|a_i|` and `|b_j|` of two
    equal-size point sets (for equal sizes, the mean gap of the sorted norms), in the points' units:
    on concentric rings, how sharp and well placed the rings are. Raises ValueError for unequal
    sizes."""
    if len(a) != len(b):
        raise ValueError(f"radial_w1 needs equal sizes, got {len(a)} and {len(b)} points")
    ra, rb = (np.sort(np.linalg.norm(np.asarray(x, np.float64), axis=1)) for x in (a, b))
    return float(np.abs(ra - rb).mean())


def points_scores(
    checkpoint: pathlib.Path, *, num_steps: int, num_samples: int, seed: int
) -> dict[str, Any]:
    """`radial_w1` and energy distance of `num_samples` points of a 2-D checkpoint (k =
    `num_steps`, unguided, labels `i % classes`, sampling seed `seed`) to the first `num_samples`
    points of its data's test split. Raises ValueError when the split is smaller."""
    model, config, meta = train.load_checkpoint(checkpoint)
    reference = data.load(config.data, split="test").images
    if num_samples > len(reference):
        raise ValueError(
            f"--num-samples {num_samples}: {config.data} has {len(reference)} test points; "
            "pass fewer"
        )
    reference = np.asarray(reference[:num_samples], np.float64)
    key = jax.random.key(seed)
    try:
        points = train.draw_points(model, config, key, num_steps=num_steps, num_points=num_samples)
    except FloatingPointError as error:
        raise FloatingPointError(f"{checkpoint}: {error}; leave it out with --steps") from error
    return {
        "step": meta["step"],
        "num_steps": num_steps,
        "w1_radius": radial_w1(points, reference),
        "energy_distance": train.energy_distance(points, reference),
        "num_samples": num_samples,
        "seed": seed,
    }


def points_length_scores(
    workdir: pathlib.Path, *, num_samples: int, seed: int, steps: Sequence[int] = ()
) -> tuple[list[dict], train.Config]:
    """`points_scores` of every checkpoint (or those at `steps`) of a 2-D distillation run, cached
    in `workdir/eval` (computed again for a checkpoint newer than its cached score), and the run's
    configuration (from its newest checkpoint)."""
    checkpoints = _checkpoints_by_step(workdir, steps)
    newest = list(checkpoints.values())[-1]
    config = train.config_from_dict(train.read_meta(newest)["config"])
    records = []
    for step, checkpoint in checkpoints.items():
        done = workdir / "eval" / f"points_k{config.k}_n{num_samples}_seed{seed}_{step:08d}.json"
        if not newer(done, than=checkpoint):
            record = points_scores(
                checkpoint, num_steps=config.k, num_samples=num_samples, seed=seed
            )
            done.parent.mkdir(parents=True, exist_ok=True)
            write_json(str(done), record)
        records.append(json.loads(done.read_text()))
    return records, config


def teacher_references(
    teacher: pathlib.Path, *, num_steps: Sequence[int], num_samples: int, seed: int
) -> dict[str, float]:
    """`radial_w1` of a teacher's samples at each of `num_steps`, lowest first: the reference
    lines beside the students' curves."""
    references = {
        f"teacher, {k} steps": points_scores(
            teacher, num_steps=k, num_samples=num_samples, seed=seed
        )["w1_radius"]
        for k in sorted(set(num_steps))
    }
    return dict(sorted(references.items(), key=lambda item: item[1]))


def length_report(
    runs: dict[str, list[dict]],
    *,
    metric: str,
    out: pathlib.Path,
    references: dict[str, float] | None = None,
    data_name: str = "MNIST",
) -> str:
    """Markdown of each run's `metric` by distillation step with its best and last checkpoint, and
    `<metric>_vs_distill_steps.png` in `out`; `references` (name: value, e.g. the teacher's) are
    listed first and drawn as horizontal lines."""
    spec = ".4f" if metric == "w1_radius" else ".2f"  # radii differ in the third decimal
    lines = ["| run | " + " | ".join(["step", metric, "label acc.", "samples"]) + " |"]
    lines.append("| --- " * 5 + "|")
    summary = [f"- {name}: {metric} {value:{spec}}." for name, value in (references or {}).items()]
    fig = Figure(figsize=(8.5, 4.2))
    ax = fig.subplots()
    dashes = ((6, 2), (1, 2), (6, 2, 1, 2), (3, 3), (6, 2, 1, 2, 1, 2))
    for i, (name, value) in enumerate((references or {}).items()):
        ax.axhline(value, color=str(0.1 + 0.12 * (i % 5)), dashes=dashes[i % 5], lw=1, label=name)
    for i, (name, records) in enumerate(runs.items()):
        scored = [r for r in records if r.get(metric) is not None]
        for r in scored:
            accuracy = evaluation.cell(r.get("label_accuracy"), ".3f")
            lines.append(
                f"| {name} | {r['step']} | {r[metric]:{spec}} | {accuracy} | {r['num_samples']} |"
            )
        if scored:
            best = min(scored, key=lambda r: r[metric])
            summary.append(
                f"- {name}: best {metric} {best[metric]:{spec}} at step {best['step']}, last "
                f"{scored[-1][metric]:{spec}} at step {scored[-1]['step']}."
            )
            style = ("o-", "s--", "^:")[i // 10 % 3]  # matplotlib's cycle repeats 10 colours
            ax.plot([r["step"] for r in scored], [r[metric] for r in scored], style, label=name)
    ax.set_xlabel("distillation step")
    ax.set_ylabel(metric)
    ax.set_yscale("log")
    if references:  # a diverged run would squash the rest: its points above this are in the table
        ax.set_ylim(top=3 * max(references.values()))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    counts = sorted({r["num_samples"] for records in runs.values() for r in records})
    ax.set_title(f"{data_name}, {metric} on {', '.join(map(str, counts))} samples by checkpoint")
    out.mkdir(parents=True, exist_ok=True)
    train.save_figure(fig, out / f"{metric}_vs_distill_steps.png", dpi=110)
    report = "\n".join([*summary, "", *lines, ""])
    with data.atomic_path(out / "length.md") as tmp:
        tmp.write_text(report)
    return report


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
        "small: 1,000 samples per row, k in {1, 8}; full: 10,000 samples, k in {1, 2, 4, 8}, "
        "two weightings each, the teacher over guidance and gamma",
        choices=tuple(sorted(BUDGETS)),
    )
    preset: str = _field(
        "mnist",
        "train.py preset of teacher and students (tiny: a dry run)",
        choices=("mnist", "tiny"),
    )
    out: str | None = _field(None, "results and cache directory (none: runs/quality-<budget>)")
    teacher: str = _field("auto", f"teacher checkpoint (auto: {_TEACHER}, trained first if absent)")
    distill_steps: int | None = _field(
        None, "training steps of each student (none: full: 1000, small: the preset's)"
    )
    distill_batch_size: int | None = _field(
        None,
        "each student's global batch, instant: both minibatches (none: full: 128, small: the "
        "preset's)",
    )
    lr: float | None = _field(None, "students' peak learning rate (none: the preset's)")
    aux_lr: float | None = _field(None, "auxiliary's peak learning rate (none: the preset's)")
    eval_batch_size: int = _field(
        200, "global batch of sampling and Inception (results do not depend on it)"
    )
    fid: bool = _field(True, "Inception FID, precision, recall (--no-fid: fd_mnist only, fast)")
    reference_count: int | None = _field(
        None,
        "score against the first N test images (none: all 10,000); comparable only at equal N",
    )
    num_samples: int | None = _field(
        None, "samples per row (none: the budget's); rows are cached per sample count"
    )
    rows: tuple[str, ...] = _field(
        (),
        "run only these rows, in this order (empty: every row of the budget). Names (with "
        "--budget full; the small budget has the k = 8 edm and k = 1 flat students, the teacher "
        "at 8-512 steps and 512 with w 0.1): " + " ".join(row.name for row in quality_rows("full")),
    )
    jobs: int = _field(
        1, "worker processes sharing the rows (one GPU: 4-8; a CPU: its core count at most)"
    )
    worker: bool = _field(False, "internal: run as one of --jobs' processes")
    time_limit: float | None = _field(
        None, "start no new row after this many minutes (a rerun continues)"
    )
    checkpoint: str = _field(
        "last",
        "last: score each student's last checkpoint; best: also its best kept checkpoint (the "
        "paper reports its best), a second row <row>-best that comes with the student's row: "
        "every kept checkpoint (ten for students trained by this command) scored on "
        "--select-samples samples of sampling seed --seed + 1 (same reference images), the lowest "
        "scored again like every row; done right after the student's last row, so after "
        "--time-limit's check; its train (s) is the whole run's",
        choices=("last", "best"),
    )
    select_samples: int = _field(
        2000, "samples per checkpoint of --checkpoint best's selection (FID, or fd_mnist)"
    )
    seed: int = _field(0, "seed of training, sampling and the sample labels")


@dataclasses.dataclass(frozen=True)
class LengthBench(_Counts):
    """Settings of `python bench.py length`."""

    workdirs: tuple[str, ...] = _field(
        (), "train.py workdirs of distillation runs (all images or all 2-D)", required=True
    )
    num_samples: int = _field(
        2000,
        "samples per checkpoint (2-D runs: use 20000; two such samples of the rings differ by "
        "0.003)",
    )
    fid: bool = _field(False, "also Inception FID (--fid; slow on a CPU); fd_mnist always")
    batch_size: int = _field(200, "global batch of sampling and Inception")
    seed: int = _field(0, "sampling seed, the same for every checkpoint")
    steps: tuple[int, ...] = _field((), "evaluate only the checkpoints of these steps (none: all)")
    out: str = _field("runs/length", "report and figure directory")


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


def _is_points_run(workdir: pathlib.Path) -> bool:
    """Whether a distillation workdir holds a 2-D (MLP) run, from its newest checkpoint; raises
    ValueError for a teacher run (its checkpoints are not a student's)."""
    newest = list(_checkpoints_by_step(workdir, ()).values())[-1]
    config = train.config_from_dict(train.read_meta(newest)["config"])
    if config.variant == "teacher":
        raise ValueError(f"{workdir} is a teacher run: pass distillation (student) workdirs")
    return train.is_points(config)


def _check_workdirs(workdirs: Sequence[pathlib.Path], *, fid: bool) -> bool:
    """Whether the runs are 2-D; raises ValueError for repeated run names (the report's keys), a
    mix of 2-D and image runs, or --fid with 2-D runs."""
    names = [w.name for w in workdirs]
    if len(set(names)) < len(names):
        raise ValueError(
            f"--workdirs repeats a run name ({names}): the report names runs by folder"
        )
    kinds = {w: _is_points_run(w) for w in workdirs}
    if len(set(kinds.values())) > 1:
        points = [w.name for w, is_points in kinds.items() if is_points]
        raise ValueError(f"--workdirs mixes 2-D runs ({points}) with image runs: report them apart")
    if fid and any(kinds.values()):
        raise ValueError("--fid is for image runs; 2-D runs are scored by w1_radius: drop --fid")
    return any(kinds.values())


def run_length(config: LengthBench) -> str:
    """The `length` subcommand: the report's Markdown (image runs: fd_mnist or FID; 2-D runs:
    `radial_w1` with the teacher's as references). Raises ValueError for unusable `--workdirs`
    (`_check_workdirs`) or 2-D runs of different teachers (whose references would collide)."""
    if not config.workdirs:
        raise ValueError("--workdirs is required: one or more train.py distillation workdirs")
    workdirs = [pathlib.Path(w) for w in config.workdirs]
    out = pathlib.Path(config.out)
    if _check_workdirs(workdirs, fid=config.fid):
        runs, configs = {}, []
        for w in workdirs:
            runs[w.name], run_config = points_length_scores(
                w, num_samples=config.num_samples, seed=config.seed, steps=config.steps
            )
            configs.append(run_config)
        teachers = {train._teacher_file(c).resolve() for c in configs}
        if len(teachers) > 1:
            raise ValueError(
                f"the runs have different teachers ({', '.join(map(str, teachers))}): report "
                "each teacher's runs separately"
            )
        references = teacher_references(
            teachers.pop(),
            num_steps=[k for c in configs for k in (c.k, c.teacher_k)],
            num_samples=config.num_samples,
            seed=config.seed,
        )
        return length_report(
            runs, metric="w1_radius", out=out, references=references, data_name="2-D points"
        )
    runs = {
        w.name: checkpoint_scores(
            w,
            num_samples=config.num_samples,
            seed=config.seed,
            fid=config.fid,
            batch_size=config.batch_size,
            steps=config.steps,
        )
        for w in workdirs
    }
    metric = "fid" if config.fid else "fd_mnist"
    return length_report(runs, metric=metric, out=out)


def run_quality(config: QualityBench) -> str:
    """The `quality` subcommand: the report's Markdown."""
    if config.jobs > 1:  # before jax starts: processes sharing one GPU must not preallocate it
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return bench_quality(config)


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
        "the MNIST teacher and distilled students scored (FID, fd_mnist, ...) and judged against "
        "the paper's claims; writes quality.md, quality.json and figures to --out",
    ),
    "length": (
        LengthBench,
        run_length,
        "a student's score at every checkpoint against the step: fd_mnist or FID (images), "
        "w1_radius (2-D runs)",
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
        train._add_options(
            commands.add_parser(name, help=help_text, description=help_text), cls, cls()
        )
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
