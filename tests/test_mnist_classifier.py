"""Tests for mnist_classifier.py and eval.py's MNIST metrics: the shipped weights' test accuracy,
the
Fréchet distance in its features against orderings that must hold (self ~ 0 < train vs test <<
blurred),
and errors users can act on."""

import numpy as np
import pytest

import data
import eval as ev
import mnist_classifier as mc


@pytest.fixture(scope="module")
def mnist_test():
    return data.load("mnist", split="test")


@pytest.mark.network  # the MNIST download, where it is not cached
def test_shipped_classifier_accuracy_on_the_test_split(mnist_test):
    predicted = ev.mnist_classify(mnist_test.images)
    assert predicted.shape == (10_000,) and predicted.dtype == np.int32
    assert np.mean(predicted == mnist_test.labels) >= 0.99
    assert ev.label_accuracy(mnist_test.images[:500], mnist_test.labels[:500]) >= 0.98
    # 28x28 digits (padded by the classifier) and RGB copies give the same answers.
    unpadded = mnist_test.images[:200, 2:30, 2:30]
    np.testing.assert_array_equal(ev.mnist_classify(unpadded), predicted[:200])
    np.testing.assert_array_equal(
        ev.mnist_classify(np.repeat(mnist_test.images[:200], 3, axis=-1)), predicted[:200]
    )


def _blur(images: np.ndarray) -> np.ndarray:
    """A 5x5 box blur (edges replicated), back to uint8."""
    x = np.pad(images.astype(np.float64), ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
    out = sum(x[:, i : i + 32, j : j + 32] for i in range(5) for j in range(5)) / 25
    return np.round(out).astype(np.uint8)


@pytest.mark.network
def test_fd_mnist_orders_real_and_degraded_digits(mnist_test):
    test = mnist_test.images[:2000]
    train = data.load("mnist", split="train").images[:2000]
    features = ev.mnist_features(test)
    assert features.shape == (2000, mc.FEATURE_DIM)
    scale = np.trace(
        np.cov(features.astype(np.float64), rowvar=False)
    )  # FD of two unrelated sets ~ 2 x this
    assert abs(ev.fd_mnist(test, test)) < 1e-6 * scale
    real_vs_real = ev.fd_mnist(train, test)
    blurred = ev.fd_mnist(_blur(test), test)
    assert 0 < real_vs_real < 0.1 * blurred


def test_bad_images_name_the_expected_layout():
    for bad in (
        np.zeros((2, 32, 32, 1), np.float32),
        np.zeros((2, 32, 32), np.uint8),
        np.zeros((2, 32, 32, 2), np.uint8),
        np.zeros((2, 16, 16, 1), np.uint8),
    ):
        with pytest.raises(ValueError, match=r"uint8 images laid out \(n, h, w, 1\|3\)"):
            ev.mnist_features(bad)
    with pytest.raises(ValueError, match=r"uint8 images laid out \(n, h, w, 1\|3\)"):
        ev.inception_features(np.zeros((2, 32, 32, 1), np.float32))


def test_missing_or_corrupt_weights_name_the_file_and_the_command(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"missing\.eqx are missing: recreate them with `python eval\.py "
        r"train-classifier`",
    ):
        mc.load_classifier(tmp_path / "missing.eqx")
    (tmp_path / "corrupt.eqx").write_bytes(b"not weights")
    with pytest.raises(
        ValueError, match=r"corrupt\.eqx are unreadable .*`python eval\.py train-classifier`"
    ):
        mc.load_classifier(tmp_path / "corrupt.eqx")


@pytest.mark.network
def test_mnist_metrics_read_the_cached_reference(mnist_test, monkeypatch, tmp_path):
    monkeypatch.setenv(
        "MMD_CACHE_DIR", str(tmp_path)
    )  # after `mnist_test` read MNIST from the user's cache
    images, labels = mnist_test.images[:300], mnist_test.labels[:300]
    first = ev._mnist_metrics(images, labels, images, "mnist-test-subset")
    scale = np.trace(np.cov(ev.mnist_features(images).astype(np.float64), rowvar=False))
    assert abs(first["fd_mnist"]) < 1e-6 * scale and first["label_accuracy"] >= 0.98
    calls = []
    features = ev.mnist_features
    monkeypatch.setattr(ev, "mnist_features", lambda x: calls.append(len(x)) or features(x))
    second = ev._mnist_metrics(images[:100], None, images, "mnist-test-subset")
    assert calls == [100] and second["label_accuracy"] is None  # the reference came from the cache
    assert second["mnist_reference_cache"] == first["mnist_reference_cache"]
