"""Data-dependent initialization (Salimans & Kingma 2016, section 3).

One forward pass over one minibatch. Every layer that can be initialised normalises, in execution
order, its own pre-activation t over the batch (and spatial positions): with mu[t] and sigma[t] the
per-unit mean and std it rescales its weight by ``init_scale / sigma`` and sets its bias so the
pre-activation has mean 0 and std ``init_scale`` (eq. 5-6, generalised to any current g and b), then
passes that normalised output on, so deeper layers initialise on already-initialised inputs.

- WN layers (``WNLinear``, ``WNConv*``) set g (or s) and b.
- Plain ``nn.Linear`` / ``nn.Conv*`` / ``nn.ConvTranspose*`` get their weight rows rescaled and
  their bias set the same way (section 3, last paragraph: the paper's "normal" baseline).
- A layer whose output goes straight into a ``MeanOnlyBatchNorm`` or ``nn.BatchNorm*`` only has its
  scale set; its bias stays, the mean-only BN's ``running_mean`` becomes the init batch's mean (the
  reference code's behaviour) and a full BN's running statistics become the batch's, with its affine
  weight set to ``init_scale``, so train and eval mode compute the same function at init.
- A ``nn.LayerNorm`` / ``nn.GroupNorm`` with an affine gets that affine set so its output has mean 0
  and std ``init_scale`` per unit on the batch (the same normalisation, one step later).
- Recurrent cells keep their initialization (the paper: standard init for recurrent weights).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from wn_rl.batches import (
    batch_mismatch,
    batch_size,
    call_with_batch,
    check_call,
    check_tensor_batch,
    eval_pass,
    is_type_or_device_error,
)
from wn_rl.convert import _old_style_hooks, _tied
from wn_rl.layers import WNLayer, WNLinear, mark_initializable
from wn_rl.mean_only_batch_norm import MeanOnlyBatchNorm

__all__ = [
    "InitReport",
    "LayerInit",
    "add_init_flags",
    "data_dependent_init",
    "initializable_layers",
    "is_initialized",
]

_PLAIN_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BN_TYPES = (MeanOnlyBatchNorm, nn.modules.batchnorm._BatchNorm)
_AFFINE_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm)
_DEAD_STD = 1e-6  # a unit whose pre-activation std is below this (relative to 1 + |mean|) is left alone


@dataclass
class LayerInit:
    """What data-dependent init did to one layer.

    ``mean`` and ``std`` summarise the per-unit pre-activation statistics *before* init (averaged
    over units); ``dead_units`` lists units with (near) zero variance on the batch, which kept their
    scale and bias; ``paired_norm`` names the batch-norm layer the scale was set for, if any.
    """

    name: str
    kind: str
    units: int
    init_scale: float
    mean: float
    std: float
    dead_units: list[int] = field(default_factory=list)
    paired_norm: str | None = None


@dataclass
class InitReport:
    """The result of :func:`data_dependent_init`: per-layer statistics in execution order."""

    layers: list[LayerInit]
    skipped: bool = False
    not_reached: list[str] = field(default_factory=list)

    def scalars(self, prefix: str = "ddi") -> dict[str, float]:
        """Flat ``{tag: value}`` ready for a TensorBoard writer or SB3's logger."""
        out: dict[str, float] = {}
        for layer in self.layers:
            out[f"{prefix}/{layer.name}/pre_init_mean"] = layer.mean
            out[f"{prefix}/{layer.name}/pre_init_std"] = layer.std
            out[f"{prefix}/{layer.name}/dead_units"] = float(len(layer.dead_units))
        return out

    @property
    def dead_units(self) -> dict[str, list[int]]:
        return {layer.name: layer.dead_units for layer in self.layers if layer.dead_units}


def initializable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers of ``model`` that data-dependent init sets, by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (WNLayer, *_PLAIN_TYPES))}


def check_settable(model: nn.Module, layers: dict[str, nn.Module], caller: str) -> None:
    """Refuse, before any change, ``layers`` of ``model`` whose weight an in-place init cannot set: a weight
    computed by torch parametrizations or by a hook of the deprecated ``torch.nn.utils.weight_norm`` /
    ``spectral_norm`` or of ``torch.nn.utils.prune`` (a write to it would be lost at the next forward, leaving the
    layer unchanged while its bias moved), and a weight tied to another module (setting one layer's scale would
    change the other's function)."""
    found = {
        "their weight is computed by torch parametrizations (such as torch.nn.utils.parametrizations.weight_norm), "
        "so it cannot be set in place. Remove them first (torch.nn.utils.parametrize.remove_parametrizations(layer, "
        "'weight')); for weight norm, then convert with wn_rl.weight_norm(model)": [
            n for n, m in layers.items() if parametrize.is_parametrized(m)
        ],
        "their weight is recomputed before every forward by a hook of the deprecated torch.nn.utils.weight_norm or "
        "spectral_norm, or of torch.nn.utils.prune, so it cannot be set in place. Remove the hook first "
        "(torch.nn.utils.remove_weight_norm(layer), remove_spectral_norm(layer) or "
        "torch.nn.utils.prune.remove(layer, 'weight')); for weight norm, then convert with wn_rl.weight_norm(model)": [
            n for n, m in layers.items() if _old_style_hooks(m)
        ],
        "they share a parameter with another module (tied weights, such as head.weight = embedding.weight), so "
        "setting one layer's scale would change the other's function. Untie the weights first": [
            n for n, _ in _tied(model, list(layers.items()))
        ],
    }
    for reason, names in found.items():
        if names:
            labels = [name or type(model).__name__ for name in names]
            raise ValueError(f"{caller} cannot set {labels}: {reason}. The model is unchanged.")


def add_init_flags(model: nn.Module) -> nn.Module:
    """Give every layer of ``model`` that data-dependent init sets the ``initialized`` flag it adds (a bool
    buffer, False), in place; returns ``model``.

    Layers built by wn_rl carry the flag from the start, but plain ``nn.Linear`` / ``nn.Conv*`` layers of a
    model built elsewhere get it from :func:`data_dependent_init`, so the ``state_dict`` of an initialised
    model has keys that a freshly built one lacks. ``add_init_flags(MyNet()).load_state_dict(saved)`` loads
    it, flags included (so a later init changes nothing). A layer's own ``init_scale`` is kept.
    """
    for layer in initializable_layers(model).values():
        if "initialized" not in layer._buffers:
            mark_initializable(layer, getattr(layer, "init_scale", 1.0))
    return model


def is_initialized(model: nn.Module) -> bool:
    """True when every initializable layer of ``model`` carries a set ``initialized`` flag."""
    layers = initializable_layers(model).values()
    return bool(layers) and all(bool(getattr(m, "initialized", False)) for m in layers)


def _channel_dim(layer: nn.Module) -> int:
    return -1 if isinstance(layer, (nn.Linear, WNLinear)) else 1


def _unit_stats(output: Tensor, channel_dim: int) -> tuple[Tensor, Tensor]:
    t = output.detach().to(torch.promote_types(output.dtype, torch.float32))  # fp64 stays fp64
    t = t.movedim(channel_dim, 0).reshape(output.shape[channel_dim], -1)
    return t.mean(dim=1), t.std(dim=1, unbiased=False)


def _unit_view(stat: Tensor, output: Tensor, channel_dim: int) -> Tensor:
    shape = [1] * output.dim()
    shape[channel_dim] = -1
    return stat.view(shape).to(output.dtype)


def _normalizer(mean: Tensor, std: Tensor, init_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(dead, factor, shift)`` that take a pre-activation of per-unit ``mean`` and ``std`` to mean 0 and std
    ``init_scale``: ``(t - shift) * factor``. A unit with (near) zero variance is dead and left as it is."""
    dead = std < _DEAD_STD * (1.0 + mean.abs())
    factor = torch.where(dead, torch.ones_like(std), init_scale / std.clamp_min(1e-30))
    shift = torch.where(dead, torch.zeros_like(mean), mean)
    return dead, factor, shift


def _layer_record(
    name: str, module: nn.Module, mean: Tensor, std: Tensor, init_scale: float, dead: Tensor
) -> LayerInit:
    return LayerInit(
        name=name,
        kind=type(module).__name__,
        units=int(std.numel()),
        init_scale=init_scale,
        mean=float(mean.abs().mean()),
        std=float(std.mean()),
        dead_units=torch.nonzero(dead).flatten().tolist(),
    )


@torch.no_grad()
def _rescale_plain(layer: nn.Module, factor: Tensor) -> None:
    weight = layer.weight
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        if layer.groups != 1:
            raise ValueError(f"data-dependent init of a transposed conv with groups={layer.groups} is unsupported")
        weight.mul_(factor.view(1, -1, *([1] * (weight.dim() - 2))).to(weight.dtype))
    else:
        weight.mul_(factor.view(-1, *([1] * (weight.dim() - 1))).to(weight.dtype))


class _InitPass:
    """Forward hooks that initialise each layer the first time it runs and pair it with a following
    batch-norm layer."""

    def __init__(self, targets: dict[str, nn.Module], norms: dict[str, nn.Module], full: bool) -> None:
        self.full = full
        self.norms = norms
        self.names = {id(m): n for n, m in {**targets, **norms}.items()}
        self.done: set[int] = set()
        self.records: list[LayerInit] = []
        self.last: tuple[nn.Module, Tensor, Tensor, Tensor, Tensor | None] | None = None

    @torch.no_grad()  # a forward that re-enables gradients must not see these in-place updates
    def layer_hook(self, layer: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> Tensor | None:
        if id(layer) in self.done:
            return None
        self.done.add(id(layer))
        if not isinstance(output, Tensor) or output.dim() < 1:
            raise TypeError(f"{self.names[id(layer)]}: expected a tensor output, got {type(output).__name__}")
        if output.dim() < (layer.v if isinstance(layer, WNLayer) else layer.weight).dim():
            raise ValueError(
                f"{self.names[id(layer)] or type(layer).__name__} ran on an unbatched input (output shape "
                f"{tuple(output.shape)}): data-dependent init needs a batch dim to estimate per-unit statistics. "
                "Stack a few hundred examples along a new first dim, shape (N, ...)."
            )
        channel_dim = _channel_dim(layer)
        mean, std = _unit_stats(output, channel_dim)
        init_scale = float(getattr(layer, "init_scale", 1.0))
        dead, factor, shift = _normalizer(mean, std, init_scale)
        old_bias = None if layer.bias is None else layer.bias.detach().clone()
        if isinstance(layer, WNLayer):
            layer.rescale_(factor)
        else:
            _rescale_plain(layer, factor)
        if layer.bias is not None:
            layer.bias.copy_(((layer.bias.to(shift.dtype) - shift) * factor).to(layer.bias.dtype))
        layer.initialized.fill_(True)
        self.records.append(_layer_record(self.names[id(layer)], layer, mean, std, init_scale, dead))
        if layer.bias is None:
            new_output = output * _unit_view(factor, output, channel_dim)
        else:
            new_output = (output - _unit_view(shift, output, channel_dim)) * _unit_view(factor, output, channel_dim)
        self.last = (layer, new_output, factor, shift, old_bias)
        return new_output

    @torch.no_grad()
    def norm_pre_hook(self, norm: nn.Module, inputs: tuple[Any, ...]) -> tuple[Tensor, ...] | None:
        if id(norm) in self.done or not inputs or not isinstance(inputs[0], Tensor):
            return None
        self.done.add(id(norm))
        x = inputs[0]
        paired = self.last is not None and self.last[1] is x
        if paired:
            layer, _, factor, shift, old_bias = self.last
            if old_bias is not None:
                # Inside a layer + batch-norm pair only the scale is set; the layer's bias stays.
                layer.bias.copy_(old_bias)
                old_bias = old_bias.to(shift.dtype)
                x = x + _unit_view((shift - old_bias) * factor + old_bias, x, 1)
            self.records[-1].paired_norm = self.names[id(norm)]
            init_scale = float(getattr(layer, "init_scale", 1.0))
        elif not self.full:
            return None  # a norm after an already-initialised layer keeps its statistics
        else:
            init_scale = 1.0
        mean, std = _unit_stats(x, 1)
        if norm.running_mean is not None:  # None: a batch norm with track_running_stats=False
            norm.running_mean.copy_(mean.to(norm.running_mean.dtype))
        if isinstance(norm, nn.modules.batchnorm._BatchNorm):
            if norm.running_var is not None:
                norm.running_var.copy_((std**2).to(norm.running_var.dtype))
            if norm.affine and paired:
                norm.weight.fill_(init_scale)
        return (x, *inputs[1:])

    @torch.no_grad()
    def affine_norm_hook(self, norm: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> Tensor | None:
        """Layer/group norm: set its per-unit affine so its output (the pre-activation) has mean 0 and
        std ``init_scale`` on the batch, as section 3 does for a layer's g and b."""
        if id(norm) in self.done or norm.weight is None or norm.bias is None:
            return None
        self.done.add(id(norm))
        paired = self.last is not None and inputs and self.last[1] is inputs[0]
        if not (paired or self.full):
            return None
        init_scale = float(getattr(self.last[0], "init_scale", 1.0)) if paired else 1.0
        channel_dim = -1 if isinstance(norm, nn.LayerNorm) else 1
        if isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) != 1:
            return None  # a multi-dim affine has no per-unit reading: left as is
        mean, std = _unit_stats(output, channel_dim)
        dead, factor, shift = _normalizer(mean, std, init_scale)  # as a layer's: a dead unit keeps its affine
        norm.weight.mul_(factor.to(norm.weight.dtype))
        norm.bias.copy_(((norm.bias.to(shift.dtype) - shift) * factor).to(norm.bias.dtype))
        record = _layer_record(self.names[id(norm)], norm, mean, std, init_scale, dead)
        if paired:  # the norm's output is the paired layer's pre-activation: its dead units are listed there
            self.records[-1].dead_units = sorted({*self.records[-1].dead_units, *record.dead_units})
        else:
            self.records.append(record)
        return (output - _unit_view(shift, output, channel_dim)) * _unit_view(factor, output, channel_dim)


def data_dependent_init(
    model: nn.Module,
    batch: Any,
    *,
    force: bool = False,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> InitReport:
    """Initialise ``model`` from one minibatch (section 3, eq. 5-6), in place.

    Args:
        model: any ``nn.Module``; its WN layers set g (or s) and b, its plain linear and conv layers
            are rescaled the same way (layers' ``init_scale`` attribute gives the target std, default 1).
        batch: the minibatch, passed as ``model(batch)`` (``model(*batch)`` for a tuple or list,
            ``model(**batch)`` for a dict). Use a few hundred real examples; at least 2 are required.
        force: re-initialise layers that are already initialised. Without it a model whose layers all
            carry the ``initialized`` flag (a buffer, so it survives ``state_dict`` round trips) is left
            unchanged with a warning, and only not-yet-initialised layers are set otherwise. Plain layers get
            that buffer from this call, so a freshly built plain model loads the resulting ``state_dict``
            after :func:`add_init_flags`; layers built by :class:`wn_rl.Parameterization` carry it from
            the start.
        forward: optional ``forward(model, batch)`` for models whose forward takes something else.

    Returns:
        An :class:`InitReport` with per-layer statistics, dead units and layers the pass never reached.

    A batch that holds no tensor (a NumPy array, None) is a ``TypeError`` unless ``forward`` is given.
    The model runs in eval mode during the pass (no dropout or noise; batch norms see the statistics
    this pass sets) and every module's training mode is restored afterwards. A dict batch whose keys the
    forward does not take, or a batch on another device or of another dtype than the model's parameters,
    is an error that says so, with the model unchanged.
    """
    if forward is None:
        check_tensor_batch(batch, "data_dependent_init", "pass forward=lambda model, batch: model(...)")
    size = batch_size(batch)
    if size is not None and size < 2:
        raise ValueError(
            f"data-dependent init needs a batch of at least 2 examples to estimate per-unit mean and std, "
            f"got {size}; pass a few hundred real inputs (the paper used a minibatch)."
        )
    if forward is None:
        check_call(model, batch)
    layers = initializable_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no layer data-dependent init can set (WN layers or nn.Linear / "
            "nn.Conv* / nn.ConvTranspose*); recurrent cells keep their own initialization."
        )
    # a layer without the flag yet is not initialised: the flags added next change nothing here
    targets = {n: m for n, m in layers.items() if force or not bool(getattr(m, "initialized", False))}
    check_settable(model, targets, "data-dependent init")
    add_init_flags(model)
    if not targets:
        warnings.warn(
            f"{type(model).__name__} is already initialised (every layer's `initialized` flag is set, e.g. "
            "from a loaded checkpoint); data-dependent init changed nothing. Pass force=True to redo it.",
            stacklevel=2,
        )
        return InitReport(layers=[], skipped=True)
    norms = {n: m for n, m in model.named_modules() if isinstance(m, _BN_TYPES)}
    init_pass = _InitPass(targets, norms, full=len(targets) == len(layers))
    handles = [m.register_forward_hook(init_pass.layer_hook) for m in targets.values()]
    handles += [m.register_forward_pre_hook(init_pass.norm_pre_hook) for m in norms.values()]
    affine = {n: m for n, m in model.named_modules() if isinstance(m, _AFFINE_NORM_TYPES)}
    init_pass.names.update({id(m): n for n, m in affine.items()})
    handles += [m.register_forward_hook(init_pass.affine_norm_hook) for m in affine.values()]
    _run_pass(model, batch, forward, handles)
    not_reached = [n for n, m in targets.items() if id(m) not in init_pass.done]
    if not_reached:
        warnings.warn(f"data-dependent init never reached these layers (left unchanged): {not_reached}", stacklevel=2)
    return InitReport(layers=init_pass.records, not_reached=not_reached)


def _run_pass(model: nn.Module, batch: Any, forward: Callable | None, handles: list[Any]) -> None:
    """The init's forward pass in eval mode, without gradients; every module's own mode is restored after it
    (a submodule the user keeps in eval mode, such as a frozen batch norm, stays so) and the hooks removed. A
    failing pass leaves the model as it was."""
    before = {k: t.detach().clone() if isinstance(t, Tensor) else t for k, t in model.state_dict().items()}
    with eval_pass(model, handles):
        try:
            with torch.no_grad():
                call_with_batch(model, batch, forward)
            _check_finite(model)
        except BaseException as error:
            model.load_state_dict(before)  # in place (optimizers keep their references): no half-initialised model
            mismatch = batch_mismatch(model, batch) if is_type_or_device_error(error) else None
            if mismatch:
                raise RuntimeError(
                    f"data-dependent init's forward pass failed: {error}\n{mismatch}. The model is unchanged; pass "
                    "the batch as the model takes it in training (batch.to(device, dtype); Atari frames as the model "
                    "expects them: uint8 if it converts them itself, else batch.float() / 255)."
                ) from error
            raise


def _check_finite(model: nn.Module) -> None:
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise FloatingPointError(
                f"data-dependent init produced non-finite values in {name!r}; check the batch for NaN/inf "
                "and that every layer's input varies across the batch."
            )
