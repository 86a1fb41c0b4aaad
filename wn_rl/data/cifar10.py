"""CIFAR-10 from the official "python version" batches (Krizhevsky 2009), with an opt-in download.

The layout is the one in ``cifar-10-python.tar.gz``: a folder ``cifar-10-batches-py`` holding the
pickled batches ``data_batch_1`` ... ``data_batch_5`` (training, 10,000 images each), ``test_batch``
and ``batches.meta``. Each batch is a dict with ``b"data"`` (uint8, ``(N, 3072)``: 1024 red, 1024
green, 1024 blue values per row, row-major 32x32) and ``b"labels"`` (N ints in 0..9).
"""

from __future__ import annotations

import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wn_rl.data.download import DatasetFormatError, DatasetNotFoundError, download_file, md5sum

__all__ = ["CIFAR10_CLASSES", "CIFAR10_FOLDER", "ImageDataset", "download_cifar10", "find_cifar10", "load_cifar10"]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = ("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")
CIFAR10_FOLDER = "cifar-10-batches-py"
# Official MD5s of the extracted files (the same values torchvision checks).
CIFAR10_FILES = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
SPLITS = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_HOW_TO_GET = (
    "Get the official archive from {url} and extract it there (`tar xzf cifar-10-python.tar.gz -C {root}`), "
    "or pass --download to the training script (download=True) to fetch and checksum-verify it."
)


@dataclass(frozen=True)
class ImageDataset:
    """Images and labels held in memory: ``images`` uint8 ``(N, C, H, W)``, ``labels`` int64 ``(N,)``."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not a CIFAR-10 split; expected one of {sorted(SPLITS)}")


def find_cifar10(root: str | Path) -> Path:
    """The folder holding the batches: ``root/cifar-10-batches-py`` or ``root`` itself."""
    root = Path(root)
    for candidate in (root / CIFAR10_FOLDER, root):
        if (candidate / "test_batch").is_file() or (candidate / "data_batch_1").is_file():
            return candidate
    raise DatasetNotFoundError(
        f"CIFAR-10 not found: expected the python batches (data_batch_1..5, test_batch) in "
        f"{root / CIFAR10_FOLDER} or {root}. " + _HOW_TO_GET.format(url=CIFAR10_URL, root=root)
    )


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DatasetNotFoundError(
            f"CIFAR-10 file {path} is missing; the folder is incomplete. "
            + _HOW_TO_GET.format(url=CIFAR10_URL, root=path.parent.parent)
        )
    with open(path, "rb") as f:
        try:
            batch = pickle.load(f, encoding="bytes")
        except Exception as exc:  # unpickling corrupt bytes can raise almost anything (ImportError, LookupError, ...)
            raise DatasetFormatError(
                f"{path} is not a CIFAR-10 python batch (could not unpickle it: {exc}); "
                "re-extract the official archive."
            ) from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DatasetFormatError(f"{path}: expected a dict with b'data' and b'labels', got {keys}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetFormatError(f"{path}: b'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetFormatError(f"{path}: expected {data.shape[0]} integer labels, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DatasetFormatError(f"{path}: labels must lie in 0..9, got {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar10(
    root: str | Path, split: str = "train", *, download: bool = False, verify: bool = False
) -> ImageDataset:
    """Load a CIFAR-10 split (``"train"``: 50,000 images, ``"test"``: 10,000) from ``root``.

    Args:
        root: the directory holding ``cifar-10-batches-py`` (or the batches themselves).
        split: ``"train"`` or ``"test"``.
        download: fetch and extract the official archive into ``root`` first if it is missing
            (verified by MD5; the only path that touches the network).
        verify: check every batch file against its official MD5 before loading.
    """
    _check_split(split)
    if download:
        download_cifar10(root)
    folder = find_cifar10(root)
    images, labels = [], []
    for name in SPLITS[split]:
        path = folder / name
        if verify and path.is_file() and md5sum(path) != CIFAR10_FILES[name]:
            raise DatasetFormatError(
                f"{path} fails its checksum (MD5 {md5sum(path)} != official {CIFAR10_FILES[name]}): the file is "
                "corrupt or not the official one. Delete the folder and download again."
            )
        x, y = _read_batch(path)
        images.append(x)
        labels.append(y)
    return ImageDataset(np.concatenate(images), np.concatenate(labels))


def download_cifar10(root: str | Path) -> Path:
    """Download ``cifar-10-python.tar.gz`` into ``root``, verify it and extract it (once)."""
    root = Path(root)
    folder = root / CIFAR10_FOLDER
    if all((folder / name).is_file() for name in CIFAR10_FILES):
        return folder
    archive = download_file(CIFAR10_URL, root / CIFAR10_ARCHIVE[0], CIFAR10_ARCHIVE[1])
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(root, filter="data")
    for name, expected in CIFAR10_FILES.items():
        if md5sum(folder / name) != expected:
            raise DatasetFormatError(f"{folder / name} fails its checksum after extraction; delete {root} and retry.")
    return folder
