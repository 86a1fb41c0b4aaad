"""Fault injection for ``scripts/train_sb3.py`` (issue #5, where SB3 allows): a changed config is refused
on resume unless forced, a damaged newest model falls back to the previous one, SIGTERM saves and exits 143."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from stable_baselines3 import DQN

from wn_rl.config import ConfigError
from wn_rl.sb3.config import load_sb3_config
from wn_rl.sb3.runner import SB3Run, latest_model

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "sb3" / "dqn_cartpole_wn.yaml")


def _overrides(tmp_path: Path, **extra) -> list[str]:
    base = {
        "total_timesteps": 400,
        "hyperparameters.learning_starts": 200,
        "hyperparameters.train_freq": 4,
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
    summary = json.loads(out[out.index("{") :])
    assert summary["interrupted"] == signal.SIGTERM and 0 < summary["num_timesteps"] < 10**7
    assert DQN.load(tmp_path / "run" / "final_model.zip").num_timesteps == summary["num_timesteps"]
