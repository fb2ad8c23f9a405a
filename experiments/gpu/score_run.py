"""Score one distillation run the way the learning-rate study reports it (eval.py's protocol).

    python experiments/gpu/score_run.py runs/gpu/alt-edm-1e-5 --out runs/gpu-scores/alt-edm-1e-5

1. fd_mnist on `--curve-samples` samples (seed 0) at every kept checkpoint: the curve.
2. FID, precision, recall, fd_mnist on `--num-samples` samples (seed 0) at the last checkpoint and,
   if another, at the best one by the curve (the paper reports its best; both are kept).
3. The texture check: the last checkpoint's samples are noised to a small noise level and denoised
   once by the teacher (one prediction, no guidance), then scored again. If FID falls towards the
   teacher's, the roughness sits in what the last sampling step leaves. Run on a teacher's own
   samples (`--samples NPZ`) this is the control.
Writes `summary.json` into --out, with every number and the time each part took.
"""

import argparse
import json
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import eval as evaluation  # noqa: E402
import inception  # noqa: E402
import mmd  # noqa: E402
import mnist_classifier  # noqa: E402

TEACHER = "checkpoints/mnist_teacher.eqx"


def score(checkpoint: pathlib.Path, out: pathlib.Path, **settings) -> dict:
    """eval.py's record for one checkpoint (the JSON it writes into `out` too)."""
    config = evaluation.EvalConfig(checkpoint=str(checkpoint), out=str(out), seed=0, **settings)
    record = evaluation.evaluate(config)
    keep = ("step", "fid", "precision", "recall", "fd_mnist", "label_accuracy", "num_samples")
    return {k: record.get(k) for k in keep} | {"checkpoint": str(checkpoint)}


def cached_reference(kind: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(mu, cov) of the newest cached reference statistics of `kind` (inception or mnist), as
    eval.py wrote them while scoring the checkpoints above; None if it wrote none."""
    root = inception.resolve_cache_dir()
    found = sorted(root.glob(f"reference_{kind}*.npz"), key=lambda p: p.stat().st_mtime)
    if not found:
        return None
    with np.load(found[-1]) as f:
        return f["mu"], f["cov"]


def redenoise(
    images: np.ndarray, labels: np.ndarray, *, u: float, teacher_path: str, seed: int
) -> np.ndarray:
    """Noise uint8 samples to the EDM level u (shifted as the teacher was trained) and return the
    teacher's one-step prediction as uint8 (eval's rounding)."""
    teacher, run, _ = evaluation.load_model(teacher_path)
    shift = run["shift"]  # the shift the teacher was trained with, as its config.json holds it
    lam = float(mmd.logsnr_edm(jnp.asarray(u), shift=shift))
    alpha, sigma = (float(v) for v in mmd.alpha_sigma(jnp.asarray(lam)))

    @jax.jit
    def one(x, y, key):
        z = alpha * x + sigma * jax.random.normal(key, x.shape)
        return teacher(z, jnp.full((x.shape[0],), lam), y)

    x = images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    outs = []
    for i in range(0, len(x), 1000):
        key = jax.random.fold_in(jax.random.key(seed), i)
        batch = (jnp.asarray(x[i : i + 1000]), jnp.asarray(labels[i : i + 1000]))
        outs.append(np.asarray(one(*batch, key)))
    x_hat = np.concatenate(outs).astype(np.float64)
    return np.clip(np.floor(127.5 * x_hat + 128.0), 0, 255).astype(np.uint8)


def texture_check(samples: pathlib.Path, *, levels: list[float], teacher_path: str) -> list[dict]:
    """FID and fd_mnist of the samples in `samples` (eval's npz) after one teacher re-denoising at
    each EDM level u in `levels` (u = 0: the samples as they are)."""
    with np.load(samples) as f:
        images, labels = f["images"], f["labels"]
    ref_i, ref_m = cached_reference("inception"), cached_reference("mnist")
    rows = []
    for u in levels:
        t0 = time.perf_counter()
        shown = redenoise(images, labels, u=u, teacher_path=teacher_path, seed=1) if u else images
        fid = evaluation.frechet_distance(
            *evaluation.feature_stats(evaluation.inception_features(shown, batch_size=1000)),
            *ref_i,
        )
        fdm = ref_m and evaluation.frechet_distance(
            *evaluation.feature_stats(mnist_classifier.mnist_features(shown)), *ref_m
        )
        black = float(np.mean(shown == 0))
        rows.append(
            {
                "u": u,
                "fid": fid,
                "fd_mnist": fdm,
                "black_share": black,
                "n": int(len(shown)),
                "seconds": time.perf_counter() - t0,
            }
        )
        print(f"texture u={u:g}: FID {fid:.3f} fd_mnist {fdm} black {black:.3f}", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("workdir", nargs="?", help="a train.py work directory (omit with --samples)")
    p.add_argument("--out", required=True)
    p.add_argument("--curve-samples", type=int, default=2000)
    p.add_argument("--num-samples", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--reference-count", type=int, default=None)
    p.add_argument("--levels", type=float, nargs="*", default=[1 / 32, 1 / 8])
    p.add_argument("--teacher", default=TEACHER)
    p.add_argument("--no-fid", action="store_true", help="fd_mnist only: no Inception, no texture")
    p.add_argument("--samples", help="only the texture check, on this eval.py samples npz")
    p.add_argument("--deadline", type=float, default=math.inf, help="epoch s: skip later parts")
    args = p.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = dict(batch_size=args.batch_size, reference_count=args.reference_count)
    summary: dict = {"workdir": args.workdir, "device": str(jax.devices()[0].device_kind)}
    t0 = time.perf_counter()

    def save(**parts) -> None:  # after every part: a run stopped at a deadline keeps what it did
        summary.update(parts, total_s=time.perf_counter() - t0)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))

    if args.workdir:
        ckpts = sorted(
            pathlib.Path(args.workdir, "checkpoints").glob("ckpt_*.eqx"),
            key=lambda p: int(p.stem.split("_")[1]),
        )
        if not ckpts:
            raise SystemExit(f"{args.workdir} has no checkpoints/ckpt_*.eqx to score")
        curve = []
        for c in ckpts:
            curve.append(
                score(c, out / "curve", num_samples=args.curve_samples, fid=False, **common)
            )
            save(curve=curve)
        finite = [r for r in curve if r["fd_mnist"] is not None and math.isfinite(r["fd_mnist"])]
        best = min(finite, key=lambda r: r["fd_mnist"]) if finite else curve[-1]
        full = dict(num_samples=args.num_samples, fid=not args.no_fid, **common)
        save(last=score(ckpts[-1], out / "full", save_samples=True, **full))
        if best["checkpoint"] != str(ckpts[-1]) and time.time() < args.deadline:
            save(best=score(pathlib.Path(best["checkpoint"]), out / "full", **full))
        samples = sorted((out / "full").glob("*_samples.npz"))
        args.samples = str(samples[-1]) if samples else None
    if args.samples and not args.no_fid and time.time() < args.deadline:
        save(
            texture=texture_check(
                pathlib.Path(args.samples), levels=args.levels, teacher_path=args.teacher
            )
        )
    save()
    print(json.dumps({k: v for k, v in summary.items() if k != "curve"}, indent=1), flush=True)


if __name__ == "__main__":
    main()
