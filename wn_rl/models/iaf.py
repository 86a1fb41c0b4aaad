"""Inverse autoregressive flow (Kingma, Salimans et al. 2016) with masked weight-normalized layers.

Section 5.2 replaces the VAE's diagonal Gaussian posterior by IAF. One IAF step maps z to

    [m, s] = AR(z, h);   sigma = sigmoid(s + forget_bias);   z' = sigma * z + (1 - sigma) * m

where AR is autoregressive (output i depends only on z_<i and the context h), so dz'/dz is
triangular with diagonal sigma and log|det dz'/dz| = sum(log sigma). After T steps
log q(z_T | x) = log q(z_0 | x) - sum_t sum(log sigma_t).

The autoregressive networks are MADE-style (Germain et al. 2015): each unit has a degree and a
weight is kept only where the degrees allow it. The masks are applied to ``v`` of a core
:class:`wn_rl.WNLinear` / :class:`wn_rl.WNConv2d` before normalising (w = g (v*M) / ||v*M||), or to
the weight of a plain layer, so data-dependent init and the parameterization switch work unchanged.
Normalisation layers are never used inside a flow: a batch statistic would make one example's
density depend on the others in its batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wn_rl.conv import WNConv2d
from wn_rl.layers import V_INIT_STD, WNLinear, mark_initializable
from wn_rl.parameterization import Parameterization, ParameterizationLike

__all__ = [
    "IAF",
    "MADE",
    "ConvARNet",
    "IAFStep",
    "MaskedConv2d",
    "MaskedLinear",
    "MaskedWNConv2d",
    "MaskedWNLinear",
    "conv_ar_mask",
    "linear_ar_mask",
    "masked_conv2d",
    "masked_linear",
]


def linear_ar_mask(in_degrees: Tensor, out_degrees: Tensor, *, strict: bool) -> Tensor:
    """MADE mask ``(out, in)``: 1 where output degree > input degree (``strict``) or >= (hidden layers)."""
    if strict:
        return (out_degrees[:, None] > in_degrees[None, :]).float()
    return (out_degrees[:, None] >= in_degrees[None, :]).float()


def conv_ar_mask(
    kernel_size: int, in_degrees: Tensor, out_degrees: Tensor, *, strict: bool, free_inputs: Tensor | None = None
) -> Tensor:
    """Mask ``(out, in, k, k)`` autoregressive in raster order over (row, column, channel degree).

    Kernel positions before the centre (rows above, then columns to the left) are kept for every
    channel pair; the centre follows :func:`linear_ar_mask` on the channel degrees; positions after
    the centre are dropped, except for ``free_inputs`` channels (the context), which are kept everywhere.
    """
    if kernel_size % 2 != 1:
        raise ValueError(f"an autoregressive conv needs an odd kernel size to have a centre, got {kernel_size}")
    n_out, n_in, centre = len(out_degrees), len(in_degrees), kernel_size // 2
    mask = torch.zeros(n_out, n_in, kernel_size, kernel_size)
    mask[:, :, :centre, :] = 1.0
    mask[:, :, centre, :centre] = 1.0
    mask[:, :, centre, centre] = linear_ar_mask(in_degrees, out_degrees, strict=strict)
    if free_inputs is not None:
        mask[:, free_inputs] = 1.0
    return mask


def _masked_norm_weight(v: Tensor, mask: Tensor, g: Tensor, dim: int) -> Tensor:
    masked = v * mask
    flat = masked.transpose(0, dim).flatten(1) if dim else masked.flatten(1)
    norm = torch.linalg.vector_norm(flat.float(), dim=1).clamp_min(1e-12).to(v.dtype)
    shape = [1] * v.dim()
    shape[dim] = -1
    return masked * (g / norm).view(shape)


class MaskedWNLinear(WNLinear):
    """:class:`wn_rl.WNLinear` whose effective weight is g (v*M) / ||v*M|| for a fixed 0/1 mask M."""

    def __init__(self, in_features: int, out_features: int, mask: Tensor, bias: bool = True, **kwargs) -> None:
        super().__init__(in_features, out_features, bias, **kwargs)
        self.register_buffer("mask", mask.to(self.v.dtype).clone(), persistent=False)

    def compute_weight(self) -> Tensor:
        return _masked_norm_weight(self.v, self.mask, self.g_value, 0)

    def v_norm(self) -> Tensor:
        return torch.linalg.vector_norm((self.v * self.mask).float(), dim=1)


class MaskedWNConv2d(WNConv2d):
    """:class:`wn_rl.WNConv2d` whose effective weight is g (v*M) / ||v*M|| for a fixed 0/1 mask M."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, mask: Tensor, **kwargs) -> None:
        super().__init__(in_channels, out_channels, kernel_size, **kwargs)
        self.register_buffer("mask", mask.to(self.v.dtype).clone(), persistent=False)

    def compute_weight(self) -> Tensor:
        return _masked_norm_weight(self.v, self.mask, self.g_value, 0)

    def v_norm(self) -> Tensor:
        return torch.linalg.vector_norm((self.v * self.mask).flatten(1).float(), dim=1)


def _start_like_wn(layer: nn.Module) -> None:
    # As the core's plain layers: w ~ N(0, 0.05), b = 0, so parameterizations start alike.
    with torch.no_grad():
        nn.init.normal_(layer.weight, 0.0, V_INIT_STD)
        layer.weight.mul_(layer.mask)
        if layer.bias is not None:
            layer.bias.zero_()


class MaskedLinear(nn.Linear):
    """``nn.Linear`` computing x (W*M)^T + b for a fixed 0/1 mask M (the normal parameterization)."""

    def __init__(self, in_features: int, out_features: int, mask: Tensor, bias: bool = True, **kwargs) -> None:
        super().__init__(in_features, out_features, bias, **kwargs)
        self.register_buffer("mask", mask.to(self.weight.dtype).clone(), persistent=False)
        _start_like_wn(self)

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.weight * self.mask, self.bias)


class MaskedConv2d(nn.Conv2d):
    """``nn.Conv2d`` with weight W*M for a fixed 0/1 mask M (the normal parameterization)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, mask: Tensor, **kwargs) -> None:
        super().__init__(in_channels, out_channels, kernel_size, **kwargs)
        self.register_buffer("mask", mask.to(self.weight.dtype).clone(), persistent=False)
        _start_like_wn(self)

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.weight * self.mask, self.bias)


def _flow_weights(parameterization: ParameterizationLike) -> Parameterization:
    return Parameterization.get(parameterization).without_norm()


def masked_linear(
    parameterization: ParameterizationLike, in_features: int, out_features: int, mask: Tensor, *, init_scale=1.0
) -> nn.Module:
    """A masked linear layer with the weights of ``parameterization`` (its normalisation layer dropped)."""
    p = _flow_weights(parameterization)
    if p.weight_norm:
        return MaskedWNLinear(in_features, out_features, mask, init_scale=init_scale, scale=p.scale)
    return mark_initializable(MaskedLinear(in_features, out_features, mask), init_scale)


def masked_conv2d(
    parameterization: ParameterizationLike, in_channels: int, out_channels: int, mask: Tensor, *, init_scale=1.0
) -> nn.Module:
    """A masked 'same' conv (odd square kernel from ``mask``) with the weights of ``parameterization``."""
    p = _flow_weights(parameterization)
    kernel, padding = mask.shape[-1], mask.shape[-1] // 2
    if p.weight_norm:
        return MaskedWNConv2d(
            in_channels, out_channels, kernel, mask, padding=padding, init_scale=init_scale, scale=p.scale
        )
    return mark_initializable(MaskedConv2d(in_channels, out_channels, kernel, mask, padding=padding), init_scale)


def _hidden_degrees(n_hidden: int, dim: int) -> Tensor:
    # Degrees 0..dim-1 cyclically: a degree-k unit may see inputs 1..k (and the context, degree 0).
    return torch.arange(n_hidden) % dim


class MADE(nn.Module):
    """Autoregressive MLP for vectors: ``(z, h) -> (m, s)`` with m_i, s_i depending on z_<i and h only.

    The context h enters the first layer as inputs of degree 0, so every hidden unit sees it.
    """

    def __init__(
        self,
        dim: int,
        context_dim: int,
        hidden: Sequence[int],
        parameterization: ParameterizationLike = "weight_norm",
        activation: type[nn.Module] = nn.ELU,
    ) -> None:
        super().__init__()
        if dim < 1 or context_dim < 0 or not hidden:
            raise ValueError(
                f"MADE needs dim >= 1, context_dim >= 0 and hidden layers, got {dim}, {context_dim}, {hidden}"
            )
        self.dim, self.context_dim = dim, context_dim
        degrees = torch.cat([torch.zeros(context_dim, dtype=torch.long), torch.arange(1, dim + 1)])
        layers: list[nn.Module] = []
        n_in = context_dim + dim
        for width in hidden:
            out_degrees = _hidden_degrees(width, dim)
            mask = linear_ar_mask(degrees, out_degrees, strict=False)
            layers += [masked_linear(parameterization, n_in, width, mask), activation()]
            degrees, n_in = out_degrees, width
        self.hidden = nn.Sequential(*layers)
        output_degrees = torch.arange(1, dim + 1).repeat(2)  # m then s, each with z's degrees
        mask = linear_ar_mask(degrees, output_degrees, strict=True)
        self.output = masked_linear(parameterization, n_in, 2 * dim, mask, init_scale=0.1)

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = z if context is None or self.context_dim == 0 else torch.cat([context, z], dim=1)
        m, s = self.output(self.hidden(x)).chunk(2, dim=1)
        return m, s


class ConvARNet(nn.Module):
    """Autoregressive conv net for feature maps ``z`` of shape ``(N, C, H, W)``: output (m, s) at
    (row, col, channel) depends only on z earlier in raster order and on the context maps."""

    def __init__(
        self,
        channels: int,
        context_channels: int,
        hidden: Sequence[int],
        parameterization: ParameterizationLike = "weight_norm",
        kernel_size: int = 3,
        activation: type[nn.Module] = nn.ELU,
    ) -> None:
        super().__init__()
        if channels < 1 or context_channels < 0 or not hidden:
            raise ValueError(f"ConvARNet needs channels >= 1 and hidden layers, got {channels}, {hidden}")
        self.channels, self.context_channels = channels, context_channels
        degrees = torch.cat([torch.zeros(context_channels, dtype=torch.long), torch.arange(1, channels + 1)])
        free = torch.arange(context_channels)
        layers: list[nn.Module] = []
        n_in = context_channels + channels
        for width in hidden:
            out_degrees = _hidden_degrees(width, channels)
            mask = conv_ar_mask(kernel_size, degrees, out_degrees, strict=False, free_inputs=free)
            layers += [masked_conv2d(parameterization, n_in, width, mask), activation()]
            degrees, n_in, free = out_degrees, width, None
        self.hidden = nn.Sequential(*layers)
        output_degrees = torch.arange(1, channels + 1).repeat(2)
        mask = conv_ar_mask(kernel_size, degrees, output_degrees, strict=True)
        self.output = masked_conv2d(parameterization, n_in, 2 * channels, mask, init_scale=0.1)

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = z if context is None or self.context_channels == 0 else torch.cat([context, z], dim=1)
        m, s = self.output(self.hidden(x)).chunk(2, dim=1)
        return m, s


class IAFStep(nn.Module):
    """One IAF step: z' = sigmoid(s + forget_bias) * z + (1 - sigmoid(s + forget_bias)) * m.

    ``reverse`` flips the variable order before the step (all non-batch dims), so stacked steps
    alternate their autoregressive order; a permutation has |det| = 1. A context map is flipped along
    the same spatial dims, so each position keeps the context computed for it.
    """

    def __init__(self, ar_net: nn.Module, *, forget_bias: float = 1.0, reverse: bool = False) -> None:
        super().__init__()
        self.ar_net = ar_net
        self.forget_bias = float(forget_bias)
        self.reverse = reverse

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns ``(z', log_det)`` with ``log_det`` of shape ``(N,)``."""
        dims = list(range(1, z.dim()))
        if self.reverse:
            z = z.flip(dims)
            if context is not None and len(dims) > 1:
                context = context.flip(dims[1:])
        m, s = self.ar_net(z, context)
        log_sigma = F.logsigmoid(s + self.forget_bias)
        sigma = log_sigma.exp()
        z = sigma * z + (1 - sigma) * m
        if self.reverse:
            z = z.flip(dims)
        return z, log_sigma.sum(dim=dims)


class IAF(nn.Module):
    """A stack of :class:`IAFStep` s, alternating the order; ``forward(z, h) -> (z_T, sum log det)``."""

    def __init__(self, steps: Sequence[IAFStep]) -> None:
        super().__init__()
        self.steps = nn.ModuleList(steps)

    @classmethod
    def for_vectors(cls, dim, context_dim, hidden, n_steps, parameterization="weight_norm", forget_bias=1.0) -> IAF:
        """``n_steps`` MADE steps on ``dim``-vectors with a ``context_dim`` context."""
        return cls(
            [
                IAFStep(MADE(dim, context_dim, hidden, parameterization), forget_bias=forget_bias, reverse=i % 2 == 1)
                for i in range(n_steps)
            ]
        )

    @classmethod
    def for_maps(cls, channels, context_channels, hidden, n_steps, parameterization="weight_norm", forget_bias=1.0):
        """``n_steps`` conv steps on ``channels``-channel maps with a ``context_channels`` context."""
        return cls(
            [
                IAFStep(
                    ConvARNet(channels, context_channels, hidden, parameterization),
                    forget_bias=forget_bias,
                    reverse=i % 2 == 1,
                )
                for i in range(n_steps)
            ]
        )

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        log_det = z.new_zeros(z.shape[0])
        for step in self.steps:
            z, step_log_det = step(z, context)
            log_det = log_det + step_log_det
        return z, log_det
