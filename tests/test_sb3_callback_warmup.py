"""The on-policy warm-up of DataDependentInitCallback (no reset after it; VecNormalize's statistics fixed for its
batch) and the DQN / QR-DQN acting weight cache after writes through ``.data``."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from sb3_contrib import QRDQN, TRPO, MaskablePPO, RecurrentPPO
from sb3_contrib.common.envs import InvalidActionEnvDiscrete
from stable_baselines3 import A2C, DQN, PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnvWrapper, VecNormalize

from wn_rl.sb3 import (
    DataDependentInitCallback,
    WnActorCriticPolicy,
    WnMaskableActorCriticPolicy,
    WnMlpPolicy,
    WnQRDQNMlpPolicy,
    WnRecurrentActorCriticPolicy,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


class RawObservations(VecEnvWrapper):
    """Records every observation its VecEnv returns (reset and steps), as they are before any outer wrapper."""

    def __init__(self, venv):
        super().__init__(venv)
        self.seen: list[np.ndarray] = []

    def reset(self):
        obs = self.venv.reset()
        self.seen.append(obs.copy())
        return obs

    def step_wait(self):
        obs, rewards, dones, infos = self.venv.step_wait()
        self.seen.append(obs.copy())
        return obs, rewards, dones, infos


class AtFirstRollout(BaseCallback):
    """Calls ``look(model)`` once, when the first rollout starts (after the warm-up and the init)."""

    def __init__(self, look):
        super().__init__()
        self.look, self.seen = look, None

    def _on_rollout_start(self) -> None:
        if self.seen is None:
            self.seen = self.look(self.model)

    def _on_step(self) -> bool:
        return True


def strict_monitor(env_id: str = "CartPole-v1", **kwargs):
    """A Monitor that refuses to reset an env mid-episode, as SB3 itself never does."""
    return lambda: Monitor(gym.make(env_id, **kwargs), allow_early_resets=False)


def test_vec_normalize_init_batch_is_normalized_once_with_the_statistics_at_the_end_of_the_warm_up():
    raw = RawObservations(DummyVecEnv([lambda: gym.make("Pendulum-v1")] * 2))
    venv = VecNormalize(raw)
    model = PPO(WnActorCriticPolicy, venv, n_steps=16, batch_size=32, n_epochs=1, seed=0)
    ddi = DataDependentInitCallback(n_samples=64)  # the reset and 31 steps of 2 envs
    first = AtFirstRollout(
        lambda m: (venv.normalize_obs(np.concatenate(raw.seen[:32])), m._last_obs.copy(), venv.obs_rms.count)
    )
    model.learn(32, callback=[ddi, first])
    expected, last_obs, count = first.seen  # the warm-up's observations normalised with its final statistics
    assert expected.shape == (64, 3)
    np.testing.assert_allclose(ddi.init_observations.numpy(), expected, atol=1e-5)
    # the warm-up updated the statistics, as training steps do (2 from the reset, 62 from its steps)
    assert count == pytest.approx(64, abs=1e-3)
    # the first rollout continues from the warm-up's last step, as the env returned it (normalised after the
    # step's statistics update: with the final statistics)
    np.testing.assert_allclose(last_obs, expected[-2:], atol=1e-5)


@pytest.mark.parametrize("algorithm", [PPO, A2C, TRPO])
def test_on_policy_warm_up_continues_into_the_first_rollout_without_a_reset(algorithm):
    """No reset after the warm-up: a strict Monitor would refuse it mid-episode. The warm-up's finished episodes
    stay out of ep_info_buffer (rollout/ep_rew_mean), though the Monitor, which the env plays them through,
    records them."""
    env = DummyVecEnv([strict_monitor()])
    batch = {} if algorithm is A2C else {"batch_size": 64}
    model = algorithm(WnActorCriticPolicy, env, n_steps=64, seed=0, policy_kwargs=dict(net_arch=[16]), **batch)
    ddi = DataDependentInitCallback(n_samples=64)
    first = AtFirstRollout(lambda m: (m._last_obs.copy(), m._last_episode_starts.copy(), len(episodes(m))))
    model.learn(64, callback=[ddi, first])
    last_obs, last_starts, warm_up_episodes = first.seen
    np.testing.assert_array_equal(last_obs[0], ddi.init_observations[-1].numpy())
    assert last_starts.dtype == bool and last_starts.shape == (1,)
    assert warm_up_episodes > 0, "CartPole ends episodes within 63 random steps"
    assert len(model.ep_info_buffer) == len(episodes(model)) - warm_up_episodes


def episodes(model) -> list[float]:
    return model.env.envs[0].get_episode_rewards()


def test_maskable_warm_up_continues_into_the_first_rollout_without_a_reset():
    env = DummyVecEnv(
        [lambda: Monitor(InvalidActionEnvDiscrete(dim=10, n_invalid_actions=8), allow_early_resets=False)]
    )
    model = MaskablePPO(WnMaskableActorCriticPolicy, env, n_steps=64, batch_size=64, n_epochs=1, seed=0)
    ddi = DataDependentInitCallback(n_samples=80)  # 79 steps, then 64 more: past the env's 100-step episodes
    first = AtFirstRollout(lambda m: m._last_obs.copy())
    model.learn(64, callback=[ddi, first])
    np.testing.assert_array_equal(first.seen[0], ddi.init_observations[-1].numpy())
    assert len(model.ep_info_buffer) == len(episodes(model)) == 1


def test_recurrent_warm_up_continues_with_an_empty_memory_marked_as_an_episode_start():
    env = DummyVecEnv([strict_monitor()] * 2)
    model = RecurrentPPO(WnRecurrentActorCriticPolicy, env, n_steps=16, batch_size=32, n_epochs=1, seed=0)
    ddi = DataDependentInitCallback(n_samples=50)  # 25 steps of 2 envs

    def look(m):
        states = [t.abs().max().item() for pair in m._last_lstm_states for t in pair]
        return m._last_obs.copy(), m._last_episode_starts.copy(), max(states)

    first = AtFirstRollout(look)
    model.learn(32, callback=[ddi, first])
    last_obs, last_starts, largest_state = first.seen
    sequences = ddi.init_observations.numpy().reshape(2, 25, 4)  # env by env, in time order
    np.testing.assert_array_equal(last_obs, sequences[:, -1])
    assert last_starts.tolist() == [True, True] and largest_state == 0.0


@pytest.mark.parametrize(
    ("algorithm", "policy", "online"), [(DQN, WnMlpPolicy, "q_net"), (QRDQN, WnQRDQNMlpPolicy, "quantile_net")]
)
def test_release_weight_cache_makes_acting_see_writes_through_data(algorithm, policy, online):
    model = algorithm(policy, "CartPole-v1", seed=0, policy_kwargs=dict(net_arch=[16]))
    net = getattr(model.policy, online)
    obs = torch.as_tensor(np.stack([model.observation_space.sample() for _ in range(4)]))
    with torch.no_grad():
        before = net(obs)  # acting fills the weight cache
        for p in net.parameters():  # shrink-and-perturb, polyak_update into the online network
            p.data.mul_(0.5)
        stale = net(obs)
    # the documented limit: a write through .data bumps no version counter, so the cache serves the old weights
    torch.testing.assert_close(stale, before)
    model.policy.release_weight_cache()
    with torch.no_grad():
        fresh = net(obs)
    expected = net(obs).detach()  # with gradients: never cached
    torch.testing.assert_close(fresh, expected)
    assert not torch.allclose(fresh, before)
    q_values = expected if expected.dim() == 2 else expected.mean(dim=1)  # QR-DQN: (batch, quantiles, actions)
    np.testing.assert_array_equal(model.predict(obs.numpy(), deterministic=True)[0], q_values.argmax(dim=1).numpy())
