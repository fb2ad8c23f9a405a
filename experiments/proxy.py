"""Proxy validation: are fd_mnist and label accuracy (seconds on a CPU) faithful to FID (minutes)?

    python -m experiments proxy [--k 2 4 8 16 64] [--num-samples 500] [--out runs/eval-proxy]

FID, fd_mnist and label accuracy of the shipped MNIST teacher at k sampling steps (one row each,
cached, resumable), the real-vs-real floor (training vs test digits) and the rank correlation of the
proxies with FID; writes eval-proxy.md into --out (experiments/results/eval-proxy.md).
"""

import dataclasses
import json
import os
import pathlib
import time
from collections.abc import Sequence

import numpy as np
from jaxtyping import UInt8

import data
import eval as evaluation
import inception
import options
import train
from experiments import bench
from experiments.bench import TEACHER, Counts, write_json


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
    model, run, _ = train.load_checkpoint(teacher)
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
            images = bench.plain_samples(
                model,
                run.model,
                shift=run.shift,
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


@dataclasses.dataclass(frozen=True)
class ProxyBench(Counts):
    """Settings of `python -m experiments proxy`."""

    teacher: str = options.field(TEACHER, "teacher checkpoint to sample")
    k: tuple[int, ...] = options.field(
        (2, 4, 8, 16, 64), "the teacher's sampling steps, one row each"
    )
    num_samples: int = options.field(500, "samples per row")
    batch_size: int = options.field(100, "global batch of sampling and Inception")
    seed: int = options.field(0, "seed of sampling and the sample labels")
    out: str = options.field("runs/eval-proxy", "rows cache and report directory")


def run_proxy(config: ProxyBench) -> str:
    """The `proxy` subcommand: the report's Markdown."""
    return bench_proxy(
        teacher=pathlib.Path(config.teacher),
        steps=config.k,
        num_samples=config.num_samples,
        batch_size=config.batch_size,
        seed=config.seed,
        out=pathlib.Path(config.out),
    )
