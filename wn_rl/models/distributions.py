"""Log-densities used by the paper's generative models (sections 5.2-5.3), as pure functions.

All return per-element log-probabilities (natural log); callers sum over the dimensions of one example.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "bernoulli_log_likelihood",
    "discretized_logistic_log_likelihood",
    "gaussian_kl_standard_normal",
    "log_normal",
    "log_standard_normal",
]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def log_normal(x: Tensor, mean: Tensor, logsd: Tensor) -> Tensor:
    """log N(x; mean, exp(logsd)^2) = -log(2 pi)/2 - logsd - (x - mean)^2 / (2 exp(2 logsd))."""
    return -_HALF_LOG_2PI - logsd - 0.5 * ((x - mean) * torch.exp(-logsd)) ** 2


def log_standard_normal(x: Tensor) -> Tensor:
    """log N(x; 0, 1)."""
    return -_HALF_LOG_2PI - 0.5 * x**2


def gaussian_kl_standard_normal(mean: Tensor, logsd: Tensor) -> Tensor:
    """KL(N(mean, exp(logsd)^2) || N(0, 1)) per element: (mean^2 + exp(2 logsd) - 1)/2 - logsd."""
    return 0.5 * (mean**2 + torch.exp(2 * logsd) - 1.0) - logsd


def bernoulli_log_likelihood(x: Tensor, logits: Tensor) -> Tensor:
    """log Bernoulli(x; sigmoid(logits)) for x in {0, 1} (computed stably from the logits)."""
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none")


def discretized_logistic_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor, num_bins: int = 256) -> Tensor:
    """log P(x) for a logistic(mean, exp(log_scale)) discretized into ``num_bins`` bins on [-1, 1].

    ``x`` holds bin centres ``2k/(num_bins-1) - 1``, k = 0..num_bins-1 (pixel k of 0..255); the mass of
    bin k is CDF(x + h) - CDF(x - h) with h = 1/(num_bins-1), the outermost bins extending to -inf
    and +inf so the masses sum to 1 (the likelihood of the IAF paper's CIFAR-10 model, in the
    edge-corrected form of PixelCNN++). Differences of sigmoids are taken in log space for stability.
    """
    half_bin = 1.0 / (num_bins - 1)
    inv_scale = torch.exp(-log_scale)
    upper = inv_scale * (x - mean + half_bin)
    lower = inv_scale * (x - mean - half_bin)
    log_cdf_upper = F.logsigmoid(upper)  # log CDF(x + h), the lowest bin's mass
    log_one_minus_cdf_lower = -F.softplus(lower)  # log (1 - CDF(x - h)), the highest bin's mass
    delta = torch.sigmoid(upper) - torch.sigmoid(lower)
    # Where the two CDFs round to the same value (a bin far in a tail, or a tiny scale), use the
    # density at the bin centre times the bin width; the clamp keeps the unused branch's gradient finite.
    centre = inv_scale * (x - mean)
    log_pdf_mid = centre - log_scale - 2.0 * F.softplus(centre) + math.log(2 * half_bin)
    middle = torch.where(delta > 1e-5, torch.log(delta.clamp_min(1e-12)), log_pdf_mid)
    bottom = x < -1.0 + half_bin / 2
    top = x > 1.0 - half_bin / 2
    return torch.where(bottom, log_cdf_upper, torch.where(top, log_one_minus_cdf_lower, middle))
