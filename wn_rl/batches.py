"""Passing a batch to a model: how :func:`wn_rl.data_dependent_init` and :func:`wn_rl.dormant_units` call the
model on a batch (a tensor, or a dict, tuple or list of tensors), the checks they make before the pass, and the
eval-mode context of their measuring forward passes."""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from torch import Tensor, nn

__all__ = [
    "batch_mismatch",
    "batch_size",
    "call_with_batch",
    "check_call",
    "check_tensor_batch",
    "eval_pass",
    "is_type_or_device_error",
]


@contextlib.contextmanager
def eval_pass(model: nn.Module, handles: Iterable[Any] = ()) -> Iterator[None]:
    """``model`` in eval mode for a measuring forward pass; afterwards, also when the pass fails, the hooks
    behind ``handles`` are removed and every module's own training mode is restored (a submodule the user keeps
    in eval mode, such as a frozen batch norm, stays so)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training


def call_with_batch(model: nn.Module, batch: Any, forward: Callable[[nn.Module, Any], Any] | None) -> None:
    """``forward(model, batch)``, else ``model(**batch)`` for a dict, ``model(*batch)`` for a tuple or list,
    ``model(batch)`` otherwise: how :func:`data_dependent_init` and :func:`wn_rl.dormant_units` pass a batch."""
    if forward is not None:
        forward(model, batch)
    elif isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def check_call(model: nn.Module, batch: Any) -> None:
    """Refuse, before anything runs, a batch the model's forward cannot take as :func:`call_with_batch` passes it
    (a dict as keyword arguments, a tuple or list as positional ones, anything else as the one argument)."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):  # a builtin or C forward: nothing to check
        return
    if isinstance(batch, dict):
        how, bind = "model(**batch), its keys as keyword arguments", lambda: signature.bind(**batch)
    elif isinstance(batch, (tuple, list)):
        how, bind = f"model(*batch), its {len(batch)} items as positional arguments", lambda: signature.bind(*batch)
    else:
        how, bind = "model(batch), as the one argument", lambda: signature.bind(batch)
    try:
        bind()
    except TypeError as error:
        raise TypeError(
            f"data_dependent_init passes a {type(batch).__name__} batch as {how}, but "
            f"{type(model).__name__}.forward{signature} does not take it ({error}). For a forward that takes the "
            "dict or tuple itself (a Dict observation), pass (batch,); for any other call, pass "
            "forward=lambda model, batch: model(...)."
        ) from None


def check_tensor_batch(batch: Any, caller: str, other_forward: str | None = None) -> None:
    """Refuse, before anything runs, a ``batch`` that holds no tensor (a NumPy array, None, a list of arrays):
    a layer would fail on it with an error about something else. ``other_forward`` says how to pass a batch the
    model converts itself, where the caller has a way."""
    if _batch_tensors(batch):
        return
    kind = type(batch)
    found = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    if isinstance(batch, (dict, tuple, list)):
        found = f"a {found} holding no tensor"
    other = f"; for a forward that takes something else, {other_forward}" if other_forward else ""
    raise TypeError(
        f"{caller} takes the batch as a torch.Tensor, or a dict, tuple or list holding tensors; got "
        f"{'None' if batch is None else found}. Convert it first, e.g. "
        f"torch.as_tensor(obs, dtype=torch.float32, device=device){other}."
    )


def batch_size(batch: Any) -> int | None:
    """The leading size of the first tensor in ``batch`` (a tensor, or a dict, tuple or list holding some)."""
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.dim() else 0
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (tuple, list)):
        for item in batch:
            size = batch_size(item)
            if size is not None:
                return size
    return None


def _batch_tensors(batch: Any) -> list[Tensor]:
    if isinstance(batch, Tensor):
        return [batch]
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (tuple, list)):
        return [t for item in batch for t in _batch_tensors(item)]
    return []


# How torch 2.13 words an input of another dtype or device than a parameter (conv, linear, matmul, pooling,
# norms, activations, in-place ops): "mat1 and mat2 must have the same dtype", "expected m1 and m2 to have the
# same dtype", "Input type (unsigned char) and bias type (float) should be the same", "expected scalar type Byte
# but found Float", "... not implemented for 'Byte'", "mixed dtype (CPU): all inputs must share same datatype",
# "result type Float can't be cast to the desired output type Byte", "Tensor on device meta is not on
# the expected device cpu!" and, on a GPU, "Expected all tensors to be on the same device".
_TYPE_OR_DEVICE_ERROR = re.compile(
    r"same dtype|type \(.*\) should be the same|scalar type|not implemented for '|mixed dtype|can't be cast to"
    r"|same device|expected device",
    re.IGNORECASE,
)


def is_type_or_device_error(error: BaseException) -> bool:
    """Whether ``error`` is torch refusing an input of another dtype or device than a parameter: only then does
    the init's error name the batch's dtype and device (a user's own error on a uint8 batch is about something
    else)."""
    return isinstance(error, RuntimeError) and _TYPE_OR_DEVICE_ERROR.search(str(error)) is not None


def batch_mismatch(model: nn.Module, batch: Any) -> str | None:
    """Where the batch's tensors sit on another device than the model's parameters, or hold another dtype
    (integers included), a sentence saying so; None where they match (the failure has another cause)."""
    params = [p for p in model.parameters() if p.is_floating_point()]
    devices = {str(p.device) for p in params}
    dtypes = {str(p.dtype).removeprefix("torch.") for p in params}
    found = {(str(t.device), str(t.dtype).removeprefix("torch.")) for t in _batch_tensors(batch)}
    if not params or all(device in devices and dtype in dtypes for device, dtype in found):
        return None
    batch_text = ", ".join(f"{dtype} on {device}" for device, dtype in sorted(found))
    model_text = f"{', '.join(sorted(dtypes))} on {', '.join(sorted(devices))}"
    return f"the batch holds {batch_text}; the model's parameters are {model_text}"
