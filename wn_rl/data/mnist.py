"""MNIST from the official IDX files (LeCun et al.), plain or gzipped, with an opt-in download.

IDX format: a 4-byte magic number (two zero bytes, a type code, the number of dimensions), then each
dimension as a big-endian int32, then the values in row-major order (big-endian for multi-byte types).
The files are ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
``t10k-labels-idx1-ubyte``, each optionally ending in ``.gz``.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from wn_rl.data.cifar10 import ImageDataset
from wn_rl.data.download import DatasetFormatError, DatasetNotFoundError, download_file

__all__ = ["MNIST_FILES", "download_mnist", "load_mnist", "read_idx"]

MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
# Official MD5s of the gzipped files (the same values torchvision checks).
MNIST_FILES = {
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}
SPLITS = {"train": "train", "test": "t10k"}
_IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (``.gz`` or not) into a numpy array, checking its header against its size."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # zlib.error: a corrupt deflate stream
        raise DatasetFormatError(f"{path}: could not read or decompress it ({exc}); download it again.") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DatasetFormatError(
            f"{path} is not an IDX file: bad magic number {raw[:4].hex()} (expected 0000 + type code + ndim, "
            "e.g. 00000803 for images)."
        )
    dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetFormatError(f"{path}: truncated header ({len(raw)} bytes for {ndim} dimensions)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetFormatError(
            f"{path}: the header says shape {shape} ({expected} bytes of data) but the file holds "
            f"{len(raw) - header}; the file is truncated or corrupt, download it again."
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find(root: Path, stem: str) -> Path:
    for folder in (root, root / "MNIST" / "raw", root / "mnist"):
        for name in (stem, f"{stem}.gz"):
            if (folder / name).is_file():
                return folder / name
    files = ", ".join(f"{name}.gz" for name in MNIST_FILES)
    raise DatasetNotFoundError(
        f"MNIST file {stem}[.gz] not found in {root} (also looked in {root / 'MNIST' / 'raw'}). Get the four "
        f"official files ({files}) from {MNIST_MIRRORS[0]} into {root}, or pass --download to the training "
        "script (download=True) to fetch and checksum-verify them."
    )


def load_mnist(root: str | Path, split: str = "train", *, download: bool = False) -> ImageDataset:
    """Load an MNIST split (``"train"``: 60,000 images, ``"test"``: 10,000) as uint8 ``(N, 1, 28, 28)``."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not an MNIST split; expected one of {sorted(SPLITS)}")
    root = Path(root)
    if download:
        download_mnist(root)
    prefix = SPLITS[split]
    images_path = _find(root, f"{prefix}-images-idx3-ubyte")
    labels_path = _find(root, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetFormatError(
            f"{images_path}: expected MNIST images, uint8 of shape (N, H, W) (28x28), got {images.dtype} "
            f"{images.shape}; download the official file again."
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise DatasetFormatError(
            f"{labels_path}: expected integer class labels (IDX type uint8), got {labels.dtype}; "
            "not an MNIST labels file, download the official one again."
        )
    if labels.shape != (images.shape[0],):
        raise DatasetFormatError(
            f"MNIST {split}: {images_path} holds {images.shape[0]} images but {labels_path} labels of shape "
            f"{labels.shape}; the files do not belong together."
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DatasetFormatError(
            f"{labels_path}: labels must lie in 0..9, got {labels.min()}..{labels.max()}; "
            "not an MNIST labels file, download the official one again."
        )
    return ImageDataset(images[:, None].copy(), labels.astype(np.int64))


def download_mnist(root: str | Path) -> Path:
    """Download the four gzipped MNIST files into ``root`` (each MD5-verified; existing good files kept)."""
    root = Path(root)
    for stem, md5 in MNIST_FILES.items():
        if (root / stem).is_file():
            continue  # an uncompressed copy is already there
        download_file([f"{mirror}{stem}.gz" for mirror in MNIST_MIRRORS], root / f"{stem}.gz", md5)
    return root
