"""The texture check at larger noise, on the CPU: FID of sample sets after one teacher re-denoising
at noise levels given as the VP sigma (data in [-1, 1]), all on equal footing (the first --n
samples against the first --n test digits).

    python experiments/redenoise.py A_samples.npz B_samples.npz --sigmas 0 0.1 0.3 --n 2000

Prints one Markdown row per set and level; FID at n = 2,000 is biased upwards against the
10,000-sample protocol, so compare rows with each other, not with the protocol's numbers.
"""

import argparse
import math
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "gpu"))

from score_run import TEACHER, redenoise  # noqa: E402

import eval as evaluation  # noqa: E402


def edm_u(sigma: float, *, shift: float, sigma_min: float = 0.002, sigma_max: float = 80.0):
    """The EDM level u whose VP noise std is `sigma` (inverse of mmd.logsnr_edm, rho = 7)."""
    lam = math.log((1.0 - sigma**2) / sigma**2)
    s = math.exp(-(lam - shift) / 2.0)
    a, b = sigma_min ** (1 / 7), sigma_max ** (1 / 7)
    return (s ** (1 / 7) - a) / (b - a)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("samples", nargs="+")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.1, 0.3])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--teacher", default=TEACHER)
    args = p.parse_args()
    real, _ = evaluation.reference_images("mnist", split="test", model_shape=(32, 32, 1))
    ref = evaluation.feature_stats(evaluation.inception_features(real[: args.n], batch_size=100))
    shift = evaluation.load_model(args.teacher)[1]["shift"]
    print("| set | sigma | u | FID (n) | seconds |\n|---|---|---|---|---|", flush=True)
    for path in args.samples:
        with np.load(path) as f:
            images, labels = f["images"][: args.n], f["labels"][: args.n]
        for sigma in args.sigmas:
            t0 = time.perf_counter()
            u = edm_u(sigma, shift=shift) if sigma else 0.0
            shown = (
                images
                if not u
                else redenoise(images, labels, u=u, teacher_path=args.teacher, seed=1)
            )
            feats = evaluation.inception_features(shown, batch_size=100)
            fid = evaluation.frechet_distance(*evaluation.feature_stats(feats), *ref)
            print(
                f"| {path} | {sigma:g} | {u:.4f} | {fid:.2f} ({args.n}) | "
                f"{time.perf_counter() - t0:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
