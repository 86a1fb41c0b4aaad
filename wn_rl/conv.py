"""Weight-normalized convolutions (Salimans & Kingma 2016, eq. 2): ``WNConv1d/2d/3d`` and
``WNConvTranspose1d/2d/3d``, one (g, v) per output channel, built on :class:`wn_rl.layers.WNLayer`.
``wn_rl.layers`` still resolves them, for imports and old pickles."""

from __future__ import annotations

import inspect
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from wn_rl.layers import WNLayer

__all__ = [
    "WNConv1d",
    "WNConv2d",
    "WNConv3d",
    "WNConvTranspose1d",
    "WNConvTranspose2d",
    "WNConvTranspose3d",
]


_CONV_HYPERPARAMETERS = (
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "transposed",
    "output_padding",
    "groups",
    "padding_mode",
    "_reversed_padding_repeated_twice",
)


class _WNConvNd(WNLayer):
    """Shared constructor of the WN convolutions: torch's own conv class parses and checks the
    arguments on the meta device (no allocation), and its hyperparameters are copied over."""

    _torch_cls: type[nn.modules.conv._ConvNd]

    def __init__(self, *args: Any, init_scale: float = 1.0, scale: str = "linear", **kwargs: Any) -> None:
        super().__init__()
        # bound against torch's own signature: device and dtype may come positionally, as torch's layers take them
        try:
            bound = inspect.signature(self._torch_cls.__init__).bind(None, *args, **kwargs)
        except TypeError as exc:
            raise TypeError(
                f"{type(self).__name__}: {exc} (the arguments are those of nn.{self._torch_cls.__name__})"
            ) from None
        arguments = {name: value for name, value in bound.arguments.items() if name != "self"}
        device = arguments.pop("device", None)
        dtype = arguments.pop("dtype", None)
        template = self._torch_cls(**arguments, device="meta")
        for name in _CONV_HYPERPARAMETERS:
            setattr(self, name, getattr(template, name))
        if self.transposed and self.groups != 1:
            raise ValueError(
                f"{type(self).__name__} does not support groups={self.groups}: with groups the per-output "
                "norm over dim 1 of a [in, out/groups, ...] weight would mix channels of different groups. "
                "Use groups=1, or a grouped WNConv2d followed by upsampling."
            )
        self._setup_wn(
            tuple(template.weight.shape),
            self.out_channels if template.bias is not None else None,
            init_scale=init_scale,
            scale=scale,
            factory={"device": device, "dtype": dtype},
        )

    def extra_repr(self) -> str:
        return self._torch_cls.extra_repr(self) + f", scale={self.scale!r}, init_scale={self.init_scale}"


class WNConv1d(_WNConvNd):
    """Weight-normalized ``nn.Conv1d``: one (g, v) per output channel (eq. 2). Args as ``nn.Conv1d``
    plus keyword-only ``init_scale`` and ``scale`` (see :class:`WNLinear`)."""

    _torch_cls = nn.Conv1d

    def forward(self, input: Tensor) -> Tensor:
        return nn.Conv1d._conv_forward(self, input, self.weight, self.bias)


class WNConv2d(_WNConvNd):
    """Weight-normalized ``nn.Conv2d``: one (g, v) per output channel (eq. 2). Args as ``nn.Conv2d``
    plus keyword-only ``init_scale`` and ``scale`` (see :class:`WNLinear`)."""

    _torch_cls = nn.Conv2d

    def forward(self, input: Tensor) -> Tensor:
        return nn.Conv2d._conv_forward(self, input, self.weight, self.bias)


class WNConv3d(_WNConvNd):
    """Weight-normalized ``nn.Conv3d``: one (g, v) per output channel (eq. 2). Args as ``nn.Conv3d``
    plus keyword-only ``init_scale`` and ``scale`` (see :class:`WNLinear`)."""

    _torch_cls = nn.Conv3d

    def forward(self, input: Tensor) -> Tensor:
        return nn.Conv3d._conv_forward(self, input, self.weight, self.bias)


_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class _WNConvTransposeNd(_WNConvNd):
    """Weight-normalized transposed convolutions: one (g, v) per output channel, i.e. the norm is taken
    per index of ``v``'s dim 1 (the weight is ``[in, out, ...]``). ``groups`` must be 1."""

    norm_dim = 1

    def forward(self, input: Tensor, output_size: list[int] | None = None) -> Tensor:
        if self.padding_mode != "zeros":
            raise ValueError(f"Only 'zeros' padding mode is supported for {type(self).__name__}")
        dims = len(self.kernel_size)
        output_padding = self._torch_cls._output_padding(
            self, input, output_size, self.stride, self.padding, self.kernel_size, dims, self.dilation
        )
        return _CONV_TRANSPOSE[dims](
            input, self.weight, self.bias, self.stride, self.padding, output_padding, self.groups, self.dilation
        )


class WNConvTranspose1d(_WNConvTransposeNd):
    """Weight-normalized ``nn.ConvTranspose1d`` (see :class:`WNConvTranspose2d`)."""

    _torch_cls = nn.ConvTranspose1d


class WNConvTranspose2d(_WNConvTransposeNd):
    """Weight-normalized ``nn.ConvTranspose2d``: one (g, v) per output channel, i.e. the norm is taken
    per index of ``v``'s dim 1 (the weight is ``[in, out, kh, kw]``). ``groups`` must be 1."""

    _torch_cls = nn.ConvTranspose2d


class WNConvTranspose3d(_WNConvTransposeNd):
    """Weight-normalized ``nn.ConvTranspose3d`` (see :class:`WNConvTranspose2d`)."""

    _torch_cls = nn.ConvTranspose3d
