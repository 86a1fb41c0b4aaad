"""Dataset loaders for the paper's experiments: CIFAR-10 python batches and MNIST IDX files from a
directory the user names, an opt-in checksum-verified download, and the paper's preprocessing."""

from wn_rl.data.cifar10 import CIFAR10_CLASSES, ImageDataset, download_cifar10, load_cifar10
from wn_rl.data.download import DatasetError, DatasetFormatError, DatasetNotFoundError
from wn_rl.data.mnist import download_mnist, load_mnist, read_idx
from wn_rl.data.preprocessing import ZCA, binarize, fit_zca, to_unit_interval

__all__ = [
    "CIFAR10_CLASSES",
    "ZCA",
    "DatasetError",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "ImageDataset",
    "binarize",
    "download_cifar10",
    "download_mnist",
    "fit_zca",
    "load_cifar10",
    "load_mnist",
    "read_idx",
    "to_unit_interval",
]
