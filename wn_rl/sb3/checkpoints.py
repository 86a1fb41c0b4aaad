"""Saving an SB3 run's models and replay buffers atomically, and finding the newest complete model to resume
(the files :mod:`wn_rl.sb3.runner` writes; layout in :mod:`wn_rl.sb3.config`)."""

from __future__ import annotations

import hashlib
import io
import json
import warnings
import zipfile
import zlib
from pathlib import Path

from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm

from wn_rl.analysis.runs import sb3_saved_models
from wn_rl.checkpoint import atomic_write_bytes, file_sha256
from wn_rl.sb3.guard import NonFiniteGuardCallback

__all__ = [
    "AtomicCheckpointCallback",
    "final_buffer_belongs",
    "latest_model",
    "latest_saved_model",
    "replay_buffer_path",
    "save_model_atomically",
    "save_replay_buffer_atomically",
]


def _zip_ok(path: Path) -> str | None:
    """``None`` when ``path`` is a complete zip whose members pass their CRC checks, else the problem."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError, zlib.error) as exc:
        return f"not a readable zip ({exc})"
    return None if bad is None else f"member {bad} fails its CRC check"


def latest_model(run_dir: Path) -> Path | None:
    """The newest complete model of a run: the checkpoint with the most steps, or ``final_model.zip``
    when its recorded step count (``final_steps.json``) is at least as large. A truncated or corrupted
    zip is skipped with a warning that names it, falling back to the previous one."""
    latest = latest_saved_model(run_dir, stacklevel=3)
    return None if latest is None else latest[1]


def latest_saved_model(run_dir: Path, *, stacklevel: int = 2) -> tuple[int, Path] | None:
    """:func:`latest_model` with its step count (from the file name, or ``final_steps.json``): ``(steps, path)``,
    from one listing of the run's saved models."""
    for steps, path in sb3_saved_models(run_dir):
        problem = _zip_ok(path)
        if problem is None:
            return steps, path
        message = f"skipping damaged model {path}: {problem}; falling back to the previous one"
        warnings.warn(message, stacklevel=stacklevel)
    return None


def replay_buffer_path(model_path: Path) -> Path:
    """Where the replay buffer saved with ``model_path`` lives (``model_N_steps.zip`` ->
    ``replay_buffer_N_steps.pkl``, ``final_model.zip`` -> ``final_replay_buffer.pkl``)."""
    if model_path.name == "final_model.zip":
        return model_path.with_name("final_replay_buffer.pkl")
    return model_path.with_name(model_path.name.replace("model_", "replay_buffer_", 1).replace(".zip", ".pkl"))


def save_replay_buffer_atomically(model: BaseAlgorithm, path: Path) -> str:
    """The replay buffer of an off-policy model, written atomically like the model; returns the file's SHA-256."""
    buffer = io.BytesIO()
    model.save_replay_buffer(buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return hashlib.sha256(buffer.getbuffer()).hexdigest()


def final_buffer_belongs(run_dir: Path) -> bool:
    """Whether ``final_replay_buffer.pkl`` was saved with ``final_model.zip``. The final save writes the buffer,
    the model, then ``final_steps.json`` with the buffer's SHA-256 (``null`` when no buffer was saved), each
    atomically: a save that a full disk or a kill stopped half way leaves the previous model and steps file
    beside a newer buffer (or a stale one beside a newer model), which this tells apart. Runs from before the
    hash was recorded load their buffer as before."""
    try:
        recorded = json.loads((run_dir / "final_steps.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(recorded, dict) or "replay_buffer_sha256" not in recorded:
        return True  # written before the hash was recorded
    expected = recorded["replay_buffer_sha256"]
    return expected is not None and file_sha256(run_dir / "final_replay_buffer.pkl") == expected


def save_model_atomically(model: BaseAlgorithm, path: Path) -> None:
    """``model.save`` into memory, then one atomic write (temp file, fsync, rename): a kill leaves the
    previous file intact, never a truncated zip."""
    buffer = io.BytesIO()
    model.save(buffer)
    atomic_write_bytes(path, buffer.getvalue())


class AtomicCheckpointCallback(BaseCallback):
    """Save ``model_<steps>_steps.zip`` every ``save_freq`` environment steps, atomically, plus the
    replay buffer (``replay_buffer_<steps>_steps.pkl``, written first) when asked. With a ``guard``, a
    model that had a non-finite gradient step is never saved: the guard's error is raised instead."""

    def __init__(
        self,
        save_freq: int,
        save_dir: Path,
        save_replay_buffer: bool = False,
        verbose: int = 0,
        guard: NonFiniteGuardCallback | None = None,
    ) -> None:
        super().__init__(verbose)
        self.save_freq = save_freq
        self.save_dir = Path(save_dir)
        self.save_replay_buffer = save_replay_buffer
        self.guard = guard
        self.last_path: Path | None = None
        self._last_saved = 0

    def _init_callback(self) -> None:
        self.save_dir.mkdir(parents=True, exist_ok=True)
        self._last_saved = self.model.num_timesteps  # a resumed model's count (the callback's is still 0 here)

    def _on_step(self) -> bool:
        if self.num_timesteps - self._last_saved >= self.save_freq:
            self.save()
        return True

    def save(self) -> Path:
        if self.guard is not None:
            self.guard.check()
        steps = self.num_timesteps
        path = self.save_dir / f"model_{steps}_steps.zip"
        if self.save_replay_buffer and isinstance(self.model, OffPolicyAlgorithm):
            save_replay_buffer_atomically(self.model, replay_buffer_path(path))  # before the model: never newer
        save_model_atomically(self.model, path)
        self._last_saved = steps
        self.last_path = path
        if self.verbose:
            print(f"checkpoint: {path}")
        return path
