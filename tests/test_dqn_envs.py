"""Environments: the two Atari protocol presets, life losses as a TD-only signal, raw rewards, MinAtar
and gymnasium specs, and clear errors for spaces the DQN cannot use."""

import gymnasium as gym
import numpy as np
import pytest

from agents.dqn.config import EnvConfig
from agents.dqn.envs import make_env, protocol_settings


def test_presets_resolve_and_overrides_win():
    nature = protocol_settings(EnvConfig(protocol="nature"))
    assert (nature["repeat_action_probability"], nature["full_action_space"], nature["terminal_on_life_loss"]) == (
        0.0,
        False,
        True,
    )
    machado = protocol_settings(EnvConfig(protocol="machado"))
    assert (machado["repeat_action_probability"], machado["full_action_space"], machado["terminal_on_life_loss"]) == (
        0.25,
        True,
        False,
    )
    assert (
        protocol_settings(EnvConfig(protocol="machado", repeat_action_probability=0.0))["repeat_action_probability"]
        == 0
    )


def test_machado_uses_the_full_action_set_and_nature_the_minimal_one():
    assert make_env(EnvConfig(name="breakout", num_envs=1, protocol="machado")).spec.n_actions == 18
    assert make_env(EnvConfig(name="breakout", num_envs=1, protocol="nature")).spec.n_actions == 4


@pytest.mark.parametrize("fire_reset", [None, True])
def test_fire_reset_only_when_asked(fire_reset):
    # Breakout's ball is launched by FIRE: with no-ops only, a life is lost soon after a FIRE reset and never
    # without one (the Nature DQN's and deep_q_rl's protocol, the presets' default).
    env = make_env(EnvConfig(name="breakout", num_envs=2, noop_max=0, fire_reset=fire_reset))
    assert env.spec.settings["fire_reset"] is bool(fire_reset)
    env.reset(seed=0)
    lost = sum(int(env.step(np.zeros(2, dtype=np.int64)).life_loss.sum()) for _ in range(200))
    assert (lost > 0) is bool(fire_reset), lost


def test_life_losses_keep_the_game_going_and_rewards_are_raw():
    env = make_env(EnvConfig(name="breakout", num_envs=2, noop_max=0))
    obs = env.reset(seed=1)
    assert obs.shape == (2, 4, 84, 84) and obs.dtype == np.uint8
    rng = np.random.default_rng(0)
    life_losses = game_overs = 0
    rewards = []
    for _ in range(1500):
        step = env.step(rng.integers(0, 4, 2))
        life_losses += int(step.life_loss.sum())
        game_overs += int(step.terminated.sum())
        rewards.extend(step.rewards.tolist())
        assert not (step.life_loss & step.terminated).any()
        assert not (step.life_loss & step.episode_start).any()
    assert game_overs >= 1 and life_losses >= 4 * game_overs  # 5 lives: 4 losses before each game over
    assert max(rewards) >= 1 and set(rewards) <= {0.0, 1.0, 4.0, 7.0}  # Breakout's raw brick scores


def test_minatar_and_gym_specs():
    minatar = make_env(EnvConfig(suite="minatar", name="breakout", num_envs=2))
    obs = minatar.reset(seed=0)
    assert minatar.spec.obs_shape == (4, 10, 10) and obs.shape == (2, 4, 10, 10) and obs.dtype == np.uint8
    cartpole = make_env(EnvConfig(suite="gym", name="CartPole-v1", num_envs=2))
    assert cartpole.spec.obs_shape == (4,) and cartpole.spec.n_actions == 2


def test_unusable_spaces_are_refused():
    with pytest.raises(ValueError, match=r"Pendulum-v1.*DQN needs Discrete actions"):
        make_env(EnvConfig(suite="gym", name="Pendulum-v1", num_envs=1))
    with pytest.raises(ValueError, match="not a registered gymnasium id"):
        make_env(EnvConfig(suite="gym", name="CartPol-v1", num_envs=1))


@pytest.mark.parametrize(
    "env_id,advice",
    [
        ("ALE/Breakout-v5", "env.suite=atari env.name=breakout"),
        ("SpaceInvadersNoFrameskip-v4", "env.suite=atari env.name=space_invaders"),
        ("MinAtar/SpaceInvaders-v1", "env.suite=minatar env.name=space_invaders"),
    ],
)
def test_an_atari_or_minatar_gym_id_under_the_gym_suite_names_the_suite_to_use(env_id, advice):
    """Registered (importing ale_py registers ALE/...) or not, such an id under env.suite=gym would be raw frames
    without the suite's preprocessing or "not registered" with no similar id: the error names the right suite."""
    import ale_py

    gym.register_envs(ale_py)
    with pytest.raises(ValueError, match=f"not for env.suite=gym: train it with {advice}"):
        make_env(EnvConfig(suite="gym", name=env_id, num_envs=1))


def test_a_gym_env_missing_its_optional_dependency_is_bad_input(monkeypatch):
    def missing(*args, **kwargs):
        raise gym.error.DependencyNotInstalled("Box2D is not installed, run `pip install gymnasium[box2d]`")

    monkeypatch.setattr(gym, "make", missing)
    with pytest.raises(ValueError, match=r"'CartPole-v1' cannot be built here: Box2D is not installed"):
        make_env(EnvConfig(suite="gym", name="CartPole-v1", num_envs=1))


@pytest.mark.parametrize("suite,name", [("atari", "breakout"), ("minatar", "breakout")])
def test_send_then_recv_is_the_step_and_misuse_is_refused(suite, name):
    """The loop sends the actions, runs its updates while Atari's emulators step, then receives: the
    same games as ``step``."""
    config = EnvConfig(suite=suite, name=name, num_envs=3)
    stepped, split = make_env(config), make_env(config)
    np.testing.assert_array_equal(stepped.reset(seed=4), split.reset(seed=4))
    rng = np.random.default_rng(0)
    for _ in range(300):
        actions = rng.integers(0, stepped.spec.n_actions, 3)
        a = stepped.step(actions)
        split.send(actions)
        b = split.recv()
        for field in ("obs", "rewards", "terminated", "truncated", "life_loss", "episode_start"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    with pytest.raises(RuntimeError, match="without send"):
        split.recv()
    split.send(actions)
    with pytest.raises(RuntimeError, match="twice without recv"):
        split.send(actions)
    split.close()  # with a step in flight


def test_minatar_without_its_package_is_a_config_error_naming_the_extra(monkeypatch, capsys):
    import importlib.util
    import sys
    from pathlib import Path

    monkeypatch.setitem(sys.modules, "minatar", None)  # as in an install without the minatar extra
    monkeypatch.setitem(sys.modules, "minatar.gym", None)
    with pytest.raises(
        ValueError, match=r"env\.suite=minatar needs the MinAtar package.*pip install -e '\.\[minatar\]'"
    ):
        make_env(EnvConfig(suite="minatar", name="breakout", num_envs=1))
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("wn_rl_script_train_dqn", root / "scripts" / "train_dqn.py")
    train_dqn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_dqn)
    config = str(root / "configs" / "dqn" / "minatar_breakout.yaml")
    assert train_dqn.main(["--config", config, "run.runs_dir=/nonexistent/never-written"]) == 2
    assert "pip install -e '.[minatar]'" in capsys.readouterr().err


def test_a_life_lost_in_the_step_a_time_limit_cuts_is_still_a_life_loss():
    """The frame limit truncates (the game goes on in principle), so a life lost in that step stays a life loss:
    under the Nature preset's life-loss terminals that transition must not bootstrap."""
    env = make_env(EnvConfig(name="breakout", num_envs=3, noop_max=0))
    env.reset(seed=0)  # 5 lives each
    real = env.env

    class Cut:  # what ale-py's recv() gives: env 0 truncated and env 1 game over, each losing a life; env 2 plays on
        def send(self, actions):
            pass

        def recv(self):
            ended = np.array([False, True, False]), np.array([True, False, False])
            return np.zeros((3, 4, 84, 84), np.uint8), np.zeros(3), *ended, {"lives": np.array([4, 4, 4])}

    env.env = Cut()
    try:
        step = env.step(np.zeros(3, dtype=np.int64))
    finally:
        env.env = real
        env.close()
    assert step.truncated.tolist() == [True, False, False] and step.terminated.tolist() == [False, True, False]
    assert step.life_loss.tolist() == [True, False, True]
