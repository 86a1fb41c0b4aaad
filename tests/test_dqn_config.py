"""Every DQN config loads; bad configs fail before any env or tensor exists, naming file, key, value."""

import re
from pathlib import Path

import pytest

from agents.dqn.config import DQNConfig, load_dqn_config
from agents.dqn.envs import check_env_name
from wn_rl.config import ConfigError

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/dqn/*.yaml"))


def test_the_shipped_configs_exist():
    names = {p.stem for p in CONFIGS}
    for game in ("breakout", "enduro", "seaquest", "space_invaders"):
        assert {f"{game}_normal", f"{game}_weight_norm"} <= names
    for game in ("asterix", "breakout", "freeway", "seaquest", "space_invaders"):
        assert f"minatar_{game}" in names
    assert "smoke" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads_and_names_a_valid_game(path):
    config = load_dqn_config(str(path))
    assert isinstance(config, DQNConfig)
    check_env_name(config.env)
    assert config.agent.lr is not None


@pytest.mark.parametrize("game", ["breakout", "enduro", "seaquest", "space_invaders"])
def test_paper_configs_follow_section_5_4(game):
    for p, lr in (("normal", 1e-4), ("weight_norm", 3e-4)):
        c = load_dqn_config(f"configs/dqn/{game}_{p}.yaml")
        a = c.agent
        assert (c.network.parameterization, a.lr, a.optimizer, a.beta1, a.batch_size) == (p, lr, "adamax", 0.5, 64)
        assert a.replay_capacity_transitions == 1_000_000 and a.target_update_every_updates == 10_000
        assert a.learning_starts_agent_steps == 50_000 and a.agent_steps_per_update == 4 and a.gamma == 0.99
        assert c.run.total_agent_steps == 200 * c.eval.every_agent_steps == 50_000_000
        assert c.env.protocol == "nature" and c.eval.epsilon == 0.05


def test_default_learning_rate_follows_the_parameterization():
    assert load_dqn_config(None, ["network.parameterization=weight_norm"]).agent.lr == 3e-4
    assert load_dqn_config(None, ["network.parameterization=normal"]).agent.lr == 1e-4


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("agent.batch_size=2000000", r"agent\.batch_size=2000000.*at most agent\.replay_capacity_transitions"),
        ("agent.learning_starts_agent_steps=60000000", r"learning_starts_agent_steps=60000000.*less than run"),
        ("agent.gamma=1.5", r"agent\.gamma=1\.5 is invalid: expected a discount in \[0, 1\]"),
        ("agent.gama=0.9", r"unknown key 'gama'; did you mean 'gamma'"),
        ("agent.batch_size=many", r"agent\.batch_size: expected an integer, got 'many'"),
        ("network.parameterization=weightnorm", r"network\.parameterization='weightnorm' is invalid"),
        ("env.suite=atari2600", r"env\.suite: 'atari2600' is not one of"),
        ("run.device=tpu", r"run\.device='tpu'"),
        ("agent.epsilon_end=2", r"agent\.epsilon_end=2\.0 is invalid"),
        ("run.seed=-1", r"run\.seed=-1 is invalid: expected an integer in \[0, 2\*\*30\)"),
        ("run.seed=3000000000", r"run\.seed=3000000000 is invalid: expected an integer in \[0, 2\*\*30\)"),
        ("network.hidden_sizes=[]", r"network\.hidden_sizes=\(\) is invalid: expected one or more positive widths"),
        ("eval.every_agent_steps=20000", r"eval\.every_agent_steps=20000 is invalid: expected at most run\.total"),
    ],
)
def test_bad_values_fail_naming_file_key_and_value(override, pattern):
    with pytest.raises(ConfigError, match=r"configs/dqn/smoke\.yaml: .*" + pattern):
        load_dqn_config("configs/dqn/smoke.yaml", [override])


def test_an_evaluation_interval_past_the_budget_is_refused_with_the_fix():
    """The runner evaluates when a step crosses a multiple of eval.every_agent_steps and has no final evaluation:
    past run.total_agent_steps no evaluation ever ran and the summary's best_epoch_mean was null."""
    with pytest.raises(ConfigError) as error:
        load_dqn_config("configs/dqn/smoke.yaml", ["run.total_agent_steps=4000"])  # smoke evaluates every 10,000
    message = str(error.value)
    assert "eval.every_agent_steps=10000 is invalid: expected at most run.total_agent_steps=4000" in message
    assert "lower it, or set it to 0 to disable evaluation" in message
    for every in (0, 4000):  # never, or once at the end of the budget
        overrides = ["run.total_agent_steps=4000", f"eval.every_agent_steps={every}"]
        assert load_dqn_config("configs/dqn/smoke.yaml", overrides).eval.every_agent_steps == every


def test_an_override_without_equals_sign_is_refused_with_examples_that_work():
    with pytest.raises(ConfigError, match=r"'agent\.lr' is not of the form key=value") as error:
        load_dqn_config("configs/dqn/smoke.yaml", ["agent.lr"])
    examples = re.findall(r"\b([a-z_.]+=[^\s)]+)", str(error.value).split("e.g.")[1])
    config = load_dqn_config("configs/dqn/smoke.yaml", examples)  # the message's own examples are valid
    assert config.agent.lr == 3e-4 and config.env.num_envs == 8


def test_bad_yaml_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("agent:\n  lr: 1e-3\n  replay_capacity: 10\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: .*unknown key 'replay_capacity'; did you mean"):
        load_dqn_config(str(bad))


def test_unknown_game_lists_the_valid_names():
    c = load_dqn_config(None, ["env.name=breakot"])
    with pytest.raises(ValueError, match=r"'breakot' is not an Atari game.*'breakout'"):
        check_env_name(c.env)
    c = load_dqn_config(None, ["env.suite=minatar", "env.name=pong"])
    with pytest.raises(ValueError, match=r"not a MinAtar game; valid names: \['asterix', 'breakout'"):
        check_env_name(c.env)


def test_train_script_reports_config_errors_without_a_traceback(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "scripts/train_dqn.py",
            "--config",
            "configs/dqn/smoke.yaml",
            "agent.gamma=-1",
            f"run.runs_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "agent.gamma=-1" in proc.stderr and "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing created


def test_train_script_reports_an_unwritable_runs_dir_without_a_traceback(tmp_path):
    import subprocess
    import sys

    (tmp_path / "blocker").write_text("a file where the runs directory should be")  # fails even as root
    overrides = [f"run.runs_dir={tmp_path / 'blocker'}", "env.suite=gym", "env.name=CartPole-v1", "env.num_envs=1"]
    overrides += ["network.architecture=mlp", "run.device=cpu"]
    proc = subprocess.run(
        [sys.executable, "scripts/train_dqn.py", "--config", "configs/dqn/cartpole.yaml", *overrides],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "blocker" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["network.parameterization=batch_norm", "agent.update_mode=compiled"], "cannot run a network with batch"),
        (["network.architecture=nature_cnn"], "expects 3-D observations"),
    ],
)
def test_a_network_or_update_mode_that_cannot_work_fails_before_the_replay_is_allocated(
    tmp_path, monkeypatch, overrides, pattern
):
    import agents.dqn.runner as runner

    def no_allocation(*args, **kwargs):
        raise AssertionError("the replay memory was allocated before the error")

    monkeypatch.setattr(runner, "ReplayMemory", no_allocation)
    config = load_dqn_config("configs/dqn/cartpole.yaml", [*overrides, "run.device=cpu", f"run.runs_dir={tmp_path}"])
    with pytest.raises(ValueError, match=pattern):
        runner.Trainer(config, tmp_path / "run")
