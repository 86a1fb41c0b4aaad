"""Fault injection for ``scripts/train_sb3.py`` (issue #5, where SB3 allows): a changed config is refused
on resume unless forced, a damaged newest model falls back to the previous one, SIGTERM saves and exits 143,
a NaN/inf gradient step is never applied or saved and stops the run, a NaN reward is blamed on the env."""

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

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3 import DQN

from wn_rl.analysis.runs import run_progress
from wn_rl.checkpoint import CheckpointError
from wn_rl.config import ConfigError
from wn_rl.sb3.checkpoints import latest_model
from wn_rl.sb3.config import load_sb3_config
from wn_rl.sb3.guard import EnvNonFiniteError, NonFiniteGuard, NonFiniteTrainingError
from wn_rl.sb3.runner import SB3Run

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "sb3" / "dqn_cartpole_wn.yaml")


def _overrides(tmp_path: Path, **extra) -> list[str]:
    base = {
        "total_timesteps": 400,
        "hyperparameters.learning_starts": 200,
        "hyperparameters.train_freq": 4,
        "hyperparameters.gradient_steps": 1,  # the config's 128 per rollout would dominate the test time
        "init.n_samples": 128,
        "checkpoint_freq": 200,
        "eval.freq": 0,
        "wn_stats_freq": 0,
        "runs_dir": str(tmp_path),
        "run_name": "run",
        "progress_bar": "false",
        "torch_threads": 1,
        "verbose": 0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sb3")
    SB3Run(load_sb3_config(CONFIG, _overrides(tmp_path)), tmp_path / "run").train()
    return tmp_path


def test_resume_with_a_changed_config_is_refused_unless_forced_safe_keys_allowed(trained):
    run_dir = trained / "run"
    changed = load_sb3_config(CONFIG, _overrides(trained, **{"hyperparameters.gamma": 0.5}))
    with pytest.raises(ConfigError, match=r"hyperparameters\.gamma: 0\.99 -> 0\.5[\s\S]*--force"):
        SB3Run(changed, run_dir, resume=True)
    assert SB3Run(changed, run_dir, resume=True, force=True).resume_from is not None
    longer = load_sb3_config(CONFIG, _overrides(trained, total_timesteps=600, checkpoint_freq=100, log_interval=5))
    assert SB3Run(longer, run_dir, resume=True).resume_from == run_dir / "final_model.zip"


def test_a_new_run_in_the_directory_of_an_old_one_is_refused(trained):
    with pytest.raises(ConfigError, match=r"already holds a run[\s\S]*--resume"):
        SB3Run(load_sb3_config(CONFIG, _overrides(trained, total_timesteps=200)), trained / "run")


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_newest_model_falls_back_to_the_previous_one_and_says_so(trained, tmp_path, damage):
    run_dir = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained / "run"), str(run_dir)], check=True)
    final = run_dir / "final_model.zip"
    data = final.read_bytes()
    if damage == "truncate":
        final.write_bytes(data[: len(data) // 2])
    else:
        i = len(data) // 3
        final.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :])
    with pytest.warns(UserWarning, match=r"skipping damaged model .*final_model\.zip"):
        found = latest_model(run_dir)
    assert found == run_dir / "checkpoints" / "model_400_steps.zip"
    assert DQN.load(found).num_timesteps == 400


@pytest.mark.parametrize("steps_file", ["{", '{"steps": 400}', "[400]"])
def test_an_unreadable_final_steps_file_falls_back_to_the_newest_checkpoint(trained, tmp_path, steps_file):
    run_dir = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained / "run"), str(run_dir)], check=True)
    (run_dir / "final_steps.json").write_text(steps_file)  # final_model.zip's step count is unknown now
    assert latest_model(run_dir) == run_dir / "checkpoints" / "model_400_steps.zip"
    assert run_progress(run_dir) == 400


def test_a_resumed_run_removes_temporary_files_of_killed_writes(trained, tmp_path):
    run_dir = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained / "run"), str(run_dir)], check=True)
    left = [run_dir / "checkpoints" / ".model_600_steps.zip.tmp-4242", run_dir / ".final_model.zip.tmp-4242"]
    for path in left:
        path.write_bytes(b"PK\x03\x04 half a zip")
    # a resume that trains (one of a complete run changes nothing, temporaries included)
    summary = SB3Run(load_sb3_config(CONFIG, _overrides(tmp_path, total_timesteps=600)), run_dir, resume=True).train()
    assert summary["num_timesteps"] == 600 and not any(path.exists() for path in left)


@pytest.mark.parametrize("verbose", [0, 1])
def test_a_resumed_run_takes_the_verbosity_it_is_given(trained, tmp_path, verbose):
    run_dir = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained / "run"), str(run_dir)], check=True)
    run = SB3Run(
        load_sb3_config(CONFIG, _overrides(tmp_path, total_timesteps=600, verbose=verbose)), run_dir, resume=True
    )
    env, model = run._build()
    try:
        assert model.verbose == verbose  # the trained run was saved with verbose=0
    finally:
        env.close()


def test_a_resumed_run_keeps_its_checkpoint_interval(trained, tmp_path):
    run_dir = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained / "run"), str(run_dir)], check=True)
    SB3Run(load_sb3_config(CONFIG, _overrides(tmp_path, total_timesteps=600)), run_dir, resume=True).train()
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("model_*.zip"))
    assert saved == ["model_200_steps.zip", "model_400_steps.zip", "model_600_steps.zip"]  # not one right away


def test_sigterm_saves_the_model_and_exits_143(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "scripts" / "train_sb3.py"), "--config", CONFIG]
    cmd += _overrides(tmp_path, total_timesteps=10**7, checkpoint_freq=0)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 90
    while not list((tmp_path / "run").glob("tb_*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2.0)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    summary = json.loads(out[out.rindex("\n{\n") :])  # the summary, after the config printed at start
    assert summary["interrupted"] == signal.SIGTERM and 0 < summary["num_timesteps"] < 10**7
    assert DQN.load(tmp_path / "run" / "final_model.zip").num_timesteps == summary["num_timesteps"]


def test_absurd_learning_rate_stops_the_run_and_nothing_bad_is_applied_or_saved(tmp_path):
    config = load_sb3_config(
        CONFIG,
        _overrides(
            tmp_path,
            total_timesteps=4000,
            **{"hyperparameters.learning_rate": "1.0e+30", "hyperparameters.gradient_steps": 128},
        ),
    )
    run = SB3Run(config, tmp_path / "run")
    with pytest.raises(NonFiniteTrainingError) as info:
        run.train()
    message = str(info.value)
    assert "non-finite value" in message and "policy.optimizer: policy.q_net" in message
    assert f"gradient step {info.value.step:,}" in message and "Detected at environment step" in message
    assert info.value.step <= run.guard.guard.steps <= info.value.step + 16  # read every 16 gradient steps
    assert all(th.isfinite(p).all() for p in run.guard.model.policy.parameters())  # bad steps were undone
    saved = sorted((tmp_path / "run" / "checkpoints").glob("model_*_steps.zip"))
    assert f"last good checkpoint: {saved[-1]}" in message
    assert not (tmp_path / "run" / "final_model.zip").exists()
    for path in saved:
        assert all(th.isfinite(p).all() for p in DQN.load(path).policy.parameters())
    with pytest.raises(NonFiniteTrainingError):  # the checkpoint callback refuses to save this model
        run.checkpoints.save()


@pytest.mark.parametrize("sync_free", [False, True], ids=["host_check", "device_only"])
def test_a_nan_gradient_step_is_not_applied(sync_free):
    net = th.nn.Linear(3, 2)
    optimizer = th.optim.Adam(net.parameters(), lr=0.1)
    guard = NonFiniteGuard({id(p): f"net.{n}" for n, p in net.named_parameters()}, sync_free=sync_free)
    guard.wrap(optimizer, "opt")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net(th.tensor([[1.0, float("nan"), 0.0]])).sum().backward()
    optimizer.step()  # no exception yet: the flag is read once per rollout, not per step
    assert all(th.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(th.count_nonzero(t) == 0 for state in optimizer.state.values() for t in state.values())
    with pytest.raises(NonFiniteTrainingError, match=r"in the gradient of opt: net.weight at gradient step 1"):
        guard.check()
    optimizer.zero_grad()
    net(th.ones(1, 3)).sum().backward()
    optimizer.step()  # a good step afterwards is applied
    assert not th.equal(before["weight"], net.weight)
    good = {k: v.clone() for k, v in net.state_dict().items()}
    for group in optimizer.param_groups:
        group["lr"] = float("inf")  # the new parameters would be inf: the step is undone
    optimizer.zero_grad()
    net(th.ones(1, 3)).sum().backward()
    optimizer.step()
    assert all(th.equal(good[k], v) for k, v in net.state_dict().items())
    assert guard.steps == 3


def test_a_second_guard_replaces_the_first_instead_of_wrapping_it():
    # a second learn() with the callback (or a new callback) builds a new guard: it must guard the optimizer's
    # own step, not the first guard's wrapper (a step would be checked and copied twice, and the first guard's
    # records would be read by nobody)
    net = th.nn.Linear(3, 2)
    optimizer = th.optim.SGD(net.parameters(), lr=0.1)
    real_step = optimizer.step
    first, second = NonFiniteGuard({}), NonFiniteGuard({})
    first.wrap(optimizer, "opt")
    second.wrap(optimizer, "opt")
    assert optimizer.step.__self__.unguarded == real_step
    net(th.tensor([[1.0, float("nan"), 0.0]])).sum().backward()
    optimizer.step()
    assert (first.steps, second.steps) == (0, 1)
    with pytest.raises(NonFiniteTrainingError, match="at gradient step 1"):
        second.check()
    first.check()  # the replaced guard saw nothing


class _NanRewardAfter(gym.Wrapper):
    def __init__(self, env: gym.Env, steps: int) -> None:
        super().__init__(env)
        self.remaining = steps

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.remaining -= 1
        return obs, (np.nan if self.remaining == 0 else reward), terminated, truncated, info


def test_nan_reward_is_reported_as_coming_from_the_environment(tmp_path):
    env_id = "wn_rl_test/NanRewardCartPole-v1"
    if env_id not in gym.registry:
        gym.register(env_id, entry_point=lambda **kw: _NanRewardAfter(gym.make("CartPole-v1", **kw), 300))
    config = load_sb3_config(CONFIG, _overrides(tmp_path, total_timesteps=1000, env_id=env_id))
    run = SB3Run(config, tmp_path / "run")
    with pytest.raises(EnvNonFiniteError) as info:
        run.train()
    message = str(info.value)
    assert "environment (vector index 0) returned a non-finite reward (nan) after action" in message
    assert "environment step 300" in message and "model_200_steps.zip" in message
    replay = run.guard.model.replay_buffer
    assert np.isfinite(replay.rewards[: replay.pos]).all() and replay.pos == 299  # the NaN was never stored


def test_a_resumed_run_continues_its_evaluations_and_keeps_the_best_model(tmp_path):
    evaluate = {"eval.freq": 100, "eval.episodes": 2}
    run_dir = tmp_path / "run"
    SB3Run(load_sb3_config(CONFIG, _overrides(tmp_path, **evaluate)), run_dir).train()
    eval_dir = run_dir / "eval"
    with np.load(eval_dir / "evaluations.npz") as data:
        first = {key: data[key].tolist() for key in data.files}
    assert first["timesteps"] == [100, 200, 300, 400]
    best_before = (eval_dir / "best_model.zip").read_bytes()
    # an evaluation at 500 whose checkpoint the kill prevented, and a half-written file of the killed writer
    np.savez(
        eval_dir / "evaluations.npz",
        timesteps=first["timesteps"] + [500],
        results=first["results"] + [[-1.0, -1.0]],
        ep_lengths=first["ep_lengths"] + [[1, 1]],
    )
    half = eval_dir / ".evaluations.npz.tmp-4242.npz"
    half.write_bytes(b"PK\x03\x04 half")
    longer = _overrides(tmp_path, total_timesteps=600, **evaluate)
    SB3Run(load_sb3_config(CONFIG, longer), run_dir, resume=True).train()
    with np.load(eval_dir / "evaluations.npz") as data:
        after = {key: data[key].tolist() for key in data.files}
    assert after["timesteps"] == [100, 200, 300, 400, 500, 600]  # kept, and 500 evaluated again
    assert after["results"][:4] == first["results"] and after["results"][4] != [-1.0, -1.0]
    assert not half.exists() and not list(eval_dir.glob(".*.tmp-*"))
    improved = max(np.mean(r) for r in after["results"][4:]) > max(np.mean(r) for r in first["results"])
    assert ((eval_dir / "best_model.zip").read_bytes() != best_before) == improved
    best_at = DQN.load(eval_dir / "best_model.zip").num_timesteps
    assert best_at in (after["timesteps"][4:] if improved else first["timesteps"])


# -- full disk and resume consistency (found on a real tmpfs, docs/full_disk.md) ------------------------------


def test_full_disk_at_an_evaluation_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    import builtins

    import wn_rl.checkpoint as ck

    def full_disk_open(file, mode="r", *args, **kwargs):  # part of the evaluations fits, then the disk is full
        if ".evaluations.npz" in str(file) and "w" in mode:
            with builtins.open(file, mode, *args, **kwargs) as f:
                f.write(b"PK\x03\x04 half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return builtins.open(file, mode, *args, **kwargs)

    monkeypatch.setattr(ck, "open", full_disk_open, raising=False)  # atomic_write_bytes' open only
    config = load_sb3_config(CONFIG, _overrides(tmp_path, **{"eval.freq": 100, "eval.episodes": 1}))
    with pytest.raises(CheckpointError, match=r"eval/evaluations\.npz: No space left on device \(errno 28\)"):
        SB3Run(config, tmp_path / "run").train()
    assert not [p.name for p in (tmp_path / "run" / "eval").iterdir() if "tmp" in p.name]


def test_full_disk_while_logging_names_the_event_file_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    from tensorboard.compat.tensorflow_stub.io import gfile

    checkpoint = tmp_path / "run" / "checkpoints" / "model_200_steps.zip"
    real_append = gfile.LocalFileSystem.append

    def append(self, filename, file_content, binary_mode=False):  # the disk fills after the first checkpoint
        if checkpoint.exists():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_append(self, filename, file_content, binary_mode)

    monkeypatch.setattr(gfile.LocalFileSystem, "append", append)
    thread_errors = []
    monkeypatch.setattr(threading, "excepthook", thread_errors.append)
    config = load_sb3_config(CONFIG, _overrides(tmp_path, total_timesteps=2000, wn_stats_freq=50))
    with pytest.raises(CheckpointError, match=r"could not write TensorBoard events .*tb_1.*errno 28"):
        SB3Run(config, tmp_path / "run").train()
    assert thread_errors == []  # reported once, by the run, not as the writer thread's traceback
    assert DQN.load(checkpoint).num_timesteps == 200


def test_a_final_buffer_from_an_unfinished_later_save_is_not_loaded_with_the_older_model(tmp_path):
    run_dir = tmp_path / "run"
    SB3Run(load_sb3_config(CONFIG, _overrides(tmp_path, save_replay_buffer="true")), run_dir).train()
    assert json.loads((run_dir / "final_steps.json").read_text())["replay_buffer_sha256"]
    # a later final save wrote its buffer, then the disk was full: the step-400 model meets another buffer
    final_buffer = run_dir / "final_replay_buffer.pkl"
    final_buffer.write_bytes((run_dir / "checkpoints" / "replay_buffer_200_steps.pkl").read_bytes())
    longer = load_sb3_config(CONFIG, _overrides(tmp_path, save_replay_buffer="true", total_timesteps=500))
    with pytest.warns(UserWarning, match=r"final_replay_buffer\.pkl was not saved with .*final_model\.zip"):
        run = SB3Run(longer, run_dir, resume=True)
        assert run.train()["num_timesteps"] == 500


def test_a_final_buffer_saved_before_hashes_were_recorded_still_loads(tmp_path, recwarn):
    run_dir = tmp_path / "run"
    SB3Run(load_sb3_config(CONFIG, _overrides(tmp_path, save_replay_buffer="true")), run_dir).train()
    (run_dir / "final_steps.json").write_text(json.dumps({"num_timesteps": 400}))  # as runs before 2026-11-24
    longer = load_sb3_config(CONFIG, _overrides(tmp_path, save_replay_buffer="true", total_timesteps=500))
    SB3Run(longer, run_dir, resume=True).train()
    assert not [w for w in recwarn if "was not saved with" in str(w.message)]


def test_a_resumed_run_evaluates_at_the_steps_of_a_run_without_a_break(tmp_path):
    first = _overrides(tmp_path, **{"eval.freq": 300, "eval.episodes": 1})
    SB3Run(load_sb3_config(CONFIG, first), tmp_path / "run").train()
    longer = _overrides(tmp_path, **{"eval.freq": 300, "eval.episodes": 1, "total_timesteps": 700})
    SB3Run(load_sb3_config(CONFIG, longer), tmp_path / "run", resume=True).train()
    with np.load(tmp_path / "run" / "eval" / "evaluations.npz") as data:
        assert data["timesteps"].tolist() == [300, 600]


def test_a_resumed_run_purges_what_a_killed_process_logged_after_its_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    SB3Run(load_sb3_config(CONFIG, _overrides(tmp_path, wn_stats_freq=50)), run_dir).train()
    for name in ("final_model.zip", "final_steps.json", "checkpoints/model_400_steps.zip"):
        (run_dir / name).unlink()  # as if killed before step 400: the first process logged up to 400
    SB3Run(load_sb3_config(CONFIG, _overrides(tmp_path, wn_stats_freq=50)), run_dir, resume=True).train()
    events = EventAccumulator(str(run_dir / "tb_1"))
    events.Reload()
    steps = [e.step for e in events.Scalars("wn/q_net/q_net.0/grad_scale_mean")]
    assert steps == sorted(set(steps)) and steps[-1] > 200  # steps after 200 once, from the resumed process


def test_a_resumed_copy_of_a_run_logs_into_its_own_directory(tmp_path):
    original, copy = tmp_path / "original" / "run", tmp_path / "copy" / "run"
    SB3Run(load_sb3_config(CONFIG, _overrides(tmp_path / "original")), original).train()
    copy.parent.mkdir()
    subprocess.run(["cp", "-r", str(original), str(copy)], check=True)
    events_before = sorted(original.rglob("events.*"))
    SB3Run(load_sb3_config(CONFIG, _overrides(tmp_path / "copy", total_timesteps=600)), copy, resume=True).train()
    assert sorted(original.rglob("events.*")) == events_before  # no restart marker nor events in the original
    assert len(list((copy / "tb_1").glob("events.*"))) == 2


def test_an_oserror_of_the_evaluation_env_is_not_reported_as_a_write_failure(tmp_path, monkeypatch):
    import stable_baselines3.common.callbacks as sb3_callbacks

    def evaluate_policy(*args, **kwargs):
        raise OSError(errno.EIO, "the eval env's emulator crashed")

    monkeypatch.setattr(sb3_callbacks, "evaluate_policy", evaluate_policy)
    config = load_sb3_config(CONFIG, _overrides(tmp_path, **{"eval.freq": 100, "eval.episodes": 1}))
    with pytest.raises(OSError, match="emulator crashed") as info:
        SB3Run(config, tmp_path / "run").train()
    assert not isinstance(info.value, CheckpointError)


def test_an_evaluation_that_cannot_be_moved_into_place_leaves_no_temporary(tmp_path, monkeypatch):
    import wn_rl.sb3.runner as runner

    real_write = runner.atomic_write_bytes

    def write(path, data):  # np.savez's temporary fitted on the disk, its atomic copy does not
        if Path(path).name == "evaluations.npz":
            raise CheckpointError(f"could not write {path}: No space left on device (errno 28)")
        return real_write(path, data)

    monkeypatch.setattr(runner, "atomic_write_bytes", write)
    config = load_sb3_config(CONFIG, _overrides(tmp_path, **{"eval.freq": 100, "eval.episodes": 1}))
    with pytest.raises(CheckpointError, match=r"eval/evaluations\.npz: No space left on device"):
        SB3Run(config, tmp_path / "run").train()
    assert [p.name for p in (tmp_path / "run" / "eval").iterdir()] == []


def test_resuming_a_run_that_stopped_before_saving_a_model_trains_it_from_step_0(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    overrides = _overrides(tmp_path, checkpoint_freq=0, wn_stats_freq=50)
    SB3Run(load_sb3_config(CONFIG, overrides), run_dir).train()
    for name in ("final_model.zip", "final_steps.json"):
        (run_dir / name).unlink()  # as if killed before its first model: config.yaml and logs only
    with pytest.raises(ConfigError, match="already holds a run"):
        SB3Run(load_sb3_config(CONFIG, overrides), run_dir)
    summary = SB3Run(load_sb3_config(CONFIG, overrides), run_dir, resume=True).train()
    assert summary["start_timesteps"] == 0 and summary["num_timesteps"] == 400
    assert "stopped before it saved a model: training it again from step 0" in capsys.readouterr().out
    assert sorted(p.name for p in run_dir.glob("tb_*")) == ["tb_1"]  # one curve, the dead attempt's purged
    events = EventAccumulator(str(run_dir / "tb_1"))
    events.Reload()
    steps = [e.step for e in events.Scalars("wn/q_net/q_net.0/grad_scale_mean")]
    assert steps == sorted(set(steps))
    with pytest.raises(ConfigError, match="no run here"):
        SB3Run(load_sb3_config(CONFIG, overrides), tmp_path / "nothing", resume=True)
