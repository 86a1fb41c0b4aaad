"""The convolutional VAE of section 5.2 for MNIST, with a diagonal Gaussian or an IAF posterior.

Encoder: 3x3 conv to 16 maps, then three sequences of two ResNet blocks on 16, 32 and 32 maps with a
2x subsampling (stride-2 conv) after the first two sequences, then a dense layer of 450 units giving
q(z|x) (and, for IAF, a context h). The decoder mirrors it (dense 450, reshaped maps, ResNet blocks,
stride-2 transposed convs), ending in the logits of a Bernoulli likelihood p(x|z). The prior is
N(0, I). The evidence lower bound (ELBO) is

    log p(x) >= E_q[log p(x|z) + log p(z) - log q(z|x)],

with log q(z|x) = log N(z_0; mu, sigma) - sum_t log|det dz_t/dz_(t-1)| for the IAF posterior
(:mod:`wn_rl.models.iaf`). Every layer is built through :class:`wn_rl.Parameterization`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from wn_rl.models.distributions import (
    bernoulli_log_likelihood,
    gaussian_kl_standard_normal,
    log_normal,
    log_standard_normal,
)
from wn_rl.models.iaf import IAF
from wn_rl.parameterization import Parameterization, ParameterizationLike

__all__ = ["POSTERIORS", "ConvVAE", "ResidualBlock"]

POSTERIORS = ("diagonal", "iaf")


class ResidualBlock(nn.Module):
    """Pre-activation ResNet block (He et al. 2016): x + conv(elu(conv(elu(x)))).

    The second conv's data-dependent-init scale is ``residual_scale`` (0.1, as in the IAF and
    PixelCNN++ reference code), so each block starts close to the identity.
    """

    def __init__(self, p: Parameterization, channels: int, residual_scale: float = 0.1) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            nn.ELU(),
            p.conv2d(channels, channels, 3, padding=1),
            nn.ELU(),
            p.conv2d(channels, channels, 3, padding=1, init_scale=residual_scale),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.branch(x)


def _blocks(p: Parameterization, channels: int, n: int) -> list[nn.Module]:
    return [ResidualBlock(p, channels) for _ in range(n)]


class ConvVAE(nn.Module):
    """Section 5.2's convolutional VAE with a Bernoulli likelihood.

    Args:
        parameterization: the weights of every layer (:class:`wn_rl.Parameterization` name).
        image_size: side of the square input (28 for MNIST; divisible by 4).
        in_channels: image channels.
        widths: feature maps of the three sequences (paper: 16, 32, 32).
        blocks_per_stage: ResNet blocks per sequence (paper: 2).
        dense: units of the dense layer (paper: 450).
        z_dim: latent dimensions.
        posterior: ``"diagonal"`` or ``"iaf"``.
        iaf_steps, iaf_hidden, context_dim, forget_bias: the IAF posterior's steps, MADE hidden
            widths, context size and the sigmoid gate's bias.
    """

    def __init__(
        self,
        parameterization: ParameterizationLike = "weight_norm",
        *,
        image_size: int = 28,
        in_channels: int = 1,
        widths: Sequence[int] = (16, 32, 32),
        blocks_per_stage: int = 2,
        dense: int = 450,
        z_dim: int = 32,
        posterior: str = "iaf",
        iaf_steps: int = 2,
        iaf_hidden: Sequence[int] = (320, 320),
        context_dim: int = 64,
        forget_bias: float = 1.0,
    ) -> None:
        super().__init__()
        _check_args(image_size, widths, posterior, z_dim, dense)
        p = Parameterization.get(parameterization)
        head = p.without_norm()
        w0, w1, w2 = widths
        side = image_size // 4
        self.image_shape = (in_channels, image_size, image_size)
        self.z_dim, self.posterior = z_dim, posterior
        self.encoder = nn.Sequential(
            p.conv2d(in_channels, w0, 3, padding=1),
            *_blocks(p, w0, blocks_per_stage),
            p.conv2d(w0, w1, 3, stride=2, padding=1),
            *_blocks(p, w1, blocks_per_stage),
            p.conv2d(w1, w2, 3, stride=2, padding=1),
            *_blocks(p, w2, blocks_per_stage),
            nn.ELU(),
            nn.Flatten(),
            p.linear(w2 * side * side, dense),
            nn.ELU(),
        )
        n_heads = 2 * z_dim + (context_dim if posterior == "iaf" else 0)
        self.posterior_head = head.linear(dense, n_heads, init_scale=0.1)
        self.context_dim = context_dim if posterior == "iaf" else 0
        self.flow = (
            IAF.for_vectors(z_dim, context_dim, iaf_hidden, iaf_steps, p, forget_bias) if posterior == "iaf" else None
        )
        self.decoder = nn.Sequential(
            p.linear(z_dim, dense),
            nn.ELU(),
            p.linear(dense, w2 * side * side),
            nn.Unflatten(1, (w2, side, side)),
            *_blocks(p, w2, blocks_per_stage),
            p.conv_transpose2d(w2, w1, 4, stride=2, padding=1),
            *_blocks(p, w1, blocks_per_stage),
            p.conv_transpose2d(w1, w0, 4, stride=2, padding=1),
            *_blocks(p, w0, blocks_per_stage),
            nn.ELU(),
            head.conv2d(w0, in_channels, 3, padding=1),
        )

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """q(z_0|x): ``(mean, logsd, context)``; context is None for the diagonal posterior."""
        out = self.posterior_head(self.encoder(x))
        mean, logsd = out[:, : self.z_dim], out[:, self.z_dim : 2 * self.z_dim]
        context = out[:, 2 * self.z_dim :] if self.flow is not None else None
        return mean, logsd, context

    def decode(self, z: Tensor) -> Tensor:
        """Logits of p(x|z), shape ``(N, *image_shape)``."""
        return self.decoder(z)

    def sample_posterior(self, x: Tensor, n_samples: int = 1) -> tuple[Tensor, Tensor]:
        """``n_samples`` draws z ~ q(z|x) with their log q(z|x): shapes ``(S*N, z_dim)`` and ``(S*N,)``."""
        mean, logsd, context = self.encode(x)
        mean, logsd = mean.repeat(n_samples, 1), logsd.repeat(n_samples, 1)
        z = mean + logsd.exp() * torch.randn_like(mean)
        log_q = log_normal(z, mean, logsd).sum(dim=1)
        if self.flow is not None:
            z, log_det = self.flow(z, context.repeat(n_samples, 1))
            log_q = log_q - log_det
        return z, log_q

    def log_weights(self, x: Tensor, n_samples: int = 1) -> Tensor:
        """log p(x, z) - log q(z|x) for ``n_samples`` posterior draws per example, shape ``(S, N)``.

        Their mean is a one-sample ELBO estimate; ``logsumexp - log S`` over the samples is the
        importance-weighted bound that tends to log p(x) as S grows (Burda et al. 2016).
        """
        z, log_q = self.sample_posterior(x, n_samples)
        log_px_z = bernoulli_log_likelihood(x.repeat(n_samples, 1, 1, 1), self.decode(z)).flatten(1).sum(dim=1)
        log_pz = log_standard_normal(z).sum(dim=1)
        return (log_px_z + log_pz - log_q).view(n_samples, x.shape[0])

    def elbo(self, x: Tensor) -> Tensor:
        """Per-example ELBO in nats, shape ``(N,)`` (analytic KL for the diagonal posterior)."""
        if self.flow is not None:
            return self.log_weights(x, 1)[0]
        mean, logsd, _ = self.encode(x)
        z = mean + logsd.exp() * torch.randn_like(mean)
        log_px_z = bernoulli_log_likelihood(x, self.decode(z)).flatten(1).sum(dim=1)
        return log_px_z - gaussian_kl_standard_normal(mean, logsd).sum(dim=1)

    def importance_weighted_bound(self, x: Tensor, n_samples: int, *, max_images: int = 10_000) -> Tensor:
        """log (1/S) sum_s p(x, z_s)/q(z_s|x) per example: a tighter bound than the ELBO.

        The S x N decoder passes are made ``max_images`` images at a time (S = 1000 on a batch of 100 would
        otherwise decode 100,000 images at once, several GB of activations)."""
        per_chunk = max(1, max_images // x.shape[0])
        chunks = [self.log_weights(x, min(per_chunk, n_samples - done)) for done in range(0, n_samples, per_chunk)]
        return torch.logsumexp(torch.cat(chunks), dim=0) - math.log(n_samples)

    def forward(self, x: Tensor) -> Tensor:
        return self.elbo(x)


def _check_args(image_size: int, widths: Sequence[int], posterior: str, z_dim: int, dense: int) -> None:
    if image_size < 4 or image_size % 4:
        raise ValueError(f"image_size={image_size} must be a positive multiple of 4 (two 2x subsamplings)")
    if len(widths) != 3 or min(widths) < 1:
        raise ValueError(f"widths={tuple(widths)} must be three positive channel counts (paper: 16, 32, 32)")
    if posterior not in POSTERIORS:
        raise ValueError(f"posterior={posterior!r}; expected one of {POSTERIORS}")
    if z_dim < 1 or dense < 1:
        raise ValueError(f"z_dim={z_dim} and dense={dense} must be positive")
