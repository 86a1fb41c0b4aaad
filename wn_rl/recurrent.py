"""Weight-normalized recurrent layers: the cells (:class:`WNLSTMCell`, :class:`WNGRUCell`,
:class:`WNRNNCell`) and drop-ins for ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` built from them.

The paper's point is that weight normalization, unlike batch normalization, works in recurrent
networks (sections 1 and 5.3): it adds no dependence between examples or time steps. Each layer and
direction here is a weight-normalized cell (:class:`wn_rl.WNLSTMCell`, :class:`wn_rl.WNGRUCell`,
:class:`wn_rl.WNRNNCell`) holding g, v and the biases; a call computes every effective weight once and runs
PyTorch's fused recurrent kernel with them (the CPU's, or cuDNN's), as ``nn.LSTM`` runs it with its own
weights. So they take what the torch modules take (multiple layers, ``bias``, ``batch_first``,
``dropout``, ``bidirectional``, unbatched input and ``PackedSequence``), except an LSTM's ``proj_size``,
and return the same outputs from the same weights. :func:`wn_rl.weight_norm` converts the torch modules
into them and :func:`wn_rl.remove_weight_norm` folds them back.
"""

from __future__ import annotations

import numbers
import re
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from wn_rl.layers import (
    _CachedWeights,
    _check_scale,
    _direction_and_norm,
    _fp32_weight_norm,
    _g_from_parameter,
    _lacks_graph,
    _parameter_from_g,
    _scale_name,
)

__all__ = [
    "WNGRU",
    "WNLSTM",
    "WNRNN",
    "WNGRUCell",
    "WNLSTMCell",
    "WNRNNBase",
    "WNRNNCell",
    "WNRNNCellBase",
]

# nn.LSTM's parameter names (weight_ih_l0, bias_hh_l1_reverse, ...): read here as the cells' tensors
_TORCH_NAME = re.compile(r"(weight|bias)_(ih|hh)_l(\d+)(_reverse)?")

State = tuple[Tensor, ...]  # (h,) or an LSTM's (h, c), each (batch, hidden)


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
        _check_scale(scale)
        plain = self._plain_cls(input_size, hidden_size, bias=bias, device=device, dtype=dtype, **plain_kwargs)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.scale = scale
        self._cache_depth = 0
        self._cached_weights: tuple[Tensor, Tensor] | None = None
        self._load_plain(plain)

    @torch.no_grad()
    def _load_plain(self, plain: nn.RNNCellBase) -> None:
        """Take ``plain``'s weights as g = ||w|| (or s = log ||w||), v = w, and its biases as they are."""
        for part in self.parts:
            v, norm = _direction_and_norm(getattr(plain, f"weight_{part}").detach())
            setattr(self, f"v_{part}", nn.Parameter(v))
            setattr(self, f"{_scale_name(self.scale)}_{part}", nn.Parameter(_parameter_from_g(norm, self.scale)))
            b = getattr(plain, f"bias_{part}")
            if b is None:
                self.register_parameter(f"bias_{part}", None)
            else:
                setattr(self, f"bias_{part}", nn.Parameter(b.detach().clone()))

    def scale_parameters(self) -> tuple[nn.Parameter, nn.Parameter]:
        """The stored scales of (weight_ih, weight_hh): ``(g_ih, g_hh)``, or ``(s_ih, s_hh)`` for exp scale."""
        name = _scale_name(self.scale)
        return getattr(self, f"{name}_ih"), getattr(self, f"{name}_hh")

    @property
    def g_values(self) -> tuple[Tensor, Tensor]:
        """The per-row scales g of (weight_ih, weight_hh) (``exp(s)`` for ``scale="exp"``)."""
        ih, hh = (_g_from_parameter(p, self.scale) for p in self.scale_parameters())
        return ih, hh

    def compute_weights(self) -> tuple[Tensor, Tensor]:
        """The effective (weight_ih, weight_hh), computed now."""
        g_ih, g_hh = self.g_values
        return _fp32_weight_norm(self.v_ih, g_ih.unsqueeze(1), 0), _fp32_weight_norm(self.v_hh, g_hh.unsqueeze(1), 0)

    def _weights(self) -> tuple[Tensor, Tensor]:
        if self._cache_depth:
            if self._cached_weights is None or any(
                _lacks_graph(w, v, scale)
                for w, v, scale in zip(
                    self._cached_weights, (self.v_ih, self.v_hh), self.scale_parameters(), strict=True
                )
            ):
                self._cached_weights = self.compute_weights()
            return self._cached_weights
        return self.compute_weights()

    @property
    def weight_ih(self) -> Tensor:
        return self._weights()[0]

    @property
    def weight_hh(self) -> Tensor:
        return self._weights()[1]

    def _step(self, input: Tensor, hx: Any, w_ih: Tensor, w_hh: Tensor) -> Any:
        """One step of the torch cell with the effective weights; ``input`` and ``hx`` batched."""
        raise NotImplementedError

    def _zero_state(self, input: Tensor) -> Any:
        return input.new_zeros(input.size(0), self.hidden_size)

    def forward(self, input: Tensor, hx: Any = None) -> Any:
        if input.dim() not in (1, 2):
            raise ValueError(f"{type(self).__name__} expects a 1D or 2D input, got shape {tuple(input.shape)}")
        batched = input.dim() == 2
        if not batched:
            input = input.unsqueeze(0)
            if hx is not None:
                hx = _map_state(hx, lambda state: state.unsqueeze(0))
        if hx is None:
            hx = self._zero_state(input)
        out = self._step(input, hx, *self._weights())
        return out if batched else _map_state(out, lambda state: state.squeeze(0))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cached_weights": None, "_cache_depth": 0}

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
    """

    _plain_cls = nn.LSTMCell

    def _zero_state(self, input: Tensor) -> tuple[Tensor, Tensor]:
        zeros = super()._zero_state(input)
        return zeros, zeros

    def _step(self, input: Tensor, hx: tuple[Tensor, Tensor], w_ih: Tensor, w_hh: Tensor) -> tuple[Tensor, Tensor]:
        return torch._VF.lstm_cell(input, hx, w_ih, w_hh, self.bias_ih, self.bias_hh)


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


def _run_kernel(name: str, *args: Any) -> tuple[Tensor, ...]:
    """PyTorch's recurrent kernel ``torch._VF.<name>(*args)`` (``lstm``, ``gru``, ``rnn_tanh``, ``rnn_relu``).
    On CUDA without the warning cuDNN gives when it copies the weights into one buffer: ours are computed
    anew at every call, so that copy is expected (one more pass over them)."""
    kernel = getattr(torch._VF, name)
    if not args[0].is_cuda or torch.compiler.is_compiling():  # Dynamo cannot trace warnings filters
        return kernel(*args)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "RNN module weights are not part of single contiguous chunk")
        return kernel(*args)


# torch.compile leaves nn.LSTM/GRU/RNN to eager (Dynamo's allow_rnn is off by default: inductor fails on the
# CPU's recurrent kernel, torch 2.13); these modules do the same for their kernel, and the weights are compiled
_run_kernel_eagerly = torch.compiler.disable(_run_kernel)


class WNRNNBase(nn.Module):
    """What :class:`WNLSTM`, :class:`WNGRU` and :class:`WNRNN` share: a stack of weight-normalized cells,
    ``num_layers`` deep and one or two directions wide, in ``cells`` (index ``layer * num_directions +
    direction``, the order of the torch module's ``h_n``).

    Same attributes as the torch modules: ``input_size``, ``hidden_size``, ``num_layers``, ``bias``,
    ``batch_first``, ``dropout``, ``bidirectional``; ``weight_ih_l0``, ``bias_hh_l1_reverse``, ... read the
    matching cell's effective weight (computed) and bias (the parameter itself, so in-place changes such
    as a forget-gate bias of 1 take effect). Keyword-only ``scale``: the cells' ``"linear"`` g or ``"exp"``
    g = exp(s).

    Each cell starts from the torch cell's initialization (g = ||w||, v = w): the paper keeps the standard
    initialization for recurrent weights and data-dependent init leaves cells alone.
    """

    _cell_cls: type[WNRNNCellBase]
    _has_cell_state = False  # an LSTM's state is (h, c)
    _kernel: str  # the torch._VF function that runs the whole stack
    bidirectional = False  # the class default serves WNLSTMs pickled before the option existed (one direction)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: Any = None,
        dtype: Any = None,
        *,
        scale: str = "linear",
        **cell_kwargs: Any,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        sizes = {"input_size": input_size, "hidden_size": hidden_size, "num_layers": num_layers}
        for arg, value in sizes.items():  # any integer type (nn.LSTM takes num_layers=np.int64(2)), stored as int
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: {arg}={value!r} must be a positive integer")
        input_size, hidden_size, num_layers = (int(value) for value in sizes.values())
        if not 0.0 <= dropout <= 1.0:  # as torch's: 1 drops every output between layers, and is allowed
            raise ValueError(f"{name}: dropout={dropout!r} must lie in [0, 1]")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bool(bidirectional)
        directions = self.num_directions
        self.cells = nn.ModuleList(
            self._cell_cls(
                input_size if layer == 0 else hidden_size * directions,
                hidden_size,
                bias,
                device=device,
                dtype=dtype,
                scale=scale,
                **cell_kwargs,
            )
            for layer in range(num_layers)
            for _ in range(directions)
        )

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def scale(self) -> str:
        return self.cells[0].scale

    def cell(self, layer: int, reverse: bool = False) -> WNRNNCellBase:
        """The cell of ``layer`` (from 0) running forward in time, or backward with ``reverse``."""
        return self.cells[layer * self.num_directions + int(reverse)]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            match = _TORCH_NAME.fullmatch(name)
            if match is None:
                raise
            kind, part, layer, reverse = match.groups()
            if int(layer) >= self.num_layers or (reverse and not self.bidirectional):
                raise
            return getattr(self.cell(int(layer), bool(reverse)), f"{kind}_{part}")

    def flatten_parameters(self) -> None:
        """Nothing to do: the cells' weights are computed per call, there is no flat cuDNN buffer. Here so
        that code written for the torch module (which calls it after ``.to()`` or in ``forward``) runs."""

    def _states(self, hx: Any, batch: int, unbatched: bool, reference: Tensor) -> State:
        """``hx`` as a tuple of ``(num_layers * num_directions, batch, hidden)`` tensors (zeros if None)."""
        shape = (self.num_layers * self.num_directions, batch, self.hidden_size)
        if hx is None:
            zeros = reference.new_zeros(shape)
            return (zeros, zeros) if self._has_cell_state else (zeros,)
        states = tuple(hx) if self._has_cell_state else (hx,)
        names = ("h_0", "c_0") if self._has_cell_state else ("h_0",)
        if len(states) != len(names):
            raise ValueError(f"{type(self).__name__} expects hx = ({', '.join(names)}), got {len(states)} tensors")
        expected = shape[::2] if unbatched else shape
        for name, state in zip(names, states, strict=True):
            if not isinstance(state, Tensor) or tuple(state.shape) != expected:
                got = tuple(state.shape) if isinstance(state, Tensor) else type(state).__name__
                raise ValueError(f"{type(self).__name__}: {name} has shape {got}, expected {expected}")
        return tuple(s.unsqueeze(1) for s in states) if unbatched else states

    def _checked(self, input: Tensor) -> tuple[Tensor, bool]:
        """A padded ``input`` with its batch dimension (added if it was unbatched), and whether it was."""
        name = type(self).__name__
        if input.dim() not in (2, 3) or input.shape[-1] != self.input_size:
            layout = "(N, L, {0})" if self.batch_first else "(L, N, {0})"
            raise ValueError(
                f"{name} expects input of shape {layout.format(self.input_size)} (or unbatched "
                f"(L, {self.input_size}), or a PackedSequence), got {tuple(input.shape)}"
            )
        unbatched = input.dim() == 2
        if unbatched:
            input = input.unsqueeze(0 if self.batch_first else 1)
        if input.shape[1 if self.batch_first else 0] == 0:
            raise ValueError(f"{name} expects a sequence of at least one step, got length 0")
        return input, unbatched

    def _flat_weights(self) -> list[Tensor]:
        """The effective weights and the biases in the torch module's ``_flat_weights`` order (per layer and
        direction: ``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``)."""
        flat = []
        for cell in self.cells:
            flat.extend(cell._weights())
            if self.bias:
                flat.extend((cell.bias_ih, cell.bias_hh))
        return flat

    def _fused(self, input: Tensor, batch_sizes: Tensor | None, states: State) -> tuple[Tensor, State]:
        """PyTorch's fused recurrent kernel (the CPU's, or cuDNN's) run with the effective weights, as
        ``nn.LSTM.forward`` runs it with its own: the same outputs from the same weights, at its speed."""
        hx = states if self._has_cell_state else states[0]
        options = (self.bias, self.num_layers, self.dropout, self.training, self.bidirectional)
        run = _run_kernel if getattr(torch._dynamo.config, "allow_rnn", False) else _run_kernel_eagerly
        if batch_sizes is None:
            result = run(self._kernel, input, hx, self._flat_weights(), *options, self.batch_first)
        else:
            result = run(self._kernel, input, batch_sizes, hx, self._flat_weights(), *options)
        return result[0], tuple(result[1:])

    def forward(self, input: Tensor | PackedSequence, hx: Any = None) -> tuple[Any, Any]:
        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_indices, unsorted_indices = input
            if data.dim() != 2 or data.shape[-1] != self.input_size:
                raise ValueError(
                    f"{type(self).__name__} expects a PackedSequence of ({self.input_size},) features, got data "
                    f"of shape {tuple(data.shape)}"
                )
            states = self._states(hx, int(batch_sizes[0]), False, data)
            if hx is not None and sorted_indices is not None:
                states = tuple(s.index_select(1, sorted_indices) for s in states)
            output, h_n = self._fused(data, batch_sizes, states)
            if unsorted_indices is not None:
                h_n = tuple(s.index_select(1, unsorted_indices) for s in h_n)
            output = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
        else:
            input, unbatched = self._checked(input)
            states = self._states(hx, input.shape[0 if self.batch_first else 1], unbatched, input)
            output, h_n = self._fused(input, None, states)
            if unbatched:
                output, h_n = output.squeeze(0 if self.batch_first else 1), tuple(s.squeeze(1) for s in h_n)
        return output, (h_n if self._has_cell_state else h_n[0])

    def extra_repr(self) -> str:
        parts = [f"{self.input_size}, {self.hidden_size}"]
        if self.num_layers != 1:
            parts.append(f"num_layers={self.num_layers}")
        if not self.bias:
            parts.append("bias=False")
        if self.batch_first:
            parts.append("batch_first=True")
        if self.dropout:
            parts.append(f"dropout={self.dropout}")
        if self.bidirectional:
            parts.append("bidirectional=True")
        parts.append(f"scale={self.scale!r}")
        return ", ".join(parts)


class WNLSTM(WNRNNBase):
    """A drop-in ``nn.LSTM`` whose layers are :class:`wn_rl.WNLSTMCell` (see :class:`WNRNNBase`): same
    arguments (``proj_size`` only as 0) plus keyword-only ``scale``, same call ``output, (h_n, c_n) =
    lstm(input, (h_0, c_0))``, the same outputs from the same weights."""

    _cell_cls = WNLSTMCell
    _has_cell_state = True
    _kernel = "lstm"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: Any = None,
        dtype: Any = None,
        *,
        scale: str = "linear",
    ) -> None:
        if proj_size:
            raise ValueError(
                f"WNLSTM does not support proj_size>0 (got {proj_size}): the projection would be a third, "
                "unnormalized weight. Use proj_size=0, or keep this LSTM a plain nn.LSTM."
            )
        super().__init__(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, device, dtype, scale=scale
        )


class WNGRU(WNRNNBase):
    """A drop-in ``nn.GRU`` whose layers are :class:`wn_rl.WNGRUCell` (see :class:`WNRNNBase`): same
    arguments plus keyword-only ``scale``, same call ``output, h_n = gru(input, h_0)``, the same outputs
    from the same weights."""

    _cell_cls = WNGRUCell
    _kernel = "gru"


class WNRNN(WNRNNBase):
    """A drop-in ``nn.RNN`` (``nonlinearity`` ``"tanh"`` or ``"relu"``) whose layers are
    :class:`wn_rl.WNRNNCell` (see :class:`WNRNNBase`): same arguments plus keyword-only ``scale``, same call
    ``output, h_n = rnn(input, h_0)``, the same outputs from the same weights."""

    _cell_cls = WNRNNCell

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: Any = None,
        dtype: Any = None,
        *,
        scale: str = "linear",
    ) -> None:
        super().__init__(
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            device,
            dtype,
            scale=scale,
            nonlinearity=nonlinearity,
        )

    @property
    def nonlinearity(self) -> str:
        return self.cells[0].nonlinearity

    @property
    def _kernel(self) -> str:
        return f"rnn_{self.nonlinearity}"

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nonlinearity={self.nonlinearity!r}"
