"""Evaluation plays a fixed quota of complete games per env, so short games are not over-counted."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from agents.dqn.config import config_dict, load_dqn_config
from agents.dqn.envs import EnvSpec, StepResult
from agents.dqn.evaluation import best_epoch_mean, evaluate, game_quotas, select_actions

ROOT = Path(__file__).resolve().parents[1]


class _FixedLengthGames:
    """Env i's games last ``lengths[i]`` steps and score 1 per step (so a game's score is its length)."""

    def __init__(self, lengths):
        self.lengths = np.asarray(lengths)
        self.spec = EnvSpec("gym", "fixed", len(lengths), (3,), 1, np.dtype(np.float32), 2, {})

    def reset(self, seed):
        self.t = np.zeros(len(self.lengths), int)
        self.done = np.zeros(len(self.lengths), bool)
        return np.zeros((len(self.lengths), 3), np.float32)

    def step(self, actions):
        start = self.done.copy()
        self.t = np.where(start, 0, self.t + 1)
        term = ~start & (self.t == self.lengths)
        self.done = term
        rewards = (~start).astype(np.float32)
        zeros = np.zeros_like(term)
        return StepResult(np.zeros((len(self.lengths), 3), np.float32), rewards, term, zeros, zeros, start)


def test_quotas_split_games_evenly():
    assert game_quotas(10, 4).tolist() == [3, 3, 2, 2]
    assert game_quotas(3, 8).sum() == 3


def test_short_games_are_not_over_counted():
    env = _FixedLengthGames([2, 50])
    q = nn.Linear(3, 2)
    result = evaluate(q, env, games=6, epsilon=0.05, seed=0, device=torch.device("cpu"))
    assert result["games"] == 6
    assert sorted(result["returns"]) == [2.0] * 3 + [50.0] * 3  # three of each, not five short ones
    assert result["return_mean"] == 26.0
    assert result["lengths"].count(2) == 3


def test_best_epoch_mean_is_the_max_of_epoch_means():
    assert best_epoch_mean([{"return_mean": 3.0}, {"return_mean": 7.0}, {"return_mean": 5.0}]) == 7.0


def test_epsilon_greedy_actions():
    q = nn.Linear(3, 4)
    with torch.no_grad():
        q.weight.zero_()
        q.bias.copy_(torch.tensor([0.0, 0.0, 1.0, 0.0]))
    obs = torch.zeros(1000, 3)
    assert (select_actions(q, obs, 0.0, 4) == 2).all()
    random_share = (select_actions(q, obs, 0.5, 4) != 2).float().mean().item()
    assert 0.3 < random_share < 0.45  # 0.5 * 3/4 expected
    assert select_actions(None, obs, 1.0, 4).unique().numel() == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--games", "0"], "--games 0: give at least 1 complete game"),
        (["--games", "-2"], "--games -2: give at least 1 complete game"),
        (["--epsilon", "2"], "--epsilon 2.0: expected a probability in [0, 1]"),
        (["--video", "cartpole.gif"], "--video needs image observations (Atari or MinAtar), not env.suite='gym'"),
        (["--video", "agent.avi"], "--video agent.avi: expected a .gif or .mp4 file name"),
        (["--device", "gpu"], "--device='gpu' is not a device"),
    ],
)
def test_evaluate_script_refuses_bad_arguments_before_playing(tmp_path, args, message):
    config = load_dqn_config(str(ROOT / "configs" / "dqn" / "cartpole.yaml"))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config_dict(config)))  # a run without a checkpoint yet
    script = [sys.executable, str(ROOT / "scripts" / "evaluate.py"), str(tmp_path), *args]
    proc = subprocess.run(script, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"wn_rl_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cartpole_run_with_replay(tmp_path: Path, total_agent_steps: int = 400) -> Path:
    """A CartPole run of ``tmp_path / "run"`` with the replay memory in its checkpoints (every 200 agent steps)."""
    from agents.dqn.runner import Trainer

    overrides = {
        "run.total_agent_steps": total_agent_steps,
        "agent.learning_starts_agent_steps": 100,
        "agent.replay_capacity_transitions": 1000,
        "eval.every_agent_steps": 0,
        "eval.max_episode_steps": 30,
        "run.checkpoint_every_agent_steps": 200,
        "run.save_replay": "true",
        "run.runs_dir": str(tmp_path),
        "run.name": "run",
        "run.progress_bar": "false",
        "run.device": "cpu",
    }
    cartpole = str(ROOT / "configs" / "dqn" / "cartpole.yaml")
    config = load_dqn_config(cartpole, [f"{k}={v}" for k, v in overrides.items()])
    Trainer(config, tmp_path / "run").run()
    return tmp_path / "run"


def test_evaluate_script_hashes_the_checkpoint_once_and_skips_a_corrupted_newest_one(tmp_path, capsys, hashed_bytes):
    """The checkpoint evaluated is verified (SHA-256) in one pass over it; a newest one corrupted in place
    with its size kept is skipped with a warning, and the previous one is evaluated."""
    from wn_rl import checkpoint as ck

    _cartpole_run_with_replay(tmp_path)
    older, newest = ck.complete_checkpoints(tmp_path / "run" / "checkpoints")
    hashed = hashed_bytes
    hashed.clear()  # what saving hashed
    evaluate_script = _load_script("evaluate")
    assert evaluate_script.main([str(tmp_path / "run"), "--games", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"] == str(newest)
    assert sum(hashed) == newest.stat().st_size
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    hashed.clear()
    with pytest.warns(UserWarning, match=r"skipping damaged checkpoint.*checkpoint_000000000400\.pt.*SHA-256"):
        assert evaluate_script.main([str(tmp_path / "run"), "--games", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"] == str(older)
    assert sum(hashed) == newest.stat().st_size + older.stat().st_size


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
)
def test_evaluate_script_moves_only_the_q_network_to_the_device(tmp_path, capsys, torch_loads, device):
    """The checkpoint was loaded with map_location=device: with run.save_replay=true the whole replay memory
    (~7 GB for a 1M-transition Atari run) went to the GPU to evaluate a network of a few MB. It is mapped on
    the CPU now (read as it is used), and only the Q-network's weights reach the device."""
    run_dir = _cartpole_run_with_replay(tmp_path, total_agent_steps=200)
    torch_loads.clear()  # the evaluation's loads only
    assert _load_script("evaluate").main([str(run_dir), "--games", "1", "--device", device]) == 0
    assert json.loads(capsys.readouterr().out)["agent_step"] == 200
    ((kwargs, payload),) = torch_loads
    assert kwargs.get("mmap") is True and torch.device(kwargs.get("map_location")) == torch.device("cpu")
    assert payload["replay"] and all(t.device.type == "cpu" for t in _tensors(payload))


@pytest.mark.parametrize(
    ("video", "absent", "message"),
    [
        ("agent.mp4", "imageio_ffmpeg", "writing MP4 needs `pip install imageio imageio-ffmpeg`"),
        ("agent.mp4", "imageio", "writing MP4 needs `pip install imageio imageio-ffmpeg`"),
        ("agent.gif", "PIL", "writing a GIF needs Pillow"),
    ],
)
def test_a_missing_video_writer_is_refused_before_any_game(tmp_path, monkeypatch, video, absent, message):
    """imageio without its ffmpeg plugin failed at the write, after every evaluation game, with a traceback."""
    evaluate = _load_script("evaluate")
    real = evaluate.importlib.util.find_spec
    monkeypatch.setattr(evaluate.importlib.util, "find_spec", lambda name: None if name == absent else real(name))
    with pytest.raises(SystemExit) as exit_:
        evaluate._parse_args([str(tmp_path), "--video", video])
    assert exit_.value.code == 2
    assert evaluate._missing_video_writer(Path(video)).startswith(message)
