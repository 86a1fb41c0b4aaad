"""The CIFAR-10 classifier of the paper's Table 1 (section 5.1), in any parameterization.

    input 3x32x32 (ZCA-whitened outside the network) -> Gaussian noise (std 0.15, training only)
    -> 3 x [3x3 conv 96, leaky ReLU 0.1] -> 2x2 max pool -> dropout 0.5
    -> 3 x [3x3 conv 192, leaky ReLU 0.1] -> 2x2 max pool -> dropout 0.5
    -> 3x3 conv 192 valid (8x8 -> 6x6), leaky ReLU -> 2 x [1x1 conv 192 (NIN), leaky ReLU]
    -> global average pool -> dense 10 -> softmax (in the loss)

Every conv goes through :class:`wn_rl.Parameterization`, so one value switches between the paper's
five parameterizations. The dense output layer uses the same weights without a normalisation layer
(``p.without_norm()``) and a data-dependent-init scale of 0.1, so the initial logits are small.
The schedule of section 5.1 is the pure function :func:`cifar_schedule`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from wn_rl.parameterization import Parameterization, ParameterizationLike

__all__ = ["GaussianNoise", "cifar_network", "cifar_schedule"]


class GaussianNoise(nn.Module):
    """Adds N(0, std^2) noise to the input in training mode; the identity in eval mode."""

    def __init__(self, std: float) -> None:
        super().__init__()
        if not std >= 0:
            raise ValueError(f"GaussianNoise std={std!r} must be >= 0")
        self.std = float(std)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.std > 0:
            return x + self.std * torch.randn_like(x)
        return x

    def extra_repr(self) -> str:
        return f"std={self.std}"


def _conv_block(p: Parameterization, n_in: int, n_out: int, kernel: int, padding: int, slope: float) -> list[nn.Module]:
    return [p.conv2d(n_in, n_out, kernel, padding=padding), nn.LeakyReLU(slope)]


def cifar_network(
    parameterization: ParameterizationLike = "weight_norm",
    *,
    widths: tuple[int, int] = (96, 192),
    noise_std: float = 0.15,
    dropout: float = 0.5,
    num_classes: int = 10,
    in_channels: int = 3,
    negative_slope: float = 0.1,
    head_init_scale: float = 0.1,
) -> nn.Sequential:
    """Table 1's network; returns logits of shape ``(N, num_classes)``.

    Args:
        parameterization: one of the names of :class:`wn_rl.Parameterization` (section 5.1 compares
            ``normal``, ``batch_norm``, ``weight_norm``, ``weight_norm+mean_only_bn``, ``mean_only_bn``).
        widths: channels of the first and the second/third stages (Table 1: 96, 192); smaller values
            give a fast model for tests.
        noise_std: std of the Gaussian input noise (Table 1: 0.15).
        dropout: dropout probability after each max pool (Table 1: 0.5).
        head_init_scale: data-dependent-init std of the logits.

    Any input of at least 12x12 works; 32x32 gives Table 1's shapes (32, 16, 8, 6, 1).
    """
    p = Parameterization.get(parameterization)
    small, large = widths
    if small < 1 or large < 1 or not 0 <= dropout < 1:
        raise ValueError(f"widths={widths} must be positive and dropout={dropout} in [0, 1)")
    layers: list[nn.Module] = [GaussianNoise(noise_std)]
    layers += _conv_block(p, in_channels, small, 3, 1, negative_slope)
    layers += _conv_block(p, small, small, 3, 1, negative_slope)
    layers += _conv_block(p, small, small, 3, 1, negative_slope)
    layers += [nn.MaxPool2d(2, 2), nn.Dropout(dropout)]
    layers += _conv_block(p, small, large, 3, 1, negative_slope)
    layers += _conv_block(p, large, large, 3, 1, negative_slope)
    layers += _conv_block(p, large, large, 3, 1, negative_slope)
    layers += [nn.MaxPool2d(2, 2), nn.Dropout(dropout)]
    layers += _conv_block(p, large, large, 3, 0, negative_slope)  # "valid": 8x8 -> 6x6
    layers += _conv_block(p, large, large, 1, 0, negative_slope)  # network-in-network
    layers += _conv_block(p, large, large, 1, 0, negative_slope)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    layers.append(p.without_norm().linear(large, num_classes, init_scale=head_init_scale))
    return nn.Sequential(*layers)


def cifar_schedule(epoch: float, *, lr: float, epochs: int, decay_start: int, beta1: float, beta1_late: float):
    """Section 5.1's Adam schedule at (fractional) ``epoch``: returns ``(learning_rate, beta1)``.

    The learning rate is ``lr`` and beta1 is ``beta1`` (0.9) before ``decay_start`` (100 of 200 epochs);
    from there beta1 is ``beta1_late`` (0.5) and the learning rate falls linearly to 0 at ``epochs``.
    """
    if epoch < decay_start:
        return lr, beta1
    remaining = max(0.0, (epochs - epoch) / max(epochs - decay_start, 1e-12))
    return lr * min(1.0, remaining), beta1_late
