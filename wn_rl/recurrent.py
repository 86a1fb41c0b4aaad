"""Weight-normalized recurrent layers: drop-ins for ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` built from the
cells (:class:`WNLSTMCell`, :class:`WNGRUCell`, :class:`WNRNNCell`).

The paper's point is that weight normalization, unlike batch normalization, works in recurrent
networks (sections 1 and 5.3): it adds no dependence between examples or time steps. Each layer and
direction here is a weight-normalized cell (:class:`wn_rl.WNLSTMCell`, :class:`wn_rl.WNGRUCell`,
:class:`wn_rl.WNRNNCell`) holding g, v and the biases; a call computes every effective weight once and runs
PyTorch's fused recurrent kernel with them (the CPU's, or cuDNN's), as ``nn.LSTM`` runs it with its own
weights. So they take what the torch modules take (multiple layers, ``bias``, ``batch_first``,
``dropout``, ``bidirectional``, an LSTM's ``proj_size``, unbatched input and ``PackedSequence``) and
return the same outputs from the same weights. :func:`wn_rl.weight_norm` converts the torch modules
into them and :func:`wn_rl.remove_weight_norm` folds them back.

The cells are in :mod:`wn_rl.recurrent_cells`; their names still resolve here, for imports and old pickles.
"""

from __future__ import annotations

import numbers
import re
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

# the cells moved to wn_rl.recurrent_cells: imported here for the stacks, and so that their names (and the
# helpers that moved with them) still resolve from wn_rl.recurrent, for imports and old pickles
from wn_rl.layers import is_count
from wn_rl.recurrent_cells import (
    _CELL_TENSORS,
    WNGRUCell,
    WNLSTMCell,
    WNRNNCell,
    WNRNNCellBase,
    _check_proj_size,
)
from wn_rl.recurrent_cells import _layer_weights as _layer_weights
from wn_rl.recurrent_cells import _map_state as _map_state

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

_TORCH_NAME = re.compile(rf"({'|'.join(_CELL_TENSORS)})_l(\d+)(_reverse)?")

State = tuple[Tensor, ...]  # (h,) or an LSTM's (h, c), each (batch, hidden) (h: (batch, proj_size) if projected)


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


def _check_stack_options(
    owner: str, dropout: Any, num_layers: Any, bias: Any, batch_first: Any, stacklevel: int
) -> None:
    """Refuse (and warn about) what ``nn.RNNBase.__init__`` refuses (and warns about), in its order and with its
    messages, before anything is allocated: ``dropout`` a number (not a bool) in [0, 1], ``bias`` and
    ``batch_first`` bools; dropout with a single layer drops nothing, so it is only warned about."""
    refused = (
        f"{owner}: dropout={dropout!r} is refused: dropout should be a number in range [0, 1] representing the "
        "probability of an element being zeroed"
    )
    try:  # torch stores float(dropout) first, so what float() refuses (None, "x") fails there, with its type
        float(dropout)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{refused} ({error})") from error
    if not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
        raise ValueError(refused)
    if dropout > 0 and num_layers == 1:
        warnings.warn(
            "dropout option adds dropout after all but last recurrent layer, so non-zero dropout expects num_layers "
            f"greater than 1, but got dropout={dropout} and num_layers={num_layers}",
            stacklevel=stacklevel,
        )
    for arg, value in (("bias", bias), ("batch_first", batch_first)):
        if not isinstance(value, bool):
            raise TypeError(
                f"{owner}: {arg} should be of type bool, got: {type(value).__name__} ({arg}={value!r}; "
                "pass True or False)"
            )


class WNRNNBase(nn.Module):
    """What :class:`WNLSTM`, :class:`WNGRU` and :class:`WNRNN` share: a stack of weight-normalized cells,
    ``num_layers`` deep and one or two directions wide, in ``cells`` (index ``layer * num_directions +
    direction``, the order of the torch module's ``h_n``).

    Same attributes as the torch modules: ``input_size``, ``hidden_size``, ``num_layers``, ``bias``,
    ``batch_first``, ``dropout``, ``bidirectional``, ``proj_size`` (0 but for a projected LSTM);
    ``weight_ih_l0``, ``bias_hh_l1_reverse``, ``weight_hr_l0``, ... read the matching cell's effective weight
    (computed) and bias (the parameter itself, so in-place changes such as a forget-gate bias of 1 take
    effect). Keyword-only ``scale``: the cells' ``"linear"`` g or ``"exp"`` g = exp(s).

    Each cell starts from the torch cell's initialization (g = ||w||, v = w): the paper keeps the standard
    initialization for recurrent weights and data-dependent init leaves cells alone.
    """

    _cell_cls: type[WNRNNCellBase]
    _has_cell_state = False  # an LSTM's state is (h, c)
    _kernel: str  # the torch._VF function that runs the whole stack
    mode: str  # nn.RNNBase's: "LSTM", "GRU", "RNN_TANH" or "RNN_RELU"
    bidirectional = False  # the class default serves WNLSTMs pickled before the option existed (one direction)
    proj_size = 0  # h has hidden_size features, as in torch's GRU and RNN; and in WNLSTMs pickled before the option

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
        # the warning points at the caller of WNLSTM(...)/WNRNN(...), whose __init__ calls this one, or of WNGRU(...)
        stacklevel = 3 if type(self).__init__ is WNRNNBase.__init__ else 4
        _check_stack_options(name, dropout, num_layers, bias, batch_first, stacklevel)
        sizes = {"input_size": input_size, "hidden_size": hidden_size, "num_layers": num_layers}
        for arg, value in sizes.items():  # any integer type (nn.LSTM takes num_layers=np.int64(2)), stored as int
            if not is_count(value):
                raise ValueError(f"{name}: {arg}={value!r} must be a positive integer")
        input_size, hidden_size, num_layers = (int(value) for value in sizes.values())
        if "proj_size" in cell_kwargs:  # an LSTM's, checked before any cell is allocated
            self.proj_size = cell_kwargs["proj_size"] = _check_proj_size(name, cell_kwargs["proj_size"], hidden_size)
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
                input_size if layer == 0 else self._h_size * directions,
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

    @property
    def _h_size(self) -> int:
        """The features of h, and so of each direction's output: ``proj_size`` for a projected LSTM."""
        return self.proj_size or self.hidden_size

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
            tensor, layer, reverse = match.groups()
            if int(layer) >= self.num_layers or (reverse and not self.bidirectional):
                raise
            return getattr(self.cell(int(layer), bool(reverse)), tensor)

    def flatten_parameters(self) -> None:
        """Nothing to do: the cells' weights are computed per call, there is no flat cuDNN buffer. Here so
        that code written for the torch module (which calls it after ``.to()`` or in ``forward``) runs."""

    def _states(self, hx: Any, batch: int, unbatched: bool, reference: Tensor) -> State:
        """``hx`` as a tuple of ``(num_layers * num_directions, batch, features)`` tensors (zeros if None):
        h's features are ``proj_size`` for a projected LSTM, c's (and otherwise h's) ``hidden_size``."""
        names = ("h_0", "c_0") if self._has_cell_state else ("h_0",)
        features = (self._h_size, self.hidden_size)[: len(names)]
        shapes = [(self.num_layers * self.num_directions, batch, size) for size in features]
        if hx is None:
            return tuple(reference.new_zeros(shape) for shape in shapes)
        states = tuple(hx) if self._has_cell_state else (hx,)
        if len(states) != len(names):
            raise ValueError(f"{type(self).__name__} expects hx = ({', '.join(names)}), got {len(states)} tensors")
        for name, state, shape in zip(names, states, shapes, strict=True):
            expected = shape[::2] if unbatched else shape
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
        direction: ``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``, then a projected LSTM's ``weight_hr``)."""
        flat = []
        for cell in self.cells:
            weights = cell._weights()
            flat.extend(weights[:2])
            if self.bias:
                flat.extend((cell.bias_ih, cell.bias_hh))
            flat.extend(weights[2:])
        return flat

    @property
    def all_weights(self) -> list[list[Tensor]]:
        """As ``nn.RNNBase.all_weights``: per layer and direction (``cells`` order), the effective weights and the
        biases in the torch module's order, the weights computed now (so assigning to them changes nothing)."""
        flat = self._flat_weights()
        per_cell = len(flat) // len(self.cells)
        return [flat[start : start + per_cell] for start in range(0, len(flat), per_cell)]

    def _fused(self, input: Tensor, batch_sizes: Tensor | None, states: State) -> tuple[Tensor, State]:
        """PyTorch's fused recurrent kernel (the CPU's, or cuDNN's) run with the effective weights, as
        ``nn.LSTM.forward`` runs it with its own: the same outputs from the same weights, at its speed. As there,
        ``input`` must have the weights' dtype but under autocast, which casts both for the kernel."""
        weight_dtype = self.cells[0].v_ih.dtype  # the effective weights' dtype (w is computed in v's)
        if input.dtype != weight_dtype and not torch._C._is_any_autocast_enabled():
            raise ValueError(
                f"RNN input dtype ({input.dtype}) does not match weight dtype ({weight_dtype}). "
                f"Convert input: input.to({weight_dtype}), or convert model: model.to({input.dtype})"
            )
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
        if self.proj_size:
            parts.append(f"proj_size={self.proj_size}")
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
    arguments plus keyword-only ``scale``, same call ``output, (h_n, c_n) = lstm(input, (h_0, c_0))``, the
    same outputs from the same weights. With ``proj_size`` P (0 < P < hidden_size) each layer and direction
    also has ``weight_hr_l{k}`` (P, hidden), weight-normalized like the others (one g per projected unit):
    h_0, h_n and each direction's output have P features, c_0 and c_n hidden_size."""

    _cell_cls = WNLSTMCell
    _has_cell_state = True
    _kernel = "lstm"
    mode = "LSTM"

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
        options = (input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, device, dtype)
        super().__init__(*options, scale=scale, proj_size=proj_size)


class WNGRU(WNRNNBase):
    """A drop-in ``nn.GRU`` whose layers are :class:`wn_rl.WNGRUCell` (see :class:`WNRNNBase`): same
    arguments plus keyword-only ``scale``, same call ``output, h_n = gru(input, h_0)``, the same outputs
    from the same weights."""

    _cell_cls = WNGRUCell
    _kernel = "gru"
    mode = "GRU"


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
        options = (input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, device, dtype)
        super().__init__(*options, scale=scale, nonlinearity=nonlinearity)

    @property
    def nonlinearity(self) -> str:
        return self.cells[0].nonlinearity

    @property
    def _kernel(self) -> str:
        return f"rnn_{self.nonlinearity}"

    @property
    def mode(self) -> str:
        return f"RNN_{self.nonlinearity.upper()}"

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nonlinearity={self.nonlinearity!r}"
