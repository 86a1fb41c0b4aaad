"""One trainer per run: a kernel lock (``flock``) on ``<run dir>/.trainer.lock``, held while a run trains.

Running a command again resumes its run, so a second terminal, or a restarted study driver beside the trainer
its killed predecessor left running, would otherwise train the same run twice at once: both write the same
checkpoints and TensorBoard logs and overwrite each other's. The trainers take this lock before they allocate
or write anything and hold it until training ends; a second one is refused with :class:`RunInUseError` (the
scripts exit with :data:`EX_TEMPFAIL`, 75). The kernel releases the lock when its process ends, however it
ends, so a lock is never stale. Its text (``host pid``) only says who holds it. The file stays with the run,
except where the lock made the run directory and nothing else was written there (a run refused by a later check):
then both go on release, so a refused run leaves nothing behind. A process that opened the file just before it
was deleted gets its lock on the deleted file; it checks, after locking, that the name still leads to the file it
locked, and tries again otherwise, so two processes never each hold a lock on a different file of the same name.

Where ``flock`` is missing (Windows) or refused (some network filesystems: ``ENOLCK``, ``EOPNOTSUPP``), a
warning is given once and runs go on unlocked, as before.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from wn_rl.config import ConfigError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["EX_TEMPFAIL", "LOCK_NAME", "RunInUseError", "RunLock", "hold_run_lock", "train_holding_lock"]

EX_TEMPFAIL = 75
"exit code of a trainer refused because another one trains its run (sysexits.h; a study reports it as skipped)"
LOCK_NAME = ".trainer.lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP}
_warned = False


class RunInUseError(ConfigError):
    """Another process trains this run: it holds the run's lock file. A :class:`~wn_rl.config.ConfigError` (the
    fix is the user's: wait, or name another run), so a script that does not know it still ends with one
    ``error:`` line; ``train_dqn.py`` and ``train_sb3.py`` catch it first and exit with :attr:`exit_code`."""

    exit_code = EX_TEMPFAIL

    def __init__(self, run_dir: Path, holder: str, other_run: str) -> None:
        self.run_dir, self.holder = run_dir, holder
        super().__init__(
            f"{run_dir} is being trained by another process ({holder}, holding {run_dir / LOCK_NAME}). Two "
            "trainers on one run would overwrite each other's checkpoints and TensorBoard logs, so this one stops "
            "before allocating or writing anything. Wait for the other one to finish (this command then resumes "
            f"the run), stop it (Ctrl-C or kill: it checkpoints first), or {other_run}."
        )


def _holder(fd: int) -> str:
    """Who holds the lock, from the file's ``host pid`` text."""
    try:
        text = os.pread(fd, 256, 0).decode(errors="replace").split()
    except OSError:
        text = []
    if len(text) == 2:
        return f"pid {text[1]} on host {text[0]}"
    return "a process that has not written its pid yet"


def _warn_unlocked(why: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"runs are not locked here ({why}): nothing stops a second trainer on the same run directory, "
            "so do not start one",
            stacklevel=4,
        )


class RunLock:
    """The lock of one run directory: :meth:`acquire` (creates the directory) and :meth:`release`, or
    ``with RunLock(run_dir):``. ``other_run`` ends the refusal's advice: how to start a separate run instead."""

    def __init__(self, run_dir: str | os.PathLike, other_run: str = "give this run another name") -> None:
        self.run_dir = Path(run_dir)
        self.other_run = other_run
        self._fd: int | None = None
        self._made_run_dir = False

    @property
    def path(self) -> Path:
        return self.run_dir / LOCK_NAME

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunInUseError` at once naming who holds it."""
        if self._fd is not None:
            return
        if fcntl is None:
            _warn_unlocked("no fcntl.flock on this platform")
            return
        for _ in range(100):  # another try only when a releasing process deleted the file or folder meanwhile
            made = not self.run_dir.exists()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            except FileNotFoundError:  # the folder went between the mkdir and the open
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise RunInUseError(self.run_dir, holder, self.other_run) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno not in _UNSUPPORTED:
                    raise
                _warn_unlocked(f"flock on {self.path}: {exc.strerror or exc}")
                return
            if _names_the_file(self.path, fd):
                break
            os.close(fd)  # locked a file deleted since it was opened: the lock it gives guards nothing
        else:
            raise OSError(f"could not lock {self.path}: it was deleted and recreated 100 times while this tried")
        with contextlib.suppress(OSError):  # informational only: a full disk must not refuse the run
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{socket.gethostname()} {os.getpid()}\n".encode(), 0)
        self._fd = fd
        self._made_run_dir = made

    def release(self) -> None:
        """Release the lock (closing the file releases the ``flock``). The file stays, unless this lock made the
        run directory and nothing else is in it: then both are removed, still under the lock."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._made_run_dir and [p.name for p in self.run_dir.iterdir()] == [LOCK_NAME]:
                self.path.unlink()
                self.run_dir.rmdir()
        except OSError:  # something was written meanwhile, or the folder is not ours to clean: it stays
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _names_the_file(path: Path, fd: int) -> bool:
    """Whether ``path`` still leads to the open file ``fd`` (not deleted, nor replaced by a new one)."""
    try:
        named, opened = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def hold_run_lock(run_dir: str | os.PathLike, other_run: str = "give this run another name") -> RunLock:
    """``with hold_run_lock(run_dir):`` train; raises :class:`RunInUseError` when another process holds it."""
    return RunLock(run_dir, other_run)


def train_holding_lock(run_dir: str | os.PathLike, other_run: str, train: Callable[[], int]) -> int:
    """A training script's ``train()`` run holding ``run_dir``'s lock; its exit code, or 75 with one ``error:``
    line when another process trains the run, or 1 when the run directory cannot be made (the message names it)."""
    try:
        with hold_run_lock(run_dir, other_run):
            return train()
    except RunInUseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # runs_dir not writable, say
        print(f"error: {exc}", file=sys.stderr)
        return 1
