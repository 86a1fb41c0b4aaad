"""The effective-weight cache behind :func:`cached`: inside it a WN layer or recurrent cell computes
w = g v / ||v|| (eq. 2) once and reuses it, for time loops such as DRAW or a recurrent policy's rollout.

A cached weight is recomputed where reusing it would be wrong: after one of the module's parameters changed
in place (an optimizer step, ``load_state_dict``, data-dependent init; PyTorch counts those in ``_version``),
after any ``torch.optim`` step (a fused optimizer's writes are not counted in ``_version``),
was replaced (``layer.v = nn.Parameter(...)``, ``load_state_dict(..., assign=True)``) or given new storage
(``v.data = ...``), after a backward pass went through it (that pass freed its graph, so truncated
backpropagation through time, and gradient accumulation where each micro-batch's forward is followed by its
backward, work inside one block), and where it was computed
without a graph that gradients now need (acting under ``no_grad``, then training). A module with inference
tensors as parameters (built under ``torch.inference_mode``) is never cached: their in-place changes are not
counted. ``wn_rl.layers`` still resolves these names.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["cached"]

_Cached = TypeVar("_Cached", Tensor, tuple[Tensor, ...])


# What a module keeps inside `cached`: a layer's weight (or, acting, its output scale), a cell's weights; each
# beside the parameter state it is valid for (``<attr>_state``).
_CACHE_ATTRS = ("_cached_weight", "_cached_weights", "_cached_scale")


class _CachedWeights(nn.Module):
    """A module whose effective weights :func:`cached` can keep for a whole block: the WN layers and the WN
    recurrent cells (:mod:`wn_rl.recurrent_cells`). Its ``_cache_depth`` counts the open blocks around it."""

    _cache_depth = 0

    def __getstate__(self) -> dict[str, Any]:
        # a weight cached inside `cached()` is a non-leaf tensor: it must not be pickled or deep-copied
        cleared = dict.fromkeys(name for attr in _CACHE_ATTRS for name in (attr, f"{attr}_state"))
        return {**self.__dict__, **cleared, "_cache_depth": 0}


def _lacks_graph(cached: Tensor, *params: Tensor) -> bool:
    """Whether a weight cached by :func:`cached` was computed without autograd history (under
    ``no_grad``, e.g. while acting) although gradients should now reach ``params``: it is recomputed."""
    return torch.is_grad_enabled() and not cached.requires_grad and any(p.requires_grad for p in params)


_optimizer_steps = 0  # torch.optim steps taken in this process, by any optimizer


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


# A fused optimizer (Adam(fused=True), SGD(fused=True), ...) writes its parameters without bumping their
# ``_version``, so a weight cached before its step would be reused after it: every step of any torch.optim
# optimizer makes every cached weight stale.
register_optimizer_step_post_hook(_count_optimizer_step)


def optimizer_steps() -> int:
    """How many ``torch.optim`` optimizer steps this process has taken (any optimizer, fused ones included)."""
    return _optimizer_steps


def _parameter_state(module: nn.Module) -> tuple[Any, ...] | None:
    """Identity, storage and in-place version of each of ``module``'s own parameters, after the process's count of
    optimizer steps: what its cached weights are valid for. ``None`` (not cached) where a parameter is an inference
    tensor, whose in-place changes are not counted, or has no storage of its own (a ``torch.func`` transform's
    wrapper)."""
    state: list[Any] = [_optimizer_steps]
    try:
        for p in module._parameters.values():
            if p is not None:
                if p.is_inference():
                    return None
                state.append((id(p), p.data_ptr(), p._version))
    except RuntimeError:
        return None
    return tuple(state)


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
    module: nn.Module,
    attr: str,
    params: Callable[[], tuple[tuple[Tensor, ...], ...]],
    compute: Callable[[], _Cached],
) -> _Cached:
    """``module``'s cached ``attr`` (a tensor, or a tuple of tensors aligned with ``params()``: the parameters
    each is computed from) where it is still valid, else ``compute()``, stored there (see the module doc).

    While ``torch.compile`` traces, nothing is stored: a tensor kept from one compiled call would enter the next
    as a constant with a freed graph, and the compiler merges the repeated computations of one graph itself."""
    if torch.compiler.is_compiling():
        return compute()
    state = _parameter_state(module)
    if state is None:
        return compute()
    value = module.__dict__.get(attr)
    kept = module.__dict__.get(f"{attr}_state")
    if (
        value is None
        or kept is None
        or kept[0] != state
        or (
            torch.is_grad_enabled()
            and any(_lacks_graph(t, *group) for t, group in zip(_as_tuple(value), params(), strict=True))
        )
    ):
        value = compute()
        setattr(module, attr, value)
        # the parameters themselves are kept beside their ids, so that no id is reused while it is compared
        setattr(module, f"{attr}_state", (state, tuple(module._parameters.values())))
        _release_after_backward(module, attr, value)
    return value


def _as_tuple(value: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return value if isinstance(value, tuple) else (value,)


def _cacheable(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _CachedWeights)]


def _clear_cache(module: nn.Module) -> None:
    for attr in _CACHE_ATTRS:
        setattr(module, attr, None)
        setattr(module, f"{attr}_state", None)


@contextlib.contextmanager
def cached(model: nn.Module) -> Iterator[nn.Module]:
    """Inside this context every WN layer of ``model`` computes its effective weight once and reuses
    it (like ``torch.nn.utils.parametrize.cached``), for time loops such as DRAW or a recurrent
    policy's rollout. Gradients still flow to g and v through the one shared weight. A weight is
    recomputed after its parameters change in place (an optimizer step) or are replaced, and after a
    backward pass through it, so a block may hold several training steps. Nestable; released when the block exits,
    by an exception too.

    Outputs that share one cached weight are differentiated in one backward: sum their losses (or pass
    ``retain_graph=True``). Two forwards followed by two separate backwards fail on the second ("backward through
    the graph a second time"), as with ``torch.nn.utils.parametrize.cached``: the first freed the shared weight's
    graph. The cache belongs to the module, not to the thread: while a block is open, every thread that runs the
    model reuses its weights, so give another thread its own copy of the model (as the native DQN's update thread
    has)."""
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
