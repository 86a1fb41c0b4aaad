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

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from wn_rl.analysis.runs import STUDY_LOCK
from wn_rl.analysis.study import RunSpec, StudyConfig
from wn_rl.checkpoint import atomic_write_bytes

__all__ = ["LOCKED", "RunOutcome", "acquire_run_lock", "execute_command", "run_local", "run_ray"]


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


def acquire_run_lock(lock: Path) -> str | None:
    """Create ``lock`` (``host pid``) exclusively; None on success, else who holds it.

    Once the run's training process has started, the lock names it too (``host driver_pid run_pid``). A
    lock on this host whose processes have all died is taken over; one whose training process outlived
    its driver (the driver was killed) is respected, so a rerun never trains the same run twice at once.
    A lock from another host is respected (delete the file by hand if no process runs that study any more).
    """
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = lock.read_text(errors="replace").strip()
            host, *pids = holder.split()
            ours = host == socket.gethostname() and pids and all(pid.isdigit() for pid in pids)
            if ours and not any(_pid_alive(int(pid)) for pid in pids):
                lock.unlink(missing_ok=True)
                continue
            return holder
        os.write(fd, me.encode())
        os.close(fd)
        return None
    return lock.read_text(errors="replace").strip()


def execute_command(
    name: str,
    command: Sequence[str],
    log_path: str,
    threads: int,
    cwd: str,
    run_dir: str,
    running: set[subprocess.Popen] | None = None,
) -> RunOutcome:
    """Run one training command to completion, appending its output to ``log_path``.

    ``<run_dir>/study.lock`` guards against two study drivers running the same run at once. The process
    is in ``running`` while it runs, so that the driver can pass a stop signal on to it.
    """
    lock = Path(cwd, run_dir, STUDY_LOCK)
    holder = acquire_run_lock(lock)
    if holder is not None:
        message = f"{name} is already being run by {holder} ({lock}); skipped"
        return RunOutcome(name, LOCKED, 0.0, str(log_path), message)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        with open(log_path, "a") as log:
            log.write(f"$ {' '.join(command)}\n")
            log.flush()
            process = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
            if running is not None:
                running.add(process)
            try:
                atomic_write_bytes(lock, f"{socket.gethostname()} {os.getpid()} {process.pid}".encode())
                returncode = process.wait()
            finally:
                if running is not None:
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
    running: set[subprocess.Popen] = set()
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
            for process in list(running):
                process.send_signal(signal.SIGTERM)
            raise
    return outcomes


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
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            outcomes.append(ray.get(done[0]))
            if on_done is not None:
                on_done(outcomes[-1], len(outcomes), total)
        return outcomes
    finally:
        if started_here:
            ray.shutdown()
