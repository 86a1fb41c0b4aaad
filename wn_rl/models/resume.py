"""Resumable paper-model runs: epoch checkpoints in a per-run folder, the config check on resume, the
position inside an epoch, RNG states, and SIGINT/SIGTERM handlers.

A run named ``{experiment}__{parameterization}__{seed}__{unix time}`` keeps its epoch checkpoints in
``checkpoint_dir/<name>/checkpoint_<update>.pt`` (atomic, completion marker last: :mod:`wn_rl.checkpoint`)
beside ``config.yaml``; the final checkpoint stays ``checkpoint_dir/<name>.pt``. Rerunning the command
finds the newest folder of the same experiment, parameterization and seed and continues it from its newest
complete checkpoint, with the TensorBoard curves continued in the same log folder (``purge_step`` drops what
a killed process logged after that checkpoint). A config that differs in a key outside the loop's
``SAFE_TO_CHANGE`` is refused unless ``force``; a finished run whose config differs, or one that stopped
before its first checkpoint, is left alone and a new run starts.

One process at a time trains a run: the run folder's lock (:mod:`wn_rl.run_lock`) is taken before a resume loads
its checkpoint, or right after a new run claims its folder, and held until the final checkpoint is written; a
second process on the same run gets :class:`~wn_rl.run_lock.RunInUseError`, naming the process that holds it.
"""

from __future__ import annotations

import json
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from wn_rl import checkpoint
from wn_rl.config import ConfigError, config_diff, config_to_dict, read_run_config
from wn_rl.models.training import PolyakAverage, run_name, save_checkpoint
from wn_rl.provenance import provenance
from wn_rl.run_lock import RunLock
from wn_rl.signals import StopOnSignals

__all__ = [
    "KEEP_CHECKPOINTS",
    "EpochProgress",
    "LoopState",
    "ResumableRun",
    "TrainingInterrupted",
    "rng_state",
    "set_rng_state",
]

KEEP_CHECKPOINTS = 3
"epoch checkpoints kept per run (the newest ones)"


class TrainingInterrupted(SystemExit):
    """The run stopped on SIGINT/SIGTERM after writing a checkpoint. A ``SystemExit`` with code 128 +
    the signal number, so a script that does not catch it exits with the shell's convention (130, 143)."""

    def __init__(self, signum: int, checkpoint_path: Path | None) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.checkpoint = checkpoint_path


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """The states of the global torch generators (CPU and, when present, CUDA) and of ``generator``."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    """Put back the states from :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class EpochProgress:
    """Where the loop stands inside an epoch: its minibatch order, the next minibatch, running sums and
    the seconds spent so far (so an epoch stopped by a signal continues where it stopped)."""

    order: Tensor
    step: int = 0
    sums: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @classmethod
    def start(cls, n: int, generator: torch.Generator) -> EpochProgress:
        """A new epoch: the same ``randperm`` draw as :func:`wn_rl.models.training.minibatches`."""
        return cls(torch.randperm(n, generator=generator))

    def batches(self, batch_size: int):
        """``(step, indices)`` of the minibatches still to do (the last partial batch dropped)."""
        for step in range(self.step, len(self.order) // batch_size):
            yield step, self.order[step * batch_size : (step + 1) * batch_size]

    def state_dict(self) -> dict[str, Any]:
        return {"order": self.order, "step": self.step, "sums": dict(self.sums), "seconds": self.seconds}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> EpochProgress | None:
        return None if state is None else cls(state["order"], state["step"], dict(state["sums"]), state["seconds"])


@dataclass
class LoopState:
    """What a training loop carries from epoch to epoch, and writes to and reads from its checkpoints."""

    config: Any
    run: ResumableRun
    model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    result: Any
    "the per-epoch curves (a dataclass of lists: CifarResult, GenerativeResult)"
    steps_per_epoch: int
    polyak: PolyakAverage | None = None

    def save(self, epochs_done: int, progress: EpochProgress | None = None) -> Path | None:
        """An epoch checkpoint: everything needed to continue exactly (mid-epoch with ``progress``)."""
        payload = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(self.generator),
            "curves": dict(self.result.__dict__),
            "epoch": epochs_done,
            "progress": None if progress is None else progress.state_dict(),
            "config": config_to_dict(self.config),
        }
        if self.polyak is not None:
            payload["polyak"] = self.polyak.model.state_dict()
            payload["polyak_updates"] = self.polyak.updates
        update = epochs_done * self.steps_per_epoch + (0 if progress is None else progress.step)
        return self.run.save(payload, update, epochs_done)

    def restore(self, state: dict[str, Any]) -> tuple[int, EpochProgress | None]:
        """Load a checkpoint of :meth:`save`; returns the epochs done and the position inside the next."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.polyak is not None:
            self.polyak.model.load_state_dict(state["polyak"])
            # a checkpoint from before the bias correction: its average carries the initial weights' share, which
            # the uncorrected rule (what a huge count gives: decay**t == 0) continues
            self.polyak.updates = int(state.get("polyak_updates", 2**62))
        set_rng_state(state["rng"], self.generator)
        self.result = type(self.result)(**state["curves"])
        return int(state["epoch"]), EpochProgress.from_state(state["progress"])


class ResumableRun:
    """One run's name, checkpoint folder and (when resuming) loaded checkpoint; ``with ResumableRun(...) as run:``
    releases the folder's lock (taken on resuming, or by :meth:`begin`) when training ends.

    Args:
        config: the run's frozen config; ``checkpoint_dir`` empty disables checkpoints and resuming.
        experiment: the first part of the run name.
        safe_to_change: config keys (dotted) that may differ on resume.
        force: resume even if other keys differ.
    """

    def __init__(self, config: Any, experiment: str, safe_to_change: frozenset[str], *, force: bool = False) -> None:
        self.config = config
        self.stop_signal: int | None = None
        self.state: dict[str, Any] | None = None
        self.last_path: Path | None = None
        self.purge_step: int | None = None
        self.resumed_from: Path | None = None  # the checkpoint loaded; last_path moves on when this process saves
        self._lock: RunLock | None = None
        prefix = f"{experiment}__{config.parameterization}__{config.seed}__"
        found = _newest_run(Path(config.checkpoint_dir), prefix) if config.checkpoint_dir else None
        self.new = not (found is not None and self._should_resume(found, safe_to_change, force))
        if not self.new:
            self.name = found.name
            self.folder: Path | None = found
            self._lock_folder()  # before it removes what a killed writer left and loads the checkpoint
            try:
                self._load()
            except BaseException:
                self.release()
                raise
        else:
            self.name = run_name(experiment, config.parameterization, config.seed)
            self.folder = Path(config.checkpoint_dir) / self.name if config.checkpoint_dir else None

    def begin(self) -> None:
        """Create the run folder and write its ``config.yaml``: once the run can start (its data loaded), so
        that a run stopped by a missing dataset leaves nothing behind."""
        if self.folder is None:
            return
        if self.new:  # a folder of its own
            self._claim_folder()
            self._lock_folder()  # before its config.yaml, which lets a rerun of the same command find it
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
        config_yaml = yaml.safe_dump(config_to_dict(self.config), sort_keys=False).encode()
        checkpoint.atomic_write_bytes(self.folder / "config.yaml", config_yaml)
        checkpoint.atomic_write_bytes(self.folder / "provenance.json", json.dumps(provenance(), indent=1).encode())

    def _claim_folder(self) -> None:
        """Create the new run's folder, one that no other run holds: two runs of one experiment, parameterization
        and seed started in the same second (a parallel sweep of another key) got one name, and wrote each other's
        checkpoints. The name's unix time moves on by a second until the folder is new."""
        parent, prefix = self.folder.parent, self.name.rsplit("__", 1)[0]
        stamp = int(self.name.rsplit("__", 1)[1])
        parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                self.folder.mkdir()
                return
            except FileExistsError:
                stamp += 1
                self.name = f"{prefix}__{stamp}"
                self.folder = parent / self.name

    def _lock_folder(self) -> None:
        self._lock = RunLock(self.folder, "start a separate run (another seed or checkpoint_dir)")
        self._lock.acquire()

    def release(self) -> None:
        """Release the run folder's lock (the end of training, or a failed start)."""
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> ResumableRun:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    @property
    def final_path(self) -> Path:
        return Path(self.config.checkpoint_dir) / f"{self.name}.pt"

    def _should_resume(self, folder: Path, safe_to_change: frozenset[str], force: bool) -> bool:
        old = read_run_config(folder, "the paper-model scripts")  # missing, empty or damaged: a ConfigError
        diff = {k: v for k, v in config_diff(old, config_to_dict(self.config)).items() if k not in safe_to_change}
        if not diff:
            return True
        final = folder.parent / f"{folder.name}.pt"
        if final in checkpoint.complete_checkpoints(folder.parent, prefix=folder.name):
            return False  # a finished run with another config: this is a new run (--force too: it is finished)
        if force:
            return True
        if not checkpoint.complete_checkpoints(folder):
            return False  # nothing to resume (it stopped before its first checkpoint, e.g. on a missing dataset)
        lines = "\n".join(f"  {key}: {a!r} -> {b!r}" for key, (a, b) in diff.items())
        raise ConfigError(
            f"{folder} holds an unfinished run with a different config:\n{lines}\n"
            "Rerun with the saved config (config.yaml there) to resume it, pass --force to resume it with this "
            f"config, or start a separate run (another checkpoint_dir, or delete {folder})."
        )

    def _load(self) -> None:
        # left by a process killed while writing: epoch checkpoints, the temporaries of config.yaml and
        # provenance.json, and those of this run's final checkpoint beside the folder (no other run writes them)
        removed = checkpoint.remove_incomplete(self.folder) + checkpoint.remove_temporaries(self.folder)
        removed += checkpoint.remove_temporaries(self.folder.parent, prefix=f"{self.name}.pt")
        if removed:
            print(f"removed {len(removed)} incomplete file(s) left by an interrupted write", flush=True)
        found = checkpoint.load_latest_checkpoint(self.folder)
        self.purge_step = 0  # a run killed before its first checkpoint starts again: drop what it logged
        if found is not None:
            path, self.state = found
            self.last_path = self.resumed_from = path
            self.purge_step = int(self.state["epoch"]) + 1
            print(f"[{self.name}] resuming from {path} (epoch {self.state['epoch']} done)", flush=True)

    def restore(self, load: Any) -> Any:
        """``load(state)``, which puts the checkpoint into the model, optimizer, ...; a checkpoint that
        does not fit the config (a resume forced past the config check) is a clear error."""
        try:
            return load(self.state)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise checkpoint.CheckpointError(
                f"{self.last_path} does not fit this run's config ({exc}). Resume with the run's saved config "
                f"({self.folder / 'config.yaml' if self.folder else '?'}) or start a separate run."
            ) from exc

    def save(self, payload: dict[str, Any], update: int, epoch: int) -> Path | None:
        """Write an epoch checkpoint (named by the number of updates done) and prune old ones."""
        if self.folder is None:
            return None
        path = self.folder / f"checkpoint_{update:010d}.pt"
        if path == self.last_path and path.is_file():
            return path  # this very state was loaded or written already; rewriting it would open a window
        checkpoint.save_checkpoint(path, payload, metadata={"epoch": epoch, "update": update})
        self.last_path = path
        checkpoint.prune_checkpoints(self.folder, KEEP_CHECKPOINTS, written=path)
        return path

    def save_final(self, model: nn.Module, result: Any) -> None:
        """The finished run's model, config and curves at :attr:`final_path`; sets ``result.checkpoint``.

        A rerun of a finished run trains nothing and keeps the final checkpoint it finds intact: rewriting it
        (new provenance, so new bytes) would open a window in which a kill leaves the finished model without a
        matching marker, and a full disk would fail a run that has nothing to do."""
        if self.config.checkpoint_dir and self._trained_nothing() and self._final_holds(result):
            result.checkpoint = str(self.final_path)
            return
        if self.config.checkpoint_dir:
            curves = dict(result.__dict__)
            payload = {
                "model": model.state_dict(),
                "config": config_to_dict(self.config),
                "curves": curves,
                "provenance": provenance(),
            }
            result.checkpoint = str(save_checkpoint(self.final_path, payload))

    def _trained_nothing(self) -> bool:
        """Whether this process resumed from a checkpoint and wrote none after it."""
        return self.resumed_from is not None and self.last_path == self.resumed_from

    def _final_holds(self, result: Any) -> bool:
        """Whether :attr:`final_path` is complete and intact and holds ``result``'s curves: written after the
        checkpoint resumed from (a process killed between its last epoch checkpoint and the final save left
        an older run's final, or none)."""
        try:
            final = checkpoint.load_checkpoint(self.final_path)
        except checkpoint.CheckpointError:
            return False
        return final.get("curves") == dict(result.__dict__)

    def interrupt(self, path: Path | None) -> TrainingInterrupted:
        """The exception to raise after the checkpoint of a stop requested by a signal."""
        name = signal.Signals(self.stop_signal).name
        print(f"[{self.name}] {name}: checkpoint {path} written; rerun the same command to resume", file=sys.stderr)
        return TrainingInterrupted(self.stop_signal, path)

    def stop_on_signals(self) -> StopOnSignals:
        """SIGINT/SIGTERM handlers while the loop runs (only when the run writes checkpoints)."""
        again = "interrupted again: quitting without a new checkpoint; the previous one is intact"
        return StopOnSignals(self, "the minibatch", again=again, enabled=self.folder is not None)


def _newest_run(checkpoint_dir: Path, prefix: str) -> Path | None:
    """The newest run folder ``checkpoint_dir/<prefix><unix time>`` holding a ``config.yaml``."""
    if not checkpoint_dir.is_dir():
        return None
    runs = [
        p
        for p in checkpoint_dir.glob(f"{prefix}*")
        if p.name[len(prefix) :].isdigit() and (p / "config.yaml").is_file()
    ]
    return max(runs, key=lambda p: (int(p.name[len(prefix) :]), p.name), default=None)
