"""CIFAR-10 and MNIST loaders read files written in the official formats and reject corrupt ones;
the download is checksum-verified (tested with file:// URLs, no network); ZCA whitens."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from wn_rl.data import (
    DatasetError,
    DatasetFormatError,
    DatasetNotFoundError,
    binarize,
    fit_zca,
    load_cifar10,
    load_mnist,
    read_idx,
)
from wn_rl.data.download import download_file, md5sum
from wn_rl.data.synthetic import write_cifar10, write_idx, write_mnist


def _write_batch(path, data, labels):
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"x", b"labels": list(labels), b"data": data, b"filenames": []}, f, protocol=2)


@pytest.fixture
def cifar_dir(tmp_path):
    """The official layout, written by hand: five training batches of 3 images and a test batch of 2."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for name, n in [*[(f"data_batch_{i}", 3) for i in range(1, 6)], ("test_batch", 2)]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n)
        _write_batch(folder / name, data, labels)
        batches[name] = (data, labels)
    return tmp_path, batches


def test_cifar10_reads_python_batches_in_channel_major_order(cifar_dir):
    root, batches = cifar_dir
    train = load_cifar10(root, "train")
    assert train.images.shape == (15, 3, 32, 32) and train.images.dtype == np.uint8
    data, labels = batches["data_batch_2"]
    # rows are 1024 red, 1024 green, 1024 blue values, each row-major 32x32
    np.testing.assert_array_equal(train.images[3, 1, 0, :], data[0, 1024:1056])
    np.testing.assert_array_equal(train.images[3, 2, 31, 31], data[0, 3071])
    np.testing.assert_array_equal(train.labels[3:6], labels)
    test = load_cifar10(root / "cifar-10-batches-py", "test")  # the folder itself works too
    assert len(test) == 2


def test_cifar10_missing_dataset_says_where_and_how(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"cifar-10-batches-py.*--download"):
        load_cifar10(tmp_path, "train")


@pytest.mark.parametrize(
    "corrupt",
    ["truncated", "wrong_shape", "bad_label", "not_a_dict", "bad_module_name"],
)
def test_cifar10_rejects_corrupt_batches(cifar_dir, corrupt):
    root, _ = cifar_dir
    path = root / "cifar-10-batches-py" / "test_batch"
    if corrupt == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif corrupt == "wrong_shape":
        _write_batch(path, np.zeros((2, 100), dtype=np.uint8), [0, 1])
    elif corrupt == "bad_label":
        _write_batch(path, np.zeros((2, 3072), dtype=np.uint8), [0, 12])
    elif corrupt == "not_a_dict":
        path.write_bytes(pickle.dumps([1, 2, 3]))
    else:  # bit rot in the pickled numpy module path: unpickling raises ModuleNotFoundError
        raw = path.read_bytes()
        assert b"numpy" in raw
        path.write_bytes(raw.replace(b"numpy", b"nompy", 1))
    with pytest.raises(DatasetFormatError, match="test_batch"):
        load_cifar10(root, "test")


def test_cifar10_verify_rejects_files_that_are_not_the_official_ones(cifar_dir):
    root, _ = cifar_dir
    with pytest.raises(DatasetFormatError, match="checksum"):
        load_cifar10(root, "test", verify=True)


def test_cifar10_incomplete_folder_names_the_missing_file(cifar_dir):
    root, _ = cifar_dir
    (root / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_4"):
        load_cifar10(root, "train")


def _idx_bytes(array: np.ndarray) -> bytes:
    # Written independently of wn_rl.data.synthetic: magic 0x00000803 / 0x00000801, big-endian dims.
    return (
        bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.astype(np.uint8).tobytes()
    )


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_reads_idx_files(tmp_path, gz):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=7).astype(np.uint8)
    for prefix in ("train", "t10k"):
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            payload = _idx_bytes(array)
            name = tmp_path / f"{prefix}-{kind}-ubyte"
            if gz:
                name.with_name(name.name + ".gz").write_bytes(gzip.compress(payload))
            else:
                name.write_bytes(payload)
    data = load_mnist(tmp_path, "test")
    assert data.images.shape == (7, 1, 28, 28) and data.images.dtype == np.uint8
    np.testing.assert_array_equal(data.images[:, 0], images)
    np.testing.assert_array_equal(data.labels, labels)


def test_synthetic_writer_matches_the_idx_layout(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / "x-idx3-ubyte", array)
    assert path.read_bytes() == _idx_bytes(array)
    np.testing.assert_array_equal(read_idx(path), array)


@pytest.mark.parametrize("corrupt", ["magic", "truncated", "bad_gzip", "corrupt_deflate_stream"])
def test_mnist_rejects_corrupt_files(tmp_path, corrupt):
    write_mnist(tmp_path, 10, 10, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    raw = path.read_bytes()
    if corrupt == "magic":
        path.write_bytes(b"\x12\x34" + raw[2:])
    elif corrupt == "truncated":
        path.write_bytes(raw[:-5])
    elif corrupt == "bad_gzip":
        path.unlink()
        (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    else:  # a valid gzip header followed by damaged compressed data: zlib.error, not OSError
        path.unlink()
        compressed = bytearray(gzip.compress(raw))
        compressed[20:60] = bytes(b ^ 0xFF for b in compressed[20:60])
        (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(bytes(compressed))
    with pytest.raises(DatasetFormatError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path, "train")


def test_mnist_images_and_labels_must_belong_together(tmp_path):
    write_mnist(tmp_path, 10, 10, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(9, dtype=np.uint8))
    with pytest.raises(DatasetFormatError, match="do not belong together"):
        load_mnist(tmp_path, "test")


@pytest.mark.parametrize(
    ("type_code", "labels", "match"),
    [
        (0x09, np.array([-1, -5, 2], ">i1"), r"labels must lie in 0\.\.9, got -5\.\.2"),
        (0x0D, np.array([0.5, 3.7, np.nan], ">f4"), r"expected integer class labels \(IDX type uint8\), got float32"),
        (0x08, np.array([0, 10, 2], np.uint8), r"labels must lie in 0\.\.9, got 0\.\.10"),
    ],
    ids=["negative_int8", "float32", "label_10"],
)
def test_mnist_labels_must_be_integers_in_0_to_9(tmp_path, type_code, labels, match):
    """Negative int8 labels were accepted, and float32 ones cast to garbage; the error names the labels file."""
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 28, 28), dtype=np.uint8))
    header = bytes([0, 0, type_code, 1]) + struct.pack(">i", len(labels))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(header + labels.tobytes())
    with pytest.raises(DatasetFormatError, match=r"t10k-labels-idx1-ubyte: " + match):
        load_mnist(tmp_path, "test")


def test_mnist_missing_says_where_and_how(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"train-images-idx3-ubyte.*--download"):
        load_mnist(tmp_path / "nowhere", "train")


def test_download_verifies_the_checksum_and_leaves_no_partial_file(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"official bytes")
    good = md5sum(source)
    target = download_file(source.as_uri(), tmp_path / "out" / "file.bin", good)
    assert target.read_bytes() == b"official bytes"
    with pytest.raises(DatasetError, match=r"MD5.*by hand from one of file://\S+source\.bin into"):
        download_file(source.as_uri(), tmp_path / "out2" / "file.bin", "0" * 32)
    assert list((tmp_path / "out2").iterdir()) == []  # nothing that looks complete was left behind
    # an existing file with the right checksum is kept without fetching (the URL does not exist)
    assert download_file("file:///does/not/exist", target, good) == target


def test_synthetic_cifar_round_trips_through_the_loader(tmp_path):
    write_cifar10(tmp_path, n_train=20, n_test=5)
    assert len(load_cifar10(tmp_path, "train")) == 20 and len(load_cifar10(tmp_path, "test")) == 5


def test_zca_whitens_to_identity_covariance():
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(12, 12, generator=generator)
    images = (torch.randn(4000, 12, generator=generator) @ mixing).reshape(4000, 3, 2, 2)
    zca = fit_zca(images, regularization=1e-8)
    white = zca(images).reshape(4000, 12).double()
    cov = white.T @ white / 4000
    torch.testing.assert_close(cov, torch.eye(12, dtype=torch.float64), atol=1e-3, rtol=0)
    torch.testing.assert_close(zca.matrix, zca.matrix.T)  # ZCA (not PCA): the symmetric whitening matrix
    with pytest.raises(ValueError, match="fitted on 12 features"):
        zca(torch.zeros(2, 3, 4, 4))


def test_binarize_modes():
    x = torch.tensor([[0.0, 0.3, 0.7, 1.0]])
    torch.testing.assert_close(binarize(x, "threshold"), torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    samples = binarize(x.expand(20000, 4), "dynamic", torch.Generator().manual_seed(0))
    torch.testing.assert_close(samples.mean(0), x[0], atol=0.02, rtol=0)
    with pytest.raises(ValueError, match="dynamic"):
        binarize(x, "random")
