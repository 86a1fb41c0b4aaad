"""Small datasets written in the real CIFAR-10 and MNIST file formats, for smoke tests and CI.

Each class has its own random template; an image is its class template plus noise, so a model can
learn the labels in a few steps. The files are byte-for-byte in the official formats (pickled python
batches; big-endian IDX, optionally gzipped) and load through the ordinary loaders.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

from wn_rl.data.cifar10 import CIFAR10_CLASSES, CIFAR10_FOLDER

__all__ = ["class_templates", "write_cifar10", "write_idx", "write_mnist"]


def class_templates(num_classes: int, shape: tuple[int, ...], rng: np.random.Generator, smooth: int = 4) -> np.ndarray:
    """One random, spatially smooth template in [0, 255] per class, shape ``(num_classes, *shape)``."""
    *lead, height, width = shape
    coarse = rng.uniform(0, 255, size=(num_classes, *lead, -(-height // smooth), -(-width // smooth)))
    fine = coarse.repeat(smooth, axis=-2).repeat(smooth, axis=-1)
    return fine[..., :height, :width]


def _images(labels: np.ndarray, templates: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    images = templates[labels] + rng.normal(0.0, noise, size=(len(labels), *templates.shape[1:]))
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


def write_cifar10(
    root: str | Path, n_train: int = 100, n_test: int = 50, *, seed: int = 0, noise: float = 40.0
) -> Path:
    """Write ``root/cifar-10-batches-py`` with five training batches, ``test_batch`` and ``batches.meta``."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / CIFAR10_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    templates = class_templates(10, (3, 32, 32), rng)
    train_parts = np.array_split(np.arange(n_train), 5)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    sizes = [len(part) for part in train_parts] + [n_test]
    for name, size in zip(names, sizes, strict=True):
        labels = rng.integers(0, 10, size=size)
        data = _images(labels, templates, rng, noise).reshape(size, 3072)
        batch = {b"batch_label": name.encode(), b"labels": labels.tolist(), b"data": data,
                 b"filenames": [f"{i}.png".encode() for i in range(size)]}  # fmt: skip
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    meta = {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_cases_per_batch": 10000, b"num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return folder


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write ``array`` (uint8) as an IDX file; gzipped when ``path`` ends in ``.gz``."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    payload = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path


def write_mnist(
    root: str | Path, n_train: int = 100, n_test: int = 50, *, seed: int = 0, gz: bool = True, size: int = 28
) -> Path:
    """Write the four MNIST IDX files into ``root`` (28x28 by default; ``size`` for smaller test images)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    templates = class_templates(10, (size, size), rng)
    templates = np.where(templates > 128, 255.0, 0.0)  # stroke-like binary templates, as MNIST is mostly 0 or 255
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, size=n)
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", _images(labels, templates, rng, 30.0))
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return root
