"""The ResNet VAE with several stochastic layers and IAF used for CIFAR-10 in section 5.2.

The paper's CIFAR-10 model is the one of the manuscript it cites (Kingma, Salimans et al. 2016,
"Improved variational inference with inverse autoregressive flow", section 6.2): a ResNet VAE with
bidirectional inference. A bottom-up pass of ResNet layers computes, at every stochastic layer i,
the parameters of q(z_i | x) and a context; a top-down pass computes the prior p(z_i | z_>i) and a
correction of the posterior, samples z_i from the combined Gaussian, applies a convolutional IAF with
the context, and merges z_i back into the top-down ResNet stream. The likelihood is a discretized
logistic over the 256 pixel levels. ELBO = log p(x|z) - sum_i [log q(z_i|x, z_>i) - log p(z_i|z_>i)],
each KL term a one-sample estimate (the IAF posterior has no closed form).

Layers producing distribution parameters use the parameterization's weights without a normalisation
layer; the ResNet branches use the full parameterization. Sizes are configurable; the defaults are a
small instance (the manuscript's best model is deeper).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wn_rl.models.distributions import discretized_logistic_log_likelihood, log_normal
from wn_rl.models.iaf import IAF
from wn_rl.parameterization import Parameterization, ParameterizationLike

__all__ = ["ResNetVAE", "StochasticLayer"]


class StochasticLayer(nn.Module):
    """One bidirectional-inference layer: a ResNet layer in each pass plus a latent map z with IAF."""

    def __init__(
        self, p: Parameterization, hidden: int, z_channels: int, context: int, downsample: bool, iaf_steps: int
    ) -> None:
        super().__init__()
        head = p.without_norm()
        self.sizes = (hidden, z_channels, context)
        self.downsample = downsample
        stride = 2 if downsample else 1
        self.up_in = head.conv2d(hidden, 2 * z_channels + context + hidden, 3, stride=stride, padding=1, init_scale=0.1)
        self.up_out = p.conv2d(hidden, hidden, 3, padding=1, init_scale=0.1)
        self.down_in = head.conv2d(hidden, 4 * z_channels + context + hidden, 3, padding=1, init_scale=0.1)
        if downsample:
            self.down_out = p.conv_transpose2d(z_channels + hidden, hidden, 4, stride=2, padding=1, init_scale=0.1)
        else:
            self.down_out = p.conv2d(z_channels + hidden, hidden, 3, padding=1, init_scale=0.1)
        self.flow = IAF.for_maps(z_channels, context, [hidden], iaf_steps, p) if iaf_steps else None

    def up(self, h: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        """Bottom-up: ``(h_out, (q_mean, q_logsd, up_context))``."""
        hidden, z, context = self.sizes
        q_mean, q_logsd, up_context, h_det = self.up_in(F.elu(h)).split([z, z, context, hidden], dim=1)
        shortcut = F.avg_pool2d(h, 2) if self.downsample else h
        return shortcut + self.up_out(F.elu(h_det)), (q_mean, q_logsd, up_context)

    def down(self, h: Tensor, q: tuple[Tensor, Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """Top-down: ``(h_out, kl)`` with the per-example one-sample KL estimate (0 when sampling the prior)."""
        hidden, z_ch, context = self.sizes
        p_mean, p_logsd, r_mean, r_logsd, down_context, h_det = self.down_in(F.elu(h)).split(
            [z_ch, z_ch, z_ch, z_ch, context, hidden], dim=1
        )
        if q is None:  # generation: sample the prior
            z = p_mean + p_logsd.exp() * torch.randn_like(p_mean)
            kl = h.new_zeros(h.shape[0])
        else:
            q_mean, q_logsd, up_context = q
            mean, logsd = q_mean + r_mean, q_logsd + r_logsd
            z = mean + logsd.exp() * torch.randn_like(mean)
            log_q = log_normal(z, mean, logsd).flatten(1).sum(dim=1)
            if self.flow is not None:
                z, log_det = self.flow(z, up_context + down_context)
                log_q = log_q - log_det
            kl = log_q - log_normal(z, p_mean, p_logsd).flatten(1).sum(dim=1)
        shortcut = F.interpolate(h, scale_factor=2.0, mode="nearest") if self.downsample else h
        return shortcut + self.down_out(F.elu(torch.cat([z, h_det], dim=1))), kl


class ResNetVAE(nn.Module):
    """Hierarchical ResNet VAE with IAF posteriors and a discretized logistic likelihood.

    Args:
        parameterization: the weights of every layer.
        image_size: side of the square input (32 for CIFAR-10); divisible by 2 ** len(stages).
        in_channels: image channels.
        hidden: ResNet feature maps (IAF paper: 160).
        z_channels: latent channels per stochastic layer (IAF paper: 32).
        context: IAF context channels.
        stages: stochastic layers per stage; every stage after the first starts with a 2x subsampling.
        iaf_steps: IAF steps per stochastic layer (0: diagonal Gaussian posteriors).

    Inputs are images scaled to [-1, 1] on the 256-level grid (``2 k / 255 - 1``).
    """

    def __init__(
        self,
        parameterization: ParameterizationLike = "weight_norm",
        *,
        image_size: int = 32,
        in_channels: int = 3,
        hidden: int = 160,
        z_channels: int = 32,
        context: int = 32,
        stages: Sequence[int] = (4, 4),
        iaf_steps: int = 1,
    ) -> None:
        super().__init__()
        if not stages or min(stages) < 1 or image_size % (2 ** len(stages)):
            raise ValueError(
                f"stages={tuple(stages)} need >= 1 layer each and image_size={image_size} divisible "
                f"by 2 ** {len(stages)}"
            )
        if min(hidden, z_channels, context) < 1 or iaf_steps < 0:
            raise ValueError(
                f"hidden, z_channels, context must be positive and iaf_steps >= 0, got "
                f"{hidden}, {z_channels}, {context}, {iaf_steps}"
            )
        p = Parameterization.get(parameterization)
        self.image_shape = (in_channels, image_size, image_size)
        self.stem = p.conv2d(in_channels, hidden, 4, stride=2, padding=1)
        self.layers = nn.ModuleList(
            StochasticLayer(p, hidden, z_channels, context, downsample=(s > 0 and j == 0), iaf_steps=iaf_steps)
            for s, n in enumerate(stages)
            for j in range(n)
        )
        self.latent_units = [
            z_channels * (image_size // 2 ** (s + 1)) ** 2 for s, n in enumerate(stages) for _ in range(n)
        ]
        "latent units of each stochastic layer (for free bits)"
        top = image_size // 2 ** len(stages)
        self.h_top = nn.Parameter(torch.zeros(1, hidden, top, top))
        self.output = p.without_norm().conv_transpose2d(hidden, in_channels, 4, stride=2, padding=1, init_scale=0.1)
        self.log_scale = nn.Parameter(torch.zeros(1, in_channels, 1, 1))

    def _decode(self, batch: int, qs: list | None) -> tuple[Tensor, Tensor]:
        h = self.h_top.expand(batch, -1, -1, -1)
        kls = []
        for i in reversed(range(len(self.layers))):
            h, kl = self.layers[i].down(h, None if qs is None else qs[i])
            kls.append(kl)
        return self.output(F.elu(h)), torch.stack(kls[::-1], dim=1)

    def elbo_terms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(log p(x|z), kl)``: shapes ``(N,)`` and ``(N, n_layers)`` (one KL estimate per layer)."""
        h = self.stem(x)
        qs = []
        for layer in self.layers:
            h, q = layer.up(h)
            qs.append(q)
        mean, kl = self._decode(x.shape[0], qs)
        log_scale = self.log_scale.expand_as(mean)
        log_px_z = discretized_logistic_log_likelihood(x, mean, log_scale).flatten(1).sum(dim=1)
        return log_px_z, kl

    def elbo(self, x: Tensor) -> Tensor:
        """Per-example ELBO in nats."""
        log_px_z, kl = self.elbo_terms(x)
        return log_px_z - kl.sum(dim=1)

    def bits_per_dim(self, elbo: Tensor) -> Tensor:
        """-ELBO / (D log 2): the bound in the units the IAF paper reports (3.11 for its best model)."""
        return -elbo / (math.prod(self.image_shape) * math.log(2))

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """``n`` images from the model, in [-1, 1]: the logistic mean of each pixel, clamped."""
        mean, _ = self._decode(n, None)
        return mean.clamp(-1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.elbo(x)
