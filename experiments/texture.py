"""Texture of digit samples: where a student's strokes differ from the teacher's and the data's.

    python experiments/texture.py NPZ [NPZ ...] [--reference mnist-test] [--n 2000]

Each NPZ holds uint8 `images` (n, h, w, 1), as `eval.py --save-samples` writes them. For each set
(and MNIST's test digits, padded to 32x32 as the models see them) it prints:
- `black`: the share of pixels that are exactly 0 (the background of real digits is);
- `stray`: isolated bright pixels per image (above `--threshold`, with none of their 8 neighbours
  above it): specks that a rough sampler leaves;
- `hf_power`: the radially averaged power spectrum's high-frequency share (radius >= h/4), and its
  ratio to the reference's: above 1 means more fine-scale energy (noise, ragged edges) than data.
"""

import argparse
import pathlib
import sys

import numpy as np
from jaxtyping import Float, UInt8

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import data  # noqa: E402


def black_share(images: UInt8[np.ndarray, "n h w c"]) -> float:
    """Fraction of pixel values that are exactly 0."""
    return float(np.mean(images == 0))


def stray_pixels(images: UInt8[np.ndarray, "n h w 1"], *, threshold: int = 64) -> float:
    """Mean number per image of pixels above `threshold` whose 8 neighbours are all at or below it
    (outside the image counts as below)."""
    bright = images[..., 0] > threshold
    padded = np.pad(bright, ((0, 0), (1, 1), (1, 1)))
    h, w = bright.shape[1:]
    neighbours = sum(
        padded[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
        if (dy, dx) != (0, 0)
    )
    return float(np.mean(np.sum(bright & (neighbours == 0), axis=(1, 2))))


def radial_power(images: UInt8[np.ndarray, "n h w 1"]) -> Float[np.ndarray, " r"]:
    """Mean power |FFT2|^2 of the images (pixels in [0, 1], each image's mean removed) in integer
    radial bins of the centred spectrum, radius 0 .. h/2 (the corners beyond are left out)."""
    x = images[..., 0].astype(np.float64) / 255.0
    x = x - x.mean(axis=(1, 2), keepdims=True)
    power = np.mean(np.abs(np.fft.fftshift(np.fft.fft2(x), axes=(1, 2))) ** 2, axis=0)
    h, w = power.shape
    yy, xx = np.indices((h, w))
    radius = np.rint(np.hypot(yy - h // 2, xx - w // 2)).astype(int)
    inside = radius <= h // 2
    sums = np.bincount(radius[inside], weights=power[inside], minlength=h // 2 + 1)
    counts = np.bincount(radius[inside], minlength=h // 2 + 1)
    return sums / np.maximum(counts, 1)


def high_frequency_share(spectrum: Float[np.ndarray, " r"], *, start: int) -> float:
    """Share of the spectrum's power (summed over radial bins) at radius >= `start`."""
    return float(spectrum[start:].sum() / spectrum.sum())


def texture_row(images: UInt8[np.ndarray, "n h w 1"], reference_hf: float | None) -> dict:
    """The three measures of one image set (`hf_ratio` against the reference's share)."""
    hf = high_frequency_share(radial_power(images), start=images.shape[1] // 4)
    return {
        "n": int(images.shape[0]),
        "black": black_share(images),
        "stray": stray_pixels(images),
        "hf_power": hf,
        "hf_ratio": None if reference_hf is None else hf / reference_hf,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("samples", nargs="+", help="eval.py --save-samples npz files")
    p.add_argument("--n", type=int, default=2000, help="images per set (the first n)")
    args = p.parse_args()
    test = data.load(source="mnist", split="test").images[: args.n]
    ref = texture_row(test, None)
    print("| set | n | black | stray per image | high-frequency share | ratio to test digits |")
    print("|---|---|---|---|---|---|")
    print(
        f"| MNIST test | {ref['n']} | {ref['black']:.3f} | {ref['stray']:.3f} | "
        f"{ref['hf_power']:.4f} | 1 |"
    )
    for path in args.samples:
        with np.load(path) as f:
            row = texture_row(f["images"][: args.n], ref["hf_power"])
        print(
            f"| {path} | {row['n']} | {row['black']:.3f} | {row['stray']:.3f} | "
            f"{row['hf_power']:.4f} | {row['hf_ratio']:.2f} |"
        )


if __name__ == "__main__":
    main()
