"""Convert an existing model to weight normalization and fold it back to plain layers.

``weight_norm`` writes each plain weight w as g = ||w||, v = w (per output unit), so the converted
model computes exactly the same function; ``remove_weight_norm`` folds w = g v / ||v|| back into a plain
torch layer with identical outputs, for deployment and export. Recurrent layers convert too: the cells
(``nn.LSTMCell``, ``nn.GRUCell``, ``nn.RNNCell``) and the multi-layer modules (``nn.LSTM``, with or without
``proj_size``, ``nn.GRU``, ``nn.RNN``, which become the drop-ins of :mod:`wn_rl.recurrent`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from wn_rl.conv import (
    _CONV_HYPERPARAMETERS,
    WNConv1d,
    WNConv2d,
    WNConv3d,
    WNConvTranspose1d,
    WNConvTranspose2d,
    WNConvTranspose3d,
)
from wn_rl.layers import (
    WNLayer,
    WNLinear,
    _check_init_scale,
    _check_scale,
    _direction_and_norm,
    _parameter_from_g,
    _scale_name,
)
from wn_rl.recurrent import WNGRU, WNLSTM, WNRNN, WNRNNBase
from wn_rl.recurrent_cells import WNGRUCell, WNLSTMCell, WNRNNCell, WNRNNCellBase, _layer_weights

__all__ = ["remove_weight_norm", "weight_norm"]

_TO_WN: dict[type[nn.Module], type[WNLayer]] = {
    nn.Linear: WNLinear,
    nn.Conv1d: WNConv1d,
    nn.Conv2d: WNConv2d,
    nn.Conv3d: WNConv3d,
    nn.ConvTranspose1d: WNConvTranspose1d,
    nn.ConvTranspose2d: WNConvTranspose2d,
    nn.ConvTranspose3d: WNConvTranspose3d,
}
_TO_PLAIN = {wn: plain for plain, wn in _TO_WN.items()}
_CELLS: dict[type[nn.Module], type[WNRNNCellBase]] = {
    nn.LSTMCell: WNLSTMCell,
    nn.GRUCell: WNGRUCell,
    nn.RNNCell: WNRNNCell,
}
_STACKS: dict[type[nn.Module], type[WNRNNBase]] = {nn.LSTM: WNLSTM, nn.GRU: WNGRU, nn.RNN: WNRNN}
_PLAIN_CELLS = {wn: plain for plain, wn in _CELLS.items()}
_PLAIN_STACKS = {wn: plain for plain, wn in _STACKS.items()}
_CONVERTIBLE = (*_TO_WN, *_CELLS, *_STACKS)
_FOLDABLE = (*_TO_PLAIN, *_PLAIN_CELLS, *_PLAIN_STACKS)


def _cell_parts(cell: WNRNNCellBase) -> dict[str, tuple[str, ...]]:
    """A WN cell's parameter: the torch cell's parameters it is made from (``v_ih``, ``g_ih`` or ``s_ih`` per
    scale, ..., a projected LSTM's ``v_hr`` and ``g_hr``; the biases)."""
    name = _scale_name(cell.scale)
    parts = {f"{kind}_{part}": (f"weight_{part}",) for part in cell.parts for kind in ("v", name)}
    return {**parts, "bias_ih": ("bias_ih",), "bias_hh": ("bias_hh",)}


def _factory(tensor: torch.Tensor) -> dict[str, object]:
    return {"device": tensor.device, "dtype": tensor.dtype}


def _copy_flag(source: nn.Module, target: nn.Module) -> None:
    flag = source._buffers.get("initialized")
    if flag is not None:
        target.register_buffer("initialized", flag.detach().clone())


def _copy_requires_grad(target: nn.Module, source: nn.Module, parts: dict[str, tuple[str, ...]]) -> None:
    """A frozen layer stays frozen: each ``target`` parameter named in ``parts`` requires grad iff one of
    the ``source`` parameters it is made from does."""
    for name, sources in parts.items():
        param = getattr(target, name)
        if param is not None:
            param.requires_grad_(any(getattr(source, s).requires_grad for s in sources))


@torch.no_grad()
def _to_wn_layer(plain: nn.Module, init_scale: float, scale: str) -> WNLayer:
    cls = _TO_WN[type(plain)]
    if cls is WNLinear:
        layer = WNLinear(
            plain.in_features,
            plain.out_features,
            plain.bias is not None,
            **_factory(plain.weight),
            init_scale=init_scale,
            scale=scale,
        )
    else:
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        for name in _CONV_HYPERPARAMETERS:
            setattr(layer, name, getattr(plain, name))
        layer._setup_wn(
            tuple(plain.weight.shape),
            plain.out_channels if plain.bias is not None else None,
            init_scale=init_scale,
            scale=scale,
            factory=_factory(plain.weight),
        )
    v, norm = _direction_and_norm(plain.weight.detach(), layer.norm_dim)
    layer.v = nn.Parameter(v)  # a clone of the weight in its memory format (a channels-last model stays so)
    layer._scale_parameter.copy_(_parameter_from_g(norm, scale))
    if plain.bias is not None:
        layer.bias.copy_(plain.bias)
    _copy_requires_grad(layer, plain, {"v": ("weight",), _scale_name(scale): ("weight",), "bias": ("bias",)})
    _copy_flag(plain, layer)
    # folding back gives the flag only to layers that had one or were initialised since, so that an
    # uninitialised round trip keeps the plain model's state_dict keys
    layer._plain_had_flag = "initialized" in plain._buffers
    layer.init_scale = float(getattr(plain, "init_scale", init_scale))
    return layer


def _nonlinearity(module: nn.Module) -> dict[str, str]:
    """The ``nonlinearity`` argument of an Elman RNN (cell), none for LSTMs and GRUs."""
    return {"nonlinearity": module.nonlinearity} if hasattr(module, "nonlinearity") else {}


def _stack_options(stack: nn.Module) -> dict[str, Any]:
    """The constructor arguments of an ``nn.LSTM``/``nn.GRU``/``nn.RNN`` or its WN drop-in, read off ``stack``
    (``proj_size`` only where it is set: nn.GRU and nn.RNN have it as 0 but refuse it as an argument)."""
    names = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional")
    projection = {"proj_size": stack.proj_size} if getattr(stack, "proj_size", 0) else {}
    return {**{name: getattr(stack, name) for name in names}, **projection, **_nonlinearity(stack)}


@torch.no_grad()
def _to_wn_cell(plain: Any, cell: WNRNNCellBase, scale: str) -> WNRNNCellBase:
    """``cell`` holding ``plain``'s weights (a torch cell, or one layer of a torch stack) as g = ||w||, v = w."""
    cell._load_plain(plain)
    _copy_requires_grad(cell, plain, _cell_parts(cell))
    return cell


def _to_wn_stack(plain: nn.RNNBase, scale: str) -> WNRNNBase:
    with _same_options_warned_already():
        stack = _STACKS[type(plain)](**_stack_options(plain), **_factory(plain.weight_ih_l0), scale=scale)
    for layer in range(plain.num_layers):
        for reverse in range(stack.num_directions):
            _to_wn_cell(_layer_weights(plain, layer, bool(reverse)), stack.cell(layer, bool(reverse)), scale)
    return stack


@contextlib.contextmanager
def _same_options_warned_already() -> Iterator[None]:
    """Building a stack from another's options: torch's warning on dropout with one layer was given when the user
    built the original, so it is not repeated for its replacement."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="dropout option adds dropout after all but last recurrent layer")
        yield


def _convert_leaf(module: nn.Module, init_scale: float, scale: str) -> nn.Module | None:
    kind = type(module)
    if kind in _TO_WN:
        return _to_wn_layer(module, init_scale, scale)
    if kind in _CELLS:
        empty = _CELLS[kind](
            module.input_size,
            module.hidden_size,
            module.bias,
            **_factory(module.weight_ih),
            **_nonlinearity(module),
            scale=scale,
        )
        return _to_wn_cell(module, empty, scale)
    if kind in _STACKS:
        return _to_wn_stack(module, scale)
    return None


def _label(name: str, module: nn.Module) -> str:
    """How messages name a layer: its qualified name and type (``'0 (LazyLinear)'``)."""
    return f"{name or '<the module itself>'} ({type(module).__name__})"


def _check_convertible(module: nn.Module) -> None:
    """Refuse, before anything is replaced, layers ``weight_norm`` cannot convert (no half-converted model)."""
    lazy = [
        _label(name, m)
        for name, m in module.named_modules()
        if isinstance(m, nn.modules.lazy.LazyModuleMixin)
        and m.has_uninitialized_params()
        and getattr(m, "cls_to_become", None) in _TO_WN  # a lazy BatchNorm stays plain either way
    ]
    if lazy:
        raise ValueError(
            f"cannot weight-normalize {lazy}: a lazy layer has no weight until its first forward pass, so it would "
            "stay a plain layer. The model is unchanged; run one forward pass first (model(example_input)), then "
            "call weight_norm."
        )
    empty = [
        _label(name, m)
        for name, m in module.named_modules()
        if type(m) in (*_TO_WN, *_CELLS)
        and 0 in (getattr(m, "out_features", 1), getattr(m, "out_channels", 1), getattr(m, "hidden_size", 1))
    ]
    if empty:
        raise ValueError(
            f"cannot weight-normalize {empty}: a layer without output units has no norm to divide by. The model is "
            "unchanged; give it out_features/out_channels/hidden_size >= 1, or leave it out."
        )
    grouped = [
        name or type(m).__name__
        for name, m in module.named_modules()
        if type(m) in _TO_WN and getattr(m, "transposed", False) and m.groups != 1
    ]
    if grouped:
        raise ValueError(
            f"cannot weight-normalize {grouped}: transposed convs with groups != 1 are unsupported (one g per "
            "output channel would span the groups' separate weights). The model is unchanged; use groups=1 there "
            "or convert the other layers one by one."
        )


# The hooks a user registers on a layer (register_forward_hook and the like), carried to its replacement. The
# dicts themselves move, so the handles that registered them still remove them. State-dict hooks stay behind:
# they are written for the old parameter names.
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_is_full_backward_hook",
)


def _carry_hooks(source: nn.Module, target: nn.Module) -> None:
    for name in _HOOK_DICTS:
        if name in source.__dict__:
            target.__dict__[name] = source.__dict__[name]


def _replace_leaves(
    module: nn.Module, replace: Callable[[nn.Module], nn.Module | None], done: dict[int, nn.Module]
) -> nn.Module:
    """``module`` with every submodule that ``replace`` maps to a new one swapped for it, in place.
    ``done`` maps each visited module's id to its result, so a layer reached twice (tied weights) is
    replaced once by one shared module."""
    if id(module) in done:
        return done[id(module)]
    replacement = replace(module)
    if replacement is not None:
        if replacement is not module:
            _carry_hooks(module, replacement)
        done[id(module)] = replacement.train(module.training)
        return replacement
    done[id(module)] = module
    for name, child in list(module._modules.items()):  # not named_children(): it skips repeats
        new = child if child is None else _replace_leaves(child, replace, done)
        if new is not child:
            setattr(module, name, new)
            if name == "_orig_mod":
                _rebind_compiled(module)
    return module


def _rebind_compiled(module: nn.Module) -> None:
    """A ``torch.compile``d module whose ``_orig_mod`` was just replaced: its forward was bound to the old module's
    ``__call__``, so it would run the old layer and the new parameters would never train. Rebind it."""
    from torch._dynamo.eval_frame import OptimizedModule  # here: importing dynamo costs a second at import time

    if isinstance(module, OptimizedModule):
        module._initialize()


def weight_norm(module: nn.Module, *, init_scale: float = 1.0, scale: str = "linear") -> nn.Module:
    """Replace every ``nn.Linear``, convolution (``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``), recurrent cell
    (``nn.LSTMCell``, ``nn.GRUCell``, ``nn.RNNCell``) and recurrent stack (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``)
    in ``module`` by its WN equivalent with g = ||w|| and v = w, so outputs are unchanged. Returns ``module``
    (modified in place) or, if ``module`` itself is such a layer, its replacement. The stacks become
    :class:`wn_rl.WNLSTM`, :class:`wn_rl.WNGRU` and :class:`wn_rl.WNRNN`, which run PyTorch's fused kernel with
    the effective weights.

    An ``nn.LSTM`` with ``proj_size`` becomes a :class:`wn_rl.WNLSTM` whose projection ``weight_hr`` is
    weight-normalized too (one g per projected unit). Layers that are already weight-normalized are left
    alone. Left plain, each named in a warning: subclasses of the layers above (``nn.MultiheadAttention``'s
    ``out_proj``, users' own), layers with torch parametrizations or the deprecated torch weight/spectral norm
    hooks, layers whose weight is tied to another module's, and other convolutions. A layer's forward and
    backward hooks move to its replacement. Build the optimizer after converting. An uninitialised
    lazy layer that would be converted (``nn.LazyLinear`` before its first forward pass) is a ``ValueError``,
    with the model unchanged.

    ``init_scale`` becomes each new layer's data-dependent-init target std (a layer's own
    ``init_scale`` attribute wins); ``scale`` is ``"linear"`` or ``"exp"``.
    """
    _check_scale(scale)
    init_scale = _check_init_scale(init_scale)
    _check_convertible(module)
    skipped = _left_plain(module)
    kept = {id(m) for found in skipped.values() for _, m in found}
    convert = lambda leaf: leaf if id(leaf) in kept else _convert_leaf(leaf, init_scale, scale)  # noqa: E731
    module = _replace_leaves(module, convert, {})
    _warn_left("weight_norm", skipped)
    return module


def _warn_left(caller: str, left: dict[str, list[tuple[str, nn.Module]]]) -> None:
    for reason, found in left.items():
        if found:
            warnings.warn(f"{caller} left {[_label(n, m) for n, m in found]} unchanged: {reason}", stacklevel=3)


def _tied(module: nn.Module, candidates: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """The ``candidates`` that share a parameter with a module outside themselves (``head.weight =
    embedding.weight``): replacing one would untie it, and training would then move the copies apart. A layer
    reached twice (one module in two places) shares nothing and is not listed."""
    owners: dict[int, set[int]] = {}
    for m in module.modules():
        for p in m._parameters.values():
            if p is not None:
                owners.setdefault(id(p), set()).add(id(m))
    tied = []
    for name, candidate in candidates:
        inside = {id(m) for m in candidate.modules()}
        if any(owners.get(id(p), set()) - inside for p in candidate.parameters()):
            tied.append((name, candidate))
    return tied


def _old_style_hooks(module: nn.Module) -> bool:
    """Whether ``module`` carries a hook of ``torch.nn.utils.weight_norm``, ``torch.nn.utils.spectral_norm`` (the
    deprecated APIs) or ``torch.nn.utils.prune``: each recomputes a parameter by name before every forward (from
    ``weight_g``/``weight_v``, ``weight_orig``, ``weight_mask``), so on a replacement it would fail or be lost."""
    kinds = (WeightNorm, SpectralNorm, BasePruningMethod)
    return any(isinstance(hook, kinds) for hook in module._forward_pre_hooks.values())


def _left_plain(module: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
    """The layers with weights that ``weight_norm`` leaves as they are, by the reason it gives."""
    parametrized, hooked, subclasses, other_convs, candidates = [], [], [], [], []
    for name, m in module.named_modules():
        if isinstance(m, _CONVERTIBLE) and parametrize.is_parametrized(m):
            parametrized.append((name, m))
        elif isinstance(m, _CONVERTIBLE) and _old_style_hooks(m):
            hooked.append((name, m))
        elif isinstance(m, _CONVERTIBLE) and type(m) not in _CONVERTIBLE:
            subclasses.append((name, m))
        elif isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m, (*_TO_WN, WNLayer)):
            other_convs.append((name, m))
        elif type(m) in _CONVERTIBLE:
            candidates.append((name, m))
    return {
        "they carry torch parametrizations (such as torch.nn.utils.parametrizations.weight_norm); to use wn_rl's "
        "weight norm instead, remove them first (torch.nn.utils.parametrize.remove_parametrizations(layer, "
        "'weight')) and convert again.": parametrized,
        "they carry a hook of the deprecated torch.nn.utils.weight_norm or torch.nn.utils.spectral_norm, or of "
        "torch.nn.utils.prune, which converting would drop (a spectral norm silently) or break (a pruning mask); "
        "remove it first (torch.nn.utils.remove_weight_norm(layer), torch.nn.utils.remove_spectral_norm(layer) or "
        "torch.nn.utils.prune.remove(layer, 'weight')) and convert again.": hooked,
        "they subclass a convertible layer, and a subclass (or the module that owns it, as nn.MultiheadAttention "
        "owns its out_proj) may use .weight in its own way. Replace them with wn_rl layers where that is safe.": (
            subclasses
        ),
        "they are convolutions of a kind wn_rl has no weight-normalized equivalent for (it has Conv1d/2d/3d and "
        "ConvTranspose1d/2d/3d).": other_convs,
        "they share a parameter with another module (tied weights, such as head.weight = embedding.weight); a "
        "converted layer would get its own copy and training would untie them. Tie the WN layers' v and g "
        "yourself, or untie the weights first.": _tied(module, candidates),
    }


@torch.no_grad()
def _fold_layer(layer: WNLayer) -> nn.Module:
    plain_cls = _TO_PLAIN[type(layer)]
    w = layer.compute_weight().detach()
    if plain_cls is nn.Linear:
        plain = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None, device="meta")
    else:
        plain = plain_cls.__new__(plain_cls)
        nn.Module.__init__(plain)
        for name in _CONV_HYPERPARAMETERS:
            setattr(plain, name, getattr(layer, name))
    # in v's memory format, before the bias (the order of torch's own layers' parameters)
    plain.weight = nn.Parameter(torch.empty_like(layer.v).copy_(w))
    plain.register_parameter("bias", None if layer.bias is None else nn.Parameter(layer.bias.detach().clone()))
    plain.init_scale = layer.init_scale
    _copy_requires_grad(plain, layer, {"weight": ("v", "g" if layer.scale == "linear" else "s"), "bias": ("bias",)})
    flag = layer.initialized
    if getattr(layer, "_plain_had_flag", True) or (not flag.is_meta and bool(flag)):
        _copy_flag(layer, plain)
    return plain


@torch.no_grad()
def _fold_cell(cell: WNRNNCellBase, plain: Any) -> None:
    """Write ``cell``'s effective weights and its biases into ``plain`` (a torch cell, or one layer of a
    torch stack under a cell's parameter names)."""
    for part, w in zip(cell.parts, cell.compute_weights(), strict=True):
        getattr(plain, f"weight_{part}").copy_(w)
    name = _scale_name(cell.scale)
    parts = {f"weight_{part}": (f"v_{part}", f"{name}_{part}") for part in cell.parts}
    if cell.bias_ih is not None:
        for part in ("ih", "hh"):  # a projection (weight_hr) has no bias
            getattr(plain, f"bias_{part}").copy_(getattr(cell, f"bias_{part}"))
            parts[f"bias_{part}"] = (f"bias_{part}",)
    _copy_requires_grad(plain, cell, parts)


def _fold_stack(stack: WNRNNBase) -> nn.RNNBase:
    with _same_options_warned_already():
        plain = _PLAIN_STACKS[type(stack)](**_stack_options(stack), **_factory(stack.cells[0].v_ih))
    for layer in range(stack.num_layers):
        for reverse in range(stack.num_directions):
            _fold_cell(stack.cell(layer, bool(reverse)), _layer_weights(plain, layer, bool(reverse)))
    return plain


def _fold_leaf(module: nn.Module) -> nn.Module | None:
    kind = type(module)
    if kind in _TO_PLAIN:
        return _fold_layer(module)
    if kind in _PLAIN_CELLS and not getattr(module, "proj_size", 0):  # torch has no projected cell
        plain = _PLAIN_CELLS[kind](
            module.input_size,
            module.hidden_size,
            module.bias_ih is not None,
            **_factory(module.v_ih),
            **_nonlinearity(module),
        )
        _fold_cell(module, plain)
        return plain
    if kind in _PLAIN_STACKS:
        return _fold_stack(module)
    if isinstance(module, WNRNNBase):  # a subclass, left whole (and named): its forward reads its WN cells
        return module
    return None


def _kept_by_folding(module: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
    """The WN layers ``remove_weight_norm`` leaves as they are, by the reason it gives (a stack's cells go with
    their stack)."""
    in_stacks = {id(cell) for m in module.modules() if isinstance(m, WNRNNBase) for cell in m.cells}
    subclasses, projected, pruned, candidates = [], [], [], []
    for name, m in module.named_modules():
        if isinstance(m, (WNLayer, WNRNNCellBase, WNRNNBase)) and type(m) not in _FOLDABLE:
            subclasses.append((name, m))
        elif type(m) in _FOLDABLE and _old_style_hooks(m):
            pruned.append((name, m))
        elif isinstance(m, WNRNNCellBase) and getattr(m, "proj_size", 0) and id(m) not in in_stacks:
            projected.append((name, m))
        elif type(m) in _FOLDABLE and id(m) not in in_stacks:
            candidates.append((name, m))
    return {
        "they subclass a wn_rl layer, and a plain torch layer would drop what the subclass adds. Fold them "
        "yourself (the weight is a layer's compute_weight(), a cell's compute_weights(); a stack's cells are in "
        ".cells).": subclasses,
        "they are LSTM cells with proj_size, which torch has no cell for (in a WNLSTM they fold into nn.LSTM with "
        "proj_size). Their effective weights are compute_weights().": projected,
        "they carry a torch.nn.utils.prune (or weight/spectral norm) hook, which recomputes a parameter of theirs by "
        "name and would fail on the plain layer; remove it first (torch.nn.utils.prune.remove(layer, 'v')) and fold "
        "again.": pruned,
        "they share a parameter (v, g or bias) with another module; each folded layer would get its own weight "
        "and training would untie them. Fold them yourself (the weight is compute_weight()).": _tied(
            module, candidates
        ),
    }


def remove_weight_norm(module: nn.Module) -> nn.Module:
    """Fold every WN layer of ``module`` back into the plain torch layer with the same outputs
    (w = g v / ||v|| becomes ``.weight``; a :class:`wn_rl.WNLSTM` with ``proj_size`` becomes
    ``nn.LSTM(proj_size=...)``). Returns ``module`` (modified in place) or, if ``module`` itself is a WN
    layer, its plain replacement. The ``initialized`` flag is kept, except on a layer converted from one
    without it and never initialised (so a round trip gives back the original ``state_dict`` keys). Left as
    they are, named in a warning: subclasses of the WN layers (whose forward may differ from the plain
    layer's), a :class:`wn_rl.WNLSTMCell` with ``proj_size`` outside a stack and layers sharing a parameter
    with another module."""
    kept = _kept_by_folding(module)
    ids = {id(m) for found in kept.values() for _, m in found}
    module = _replace_leaves(module, lambda leaf: leaf if id(leaf) in ids else _fold_leaf(leaf), {})
    _warn_left("remove_weight_norm", kept)
    return module
