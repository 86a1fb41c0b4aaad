"""The local study backend under failure: a study lock left empty or unreadable stops only its run, with
how to clear it; taking a lock that cannot be written leaves neither a lock nor an open file behind; a
run about to start when the driver is interrupted does not train on; and a run whose lock cannot be
rewritten is stopped before its lock is released. Tiny processes stand in for training runs."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from wn_rl.analysis import backends
from wn_rl.analysis.backends import LOCKED, acquire_run_lock, execute_command, run_local
from wn_rl.analysis.runs import STUDY_LOCK
from wn_rl.analysis.study import load_study_config, plan_runs
from wn_rl.checkpoint import CheckpointError

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "studies" / "smoke_cartpole.yaml"


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize(
    "content", ["", " \n", socket.gethostname(), f"{socket.gethostname()} 12x", f"{socket.gethostname()} 99999999999"]
)
def test_an_empty_or_unreadable_lock_is_held_by_an_unknown_owner(tmp_path: Path, content: str) -> None:
    """A driver killed between creating the lock and writing it (or an older driver's failed write) leaves
    such a lock: nothing says whether its run still trains, so it is kept, with how to clear it."""
    lock = tmp_path / "run" / STUDY_LOCK
    lock.parent.mkdir()
    lock.write_text(content)
    holder = acquire_run_lock(lock)
    assert holder is not None and holder.startswith("an unknown owner") and "delete it" in holder
    assert lock.read_text() == content  # not taken over
    outcome = execute_command("run", ["true"], str(tmp_path / "run.log"), 1, str(tmp_path), "run")
    assert outcome.returncode == LOCKED and "being run by an unknown owner" in outcome.log_tail
    assert str(lock) in outcome.log_tail and lock.read_text() == content


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files in /proc/self/fd")
def test_a_lock_that_cannot_be_written_is_not_left_behind(tmp_path: Path) -> None:
    """A full disk (here: a file size limit of 0) while taking the lock: an error, but no empty lock that
    would block the run for good and no open file."""
    lock = tmp_path / "run" / STUDY_LOCK
    lock.parent.mkdir()
    fds = _open_fds()
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, limits[1]))
    try:
        with pytest.raises(OSError):
            acquire_run_lock(lock)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    assert list(lock.parent.iterdir()) == [] and _open_fds() == fds
    assert acquire_run_lock(lock) is None and lock.read_text() == f"{socket.gethostname()} {os.getpid()}"


def test_a_run_starting_while_the_driver_stops_does_not_train_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C after a run took its lock and before its process started: the process must not be started
    behind the driver's back (or must be stopped with the others), not train while the driver waits."""
    started = tmp_path / "started.txt"
    script = tmp_path / "train.py"
    script.write_text(f"import time\nopen({str(started)!r}, 'w').close()\ntime.sleep(30)\n")
    grid = "grid={network.parameterization: [normal], run.seed: [0]}"
    study = load_study_config(SMOKE, [f"runs_dir={tmp_path}", f"train_script={script}", grid])
    take_lock, main_thread = backends.acquire_run_lock, threading.main_thread().ident

    def take_lock_then_ctrl_c(lock: Path) -> str | None:
        holder = take_lock(lock)
        signal.pthread_kill(main_thread, signal.SIGINT)
        time.sleep(1.0)  # the driver handles its Ctrl-C before this run gets to start its process
        return holder

    monkeypatch.setattr(backends, "acquire_run_lock", take_lock_then_ctrl_c)
    # Ctrl-C as in a terminal: a suite started in the background (nohup pytest &) inherits SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    begin = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_local(study, plan_runs(study), max_parallel=1)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - begin < 15 and not started.exists()
    assert not list(tmp_path.glob(f"smoke_cartpole/*/{STUDY_LOCK}"))


def test_a_run_whose_lock_cannot_be_rewritten_is_stopped_before_its_lock_is_released(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Naming the started process in the lock fails (a full disk): the process is stopped and waited for
    before the lock goes, so that a rerun cannot train the same run directory while it still runs."""
    pids: list[int] = []

    def full_disk(path: Path, data: bytes) -> None:
        pids.append(int(data.split()[-1]))
        raise CheckpointError(f"could not write {path}: No space left on device (errno 28)")

    monkeypatch.setattr(backends, "atomic_write_bytes", full_disk)
    try:
        with pytest.raises(CheckpointError, match="No space left"):
            execute_command("run", ["sleep", "30"], str(tmp_path / "run.log"), 1, str(tmp_path), "run")
        assert len(pids) == 1
        with pytest.raises(ProcessLookupError):  # ended and reaped (a zombie would still take signal 0)
            os.kill(pids[0], 0)
        assert not (tmp_path / "run" / STUDY_LOCK).exists()
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_the_lock_names_the_driver_while_it_is_taken(tmp_path: Path) -> None:
    """The lock is written in full before it has its name: no temporary is left, and its content is
    the driver's host and pid from the moment it exists."""
    lock = tmp_path / "run" / STUDY_LOCK
    assert acquire_run_lock(lock) is None
    assert [p.name for p in lock.parent.iterdir()] == [STUDY_LOCK]
    assert lock.read_text() == f"{socket.gethostname()} {os.getpid()}"
    assert acquire_run_lock(lock) == lock.read_text()  # held by a live process: this one


def test_a_filesystem_without_hard_links_still_takes_locks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock is linked into place from a written temporary; where the filesystem refuses hard links (some FUSE
    and SMB mounts) it is created exclusively and written instead, not an OSError that stops the driver."""
    import errno

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(backends.os, "link", no_links)
    lock = tmp_path / "run" / STUDY_LOCK
    assert acquire_run_lock(lock) is None
    assert lock.read_text() == f"{socket.gethostname()} {os.getpid()}"
    assert acquire_run_lock(lock) is not None  # held (by this live process)
    assert sorted(p.name for p in lock.parent.iterdir()) == [STUDY_LOCK]  # no temporary left


def test_an_interrupted_ray_study_cancels_its_tasks_and_waits_for_their_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C in a Ray study left its trainers to Ray's shutdown (killed without a checkpoint, or left running).
    The tasks are now cancelled, which raises KeyboardInterrupt in execute_command: it sends its trainer SIGTERM
    (the trainer checkpoints) and waits; the driver waits for them before Ray shuts down. A fake Ray here: the
    cancellation's effect inside a task is execute_command's, tested above."""
    import sys
    import types

    calls: list[tuple] = []

    class Task:
        def options(self, **kwargs):
            return self

        def remote(self, *args):
            calls.append(("remote", args[0]))
            return f"ref-{args[0]}"

    def wait(refs, num_returns=1, timeout=None):
        calls.append(("wait", list(refs), num_returns, timeout))
        if num_returns == 1:
            raise KeyboardInterrupt  # Ctrl-C while the driver waits for the first run
        return list(refs), []

    fake = types.SimpleNamespace(
        is_initialized=lambda: False,
        init=lambda **kwargs: calls.append(("init",)),
        remote=lambda fn: Task(),
        wait=wait,
        get=lambda ref: pytest.fail("no task finished"),
        cancel=lambda ref, **kwargs: calls.append(("cancel", ref, kwargs)),
        shutdown=lambda: calls.append(("shutdown",)),
    )
    monkeypatch.setitem(sys.modules, "ray", fake)
    study = load_study_config(SMOKE, [f"runs_dir={tmp_path}"])
    specs = plan_runs(study)
    with pytest.raises(KeyboardInterrupt):
        backends.run_ray(study, specs)
    refs = [f"ref-{spec.name}" for spec in specs]
    cancels = [c for c in calls if c[0] == "cancel"]
    assert [c[1] for c in cancels] == refs and all(not c[2].get("force") for c in cancels)  # an interrupt, no kill
    last_wait = [c for c in calls if c[0] == "wait"][-1]
    assert last_wait == ("wait", refs, len(refs), backends.RAY_STOP_GRACE_S)
    assert calls[-1] == ("shutdown",) and calls.index(last_wait) < len(calls) - 1  # shut down after the wait


def test_two_drivers_taking_over_one_dead_lock_do_not_both_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two drivers restarted at once both read a dead driver's lock. The first deletes it and takes its own; the
    second, still holding the dead content it read, must not then delete the first's fresh lock and run too."""
    lock = tmp_path / "run" / STUDY_LOCK
    lock.parent.mkdir()
    dead_pid = 2**31 - 2  # no such process
    lock.write_text(f"{socket.gethostname()} {dead_pid}")
    first_done, second_checked = threading.Event(), threading.Event()
    pid_alive = backends._pid_alive

    def slow_for_the_second(pid: int) -> bool:
        if threading.current_thread().name == "second" and not second_checked.is_set():
            second_checked.set()
            assert first_done.wait(10)  # the first takes the lock over while the second decides it is dead
        return pid_alive(pid)

    monkeypatch.setattr(backends, "_pid_alive", slow_for_the_second)
    results: dict[str, str | None] = {}

    def second() -> None:
        results["second"] = acquire_run_lock(lock)

    thread = threading.Thread(target=second, name="second")
    thread.start()
    assert second_checked.wait(10)
    results["first"] = acquire_run_lock(lock)
    first_done.set()
    thread.join(10)
    assert results["first"] is None  # the first took the dead lock over
    assert results["second"] == f"{socket.gethostname()} {os.getpid()}"  # the second sees the first's, alive
    assert lock.read_text() == f"{socket.gethostname()} {os.getpid()}"
