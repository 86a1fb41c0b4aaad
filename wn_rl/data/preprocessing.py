"""Preprocessing used by the paper's experiments, as pure functions on tensors.

- ZCA whitening for CIFAR-10 (Table 1's first layer), fitted on the training set.
- Binarization of MNIST grey levels for the Bernoulli likelihood of the VAE and DRAW (section 5.2-5.3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ZCA", "binarize", "fit_zca", "to_unit_interval"]


@dataclass(frozen=True)
class ZCA:
    """A fitted ZCA transform: ``x -> (x - mean) @ matrix`` on flattened images (float64 fit, float32 use)."""

    mean: Tensor
    matrix: Tensor

    def __call__(self, images: Tensor) -> Tensor:
        """Whiten ``images`` of shape ``(N, C, H, W)`` (any float dtype); returns float32 of the same shape."""
        flat = images.reshape(images.shape[0], -1).float()
        if flat.shape[1] != self.mean.numel():
            raise ValueError(
                f"ZCA was fitted on {self.mean.numel()} features per image, got images of shape {tuple(images.shape)}"
            )
        mean, matrix = self.mean.to(flat.device), self.matrix.to(flat.device)
        return ((flat - mean) @ matrix).reshape(images.shape)

    def state_dict(self) -> dict[str, Tensor]:
        return {"mean": self.mean, "matrix": self.matrix}


def fit_zca(images: Tensor, regularization: float = 1e-5) -> ZCA:
    """Fit ZCA whitening: with Sigma the covariance of the centred, flattened images and
    Sigma = U diag(S) U^T, the whitening matrix is U diag(1 / sqrt(S + regularization)) U^T.

    The paper's reference code (Lasagne, CIFAR-10) used this form with regularization 1e-5 on images
    scaled to [0, 1]. Fitted in float64; the covariance of 50,000 x 3072 images takes a few seconds.
    """
    if images.dim() < 2 or images.shape[0] < 2:
        raise ValueError(f"fit_zca needs at least 2 images of shape (N, ...), got {tuple(images.shape)}")
    if not regularization > 0:
        raise ValueError(f"regularization={regularization!r} must be positive (it keeps 1/sqrt(S) finite)")
    flat = images.reshape(images.shape[0], -1).double()
    mean = flat.mean(dim=0)
    centred = flat - mean
    sigma = centred.T @ centred / flat.shape[0]
    eigenvalues, eigenvectors = torch.linalg.eigh(sigma)
    matrix = eigenvectors @ torch.diag((eigenvalues.clamp_min(0) + regularization).rsqrt()) @ eigenvectors.T
    return ZCA(mean=mean.float(), matrix=matrix.float())


def to_unit_interval(images: Tensor) -> Tensor:
    """uint8 grey levels 0..255 -> float32 in [0, 1]."""
    return images.float().div_(255.0)


def binarize(images: Tensor, mode: str, generator: torch.Generator | None = None) -> Tensor:
    """Binarize intensities in [0, 1]: ``"dynamic"`` samples x ~ Bernoulli(intensity) afresh on every call
    (the usual protocol for VAEs on MNIST), ``"threshold"`` uses intensity > 0.5."""
    if mode == "dynamic":
        return torch.bernoulli(images, generator=generator)
    if mode == "threshold":
        return (images > 0.5).to(images.dtype)
    raise ValueError(f"binarize mode={mode!r}; expected 'dynamic' or 'threshold'")
