"""Mean-only batch normalization (Salimans & Kingma 2016, section 4, eq. 7-8): :class:`MeanOnlyBatchNorm`.
``wn_rl.layers`` still resolves it, for imports and old pickles."""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["MeanOnlyBatchNorm"]


class _MeanOnlyBatchNormFn(torch.autograd.Function):
    """t~ = t - mu[t] + b with the gradient of eq. (8), grad_t = grad_t~ - mu[grad_t~], computed from one
    reduction that also gives grad_b (autograd would reduce twice and add a full-size tensor). The backward
    is linear in the incoming gradient and made of differentiable ops, so double backward (gradient
    penalties) works: the second derivative of this linear map is zero."""

    @staticmethod
    def forward(ctx: Any, input: Tensor, bias: Tensor, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        dims = [0, *range(2, input.dim())]
        mean = input.mean(dim=dims)
        ctx.dims, ctx.shape, ctx.count = dims, shape, input.numel() // input.shape[1]
        ctx.mark_non_differentiable(mean)
        return input - (mean - bias).view(shape), mean

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor, _grad_mean: Tensor | None) -> tuple[Tensor, Tensor, None]:
        total = grad_output.sum(dim=ctx.dims)
        return grad_output - (total / ctx.count).view(ctx.shape), total, None


class MeanOnlyBatchNorm(nn.Module):
    """Mean-only batch normalization (section 4, eq. 7-8): t~ = t - mu[t] + b.

    In training the minibatch mean over every dim but the channel dim (1) is subtracted and a running
    average kept (``running_mean <- (1 - momentum) running_mean + momentum mu``); in eval the running
    mean is subtracted. An empty batch (no elements) leaves the running mean as it is, as in ``nn.BatchNorm``.
    Autograd through the batch mean gives eq. (8): the backpropagated gradient is centred. Inputs are ``(N, C)``,
    ``(N, C, L)`` or ``(N, C, H, W)``. The buffer is named ``running_mean`` so stable-baselines3 copies it to target
    networks.
    """

    def __init__(self, num_features: int, momentum: float = 0.1, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0.0 <= momentum <= 1.0:
            raise ValueError(
                f"momentum={momentum!r} must be a number in [0, 1] (weight of the new batch mean); a cumulative "
                "average (nn.BatchNorm's momentum=None) is not supported"
            )
        self.num_features = num_features
        self.momentum = momentum
        self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))
        self.register_buffer("running_mean", torch.zeros(num_features, device=device, dtype=dtype))

    def _shape(self, input: Tensor) -> tuple[int, ...]:
        if input.dim() < 2 or input.shape[1] != self.num_features:
            raise ValueError(
                f"MeanOnlyBatchNorm({self.num_features}) expects input of shape (N, {self.num_features}, ...), "
                f"got {tuple(input.shape)}"
            )
        return (1, self.num_features) + (1,) * (input.dim() - 2)

    def forward(self, input: Tensor) -> Tensor:
        shape = self._shape(input)
        # an empty batch has no mean: as nn.BatchNorm does, it comes back (empty) and the running mean stays
        if not self.training or input.numel() == 0:
            return input - (self.running_mean - self.bias).view(shape)
        output, mean = _MeanOnlyBatchNormFn.apply(input, self.bias, shape)
        with torch.no_grad():
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
        return output

    def extra_repr(self) -> str:
        return f"{self.num_features}, momentum={self.momentum}"
