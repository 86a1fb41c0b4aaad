"""Executing a study's runs: local subprocesses in parallel, or Ray tasks on a cluster.

Both backends run the same command per run (``python scripts/train_dqn.py --config ... key=value``)
with ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` set to the study's ``torch_threads``, and write its
output to ``<study dir>/logs/<run name>.log``. A lock file in the run directory keeps two study drivers
(say, a restarted one) from running the same run at once. A failed run does not stop the others; its exit code and
the tail of its log are reported at the end.

Ray (optional extra ``pip install -e ".[study]"``): every run is a Ray task reserving
``ray.cpus_per_run`` CPUs and ``ray.gpus_per_run`` GPUs. The task starts the training process in the
driver's working directory, so on a multi-node cluster every node needs the repository at the same path
and the study's ``runs_dir`` on a shared filesystem, where the driver reads the results back.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from wn_rl.analysis.runs import STUDY_LOCK
from wn_rl.analysis.study import RunSpec, StudyConfig
from wn_rl.checkpoint import atomic_write_bytes

__all__ = ["LOCKED", "RunOutcome", "RunningProcesses", "acquire_run_lock", "execute_command", "run_local", "run_ray"]


@dataclass(frozen=True)
class RunOutcome:
    """How one run's process ended."""

    name: str
    returncode: int
    seconds: float
    log: str
    log_tail: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


LOCKED = 75  # EX_TEMPFAIL: another driver is running this run


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_pids(holder: str) -> list[int] | None:
    """The pids of a lock's ``host pid [pid]``, or None if it does not read so (empty, say)."""
    _, *pids = holder.split() or [""]
    if not pids or not all(pid.isdecimal() and 0 < int(pid) < 2**31 for pid in pids):
        return None
    return [int(pid) for pid in pids]


def _create_lock(lock: Path, content: str) -> bool:
    """Create ``lock`` holding ``content``, False if it exists. The content is written to a temporary first
    and linked to the lock's name, so that no driver ever reads the lock empty, even after a crash."""
    tmp = lock.with_name(f".{lock.name}.tmp-{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as f:
            f.write(content.encode())
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, lock)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        return _create_lock_in_place(lock, content)
    finally:
        tmp.unlink(missing_ok=True)
    return True


_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}  # some FUSE and SMB mounts


def _create_lock_in_place(lock: Path, content: str) -> bool:
    """:func:`_create_lock` where the filesystem has no hard links: created exclusively, then written (a reader in
    between sees it empty, as held by an unknown owner); removed again if the write fails."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    try:
        os.write(fd, content.encode())
        os.fsync(fd)
    except BaseException:
        lock.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    return True


def acquire_run_lock(lock: Path) -> str | None:
    """Create ``lock`` (``host pid``) exclusively; None on success, else who holds it.

    Once the run's training process has started, the lock names it too (``host driver_pid run_pid``). A
    lock on this host whose processes have all died is taken over; one whose training process outlived
    its driver (the driver was killed) is respected, so a rerun never trains the same run twice at once.
    A lock from another host is respected (delete the file by hand if no process runs that study any more),
    and so is one that does not read ``host pid`` (an older driver killed while it wrote it): nothing
    tells whether its run still trains.
    """
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(3):
        if _create_lock(lock, me):
            return None
        try:
            holder = lock.read_text(errors="replace").strip()
        except FileNotFoundError:
            continue  # released since
        pids = _lock_pids(holder)
        if pids is None:
            what = "is empty" if not holder else f"reads {holder[:80]!r}, not 'host pid'"
            return f"an unknown owner (the lock file {what}; delete it if no study driver runs this run)"
        if holder.split()[0] == socket.gethostname() and not any(_pid_alive(pid) for pid in pids):
            _remove_dead_lock(lock, holder)
            continue
        return holder
    return "another study driver (the lock changed hands while this one tried to take it; run this again)"


def _remove_dead_lock(lock: Path, holder: str) -> None:
    """Delete ``lock`` if it still reads ``holder`` (whose processes have died), under an exclusive ``flock`` on a
    guard file beside it. Two drivers that both read the dead lock take turns here, so the second re-reads the
    lock the first has just created and leaves it alone (unguarded, it would delete it and both would run)."""
    guard = lock.with_name(f".{lock.name}.takeover")
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the take-over is not serialised
        fcntl = None
    fd = os.open(guard, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            current = lock.read_text(errors="replace").strip()
        except FileNotFoundError:
            return
        if current == holder:
            lock.unlink(missing_ok=True)
    finally:
        os.close(fd)  # releases the flock


class RunningProcesses:
    """The training processes a local study driver has started, and whether it is stopping.

    Starting a process and :meth:`stop` take one lock: a run about to start when the driver is interrupted
    either starts before the stop, and is signalled with the others, or not at all; none trains on while
    the driver waits for it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._processes: set[subprocess.Popen] = set()
        self._stopping = False

    def start(self, command: Sequence[str], log: IO[str], env: dict[str, str], cwd: str) -> subprocess.Popen | None:
        """Start ``command`` with its output appended to ``log``; None once the driver is stopping."""
        with self._lock:
            if self._stopping:
                return None
            log.write(f"$ {' '.join(command)}\n")
            log.flush()
            process = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
            self._processes.add(process)
            return process

    def discard(self, process: subprocess.Popen) -> None:
        with self._lock:
            self._processes.discard(process)

    def stop(self) -> None:
        """Start no further process, and send SIGTERM to the running ones (they checkpoint and exit)."""
        with self._lock:
            self._stopping = True
            for process in self._processes:
                process.send_signal(signal.SIGTERM)


def execute_command(
    name: str,
    command: Sequence[str],
    log_path: str,
    threads: int,
    cwd: str,
    run_dir: str,
    running: RunningProcesses | None = None,
) -> RunOutcome:
    """Run one training command to completion, appending its output to ``log_path``.

    ``<run_dir>/study.lock`` guards against two study drivers running the same run at once. The process
    is in ``running`` while it runs, so that the driver can pass a stop signal on to it; once the driver
    is stopping, the command is not started (exit code 143, as after SIGTERM).
    """
    lock = Path(cwd, run_dir, STUDY_LOCK)
    holder = acquire_run_lock(lock)
    if holder is not None:
        message = f"{name} is already being run by {holder} ({lock}); skipped"
        return RunOutcome(name, LOCKED, 0.0, str(log_path), message)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    running = running if running is not None else RunningProcesses()
    start = time.perf_counter()
    try:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as log:
            process = running.start(command, log, env, cwd)
            if process is None:
                message = f"{name} was not started: the study driver is stopping"
                return RunOutcome(name, 128 + signal.SIGTERM, 0.0, str(log_path), message)
            try:
                atomic_write_bytes(lock, f"{socket.gethostname()} {os.getpid()} {process.pid}".encode())
                returncode = process.wait()
            except BaseException:
                # the lock goes below: the run must have ended first, or a rerun could train it twice at once
                process.terminate()
                process.wait()
                raise
            finally:
                running.discard(process)
    finally:
        lock.unlink(missing_ok=True)
    tail = Path(log_path).read_text(errors="replace")[-2000:]
    return RunOutcome(name, returncode, time.perf_counter() - start, str(log_path), tail)


def _jobs(study: StudyConfig, specs: Sequence[RunSpec]) -> list[tuple[str, list[str], str, str]]:
    logs = study.study_dir / "logs"
    return [
        (s.name, s.command(study, sys.executable), str((logs / f"{s.name}.log").resolve()), str(s.run_dir))
        for s in specs
    ]


def run_local(
    study: StudyConfig,
    specs: Sequence[RunSpec],
    *,
    max_parallel: int | None = None,
    on_done: Callable[[RunOutcome, int, int], None] | None = None,
) -> list[RunOutcome]:
    """Run ``specs`` as subprocesses, ``max_parallel`` (default: the study's) at a time.

    Interrupted (Ctrl-C, or SIGTERM turned into ``KeyboardInterrupt`` by ``scripts/study.py``), it starts
    no further run and sends SIGTERM to the running ones, which checkpoint and exit; it returns when they
    have."""
    workers = max_parallel or study.max_parallel
    outcomes: list[RunOutcome] = []
    cwd = os.getcwd()
    running = RunningProcesses()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        threads = study.torch_threads
        futures = [
            pool.submit(execute_command, n, cmd, log, threads, cwd, run_dir, running)
            for n, cmd, log, run_dir in _jobs(study, specs)
        ]
        try:
            for future in as_completed(futures):
                outcomes.append(future.result())
                if on_done is not None:
                    on_done(outcomes[-1], len(outcomes), len(futures))
        except BaseException:
            for future in futures:
                future.cancel()
            running.stop()
            raise
    return outcomes


RAY_STOP_GRACE_S = 600.0  # how long an interrupted driver waits for Ray's runs to write their checkpoints


def _stop_ray_tasks(ray: object, pending: list) -> None:
    """Cancel ``pending`` Ray tasks: a queued one never starts; a running one gets ``KeyboardInterrupt`` in
    :func:`execute_command`, which sends its trainer SIGTERM (it checkpoints and exits) and waits for it. The
    driver waits up to :data:`RAY_STOP_GRACE_S` for them, so that shutting Ray down does not kill a trainer in the
    middle of its checkpoint. Nothing left to do on a second Ctrl-C: it ends the wait."""
    for ref in pending:
        ray.cancel(ref)
    if pending:
        ray.wait(pending, num_returns=len(pending), timeout=RAY_STOP_GRACE_S)


def run_ray(
    study: StudyConfig,
    specs: Sequence[RunSpec],
    *,
    address: str | None = None,
    on_done: Callable[[RunOutcome, int, int], None] | None = None,
) -> list[RunOutcome]:
    """Run ``specs`` as Ray tasks with the study's per-run CPU/GPU share; returns when all have ended."""
    try:
        import ray
    except ImportError:
        raise ImportError(
            "--backend ray needs Ray: pip install -e '.[study]' (or pip install 'ray>=2.9'); "
            "use --backend local to run on this machine without it"
        ) from None
    address = address if address is not None else study.ray.address
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        task = ray.remote(execute_command).options(
            num_cpus=study.ray.cpus_per_run, num_gpus=study.ray.gpus_per_run, max_retries=0
        )
        cwd = os.getcwd()
        threads = study.torch_threads
        pending = [task.remote(n, cmd, log, threads, cwd, run_dir) for n, cmd, log, run_dir in _jobs(study, specs)]
        total, outcomes = len(pending), []
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                outcomes.append(ray.get(done[0]))
                if on_done is not None:
                    on_done(outcomes[-1], len(outcomes), total)
        except KeyboardInterrupt:
            _stop_ray_tasks(ray, pending)
            raise
        return outcomes
    finally:
        if started_here:
            ray.shutdown()
