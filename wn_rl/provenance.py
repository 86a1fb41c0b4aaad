"""Provenance of a run: which code, which libraries, which machine.

Every run directory and every checkpoint stores :func:`provenance`, so that a number can always be
traced to the commit (and whether the working tree had uncommitted changes), the library versions and
the hardware that produced it. Collection never raises: a field that cannot be read is ``None``.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["git_info", "hardware_info", "library_versions", "provenance"]

_LIBRARIES = ("torch", "numpy", "gymnasium", "ale-py", "stable-baselines3", "sb3-contrib", "minatar", "wn_rl")


def _run_git(args: list[str], cwd: Path) -> str | None:
    try:
        result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_info(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Commit, branch and dirty flag of the git checkout holding ``path`` (default: this package).

    ``dirty`` is True when tracked files differ from the commit (untracked files do not count), so a
    result with ``dirty: False`` can be reproduced from ``commit`` alone.
    """
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent
    if cwd.is_file():
        cwd = cwd.parent
    commit = _run_git(["rev-parse", "HEAD"], cwd)
    if commit is None:
        return {"commit": None, "branch": None, "dirty": None, "repo_root": None}
    status = _run_git(["status", "--porcelain", "--untracked-files=no"], cwd)
    return {
        "commit": commit,
        "branch": _run_git(["rev-parse", "--abbrev-ref", "HEAD"], cwd),
        "dirty": None if status is None else bool(status),
        "repo_root": _run_git(["rev-parse", "--show-toplevel"], cwd),
    }


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries a result depends on (``None`` when not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gpu_info() -> list[dict[str, Any]]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpus.append(
            {"name": props.name, "memory_bytes": int(props.total_memory), "capability": f"{props.major}.{props.minor}"}
        )
    return gpus


def hardware_info() -> dict[str, Any]:
    """CPU model and count, physical memory, GPUs (name, memory, compute capability), OS and host name."""
    try:
        import torch

        cuda = torch.version.cuda
        torch_threads = torch.get_num_threads()
    except ImportError:
        cuda, torch_threads = None, None
    return {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch_threads,
        "memory_bytes": _memory_bytes(),
        "gpus": _gpu_info(),
        "cuda": cuda,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "hostname": platform.node(),
    }


def _cwd() -> str | None:
    """The working directory, or None when it cannot be read (it was deleted under the process)."""
    try:
        return os.getcwd()
    except OSError:
        return None


def provenance(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Everything needed to trace a result: git state, library versions, hardware, command, time.

    Plain JSON-serialisable data. ``path`` locates the git checkout (default: the one holding wn_rl).
    """
    return {
        "git": git_info(path),
        "versions": library_versions(),
        "hardware": hardware_info(),
        "command": [sys.executable, *sys.argv],
        "cwd": _cwd(),
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
