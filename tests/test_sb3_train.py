"""scripts/train_sb3.py and its configs: every shipped config loads, bad configs fail fast with the
key and the fix, and a real run (subprocess, tiny budget) writes TensorBoard, checkpoints, an
evaluation and a final model, then resumes with its step counter continued."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from stable_baselines3 import DQN, HerReplayBuffer

from wn_rl.config import ConfigError
from wn_rl.sb3.checkpoints import latest_model
from wn_rl.sb3.config import build_hyperparameters, build_policy_kwargs, load_sb3_config, resolve_policy
from wn_rl.sb3.envs import make_env
from wn_rl.sb3.runner import SB3Run

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "sb3").glob("*.yaml"))
SCRIPT = ROOT / "scripts" / "train_sb3.py"
CARTPOLE = ROOT / "configs" / "sb3" / "dqn_cartpole_wn.yaml"


def test_configs_cover_the_issue():
    names = {p.stem for p in CONFIGS}
    for algo in ("dqn", "ppo", "a2c"):
        for game in ("breakout", "spaceinvaders", "pong"):
            assert {f"{algo}_{game}_wn", f"{algo}_{game}_normal"} <= names
    for algo in ("sac", "td3"):
        for env in ("halfcheetah", "hopper", "pendulum"):
            assert {f"{algo}_{env}_wn", f"{algo}_{env}_normal"} <= names
    assert {"dqn_cartpole_wn", "recurrent_ppo_cartpole_novel_wn"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_loads_and_resolves(path):
    config = load_sb3_config(path)
    policy = resolve_policy(config.algo, config.policy)
    build_policy_kwargs(config)
    build_hyperparameters(config)
    if path.stem.endswith("_wn"):
        assert isinstance(policy, type) and policy.__name__.startswith("Wn")
    if config.env_id.endswith("NoFrameskip-v4"):
        assert config.frame_stack == 4
    if config.algo in ("dqn", "qrdqn", "sac", "td3", "tqc") and config.init.enabled:
        assert config.hyperparameters.get("learning_starts", 100) >= config.init.n_samples


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["n_env=4"], "unknown key 'n_env'; did you mean 'n_envs'"),
        (["policy=WnCnnPolicyy"], "Did you mean 'WnCnnPolicy'"),
        (["hyperparameters.learning_rat=1e-3"], "hyperparameters.learning_rat is not an argument of DQN"),
        (["env_id=ALE/Breakout-v5"], "Use BreakoutNoFrameskip-v4"),
        (["env_id=Breakout-v4"], r"only <Game>NoFrameskip-v4 .* Use BreakoutNoFrameskip-v4"),  # raw frames before
        (["env_id=BreakoutNoFrameskip-v0"], "Use BreakoutNoFrameskip-v4"),
        (["total_timesteps=0"], "total_timesteps=0 is invalid"),
        (["init.n_samples=1"], "init.n_samples=1 is invalid"),
        (["hyperparameters.learning_starts=100"], "init.n_samples=256 needs hyperparameters.learning_starts >= 256"),
        (["hyperparameters.learning_rate=lin_abc"], "learning_rate='lin_abc' is invalid: expected a number or 'lin_"),
        (["hyperparameters.replay_buffer_class=HerReplayBufer"], "Did you mean 'HerReplayBuffer'"),
        (["hyperparameters.replay_buffer_class=[HerReplayBuffer]"], r"class=\['HerReplayBuffer'\] is not one"),
    ],
)
def test_bad_configs_fail_with_the_key_and_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_sb3_config(ROOT / "configs" / "sb3" / "dqn_breakout_wn.yaml", overrides)


def test_replay_buffer_class_null_is_sb3s_default():
    path = ROOT / "configs" / "sb3" / "dqn_cartpole_wn.yaml"
    config = load_sb3_config(path, ["hyperparameters.replay_buffer_class=null"])
    assert build_hyperparameters(config)["replay_buffer_class"] is None  # SB3 picks the buffer for the space


def test_policy_kwargs_names_resolve_to_classes():
    config = load_sb3_config(ROOT / "configs" / "sb3" / "a2c_pong_wn.yaml")
    kwargs = build_policy_kwargs(config)
    assert kwargs["optimizer_class"].__name__ == "RMSpropTFLike"
    bad = load_sb3_config(ROOT / "configs" / "sb3" / "a2c_pong_wn.yaml", ["policy_kwargs.activation_fn=relux"])
    with pytest.raises(ConfigError, match=r"activation_fn='relux' is not one of"):
        build_policy_kwargs(bad)
    assert build_hyperparameters(load_sb3_config(ROOT / "configs" / "sb3" / "ppo_pong_wn.yaml"))["clip_range"](0.5) == (
        pytest.approx(0.05)
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["policy_kwargs.parametrization=weight_norm"], "unexpected keyword argument 'parametrization'"),
        (["policy=WnCnnPolicy"], "Use WnMlpPolicy for vector observations"),
        (["env_id=CartPol-v1"], "Did you mean: `CartPole`"),
        (
            ["env_id=wn_rl/InvalidActionDiscrete-v0", "policy=MlpPolicy", "env_kwargs={dim: 5}"],
            r"n_invalid_actions=8 with dim=5: expected 0 <= n_invalid_actions < dim",  # an AssertionError before
        ),
    ],
)
def test_what_the_algorithm_or_gym_rejects_is_a_config_error_before_any_file(tmp_path, overrides, message):
    base = [f"runs_dir={tmp_path}", "progress_bar=false"]  # the progress bar's packages are an optional extra
    config = load_sb3_config(ROOT / "configs" / "sb3" / "dqn_cartpole_wn.yaml", [*base, *overrides])
    with pytest.raises(ConfigError, match=message):
        SB3Run(config, tmp_path / "run").train()
    assert not any(tmp_path.iterdir())


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, cwd=ROOT, check=False
    )


def test_script_trains_checkpoints_evaluates_and_resumes_with_the_counter_continued(tmp_path):
    common = [
        f"runs_dir={tmp_path}",
        "run_name=run",
        "progress_bar=false",
        "torch_threads=1",
        "verbose=0",
    ]
    first = run_script(
        "--config",
        "configs/sb3/dqn_cartpole_wn.yaml",
        "total_timesteps=600",
        "hyperparameters.learning_starts=300",
        "hyperparameters.train_freq=4",
        "hyperparameters.gradient_steps=1",
        "init.n_samples=256",
        "checkpoint_freq=250",
        "save_replay_buffer=true",
        "eval.freq=300",
        "eval.episodes=2",
        "wn_stats_freq=100",
        *common,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "run"
    summary = json.loads(first.stdout[first.stdout.rindex("\n{\n") :])  # the summary, after the config printed at start
    assert first.stdout.startswith("algo: dqn\n") and "learning_starts: 300" in first.stdout  # the config, first
    assert summary["num_timesteps"] == 600 and summary["resumed_from"] is None
    for name in ("config.yaml", "final_model.zip", "final_replay_buffer.pkl", "eval/evaluations.npz"):
        assert (run_dir / name).is_file(), name
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("model_*.zip")) == [
        "model_250_steps.zip",
        "model_500_steps.zip",
    ]
    assert (run_dir / "checkpoints" / "replay_buffer_500_steps.pkl").is_file()
    assert not list(run_dir.rglob(".*.tmp-*")), "temporary files left behind"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb_1")).Reload()
    assert "wn/q_net/q_net.0/grad_scale_mean" in events.Tags()["scalars"]
    assert "ddi/q_net/q_net.0/pre_init_std" in events.Tags()["scalars"]
    assert "hyperparameters/text_summary" in events.Tags()["tensors"]

    assert latest_model(run_dir) == run_dir / "final_model.zip"
    second = run_script("--resume", str(run_dir), "total_timesteps=800", *common)
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = json.loads(second.stdout[second.stdout.rindex("\n{\n") :])  # the summary, after the config
    assert resumed["start_timesteps"] == 600 and resumed["num_timesteps"] == 800
    assert resumed["resumed_from"].endswith("final_model.zip")
    assert sorted(p.name for p in run_dir.glob("tb_*")) == ["tb_1"]  # the same TensorBoard curve continues
    model = DQN.load(run_dir / "final_model.zip")
    assert model.num_timesteps == 800 and model._n_calls >= 800
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["total_timesteps"] == 800  # the budget resumed to


def test_script_rejects_bad_input_before_training(tmp_path):
    result = run_script("--config", "configs/sb3/dqn_cartpole_wn.yaml", "learning_rate=1e-3", f"runs_dir={tmp_path}")
    assert result.returncode == 2
    assert "unknown key 'learning_rate'" in result.stderr
    assert not any(tmp_path.iterdir())
    wrong_space = run_script(
        "--config",
        "configs/sb3/dqn_cartpole_wn.yaml",
        "policy=WnCnnPolicy",
        f"runs_dir={tmp_path}",
        "progress_bar=false",
    )
    assert wrong_space.returncode == 2 and "Use WnMlpPolicy" in wrong_space.stderr
    assert not any(tmp_path.iterdir())  # the run's lock made its directory and took both away again
    missing = run_script("--resume", str(tmp_path / "nothing"))
    assert missing.returncode == 2
    assert f"--resume {tmp_path / 'nothing'}: the directory does not exist" in missing.stderr
    assert "expected a YAML file" not in missing.stderr
    (tmp_path / "empty").mkdir()
    not_a_run = run_script("--resume", str(tmp_path / "empty"))
    assert not_a_run.returncode == 2
    assert "holds no config.yaml: not a run directory of scripts/train_sb3.py" in not_a_run.stderr
    bad_device = run_script("--config", "configs/sb3/dqn_cartpole_wn.yaml", "device=gpu", f"runs_dir={tmp_path}")
    assert bad_device.returncode == 2 and "Traceback" not in bad_device.stderr
    assert "device='gpu' is not a device" in bad_device.stderr and "run.device" not in bad_device.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_device_is_checked_when_the_config_loads(monkeypatch):
    path = ROOT / "configs" / "sb3" / "dqn_cartpole_wn.yaml"
    with pytest.raises(ConfigError, match=r"device='gpu' is not a device: expected auto, cpu, cuda, cuda:N .* or mps"):
        load_sb3_config(path, ["device=gpu"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"device='cuda' but no CUDA device is available here; use device=auto or"):
        load_sb3_config(path, ["device=cuda"])
    assert load_sb3_config(path, ["device=cpu"]).device == "cpu"
    assert load_sb3_config(path).device == "auto"


def _complete_run_overrides(runs_dir: Path, total_timesteps: int) -> list[str]:
    """Exactly ``total_timesteps`` steps, with checkpoints, a replay buffer, evaluations and WN statistics."""
    overrides = [f"runs_dir={runs_dir}", "run_name=run", "progress_bar=false", "torch_threads=1", "verbose=0"]
    overrides += ["hyperparameters.train_freq=1", "hyperparameters.gradient_steps=1", "init.n_samples=32"]
    overrides += ["hyperparameters.learning_starts=50", "hyperparameters.buffer_size=1000", "save_replay_buffer=true"]
    overrides += ["checkpoint_freq=50", "eval.freq=50", "eval.episodes=1", "wn_stats_freq=25"]
    return [*overrides, f"total_timesteps={total_timesteps}"]


@pytest.fixture(scope="module")
def complete_run(tmp_path_factory) -> Path:
    """A run trained to its total_timesteps=100; tests copy it."""
    runs_dir = tmp_path_factory.mktemp("complete")
    SB3Run(load_sb3_config(CARTPOLE, _complete_run_overrides(runs_dir, 100)), runs_dir / "run").train()
    return runs_dir / "run"


def _snapshot(run_dir: Path) -> dict[str, tuple[int, int, str | None]]:
    """Every file and folder under ``run_dir``: size, mtime in ns and (files) SHA-256."""
    snapshot = {}
    for path in sorted([run_dir, *run_dir.rglob("*")]):
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        snapshot[str(path.relative_to(run_dir))] = (path.stat().st_size, path.stat().st_mtime_ns, digest)
    return snapshot


@pytest.mark.parametrize("total_timesteps", [100, 80])
def test_resuming_a_complete_run_leaves_its_directory_unchanged(complete_run, tmp_path, capsys, total_timesteps):
    run_dir = shutil.copytree(complete_run, tmp_path / "run")
    before = _snapshot(run_dir)
    assert any(name.startswith("tb_1/events.") for name in before) and "final_replay_buffer.pkl" in before
    capsys.readouterr()
    again = load_sb3_config(CARTPOLE, _complete_run_overrides(tmp_path, total_timesteps))
    summary = SB3Run(again, run_dir, resume=True).train()
    assert summary["start_timesteps"] == summary["num_timesteps"] == 100 and summary["interrupted"] is None
    out = capsys.readouterr().out
    assert f"at step 100; the run is complete (total_timesteps={total_timesteps}): nothing to train; raise" in out
    assert "(the run directory is left unchanged)" in out
    assert _snapshot(run_dir) == before  # config.yaml keeps total_timesteps=100, no new model or events file


def test_script_resume_of_a_complete_run_exits_0_and_changes_nothing(complete_run, tmp_path):
    run_dir = shutil.copytree(complete_run, tmp_path / "run")
    (run_dir / ".trainer.lock").write_text("host 1\n")  # as the script that trained it left it
    before = _snapshot(run_dir)
    resumed = run_script("--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "the run is complete (total_timesteps=100): nothing to train" in resumed.stdout
    assert json.loads(resumed.stdout[resumed.stdout.rindex("\n{\n") :])["num_timesteps"] == 100
    after = _snapshot(run_dir)
    assert after.pop(".trainer.lock") != before.pop(".trainer.lock")  # the lock's text names its last holder
    assert after == before


def test_resuming_a_complete_run_with_a_larger_budget_trains_on(complete_run, tmp_path, capsys):
    run_dir = shutil.copytree(complete_run, tmp_path / "run")
    events_before = set(run_dir.glob("tb_1/events.*"))
    longer = load_sb3_config(CARTPOLE, _complete_run_overrides(tmp_path, 150))
    summary = SB3Run(longer, run_dir, resume=True).train()
    assert summary["start_timesteps"] == 100 and summary["num_timesteps"] == 150
    assert "nothing to train" not in capsys.readouterr().out
    assert json.loads((run_dir / "final_steps.json").read_text())["num_timesteps"] == 150
    assert DQN.load(run_dir / "final_model.zip").num_timesteps == 150
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["total_timesteps"] == 150
    assert len(set(run_dir.glob("tb_1/events.*")) - events_before) == 1


def test_a_run_stopped_at_its_budget_before_its_final_save_writes_it_on_resume(complete_run, tmp_path, capsys):
    run_dir = shutil.copytree(complete_run, tmp_path / "run")
    for name in ("final_model.zip", "final_steps.json", "final_replay_buffer.pkl"):
        (run_dir / name).unlink()  # killed after the step-100 checkpoint, before the final save
    again = load_sb3_config(CARTPOLE, _complete_run_overrides(tmp_path, 100))
    summary = SB3Run(again, run_dir, resume=True).train()
    assert summary["resumed_from"].endswith("model_100_steps.zip") and summary["num_timesteps"] == 100
    out = capsys.readouterr().out
    assert "the run is complete (total_timesteps=100): nothing to train" in out and "left unchanged" not in out
    assert json.loads((run_dir / "final_steps.json").read_text())["num_timesteps"] == 100
    assert DQN.load(run_dir / "final_model.zip").num_timesteps == 100


def test_her_config_trains_checkpoints_its_her_buffer_and_resumes(tmp_path):
    config_path = ROOT / "configs" / "sb3" / "dqn_bitflipping_her_wn.yaml"
    tiny = [
        f"runs_dir={tmp_path}",
        "run_name=her",
        "progress_bar=false",
        "torch_threads=1",
        "verbose=0",
        "env_kwargs.n_bits=4",
        "hyperparameters.learning_starts=256",
        "hyperparameters.batch_size=32",
        "init.n_samples=256",
        "checkpoint_freq=300",
        "save_replay_buffer=true",
        "eval.freq=0",
    ]
    config = load_sb3_config(config_path, [*tiny, "total_timesteps=400"])
    assert build_hyperparameters(config)["replay_buffer_class"] is HerReplayBuffer
    summary = SB3Run(config, tmp_path / "her").train()
    assert summary["num_timesteps"] == 400
    checkpoint = tmp_path / "her" / "checkpoints" / "model_300_steps.zip"
    assert checkpoint.is_file() and (tmp_path / "her" / "checkpoints" / "replay_buffer_300_steps.pkl").is_file()
    resumed_config = load_sb3_config(config_path, [*tiny, "total_timesteps=500"])
    resumed = SB3Run(resumed_config, tmp_path / "her", resume=True).train()
    assert resumed["start_timesteps"] == 400 and resumed["num_timesteps"] == 500
    env = make_env("wn_rl/BitFlipping-v0", 1, 0, env_kwargs={"n_bits": 4})  # HER models load with their env
    model = DQN.load(tmp_path / "her" / "final_model.zip", env=env)
    model.load_replay_buffer(tmp_path / "her" / "final_replay_buffer.pkl", truncate_last_traj=False)
    assert isinstance(model.replay_buffer, HerReplayBuffer) and model.replay_buffer.size() > 0


@pytest.mark.parametrize("env_id", ["wn_rl/CartPoleNoVel-v1", "PongNoFrameskip-v4"])
def test_subprocess_envs_build_our_ids_and_ale_pys(env_id):
    """SubprocVecEnv's workers start fresh interpreters, where neither our ids nor ale-py's were registered:
    ``subprocess_envs=true`` failed for every Atari and wn_rl/* id with a ConnectionResetError."""
    env = make_env(env_id, 2, 0, subprocess=True)
    try:
        obs = env.reset()
        expected = (2,) if "NoVel" in env_id else (84, 84, 4)  # positions only; 4 stacked 84x84 frames
        assert obs.shape == (2, *expected) and env.observation_space.shape == expected
    finally:
        env.close()
