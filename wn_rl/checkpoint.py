"""Atomic, versioned, verifiable checkpoints: tensors plus plain data, no pickled objects.

A checkpoint ``NAME.pt`` is complete only when its marker ``NAME.pt.complete.json`` exists, and the
marker is written last. Both files are written to a temporary file in the same directory, flushed,
fsynced and renamed over the final name, then the directory is fsynced, so a kill at any instant leaves
either the new complete checkpoint or the previous one, never a half-written file that looks valid.
The marker records the payload's size and SHA-256, so truncated or corrupted files are detected on load;
how far a run got is read from the marker and the file's size alone (``check_hash=False``), without
reading a payload that can hold GBs of replay memory.

The payload is a ``torch.save`` file of dicts, lists, tuples, strings, numbers, booleans, ``None`` and
tensors only (checked before writing), loadable with ``torch.load(path, weights_only=True)``, and
carries ``format_version`` so that old checkpoints keep loading.

:func:`summary_writer` opens TensorBoard logs whose write failures (a full disk) are a
:class:`CheckpointError` naming the event file, like a checkpoint's.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import threading
import warnings
from collections import Counter, OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "atomic_write_bytes",
    "complete_checkpoints",
    "file_sha256",
    "latest_checkpoint",
    "load_checkpoint",
    "load_latest_checkpoint",
    "name_write_errors",
    "prune_checkpoints",
    "remove_incomplete",
    "remove_temporaries",
    "save_checkpoint",
    "summary_writer",
]

FORMAT_VERSION = 1
MARKER_SUFFIX = ".complete.json"
_PLAIN = (str, int, float, bool, type(None))
_KEYS = (str, int, bool)
_MAPPINGS = (dict, OrderedDict, Counter)
_SEQUENCES = (list, tuple, torch.Size)
_TENSORS = (torch.Tensor, torch.nn.Parameter)


class CheckpointError(RuntimeError):
    """A checkpoint (or a run's log: :func:`summary_writer`) could not be written or read; the message
    names the path and the cause."""


def _check_plain(value: Any, where: str) -> None:
    # exact types: a subclass (numpy.float64 of float, an IntEnum key, a namedtuple, a defaultdict) pickles as
    # its own class, which torch.load(weights_only=True) refuses, so the checkpoint would be written but never
    # load. The subclasses allowed are those weights_only loads: OrderedDict (every state_dict()), Counter,
    # torch.Size, Parameter.
    if type(value) in _TENSORS or type(value) in _PLAIN:
        return
    if type(value) in _MAPPINGS:
        for key, item in value.items():
            if type(key) not in _KEYS:
                raise TypeError(
                    f"checkpoint key {where}[{key!r}] is a {type(key).__name__}; keys must be of type str, int "
                    "or bool exactly (subclasses such as an IntEnum do not load with weights_only=True): "
                    "convert it, e.g. str(key) or int(key)"
                )
            _check_plain(item, f"{where}[{key!r}]")
        return
    if type(value) in _SEQUENCES:
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    raise TypeError(
        f"checkpoint value {where} is a {type(value).__name__}; checkpoints hold only tensors and plain data "
        "(dict, OrderedDict, list, tuple, str, int, float, bool, None; exactly these types, no subclass such "
        "as a namedtuple or defaultdict) so they load with torch.load(weights_only=True). "
        "Store a state_dict() or convert the value to plain data (dict(...), tuple(...))."
    )


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems cannot open directories; the rename still happened
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _temporary(path: Path) -> Iterator[Path]:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync file, rename, fsync directory)."""
    path = Path(path)
    try:
        with _temporary(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        raise CheckpointError(f"could not write {path}: {exc.strerror or exc} (errno {exc.errno})") from exc


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex), read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _marker(path: Path) -> Path:
    return path.with_name(path.name + MARKER_SUFFIX)


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any], *, metadata: dict | None = None) -> Path:
    """Atomically write ``payload`` (tensors and plain data) to ``path`` and then its completion marker.

    ``format_version`` is added to the payload. ``metadata`` (plain JSON data, e.g. the agent step) is
    stored in the marker, readable without loading the payload. Raises :class:`CheckpointError` naming
    the path on any OS error (full disk, unwritable directory); the previous checkpoint is untouched.
    """
    path = Path(path)
    _check_plain(payload, "payload")
    payload = {**payload, "format_version": FORMAT_VERSION}
    if not path.parent.is_dir():
        raise CheckpointError(f"checkpoint directory {path.parent} does not exist; create it first")
    digest = hashlib.sha256()
    size = 0
    try:
        with _temporary(path) as tmp:
            with open(tmp, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            with open(tmp, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    digest.update(chunk)
                    size += len(chunk)
            os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        # torch.save reports a failed write (full disk) as a RuntimeError of its zip writer, raised while
        # handling the OSError of the file's write
        cause = exc if isinstance(exc, OSError) else exc.__context__
        if not isinstance(cause, OSError):
            raise
        raise CheckpointError(
            f"could not write checkpoint {path}: {cause.strerror or cause} (errno {cause.errno})"
        ) from exc
    marker = {"file": path.name, "bytes": size, "sha256": digest.hexdigest(), "format_version": FORMAT_VERSION}
    marker["metadata"] = metadata or {}
    try:
        atomic_write_bytes(_marker(path), json.dumps(marker, indent=1).encode())
    except CheckpointError:
        # without its marker the payload is invisible to every reader, but it can hold GBs of the full disk
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    return path


def read_marker(path: str | os.PathLike) -> dict[str, Any]:
    """The completion marker of ``path`` (raises :class:`CheckpointError` when it is missing or invalid)."""
    path = Path(path)
    try:
        marker = json.loads(_marker(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is incomplete: its completion marker {_marker(path).name} is missing") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: completion marker unreadable ({exc})") from None
    if not isinstance(marker, dict) or not {"bytes", "sha256"} <= set(marker):
        raise CheckpointError(f"{path}: completion marker {_marker(path).name} is malformed")
    return marker


def verify_checkpoint(path: str | os.PathLike, *, check_hash: bool = True) -> dict[str, Any]:
    """Check size and SHA-256 of ``path`` against its marker; returns the marker.

    ``check_hash=False`` checks the size alone: a ``stat``, no read of the file, which may hold GBs (the
    replay memory). That catches a missing or truncated file but not one corrupted in place, so it is for
    telling how far a run got, never for loading (:func:`load_checkpoint` hashes).
    """
    path = Path(path)
    marker = read_marker(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing although its marker exists")
    size = path.stat().st_size
    if size != marker["bytes"]:
        raise CheckpointError(f"{path} is truncated or corrupted: {size} bytes, the marker says {marker['bytes']}")
    if not check_hash:
        return marker
    if file_sha256(path) != marker["sha256"]:
        raise CheckpointError(f"{path} is corrupted: its SHA-256 differs from the one recorded when it was written")
    return marker


def load_checkpoint(
    path: str | os.PathLike, map_location: Any = "cpu", *, verify: bool = True, mmap: bool | None = None
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``,
    after checking its marker, size and hash (``verify=False`` skips them). Raises :class:`CheckpointError`.

    ``mmap=True`` maps the file instead of reading it (``torch.load(mmap=True)``; keep ``map_location`` on the
    CPU): a tensor's bytes are read when it is used, so taking the Q-network out of a checkpoint that holds GBs
    of replay memory reads the Q-network alone. ``None`` (the default) is torch's default (no mapping)."""
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises several types for damaged zip archives
        raise CheckpointError(f"{path} could not be loaded: {exc}") from exc
    version = payload.get("format_version") if isinstance(payload, dict) else None
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {version!r}; this wn_rl reads versions 1..{FORMAT_VERSION}. "
            "Upgrade wn_rl to load it."
        )
    return payload


_STEP = re.compile(r"(\d+)")


def _checkpoint_files(directory: Path, prefix: str) -> list[Path]:
    """The files named ``prefix`` + digits (the step, maybe none) + ``.pt`` in ``directory``: not the checkpoints
    of a prefix it begins (``run_1`` is not ``run_10_7.pt``'s), nor directories."""
    if not directory.is_dir():
        return []
    name = re.compile(re.escape(prefix) + r"\d*\.pt")
    return [p for p in directory.glob(f"{glob.escape(prefix)}*.pt") if name.fullmatch(p.name) and p.is_file()]


def complete_checkpoints(directory: str | os.PathLike, prefix: str = "checkpoint_") -> list[Path]:
    """Checkpoints in ``directory`` that have a completion marker, oldest first (by the number in the name).

    A checkpoint is named ``prefix`` + its step + ``.pt`` (``checkpoint_000000000200.pt``) or ``prefix`` + ``.pt``:
    end ``prefix`` in a non-digit, or a run ``run_1``'s checkpoints and ``run_10``'s look alike."""
    found = [p for p in _checkpoint_files(Path(directory), prefix) if _marker(p).exists()]

    def key(p: Path) -> tuple[int, str]:
        numbers = _STEP.findall(p.stem)
        return (int(numbers[-1]) if numbers else -1, p.name)

    return sorted(found, key=key)


def latest_checkpoint(
    directory: str | os.PathLike, prefix: str = "checkpoint_", *, check_hash: bool = True
) -> Path | None:
    """The newest checkpoint that passes verification; damaged newer ones are skipped with a warning.
    ``check_hash=False`` verifies sizes only (see :func:`verify_checkpoint`): for progress, not loading."""
    for path in reversed(complete_checkpoints(directory, prefix)):
        try:
            verify_checkpoint(path, check_hash=check_hash)
        except CheckpointError as exc:
            warnings.warn(f"skipping damaged checkpoint: {exc}; falling back to the previous one", stacklevel=2)
            continue
        return path
    return None


def load_latest_checkpoint(
    directory: str | os.PathLike, prefix: str = "checkpoint_", map_location: Any = "cpu", *, mmap: bool | None = None
) -> tuple[Path, dict[str, Any]] | None:
    """``(path, payload)`` of the newest checkpoint that passes verification (:func:`latest_checkpoint`:
    damaged newer ones are skipped with a warning), or None when there is none; ``mmap`` as in
    :func:`load_checkpoint`.

    The file is read twice, once to hash it and once by ``torch.load``, never hashed again by
    :func:`load_checkpoint`: with the replay memory a checkpoint holds GBs. A checkpoint that verifies but
    does not load (a newer ``format_version``) raises :class:`CheckpointError` instead of falling back.
    """
    path = latest_checkpoint(directory, prefix)
    return None if path is None else (path, load_checkpoint(path, map_location, verify=False, mmap=mmap))


def prune_checkpoints(
    directory: str | os.PathLike, keep: int, prefix: str = "checkpoint_", *, written: str | os.PathLike | None = None
) -> list[Path]:
    """Delete all but the ``keep`` newest complete checkpoints (marker first, so a kill mid-way never
    leaves a marker without its file). Returns the deleted paths. Names as in :func:`complete_checkpoints`
    (``prefix`` + step + ``.pt``; end ``prefix`` in a non-digit).

    ``written``: the checkpoint just written by a run that resumed from the newest one it could load. It is never
    deleted, and ``keep`` counts it and those before it. Checkpoints numbered after it are deleted: the resume
    skipped them as damaged (:func:`latest_checkpoint`) and the run has moved on from an older one. Without this
    a damaged newer checkpoint outranked the one just written, which was pruned, leaving nothing loadable."""
    found = complete_checkpoints(directory, prefix)
    stale: list[Path] = []
    if written is not None:
        written = Path(written)
        names = [p.name for p in found]
        if written.name in names:
            cut = names.index(written.name) + 1
            found, stale = found[:cut], found[cut:]
        if stale:
            warnings.warn(
                f"deleting {[p.name for p in stale]}: numbered after {written.name}, which this run wrote after "
                "resuming from an older checkpoint, so they could not be loaded (damaged)",
                stacklevel=2,
            )
    removed = []
    for path in [*stale, *(found[:-keep] if keep > 0 else [])]:
        with contextlib.suppress(FileNotFoundError):
            _marker(path).unlink()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        removed.append(path)
    return removed


def remove_incomplete(directory: str | os.PathLike, prefix: str = "checkpoint_") -> list[Path]:
    """Delete what writers killed mid-way left in ``directory``: temporary files (``.NAME.tmp-PID``) and
    checkpoints without a completion marker (invisible to every reader). Call it only while no other
    process writes to ``directory`` (at the start of a run). Returns the deleted paths. Names as in
    :func:`complete_checkpoints` (``prefix`` + step + ``.pt``; end ``prefix`` in a non-digit); directories
    are left alone."""
    directory = Path(directory)
    stale = [p for p in _checkpoint_files(directory, prefix) if not _marker(p).exists()]
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return remove_temporaries(directory, prefix) + stale


def remove_temporaries(directory: str | os.PathLike, prefix: str = "") -> list[Path]:
    """Delete the temporary files (``.NAME.tmp-PID``) that writers killed before their rename left in
    ``directory``. Only while no other process writes there.

    ``prefix=""`` deletes every one; otherwise those of a checkpoint or its marker named as in
    :func:`complete_checkpoints` (``prefix`` + step + ``.pt``; end ``prefix`` in a non-digit), or of
    ``prefix`` itself and its marker (``prefix="NAME.pt"``: one file's temporaries)."""
    directory = Path(directory)
    name = re.compile(r"\." + re.escape(prefix) + r"(\d*\.pt)?(" + re.escape(MARKER_SUFFIX) + r")?\.tmp-\d+")
    found = directory.glob(f".{glob.escape(prefix)}*.tmp-*") if directory.is_dir() else []
    stale = [p for p in found if (not prefix or name.fullmatch(p.name)) and p.is_file()]
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return stale


_EVENT_WRITER_MODULE = "tensorboard.summary.writer.event_file_writer"


class _EventFileNamingPath:
    """TensorBoard's ``EventFileWriter`` with its write errors raised as :class:`CheckpointError` naming the
    event file. Its writer thread keeps the ``OSError`` of a failed write (a full disk) and the next
    ``add_event``, ``flush`` or ``close`` of the main thread raises it; TensorBoard names no path."""

    def __init__(self, event_writer: Any) -> None:
        self._event_writer = event_writer
        self.path = getattr(event_writer, "_file_name", None) or event_writer.get_logdir()

    def _call(self, name: str, *args: Any) -> Any:
        try:
            return getattr(self._event_writer, name)(*args)
        except OSError as exc:
            raise CheckpointError(
                f"could not write TensorBoard events {self.path}: {exc.strerror or exc} (errno {exc.errno}); "
                "the events written before stay readable"
            ) from exc

    def add_event(self, event: Any) -> None:
        self._call("add_event", event)

    def flush(self) -> None:
        self._call("flush")

    def close(self) -> None:
        self._call("close")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._event_writer, name)


def _report_event_writer_errors_once() -> None:
    """TensorBoard's writer thread dies on a failed write and the main thread re-raises its error (as a
    :class:`CheckpointError`); without this hook Python also prints the thread's traceback."""
    previous = threading.excepthook
    if getattr(previous, "wn_rl_quiet_event_writer", False):
        return

    def hook(args: Any) -> None:
        if isinstance(args.exc_value, OSError) and type(args.thread).__module__ == _EVENT_WRITER_MODULE:
            return
        previous(args)

    hook.wn_rl_quiet_event_writer = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def summary_writer(log_dir: str | os.PathLike, purge_step: int | None = None) -> Any:
    """A TensorBoard ``SummaryWriter`` in ``log_dir`` whose write failures (a full disk) raise
    :class:`CheckpointError` naming the event file, from the ``add_*``, ``flush`` or ``close`` call after
    the failure, with no traceback from TensorBoard's writer thread. The records written before stay
    readable (a reader stops at a truncated last record); a resumed run writes a new event file."""
    from torch.utils.tensorboard import SummaryWriter

    _report_event_writer_errors_once()
    try:
        writer = SummaryWriter(str(log_dir), purge_step=purge_step)
    except OSError as exc:
        raise CheckpointError(
            f"could not write TensorBoard events in {log_dir}: {exc.strerror or exc} (errno {exc.errno})"
        ) from exc
    return name_write_errors(writer)


def name_write_errors(writer: Any) -> Any:
    """Make an open TensorBoard ``SummaryWriter`` (e.g. one that a library created) raise
    :class:`CheckpointError` naming its event file when a write fails, as :func:`summary_writer` does;
    returns ``writer``."""
    _report_event_writer_errors_once()
    file_writer = writer.file_writer  # None once closed (a later add_* would open a new, plain one)
    if file_writer is not None and not isinstance(file_writer.event_writer, _EventFileNamingPath):
        file_writer.event_writer = _EventFileNamingPath(file_writer.event_writer)
    return writer
