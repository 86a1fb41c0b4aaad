"""The effective-weight cache behind :func:`cached`: inside it a WN layer or recurrent cell computes
w = g v / ||v|| (eq. 2) once and reuses it, for time loops such as DRAW or a recurrent policy's rollout.

A cached weight is recomputed where reusing it would be wrong: after one of its parameters changed in place
(an optimizer step, ``load_state_dict``, data-dependent init; PyTorch counts those in ``_version``), after a
backward pass went through it (that pass freed its graph, so truncated backpropagation through time and
gradient accumulation inside one block work), and where it was computed without a graph that gradients now
need (acting under ``no_grad``, then training). ``wn_rl.layers`` still resolves these names.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
from torch import Tensor, nn

__all__ = ["cached"]

_Cached = TypeVar("_Cached", Tensor, tuple[Tensor, ...])


class _CachedWeights(nn.Module):
    """A module whose effective weights :func:`cached` can keep for a whole block: the WN layers and the WN
    recurrent cells (:mod:`wn_rl.recurrent_cells`). Its ``_cache_depth`` counts the open blocks around it."""

    _cache_depth = 0


def _lacks_graph(cached: Tensor, *params: Tensor) -> bool:
    """Whether a weight cached by :func:`cached` was computed without autograd history (under
    ``no_grad``, e.g. while acting) although gradients should now reach ``params``: it is recomputed."""
    return torch.is_grad_enabled() and not cached.requires_grad and any(p.requires_grad for p in params)


def _versions(params: tuple[Tensor, ...]) -> tuple[int, ...]:
    """The in-place version counters of ``params`` (inference tensors have none, and never change)."""
    return tuple(0 if p.is_inference() else p._version for p in params)


def _release(module_ref: weakref.ref, attr: str, cached_id: int, _grad: Tensor) -> None:
    module = module_ref()
    if module is not None and id(getattr(module, attr, None)) == cached_id:
        setattr(module, attr, None)


def _release_after_backward(module: nn.Module, attr: str, value: Tensor | tuple[Tensor, ...]) -> None:
    """Drop ``module``'s cached ``attr`` once a backward pass reaches it: that pass frees the graph the next
    forward would otherwise reuse ("Trying to backward through the graph a second time"). The hook holds the
    value's id, not the value: a graph node that held its own tensor would never be freed."""
    release = functools.partial(_release, weakref.ref(module), attr, id(value))
    for tensor in value if isinstance(value, tuple) else (value,):
        if tensor.requires_grad:
            tensor.register_hook(release)


def _reuse(
    module: nn.Module, attr: str, params: tuple[tuple[Tensor, ...], ...], compute: Callable[[], _Cached]
) -> _Cached:
    """``module``'s cached ``attr`` (a tensor, or a tuple of tensors aligned with ``params``: the parameters
    each is computed from) where it is still valid, else ``compute()``, stored there (see the module doc).

    While ``torch.compile`` traces, nothing is stored: a tensor kept from one compiled call would enter the next
    as a constant with a freed graph, and the compiler merges the repeated computations of one graph itself."""
    if torch.compiler.is_compiling():
        return compute()
    value = getattr(module, attr, None)
    versions = _versions(tuple(p for group in params for p in group))
    tensors = value if isinstance(value, tuple) else (value,)
    if (
        value is None
        or getattr(module, f"{attr}_versions", None) != versions
        or any(_lacks_graph(t, *group) for t, group in zip(tensors, params, strict=True))
    ):
        value = compute()
        setattr(module, attr, value)
        setattr(module, f"{attr}_versions", versions)
        _release_after_backward(module, attr, value)
    return value


def _cacheable(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _CachedWeights)]


def _clear_cache(module: nn.Module) -> None:
    module._cached_weight = None
    module._cached_weights = None
    module._cached_scale = None


@contextlib.contextmanager
def cached(model: nn.Module) -> Iterator[nn.Module]:
    """Inside this context every WN layer of ``model`` computes its effective weight once and reuses
    it (like ``torch.nn.utils.parametrize.cached``), for time loops such as DRAW or a recurrent
    policy's rollout. Gradients still flow to g and v through the one shared weight. A weight is
    recomputed after its parameters change in place (an optimizer step) and after a backward pass
    through it, so a block may hold several training steps. Nestable; released when the block exits,
    by an exception too."""
    modules = _cacheable(model)
    for module in modules:
        module._cache_depth += 1
    try:
        yield model
    finally:
        for module in modules:
            module._cache_depth -= 1
            if module._cache_depth == 0:
                _clear_cache(module)
