"""The paper's parameterizations as one switch, and the builders that turn a choice into layers.

Section 5.1 compares five ways to parameterize the same network; ``layer_norm`` is added because
modern value-based RL uses it. Every network in wn_rl (Q-networks, SB3 policies, paper models) is
built through :meth:`Parameterization.linear` / :meth:`Parameterization.conv2d` and friends, so one
config value switches the whole network, and a per-layer override (e.g. an unnormalised head) is just
another :class:`Parameterization` passed for that layer.

=============================  ===================  ======================================
name                           weight               normalisation after the layer
=============================  ===================  ======================================
``normal``                     plain w              none
``batch_norm``                 plain w (no bias)    ``nn.BatchNorm1d/2d``
``weight_norm``                w = g v / ||v||      none
``weight_norm+mean_only_bn``   w = g v / ||v||      ``MeanOnlyBatchNorm`` (section 4)
``mean_only_bn``               plain w (no bias)    ``MeanOnlyBatchNorm``
``layer_norm``                 plain w (no bias)    ``nn.LayerNorm`` / ``nn.GroupNorm(1, C)``
=============================  ===================  ======================================

Layers followed by a normalisation get no bias of their own (the norm's bias takes its place).
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.nn.utils import skip_init

from wn_rl.conv import WNConv1d, WNConv2d, WNConvTranspose2d
from wn_rl.layers import V_INIT_STD, WNLinear, _check_scale, is_count, mark_initializable
from wn_rl.mean_only_batch_norm import MeanOnlyBatchNorm
from wn_rl.recurrent import WNGRU, WNLSTM
from wn_rl.recurrent_cells import WNGRUCell, WNLSTMCell

__all__ = ["PARAMETERIZATIONS", "NORMS", "Parameterization", "mlp", "register_parameterization"]

NORMS = (None, "batch_norm", "mean_only_bn", "layer_norm")


@dataclass(frozen=True)
class Parameterization:
    """One way to parameterize every layer of a network.

    Attributes:
        name: the registered name (``"weight_norm"``, ...).
        weight_norm: whether weights are w = g v / ||v|| (section 2).
        norm: the normalisation after each layer: ``None``, ``"batch_norm"``, ``"mean_only_bn"``
            (section 4) or ``"layer_norm"``.
        scale: ``"linear"`` (learn g) or ``"exp"`` (learn s, g = exp(s)); only used with weight norm.
    """

    name: str
    weight_norm: bool
    norm: str | None = None
    scale: str = "linear"

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r} is not one of {NORMS}")
        _check_scale(self.scale)

    @classmethod
    def get(cls, value: str | Parameterization, *, scale: str | None = None) -> Parameterization:
        """The parameterization named ``value`` (or ``value`` itself), optionally with another scale."""
        if isinstance(value, Parameterization):
            found = value
        elif isinstance(value, str) and value in PARAMETERIZATIONS:
            found = PARAMETERIZATIONS[value]
        else:
            raise ValueError(
                f"unknown parameterization {value!r}; expected one of {sorted(PARAMETERIZATIONS)} "
                "(register more with wn_rl.register_parameterization)"
            )
        return found if scale is None else found.with_scale(scale)

    @property
    def normalized(self) -> bool:
        """Whether layers are followed by a normalisation layer."""
        return self.norm is not None

    def without_norm(self) -> Parameterization:
        """The same weights without the normalisation layer (e.g. for an output head)."""
        if self.norm is None:
            return self
        return PARAMETERIZATIONS["weight_norm" if self.weight_norm else "normal"].with_scale(self.scale)

    def with_scale(self, scale: str) -> Parameterization:
        return self if scale == self.scale else replace(self, scale=scale)

    def _norm_layer(self, features: int, spatial_dims: int, factory: dict[str, Any]) -> nn.Module:
        if self.norm == "mean_only_bn":
            return MeanOnlyBatchNorm(features, **factory)
        if self.norm == "batch_norm":
            cls = nn.BatchNorm1d if spatial_dims <= 1 else nn.BatchNorm2d
            return cls(features, **factory)
        if spatial_dims == 0:
            return nn.LayerNorm(features, **factory)
        return nn.GroupNorm(1, features, **factory)

    def _finish(self, layer: nn.Module, features: int, spatial_dims: int, factory: dict[str, Any]) -> nn.Module:
        if self.norm is None:
            return layer
        return nn.Sequential(layer, self._norm_layer(features, spatial_dims, factory))

    @staticmethod
    def _plain(cls: type[nn.Module], init_scale: float, *args: Any, **kwargs: Any) -> nn.Module:
        """A plain layer started like a WN one (w ~ N(0, 0.05), b = 0, drawing the same random numbers),
        so every parameterization built from one seed computes the same function after data-dependent
        init, as in the paper's comparison (section 5.1)."""
        layer = skip_init(cls, *args, **kwargs)
        with torch.no_grad():
            nn.init.normal_(layer.weight, 0.0, V_INIT_STD)
            if layer.bias is not None:
                layer.bias.zero_()
        return mark_initializable(layer, init_scale)

    def linear(
        self, in_features: int, out_features: int, *, bias: bool = True, init_scale: float = 1.0, **factory: Any
    ) -> nn.Module:
        """A linear layer (plus its normalisation) in this parameterization."""
        bias = bias and self.norm is None
        if self.weight_norm:
            layer = WNLinear(in_features, out_features, bias, init_scale=init_scale, scale=self.scale, **factory)
        else:
            layer = self._plain(nn.Linear, init_scale, in_features, out_features, bias, **factory)
        return self._finish(layer, out_features, 0, factory)

    def _recurrent(self, plain: type[nn.Module], wn: type[nn.Module], *args: Any, **kwargs: Any) -> nn.Module:
        """``wn(*args, **kwargs)`` with this ``scale`` under weight norm, else ``plain(*args, **kwargs)``.
        Never a norm layer: recurrent layers keep their own initialization and no batch statistics
        (section 5.3)."""
        return wn(*args, **kwargs, scale=self.scale) if self.weight_norm else plain(*args, **kwargs)

    def lstm_cell(self, input_size: int, hidden_size: int, *, bias: bool = True, **factory: Any) -> nn.Module:
        """An LSTM cell in this parameterization: :class:`WNLSTMCell` under weight norm, else ``nn.LSTMCell``."""
        return self._recurrent(nn.LSTMCell, WNLSTMCell, input_size, hidden_size, bias, **factory)

    def gru_cell(self, input_size: int, hidden_size: int, *, bias: bool = True, **factory: Any) -> nn.Module:
        """A GRU cell in this parameterization: :class:`WNGRUCell` under weight norm, else ``nn.GRUCell``."""
        return self._recurrent(nn.GRUCell, WNGRUCell, input_size, hidden_size, bias, **factory)

    def lstm(self, input_size: int, hidden_size: int, num_layers: int = 1, **kwargs: Any) -> nn.Module:
        """A multi-layer LSTM in this parameterization: :class:`wn_rl.WNLSTM` (WN cells run by PyTorch's fused
        kernel) under weight norm, else ``nn.LSTM``; ``kwargs`` as ``nn.LSTM``'s (``batch_first``, ``dropout``, ...)."""
        return self._recurrent(nn.LSTM, WNLSTM, input_size, hidden_size, num_layers, **kwargs)

    def gru(self, input_size: int, hidden_size: int, num_layers: int = 1, **kwargs: Any) -> nn.Module:
        """A multi-layer GRU in this parameterization: :class:`wn_rl.WNGRU` under weight norm, else ``nn.GRU``;
        ``kwargs`` as ``nn.GRU``'s."""
        return self._recurrent(nn.GRU, WNGRU, input_size, hidden_size, num_layers, **kwargs)

    def conv1d(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        *,
        init_scale: float = 1.0,
        bias: bool = True,
        **kwargs: Any,
    ) -> nn.Module:
        """A 1-D convolution (plus its normalisation); ``kwargs`` as ``nn.Conv1d``."""
        return self._conv(nn.Conv1d, WNConv1d, 1, in_channels, out_channels, kernel_size, init_scale, bias, kwargs)

    def conv2d(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        *,
        init_scale: float = 1.0,
        bias: bool = True,
        **kwargs: Any,
    ) -> nn.Module:
        """A 2-D convolution (plus its normalisation); ``kwargs`` as ``nn.Conv2d``."""
        return self._conv(nn.Conv2d, WNConv2d, 2, in_channels, out_channels, kernel_size, init_scale, bias, kwargs)

    def conv_transpose2d(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        *,
        init_scale: float = 1.0,
        bias: bool = True,
        **kwargs: Any,
    ) -> nn.Module:
        """A 2-D transposed convolution (plus its normalisation); ``kwargs`` as ``nn.ConvTranspose2d``."""
        return self._conv(
            nn.ConvTranspose2d, WNConvTranspose2d, 2, in_channels, out_channels, kernel_size, init_scale, bias, kwargs
        )

    def _conv(
        self,
        plain_cls: type,
        wn_cls: type,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        init_scale: float,
        bias: bool,
        kwargs: dict[str, Any],
    ) -> nn.Module:
        bias = bias and self.norm is None
        if self.weight_norm:
            layer = wn_cls(
                in_channels, out_channels, kernel_size, bias=bias, init_scale=init_scale, scale=self.scale, **kwargs
            )
        else:
            layer = self._plain(plain_cls, init_scale, in_channels, out_channels, kernel_size, bias=bias, **kwargs)
        factory = {k: kwargs[k] for k in ("device", "dtype") if k in kwargs}
        return self._finish(layer, out_channels, spatial_dims, factory)

    def __str__(self) -> str:
        return self.name if self.scale == "linear" else f"{self.name}(scale={self.scale})"


PARAMETERIZATIONS: dict[str, Parameterization] = {}


def register_parameterization(parameterization: Parameterization) -> Parameterization:
    """Make ``parameterization`` available by name everywhere a parameterization is accepted."""
    if parameterization.name in PARAMETERIZATIONS:
        raise ValueError(f"a parameterization named {parameterization.name!r} is already registered")
    PARAMETERIZATIONS[parameterization.name] = parameterization
    return parameterization


for _p in (
    Parameterization("normal", weight_norm=False),
    Parameterization("batch_norm", weight_norm=False, norm="batch_norm"),
    Parameterization("weight_norm", weight_norm=True),
    Parameterization("weight_norm+mean_only_bn", weight_norm=True, norm="mean_only_bn"),
    Parameterization("mean_only_bn", weight_norm=False, norm="mean_only_bn"),
    Parameterization("layer_norm", weight_norm=False, norm="layer_norm"),
):
    register_parameterization(_p)

ParameterizationLike = str | Parameterization


def mlp(
    sizes: Sequence[int],
    parameterization: ParameterizationLike = "weight_norm",
    activation: Callable[[], nn.Module] = nn.ReLU,
    *,
    init_scales: Sequence[float] | float = 1.0,
    overrides: Mapping[int, ParameterizationLike] | None = None,
    activate_last: bool = False,
    **factory: Any,
) -> nn.Sequential:
    """A multilayer perceptron ``sizes[0] -> ... -> sizes[-1]`` in one parameterization.

    Args:
        sizes: layer widths, input first; at least two.
        parameterization: the default for every layer.
        activation: factory of the nonlinearity placed between layers.
        init_scales: one data-dependent-init target std for all layers, or one per layer.
        overrides: per-layer parameterization by layer index (negative indices count from the end),
            e.g. ``{-1: "weight_norm"}`` for a head without mean-only BN.
        activate_last: also put the activation after the last layer.
    """
    if len(sizes) < 2:
        raise ValueError(f"mlp needs at least an input and an output size, got sizes={list(sizes)}")
    widths = list(sizes)[1:]
    if not all(is_count(w) for w in widths):
        raise ValueError(
            f"mlp: sizes={list(sizes)} must give every layer's width (all but the input size) as a positive "
            "integer, e.g. sizes=[4, 64, 2]; leave out a layer rather than give it 0 units"
        )
    n_layers = len(sizes) - 1
    scales = [float(init_scales)] * n_layers if isinstance(init_scales, numbers.Real) else list(init_scales)
    if len(scales) != n_layers:
        raise ValueError(f"init_scales has {len(scales)} entries for {n_layers} layers")
    default = Parameterization.get(parameterization)
    chosen = {i: default for i in range(n_layers)}
    for index, value in (overrides or {}).items():
        if isinstance(index, bool) or not isinstance(index, numbers.Integral):
            raise ValueError(
                f"override key {index!r} must be an integer layer index (0 the first layer, -1 the last), e.g. "
                "overrides={-1: 'normal'} for an unnormalised head"
            )
        if not -n_layers <= index < n_layers:
            raise ValueError(f"override index {index} is out of range for {n_layers} layers")
        chosen[index % n_layers] = Parameterization.get(value)
    modules: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        modules.append(chosen[i].linear(n_in, n_out, init_scale=scales[i], **factory))
        if i < n_layers - 1 or activate_last:
            modules.append(activation())
    return nn.Sequential(*modules)
