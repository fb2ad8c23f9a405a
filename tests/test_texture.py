"""experiments/texture.py's measures against hand-made images with known answers."""

import numpy as np
import pytest

from experiments import texture


def blank(n=1, side=8):
    return np.zeros((n, side, side, 1), np.uint8)


def test_black_share_counts_exact_zeros_only():
    images = blank(2)
    images[0, 0, 0, 0], images[1, 3, 3, 0] = 1, 255  # 2 of 128 values are not exactly 0
    assert texture.black_share(images) == pytest.approx(126 / 128)


def test_stray_pixels_are_isolated_bright_ones():
    images = blank(3)
    images[0, 4, 4, 0] = 200  # one isolated speck
    images[0, 0, 0, 0] = 200  # another, in a corner (outside the image is dark)
    images[1, 2:4, 2:4, 0] = 200  # a 2x2 blob: no pixel of it is isolated
    images[2, 1, 1, 0], images[2, 2, 2, 0] = 200, 200  # diagonal neighbours are neighbours
    images[2, 6, 6, 0] = 30  # below the threshold: not bright
    assert texture.stray_pixels(images, threshold=64) == pytest.approx((2 + 0 + 0) / 3)


def test_radial_power_of_plane_waves_sits_at_their_frequency():
    side, y = 16, np.arange(16)
    for f in (1, 3, 6):
        wave = 127.5 + 127.0 * np.cos(2 * np.pi * f * y / side)
        images = np.broadcast_to(wave[:, None], (side, side)).astype(np.uint8)[None, ..., None]
        spectrum = texture.radial_power(images)
        assert spectrum.shape == (side // 2 + 1,)
        assert np.argmax(spectrum) == f
        assert spectrum[f] > 100 * np.delete(spectrum, f).max()


def test_high_frequency_share_of_a_flat_image_is_zero_and_of_a_checkerboard_is_one():
    flat = np.full((1, 8, 8, 1), 90, np.uint8)
    assert texture.radial_power(flat).sum() == 0  # the mean is removed: no power at all
    checker = ((np.indices((8, 8)).sum(0) % 2) * 255).astype(np.uint8)[None, ..., None]
    spectrum = texture.radial_power(checker)
    # the checkerboard's power is at the Nyquist corner, radius 4 * sqrt(2) > side / 2: outside the
    # bins; a stripe pattern at the Nyquist row frequency lands in the last bin
    assert spectrum.sum() == 0
    stripes = ((np.arange(8) % 2) * 255).astype(np.uint8)
    stripes = np.broadcast_to(stripes[:, None], (8, 8))[None, ..., None]
    assert texture.high_frequency_share(texture.radial_power(stripes), start=2) == pytest.approx(1)
