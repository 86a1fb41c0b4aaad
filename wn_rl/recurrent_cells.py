"""Weight-normalized recurrent cells (Salimans & Kingma 2016, eq. 2): :class:`WNLSTMCell`, :class:`WNGRUCell`
and :class:`WNRNNCell`, drop-ins for ``nn.LSTMCell``, ``nn.GRUCell`` and ``nn.RNNCell``, and their base
:class:`WNRNNCellBase`. The stacks built from them are in :mod:`wn_rl.recurrent`; ``wn_rl.recurrent`` and
``wn_rl.layers`` still resolve the cells, for imports and old pickles."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from wn_rl.caching import _CachedWeights, _reuse
from wn_rl.layers import (
    _check_scale,
    _direction_and_norm,
    _fp32_weight_norm,
    _g_from_parameter,
    _parameter_from_g,
    _scale_name,
    is_count,
)

__all__ = ["WNGRUCell", "WNLSTMCell", "WNRNNCell", "WNRNNCellBase"]

# nn.LSTM's parameter names (weight_ih_l0, bias_hh_l1_reverse, weight_hr_l0, ...): read here as the cells' tensors
_CELL_TENSORS = ("weight_ih", "weight_hh", "weight_hr", "bias_ih", "bias_hh")


def _layer_weights(stack: nn.Module, layer: int, reverse: bool) -> SimpleNamespace:
    """One layer and direction of an ``nn.LSTM``/``nn.GRU``/``nn.RNN`` under a cell's parameter names
    (``weight_ih``, ..., ``weight_hr`` of a projected LSTM; None where the stack has no such tensor)."""
    suffix = f"_l{layer}{'_reverse' if reverse else ''}"
    return SimpleNamespace(**{name: getattr(stack, name + suffix, None) for name in _CELL_TENSORS})


def _check_cell_sizes(owner: str, input_size: Any, hidden_size: Any) -> None:
    """Refuse, before anything is allocated, sizes a WN cell cannot take: ``input_size`` must be an integer >= 0
    (``nn.LSTMCell`` takes 0 too) and ``hidden_size`` one >= 1, since w = g v / ||v|| needs at least one row (torch's
    fused kernel takes none at all as a division by zero that kills the process)."""
    for arg, value, least in (("input_size", input_size, 0), ("hidden_size", hidden_size, 1)):
        if not is_count(value, least):
            expected = "a positive integer" if least else "a non-negative integer"
            raise ValueError(f"{owner}: {arg}={value!r} must be {expected}")


def _check_proj_size(owner: str, proj_size: Any, hidden_size: int) -> int:
    """``proj_size`` as an int; refused, as ``nn.LSTM`` refuses it and before anything is allocated, unless
    0 <= proj_size < hidden_size (the projection maps the hidden state to fewer features)."""
    if not (is_count(proj_size, 0) and proj_size < hidden_size):
        raise ValueError(
            f"{owner}: proj_size={proj_size!r} must be an integer with 0 <= proj_size < hidden_size={hidden_size} "
            "(0 for no projection)"
        )
    return int(proj_size)


class WNRNNCellBase(_CachedWeights):
    """What the weight-normalized recurrent cells share: ``weight_ih`` and ``weight_hh`` each
    reparameterized with one g per row (eq. 2), parameters ``v_ih``, ``g_ih``, ``v_hh``, ``g_hh``,
    ``bias_ih``, ``bias_hh``; with ``scale="exp"`` ``s_ih`` and ``s_hh`` replace ``g_ih`` and ``g_hh``,
    with g = exp(s) (section 2).

    A fresh cell starts from its torch cell's own initialization written as g = ||w||, v = w (s = log ||w||
    with ``scale="exp"``): the paper keeps the standard initialization for recurrent weights (section 3) and
    data-dependent init leaves the cell alone. ``.weight_ih`` and ``.weight_hh`` are the effective weights;
    inside :func:`cached` both are computed once for a whole time loop.
    """

    parts = ("ih", "hh")
    scale: str = "linear"  # the class default serves cells pickled before the option existed (all linear)
    _plain_cls: type[nn.RNNCellBase]

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        scale: str = "linear",
        **plain_kwargs: Any,
    ) -> None:
        super().__init__()
        _check_cell_sizes(type(self).__name__, input_size, hidden_size)
        _check_scale(scale)
        plain = self._fresh_plain(input_size, hidden_size, bias, device=device, dtype=dtype, **plain_kwargs)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.scale = scale
        self._cache_depth = 0
        self._cached_weights: tuple[Tensor, ...] | None = None
        self._load_plain(plain)

    def _fresh_plain(self, input_size: int, hidden_size: int, bias: bool, **kwargs: Any) -> Any:
        """The torch cell, in torch's initialization, that a fresh cell takes its weights from."""
        return self._plain_cls(input_size, hidden_size, bias=bias, **kwargs)

    @torch.no_grad()
    def _load_plain(self, plain: Any) -> None:
        """Take ``plain``'s weights as g = ||w|| (or s = log ||w||), v = w, and its biases as they are."""
        for part in self.parts:
            v, norm = _direction_and_norm(getattr(plain, f"weight_{part}").detach())
            setattr(self, f"v_{part}", nn.Parameter(v))
            setattr(self, f"{_scale_name(self.scale)}_{part}", nn.Parameter(_parameter_from_g(norm, self.scale)))
        for part in ("ih", "hh"):  # an LSTM's projection has no bias, in torch as here
            b = getattr(plain, f"bias_{part}")
            if b is None:
                self.register_parameter(f"bias_{part}", None)
            else:
                setattr(self, f"bias_{part}", nn.Parameter(b.detach().clone()))

    def scale_parameters(self) -> tuple[nn.Parameter, ...]:
        """The stored scales in ``parts`` order: ``(g_ih, g_hh[, g_hr])``, or ``(s_ih, s_hh[, s_hr])`` for exp scale."""
        name = _scale_name(self.scale)
        return tuple(getattr(self, f"{name}_{part}") for part in self.parts)

    @property
    def g_values(self) -> tuple[Tensor, ...]:
        """The per-row scales g of (weight_ih, weight_hh[, weight_hr]) (``exp(s)`` for ``scale="exp"``)."""
        return tuple(_g_from_parameter(p, self.scale) for p in self.scale_parameters())

    def _weight_parameters(self) -> tuple[tuple[Tensor, ...], ...]:
        return tuple(zip(self._directions(), self.scale_parameters(), strict=True))

    def _directions(self) -> tuple[nn.Parameter, ...]:
        return tuple(getattr(self, f"v_{part}") for part in self.parts)

    def compute_weights(self) -> tuple[Tensor, ...]:
        """The effective (weight_ih, weight_hh[, weight_hr]), computed now."""
        return tuple(
            _fp32_weight_norm(v, g.unsqueeze(1), 0) for v, g in zip(self._directions(), self.g_values, strict=True)
        )

    def _weights(self) -> tuple[Tensor, ...]:
        if self._cache_depth:
            return _reuse(self, "_cached_weights", self._weight_parameters, self.compute_weights)
        return self.compute_weights()

    @property
    def weight_ih(self) -> Tensor:
        return self._weights()[0]

    @property
    def weight_hh(self) -> Tensor:
        return self._weights()[1]

    def _step(self, input: Tensor, hx: Any, *weights: Tensor) -> Any:
        """One step of the torch cell with the effective weights (``parts`` order); ``input``, ``hx`` batched."""
        raise NotImplementedError

    def _zero_state(self, input: Tensor) -> Any:
        return input.new_zeros(input.size(0), self.hidden_size)

    def _check_call(self, input: Tensor, hx: Any) -> None:
        """Refuse what the step's kernel would not name, before the weights are computed (``input`` 1D or 2D and
        ``hx`` as given): nothing here, torch's cell kernels check the sizes themselves."""

    def forward(self, input: Tensor, hx: Any = None) -> Any:
        if input.dim() not in (1, 2):
            raise ValueError(f"{type(self).__name__} expects a 1D or 2D input, got shape {tuple(input.shape)}")
        self._check_call(input, hx)
        batched = input.dim() == 2
        if not batched:
            input = input.unsqueeze(0)
            if hx is not None:
                hx = _map_state(hx, lambda state: state.unsqueeze(0))
        if hx is None:
            hx = self._zero_state(input)
        out = self._step(input, hx, *self._weights())
        return out if batched else _map_state(out, lambda state: state.squeeze(0))

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, bias={self.bias_ih is not None}, scale={self.scale!r}"


def _map_state(state: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``fn`` applied to a recurrent state: one tensor, or an LSTM's ``(h, c)`` (a tuple, or a list as
    ``nn.LSTMCell`` also takes)."""
    return tuple(fn(part) for part in state) if isinstance(state, (tuple, list)) else fn(state)


class WNLSTMCell(WNRNNCellBase):
    """``nn.LSTMCell`` with weight-normalized ``weight_ih`` and ``weight_hh``, one g per row (see
    :class:`WNRNNCellBase`). Args and inputs/outputs are those of ``nn.LSTMCell`` plus keyword-only
    ``scale`` (see :class:`WNLinear`); a fresh cell starts from ``nn.LSTMCell``'s init as g = ||w||, v = w.

    Keyword-only ``proj_size`` P makes it a layer of ``nn.LSTM(proj_size=P)`` (torch has no such cell, so
    :func:`wn_rl.remove_weight_norm` folds it only in a :class:`WNLSTM`): h = W_hr (o * tanh(c)) has P features,
    and ``weight_hr`` (P, hidden) is weight-normalized too (``v_hr``, ``g_hr``: one g per projected unit).
    """

    _plain_cls = nn.LSTMCell
    proj_size = 0  # the class default serves cells pickled before the option existed

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        scale: str = "linear",
        proj_size: int = 0,
    ) -> None:
        _check_cell_sizes(type(self).__name__, input_size, hidden_size)  # before proj_size, which it bounds
        proj_size = _check_proj_size(type(self).__name__, proj_size, hidden_size)
        super().__init__(input_size, hidden_size, bias, device, dtype, scale=scale, proj_size=proj_size)

    @property
    def parts(self) -> tuple[str, ...]:
        return ("ih", "hh", "hr") if self.proj_size else ("ih", "hh")

    def _fresh_plain(self, input_size: int, hidden_size: int, bias: bool, proj_size: int = 0, **factory: Any) -> Any:
        if not proj_size:
            return super()._fresh_plain(input_size, hidden_size, bias, **factory)
        return _layer_weights(nn.LSTM(input_size, hidden_size, bias=bias, proj_size=proj_size, **factory), 0, False)

    def _load_plain(self, plain: Any) -> None:
        """As :meth:`WNRNNCellBase._load_plain`; a ``weight_hr`` in ``plain`` makes this cell projected."""
        w_hr = getattr(plain, "weight_hr", None)
        self.proj_size = 0 if w_hr is None else int(w_hr.shape[0])
        super()._load_plain(plain)

    @property
    def weight_hr(self) -> Tensor:
        if not self.proj_size:
            raise AttributeError("weight_hr: this WNLSTMCell has no projection (proj_size=0)")
        return self._weights()[2]

    def _check_call(self, input: Tensor, hx: Any) -> None:
        """A projected cell's sizes, as torch's cell kernels check them (``nn.LSTMCell`` says "input has
        inconsistent input_size"): its step runs torch's LSTM kernel, whose errors name neither."""
        if not self.proj_size:
            return  # torch's lstm_cell kernel checks the sizes
        owner = f"WNLSTMCell(proj_size={self.proj_size})"
        if input.size(-1) != self.input_size:
            raise RuntimeError(
                f"{owner}: input has inconsistent input_size: got {input.size(-1)} expected {self.input_size} "
                f"(input of shape {tuple(input.shape)})"
            )
        if hx is None:
            return
        if not isinstance(hx, (tuple, list)) or len(hx) != 2 or not all(isinstance(s, Tensor) for s in hx):
            got = f"{len(hx)} items" if isinstance(hx, (tuple, list)) else type(hx).__name__
            raise ValueError(f"{owner} expects hx = (h, c), two tensors, got {got}")
        batch = tuple(input.shape[:-1])  # () for an unbatched input
        for index, (state, size) in enumerate(zip(hx, (self.proj_size, self.hidden_size), strict=True)):
            if tuple(state.shape) != (*batch, size):
                raise RuntimeError(
                    f"{owner}: hx[{index}] has shape {tuple(state.shape)}, expected {(*batch, size)}: h is "
                    f"(batch, proj_size={self.proj_size}) and c (batch, hidden_size={self.hidden_size}), both without "
                    "the batch dimension for an unbatched input"
                )

    def _zero_state(self, input: Tensor) -> tuple[Tensor, Tensor]:
        c = super()._zero_state(input)
        return (input.new_zeros(input.size(0), self.proj_size) if self.proj_size else c), c

    def _step(self, input: Tensor, hx: Any, w_ih: Tensor, w_hh: Tensor, *w_hr: Tensor) -> tuple[Tensor, Tensor]:
        if not w_hr:
            return torch._VF.lstm_cell(input, hx, w_ih, w_hh, self.bias_ih, self.bias_hh)
        # torch has no projected cell kernel: one step of its LSTM kernel (one layer, flat weights in its order)
        flat = [w_ih, w_hh, *(() if self.bias_ih is None else (self.bias_ih, self.bias_hh)), *w_hr]
        _, h, c = torch._VF.lstm(input[None], [s[None] for s in hx], flat, len(flat) == 5, 1, 0.0, False, False, False)
        return h[0], c[0]

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", proj_size={self.proj_size}" if self.proj_size else "")


class WNGRUCell(WNRNNCellBase):
    """``nn.GRUCell`` with weight-normalized ``weight_ih`` and ``weight_hh``, one g per row (see
    :class:`WNRNNCellBase`). Args and inputs/outputs are those of ``nn.GRUCell`` plus keyword-only
    ``scale``; a fresh cell starts from ``nn.GRUCell``'s init as g = ||w||, v = w.
    """

    _plain_cls = nn.GRUCell

    def _step(self, input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor) -> Tensor:
        return torch._VF.gru_cell(input, hx, w_ih, w_hh, self.bias_ih, self.bias_hh)


class WNRNNCell(WNRNNCellBase):
    """``nn.RNNCell`` (``nonlinearity`` ``"tanh"`` or ``"relu"``) with weight-normalized ``weight_ih`` and
    ``weight_hh``, one g per row (see :class:`WNRNNCellBase`). Args and inputs/outputs are those of
    ``nn.RNNCell`` plus keyword-only ``scale``; a fresh cell starts from ``nn.RNNCell``'s init as g = ||w||, v = w.
    """

    _plain_cls = nn.RNNCell
    nonlinearity: str = "tanh"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        nonlinearity: str = "tanh",
        device: Any = None,
        dtype: Any = None,
        *,
        scale: str = "linear",
    ) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"WNRNNCell: nonlinearity={nonlinearity!r} is not supported; use 'tanh' or 'relu'")
        super().__init__(input_size, hidden_size, bias, device, dtype, scale=scale, nonlinearity=nonlinearity)
        self.nonlinearity = nonlinearity

    def _step(self, input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor) -> Tensor:
        cell = torch._VF.rnn_tanh_cell if self.nonlinearity == "tanh" else torch._VF.rnn_relu_cell
        return cell(input, hx, w_ih, w_hh, self.bias_ih, self.bias_hh)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nonlinearity={self.nonlinearity!r}"
