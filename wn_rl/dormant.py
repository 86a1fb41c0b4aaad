"""Dormant units: how many hidden units of a network have (almost) stopped responding to its inputs.

Sokar et al. 2023, "The Dormant Neuron Phenomenon in Deep Reinforcement Learning" (ICML), section 3: for a
layer of H units with outputs h_i(x), unit i's score is its mean absolute activation relative to the layer's

    s_i = E_x |h_i(x)| / ((1/H) sum_k E_x |h_k(x)|),

the expectation taken over a batch of inputs (and, for a convolution's channel, over its spatial positions
too). Unit i is tau-dormant when s_i <= tau; with tau = 0 that means never active on the batch (a ReLU unit
whose pre-activation is negative for every input). A layer whose units are all silent has every score 0. A layer
with a non-finite activation (NaN or inf: a diverging network) has no layer mean: its scores are NaN, no unit of it
counts dormant, and its fraction is NaN (a gap in TensorBoard) rather than a misleading 1.
DQN networks trained with large learning rates can lose all of a layer's units this way: the Q-values
become constant and the agent always takes the same action.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from wn_rl.batches import batch_size, call_with_batch, check_tensor_batch, eval_pass

__all__ = [
    "ACTIVATIONS",
    "TAU_EXPECTED",
    "DormantStats",
    "dormant_scalars",
    "dormant_units",
    "is_tau",
    "total_fraction",
]

TAU_EXPECTED = "a finite threshold >= 0 (0: units never active on the batch; Sokar et al. use 0 to 0.1)"


def is_tau(tau: object) -> bool:
    """Whether ``tau`` is a dormancy threshold: a real number (not a bool), finite and >= 0 (the one check behind
    ``dormant_units``, ``WnStatsCallback``, both configs and ``scripts/dormant_units.py``)."""
    return isinstance(tau, numbers.Real) and not isinstance(tau, bool) and math.isfinite(tau) and tau >= 0


# The hidden-layer nonlinearities looked at by default (nn.ReLU6 is an nn.Hardtanh). Output squashers such as
# nn.Sigmoid and nn.Softmax are left out: they end heads, not hidden layers.
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardtanh,
    nn.Tanh,
)


@dataclass(frozen=True)
class DormantStats:
    """One layer's dormant units: ``scores`` are the per-unit s_i (a CPU tensor of ``units`` values), ``dormant``
    how many have s_i <= ``tau``, ``non_finite`` how many had a NaN or inf mean activation (then every score of the
    layer is NaN and ``dormant`` is 0)."""

    units: int
    dormant: int
    tau: float
    scores: Tensor
    non_finite: int = 0

    @property
    def fraction(self) -> float:
        """The share of the layer's units that are dormant, in [0, 1]; NaN when its activations were not finite."""
        return math.nan if self.non_finite else self.dormant / self.units


def _pick_layers(model: nn.Module, layers: Iterable[str] | None) -> dict[str, nn.Module]:
    """``{name: module}``: the named modules, or every activation module of :data:`ACTIVATIONS`."""
    named = dict(model.named_modules())
    if layers is not None:
        names = [layers] if isinstance(layers, str) else list(layers)
        missing = [n for n in names if n not in named]
        if missing or not names:
            known = [n for n, m in named.items() if isinstance(m, ACTIVATIONS)] or [n for n in named if n][:20]
            raise ValueError(
                f"layers={names!r}: {type(model).__name__} has no module named {missing or 'at all'}; "
                f"give names from model.named_modules(), e.g. {known}"
            )
        return {n: named[n] for n in names}
    found = {(n or type(m).__name__): m for n, m in named.items() if isinstance(m, ACTIVATIONS)}
    if not found:
        kinds = ", ".join(k.__name__ for k in ACTIVATIONS)
        raise ValueError(
            f"{type(model).__name__} has no activation module ({kinds}); activations applied as functions "
            "(F.relu, torch.tanh) cannot be seen. Build the model with activation modules (nn.ReLU()), or pass "
            "layers=[...] naming the modules whose outputs are the units (names from model.named_modules())."
        )
    return found


def _unit_means(name: str, output: Any) -> Tensor:
    """E|h_i| per unit of one call's ``output``: features of ``(batch, H)``, channels of ``(batch, C, ...)``."""
    if not isinstance(output, Tensor) or output.dim() < 2:
        shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise ValueError(
            f"layer {name!r} returned {shape}; dormant units need a (batch, units) or (batch, channels, ...) "
            "tensor: pick activation modules with layers=[...]"
        )
    # summed in float64: float32 sums of finite magnitudes near its largest value (3.4e38) overflow to inf; the
    # mean itself fits the output's dtype
    means = output.detach().abs().mean(dim=[0, *range(2, output.dim())], dtype=torch.float64)
    return means.to(torch.promote_types(output.dtype, torch.float32))


def _scores(name: str, calls: list[Tensor]) -> tuple[Tensor, Tensor]:
    """s_i from the per-call unit means of one layer (a module called twice counts both calls), and how many units
    had a non-finite mean: with any, the layer mean is undefined and every s_i is NaN."""
    if len({c.shape for c in calls}) > 1:
        raise ValueError(
            f"layer {name!r} was called {len(calls)} times with different numbers of units "
            f"{[c.numel() for c in calls]}; give each layer its own activation module"
        )
    # in float64, and the layer mean as a sum of unit means / H: a plain mean of finite unit means near the
    # dtype's largest value (3.4e38 in float32) sums to inf, which made every s_i 0 and the layer all dormant
    mean_abs = torch.stack(calls).to(torch.float64).mean(0)
    non_finite = (~mean_abs.isfinite()).sum()
    layer_mean = (mean_abs / mean_abs.numel()).sum()  # finite when every unit mean is
    scores = torch.where(layer_mean > 0, mean_abs / layer_mean.clamp_min(torch.finfo(mean_abs.dtype).tiny), 0.0)
    scores = torch.where((non_finite > 0) | ~layer_mean.isfinite(), math.nan, scores)
    return scores.to(calls[0].dtype), non_finite


def _to_host(tensors: list[Tensor]) -> list[Tensor]:
    """``tensors`` on the CPU in one dtype (their promoted one); a model's layers may sit on several devices."""
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    return [t.to("cpu", dtype) for t in tensors]


@torch.no_grad()
def dormant_units(
    model: nn.Module,
    batch: Any,
    *,
    tau: float = 0.0,
    layers: Iterable[str] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> dict[str, DormantStats]:
    """The tau-dormant units of each activation layer of ``model`` on ``batch`` (Sokar et al. 2023, section 3).

    Unit i of a layer is dormant when s_i = E_x|h_i(x)| / ((1/H) sum_k E_x|h_k(x)|) <= ``tau`` (see the module
    docstring); units are the features of a 2-d output and the channels of a convolution's output (averaged
    over positions too).

    Args:
        model: any ``nn.Module``. By default every module of :data:`ACTIVATIONS` (``nn.ReLU``, ``nn.Tanh``, ...) is
            a layer; activations applied as functions (``F.relu``) have no module and are not seen.
        batch: the inputs, at least 2, passed as ``model(batch)`` (``model(*batch)`` for a tuple or list,
            ``model(**batch)`` for a dict), as :func:`wn_rl.data_dependent_init` does. A few hundred states.
        tau: the dormancy threshold, >= 0 (0: never active; Sokar et al. use 0 to 0.1).
        layers: names of the modules to look at (from ``model.named_modules()``) instead of every activation.
        forward: optional ``forward(model, batch)`` for models whose forward takes something else.

    Returns:
        ``{layer name: DormantStats}`` in module order, for the layers the forward pass reached. A module called
        more than once (a time loop, or one ``nn.ReLU`` shared by several layers of the same width) is one layer
        whose scores average all its calls: give each layer its own activation module to count them apart.

    One forward pass without gradients, in eval mode (norm layers on their running statistics, which it does
    not update; no dropout): the network as it acts. Every module's training mode is restored and the hooks are
    removed afterwards, also when the pass fails. Two host copies per layer. A layer
    with NaN or inf activations gets NaN scores and fraction, ``non_finite`` counting its non-finite units: measuring a
    diverging network does not raise.
    """
    if not is_tau(tau):
        raise ValueError(f"tau={tau!r}: expected {TAU_EXPECTED}")
    if forward is None:
        check_tensor_batch(batch, "dormant_units", "pass forward=lambda model, batch: model(...)")
    size = batch_size(batch)
    if size is not None and size < 2:
        raise ValueError(f"dormant units need a batch of at least 2 inputs, got {size}; pass a few hundred states")
    picked = _pick_layers(model, layers)
    calls: dict[str, list[Tensor]] = {}

    def hook_for(name: str) -> Callable[..., None]:
        return lambda module, inputs, output: calls.setdefault(name, []).append(_unit_means(name, output))

    handles = [module.register_forward_hook(hook_for(name)) for name, module in picked.items()]
    with eval_pass(model, handles):
        call_with_batch(model, batch, forward)
    if not calls:
        raise ValueError(f"the forward pass of {type(model).__name__} reached none of the layers {list(picked)}")
    names = [name for name in picked if name in calls]
    host = _to_host([t for name in names for t in _scores(name, calls[name])])
    out = {}
    for name, scores, non_finite in zip(names, host[::2], host[1::2], strict=True):
        dormant = int((scores <= tau).sum())  # NaN scores are never <= tau
        out[name] = DormantStats(scores.numel(), dormant, float(tau), scores, non_finite=int(non_finite))
    return out


def total_fraction(stats: Mapping[str, DormantStats]) -> float:
    """The share of dormant units over all the layers of ``stats`` together (each unit counts once); NaN when a
    layer's activations were not finite (:attr:`DormantStats.non_finite`)."""
    units = sum(s.units for s in stats.values())
    if not units or any(s.non_finite for s in stats.values()):
        return math.nan
    return sum(s.dormant for s in stats.values()) / units


def dormant_scalars(
    model: nn.Module,
    batch: Any,
    *,
    tau: float = 0.0,
    layers: Iterable[str] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    prefix: str = "dormant",
) -> dict[str, float]:
    """:func:`dormant_units` as scalars ready for ``SummaryWriter.add_scalar`` or SB3's ``logger.record``:
    ``{f"{prefix}/{layer}/fraction": ..., f"{prefix}/total_fraction": ...}`` (the total over every unit)."""
    stats = dormant_units(model, batch, tau=tau, layers=layers, forward=forward)
    scalars = {f"{prefix}/{layer}/fraction": s.fraction for layer, s in stats.items()}
    scalars[f"{prefix}/total_fraction"] = total_fraction(stats)
    return scalars
