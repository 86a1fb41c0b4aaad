"""Fault injection for the native DQN (issue #5): signals, NaN/inf in the learner and the environment,
full disks, damaged checkpoints, changed configs (exact resume and the SIGKILL soak: test_dqn_resume.py).
Tiny CartPole/MinAtar runs on CPU."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from agents.dqn.config import load_dqn_config, load_run_config
from agents.dqn.learner import NonFiniteError
from agents.dqn.nonfinite import EnvNonFiniteError
from agents.dqn.runner import Trainer
from wn_rl import checkpoint as ck
from wn_rl.checkpoint import CheckpointError, complete_checkpoints

ROOT = Path(__file__).resolve().parents[1]
CARTPOLE = str(ROOT / "configs" / "dqn" / "cartpole.yaml")


def _cartpole_overrides(tmp_path: Path, **extra) -> list[str]:
    base = {
        "run.total_agent_steps": 800,
        "agent.learning_starts_agent_steps": 200,
        "agent.replay_capacity_transitions": 2000,
        "eval.every_agent_steps": 0,
        "run.log_every_agent_steps": 200,
        "run.checkpoint_every_agent_steps": 200,
        "run.runs_dir": str(tmp_path),
        "run.name": "run",
        "run.progress_bar": "false",
        "run.device": "cpu",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _cartpole(tmp_path: Path, **extra):
    return load_dqn_config(CARTPOLE, _cartpole_overrides(tmp_path, **extra))


def test_absurd_learning_rate_stops_the_run_naming_step_tensor_and_checkpoint(tmp_path):
    trainer = Trainer(_cartpole(tmp_path, **{"agent.lr": 1e30}), tmp_path / "run")
    with pytest.raises(NonFiniteError) as info:
        trainer.run()
    message = str(info.value)
    assert "non-finite value" in message and "at update" in message and "last good checkpoint" in message
    assert info.value.update <= trainer.learner.updates <= info.value.update + 16  # stopped within a few updates
    for p in trainer.learner.q_network.parameters():  # the bad steps were never applied
        assert torch.isfinite(p).all()
    for path in complete_checkpoints(tmp_path / "run" / "checkpoints"):  # and never checkpointed
        state = ck.load_checkpoint(path)
        assert all(torch.isfinite(v).all() for v in state["learner"]["q_network"].values() if v.is_floating_point())
        assert state["counters"]["updates"] < info.value.update


def test_a_nan_gradient_step_is_skipped_on_the_device(tmp_path):
    trainer = Trainer(_cartpole(tmp_path), tmp_path / "run")
    learner = trainer.learner
    before = {k: v.clone() for k, v in learner.q_network.state_dict().items()}
    real_loss = learner.loss

    def nan_loss(batch):
        loss, *rest = real_loss(batch)
        return (loss * float("nan"), *rest)

    from agents.dqn.replay import ReplayBatch

    n = 8
    batch = ReplayBatch(
        obs=torch.zeros(n, 4),
        actions=torch.zeros(n, dtype=torch.long),
        rewards=torch.ones(n, 1),
        next_obs=torch.zeros(n, 4),
        terminals=torch.zeros(n, 1, dtype=torch.bool),
        truncations=torch.zeros(n, 1, dtype=torch.bool),
        next_offsets=torch.ones(n, dtype=torch.long),
        indices=torch.arange(n),
    )
    learner.loss = nan_loss
    learner.update(batch)  # no exception yet: the flag is read every few updates, not per update
    after = learner.q_network.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.count_nonzero(t) == 0 for s in learner.optimizer.state.values() for t in s.values())
    with pytest.raises(NonFiniteError, match=r"in the loss at update 1"):
        learner.raise_if_nonfinite()


def test_nan_reward_is_reported_as_coming_from_the_environment(tmp_path):
    trainer = Trainer(_cartpole(tmp_path), tmp_path / "run")
    real_recv = trainer.env.recv
    calls = {"n": 0}

    def recv():
        result = real_recv()
        calls["n"] += 1
        if calls["n"] == 120:
            result.rewards[2] = np.nan
        return result

    trainer.env.recv = recv
    with pytest.raises(EnvNonFiniteError) as info:
        trainer.run()
    message = str(info.value)
    assert "environment 'CartPole-v1' (vector index 2)" in message and "non-finite reward" in message
    assert "after action" in message and "agent step 476" in message
    assert "last good checkpoint" in message and "checkpoint_000000000400.pt" in message


def test_full_disk_names_the_path_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(_cartpole(tmp_path), tmp_path / "run")
    real_save = ck.torch.save
    calls = {"n": 0}

    def save(obj, f):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(ck.torch, "save", save)
    with pytest.raises(CheckpointError, match=r"checkpoint_000000000400\.pt: No space left on device"):
        trainer.run()
    assert [p.name for p in complete_checkpoints(tmp_path / "run" / "checkpoints")] == ["checkpoint_000000000200.pt"]
    ck.load_checkpoint(tmp_path / "run" / "checkpoints" / "checkpoint_000000000200.pt")


def test_full_disk_while_logging_names_the_event_file_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    # found on a real 1 MB tmpfs (docs/full_disk.md): TensorBoard's writer thread printed a traceback and the
    # run stopped with "[Errno 28] No space left on device", naming no file
    from tensorboard.backend.event_processing import event_file_loader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.compat.tensorflow_stub.io import gfile

    checkpoints, tb = tmp_path / "run" / "checkpoints", tmp_path / "run" / "tb"
    real_append = gfile.LocalFileSystem.append

    def append(self, filename, file_content, binary_mode=False):  # the disk fills after the first checkpoint
        if complete_checkpoints(checkpoints):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_append(self, filename, file_content, binary_mode)

    monkeypatch.setattr(gfile.LocalFileSystem, "append", append)
    thread_errors = []
    monkeypatch.setattr(threading, "excepthook", thread_errors.append)
    trainer = Trainer(_cartpole(tmp_path), tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"TensorBoard events") as info:
        trainer.run()
    assert str(tb) in str(info.value) and "No space left on device (errno 28)" in str(info.value)
    assert thread_errors == []  # the writer thread's error is reported once, by the run, not as a traceback
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["checkpoint_000000000200.pt"]
    ck.load_checkpoint(checkpoints / "checkpoint_000000000200.pt")
    (events,) = tb.iterdir()  # what was written before the disk filled reads back
    assert len(list(event_file_loader.RawEventFileLoader(str(events)).Load())) >= 2  # version, hyperparameters
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    assert "hyperparameters/text_summary" in accumulator.Tags()["tensors"]
    assert all(e.step <= 200 for tag in accumulator.Tags()["scalars"] for e in accumulator.Scalars(tag))


def test_evaluate_video_on_a_full_disk_is_an_error_naming_the_file_and_leaves_no_partial_video(
    tmp_path, monkeypatch, capsys
):
    # found on a real tmpfs (docs/full_disk.md): PIL's OSError went up as a traceback and a truncated GIF stayed
    import builtins
    import importlib.util
    import io

    minatar = str(ROOT / "configs" / "dqn" / "minatar_breakout.yaml")
    overrides = _cartpole_overrides(tmp_path, **{"run.total_agent_steps": 300, "eval.max_episode_steps": 100})
    Trainer(load_dqn_config(minatar, overrides), tmp_path / "run").run()
    spec = importlib.util.spec_from_file_location("wn_rl_script_evaluate", ROOT / "scripts" / "evaluate.py")
    evaluate_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate_script)
    gif, real_open = tmp_path / "agent.gif", builtins.open

    class FullDisk(io.FileIO):  # the disk fills up after the first kilobyte of the video
        def write(self, data):
            if self.tell() + len(data) > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    def open_on_a_full_disk(file, mode="r", *args, **kwargs):
        if "agent.gif" in str(file) and "r" not in mode:
            return FullDisk(file, mode.replace("b", ""))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_on_a_full_disk)
    argv = [str(tmp_path / "run"), "--games", "1", "--video", str(gif), "--video-steps", "50", "--device", "cpu"]
    assert evaluate_script.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: could not write {gif}: No space left on device (errno 28)")
    assert not [p.name for p in tmp_path.iterdir() if "agent.gif" in p.name]


def test_unwritable_run_directory_is_a_clear_error(tmp_path):
    (tmp_path / "blocker").write_text("a file where the runs directory should be")  # fails even as root
    trainer = Trainer(_cartpole(tmp_path / "blocker"), tmp_path / "blocker" / "run")
    with pytest.raises(OSError, match="blocker/run"):
        trainer.run()


def _script(tmp_path: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "scripts" / "train_dqn.py"), "--config", CARTPOLE]
    cmd += _cartpole_overrides(tmp_path, **{"run.total_agent_steps": 10**7, "run.checkpoint_every_agent_steps": 10**6})
    return subprocess.Popen([*cmd, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_training(proc: subprocess.Popen, run_dir: Path, timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    while not (run_dir / "tb").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2.0)  # well inside the loop (and past the learning start)
    assert proc.poll() is None, proc.communicate()


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_finishes_the_step_checkpoints_and_exits_with_the_convention(tmp_path, sig, code):
    proc = _script(tmp_path)
    _wait_for_training(proc, tmp_path / "run")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err[-2000:]
    summary = json.loads(out[out.index("{") :])
    assert summary["interrupted"] == sig and 0 < summary["agent_steps"] < 10**7
    saved = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert saved and saved[-1].name == f"checkpoint_{summary['agent_steps']:012d}.pt"
    assert ck.load_checkpoint(saved[-1])["counters"]["agent_step"] == summary["agent_steps"]


@pytest.mark.parametrize("checkpointed", [False, True])
def test_a_second_ctrl_c_quits_at_once_and_says_whether_a_checkpoint_is_kept(
    tmp_path, monkeypatch, capsys, checkpointed
):
    """The second Ctrl-C is a KeyboardInterrupt out of the loop: the script says which checkpoint the rerun
    continues from, or that there is none yet (it said "the previous one is intact" either way)."""
    import importlib.util

    if checkpointed:
        Trainer(_cartpole(tmp_path, **{"run.total_agent_steps": 400}), tmp_path / "run").run()

    def second_ctrl_c(self, until_agent_step, bar=None):
        self.stop_signal = signal.SIGINT  # the first Ctrl-C, recorded by the loop's handler
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "advance", second_ctrl_c)
    spec = importlib.util.spec_from_file_location("wn_rl_script_train_dqn", ROOT / "scripts" / "train_dqn.py")
    train_dqn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_dqn)
    assert train_dqn.main(["--config", CARTPOLE, *_cartpole_overrides(tmp_path)]) == 130
    err = capsys.readouterr().err
    saved = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert bool(saved) == checkpointed
    if checkpointed:
        assert f"interrupted again: quit without a new checkpoint; the previous one is intact: {saved[-1]}" in err
    else:
        assert "interrupted again: quit without a new checkpoint; none was written yet, so it starts over" in err


def test_a_committed_version_1_checkpoint_keeps_loading_and_resumes(tmp_path):
    data = ROOT / "tests" / "data" / "dqn_checkpoint_v1"
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_bytes((data / "config.yaml").read_bytes())
    for name in ("checkpoint_000000000400.pt", "checkpoint_000000000400.pt.complete.json"):
        (run_dir / "checkpoints" / name).write_bytes((data / name).read_bytes())
    raw = torch.load(data / "checkpoint_000000000400.pt", weights_only=True)
    assert raw["format_version"] == 1
    config = load_run_config(run_dir, [f"run.runs_dir={tmp_path}", "run.total_agent_steps=480"])  # as --resume does
    trainer = Trainer(config, run_dir)
    with pytest.warns(UserWarning, match="resumed from .*checkpoint_000000000400.pt at agent step 400"):
        summary = trainer.run()
    assert summary["agent_steps"] == 480 and summary["interrupted"] is None
