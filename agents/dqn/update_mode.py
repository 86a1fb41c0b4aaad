"""How the learner's update runs on this machine: ``agent.update_mode`` (eager, or one compiled graph,
on CUDA replayed as a CUDA graph) and, on a CPU, glibc keeping the update's freed memory."""

from __future__ import annotations

import torch
from torch import nn

from wn_rl.config import ConfigError

__all__ = ["COMPILED_UPDATE_TORCH", "COMPILE_PAYS_AFTER_UPDATES", "keep_freed_memory", "resolve_update_mode"]

COMPILE_PAYS_AFTER_UPDATES = 50_000  # CPU: below this, update_mode auto stays eager
# The compiled update's forward is torch.func.functional_call, which Dynamo traces from torch 2.5 on;
# torch 2.4's keeps it as one opaque call and cannot hand it the module ("call_function args: NNModuleVariable()")
COMPILED_UPDATE_TORCH = (2, 5)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> None:
    """Make glibc keep freed blocks in the process instead of returning them to the OS.

    An update allocates and frees temporaries of up to the parameters' size (gradients, moments'
    updates, activations). glibc serves blocks above its mmap threshold with fresh ``mmap``s and trims
    the heap top, so every update page-faults megabytes in again; on the 2-core KVM CPU this was ~25% of
    an eager Nature-CNN update (docs/benchmarks.md). Raising both thresholds (to 32 MiB, glibc's maximum
    mmap threshold, and 1 GiB) keeps them mapped. Process-wide; a no-op where glibc is not the C library.
    """
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)  # the running process: glibc's symbols included
    libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
    libc.mallopt(M_TRIM_THRESHOLD, 2**30)


def resolve_update_mode(mode: str, device: torch.device, model: nn.Module, planned_updates: int | None = None) -> str:
    """``agent.update_mode``. ``auto``: ``cudagraph`` on CUDA; on a CPU ``compiled`` when the run plans at
    least ``COMPILE_PAYS_AFTER_UPDATES`` updates (compiling takes ~0.5-2 min there and saves ~1.5 ms per
    MinAtar and ~10 ms per Nature-CNN update, docs/benchmarks.md), else ``eager``. Networks with batch
    statistics always run eager (their forward changes buffers), and so does torch < 2.5
    (:data:`COMPILED_UPDATE_TORCH`), where ``compiled`` and ``cudagraph`` raise :class:`ConfigError`."""
    from agents.dqn.networks import has_batch_statistics

    compiles = torch.__version__ >= COMPILED_UPDATE_TORCH
    if mode == "auto":
        if has_batch_statistics(model) or not compiles:
            return "eager"
        if device.type == "cuda":
            return "cudagraph"
        long_run = planned_updates is not None and planned_updates >= COMPILE_PAYS_AFTER_UPDATES
        return "compiled" if device.type == "cpu" and long_run else "eager"
    if mode != "eager" and has_batch_statistics(model):
        raise ValueError(
            f"agent.update_mode={mode!r} cannot run a network with batch statistics (batch norm, mean-only BN): "
            "its forward changes buffers. Use agent.update_mode=eager (or auto)."
        )
    if mode == "cudagraph" and device.type != "cuda":
        raise ValueError(f"agent.update_mode='cudagraph' needs a CUDA device, not {device}; use 'compiled' or 'auto'.")
    if mode != "eager" and not compiles:
        version = ".".join(map(str, COMPILED_UPDATE_TORCH))
        raise ConfigError(
            f"agent.update_mode={mode!r} needs torch >= {version} (torch.compile of the update's "
            f"torch.func.functional_call); this is torch {torch.__version__}. Use agent.update_mode=eager "
            "(or auto), or upgrade torch."
        )
    return mode
