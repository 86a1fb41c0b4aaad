"""WnStatsCallback(dormant=True): the dormant-unit fractions of every online network reach SB3's TensorBoard,
measured on the newest buffered observations (replay or rollout), and only when asked."""

import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3 import DQN, PPO, SAC
from stable_baselines3.common.buffers import ReplayBuffer, RolloutBuffer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from wn_rl.sb3 import DataDependentInitCallback, WnActorCriticPolicy, WnMlpPolicy, WnSACPolicy, WnStatsCallback
from wn_rl.sb3.callbacks import recent_buffer_batch


def test_ppo_logs_dormant_fractions_to_tensorboard_only_when_asked(tmp_path):
    model = PPO(WnActorCriticPolicy, "CartPole-v1", n_steps=64, batch_size=64, seed=0, tensorboard_log=str(tmp_path))
    stats = WnStatsCallback(log_freq=48, dormant=True, dormant_samples=32)
    model.learn(128, callback=[DataDependentInitCallback(n_samples=64), stats], tb_log_name="run")
    scalars = EventAccumulator(str(next(tmp_path.glob("run_*")))).Reload().Tags()["scalars"]
    assert "dormant/policy/total_fraction" in scalars
    assert "dormant/policy/mlp_extractor.policy_net.1/fraction" in scalars
    assert "dormant/policy/mlp_extractor.value_net.3/fraction" in scalars
    assert 0.0 <= stats.last_stats["dormant/policy/total_fraction"] <= 1.0
    plain = WnStatsCallback(log_freq=48)
    model.learn(64, callback=plain, reset_num_timesteps=False)
    assert plain.last_stats and not any(k.startswith("dormant/") for k in plain.last_stats)


def test_sac_measures_actor_and_critics_on_replay_observations_and_actions():
    model = SAC(WnSACPolicy, "Pendulum-v1", learning_starts=64, seed=0, policy_kwargs=dict(net_arch=[32, 32]))
    stats = WnStatsCallback(log_freq=40, dormant=True)
    model.learn(100, callback=[DataDependentInitCallback(n_samples=64), stats])
    for key in ("dormant/actor/latent_pi.1/fraction", "dormant/critic/qf0.3/fraction", "dormant/critic/qf1.1/fraction"):
        assert 0.0 <= stats.last_stats[key] <= 1.0, key
    assert stats.dormant_stats()  # callable on its own, on the replay buffer's newest steps


def test_recent_buffer_batch_takes_the_newest_steps_of_every_env():
    box = spaces.Box(-np.inf, np.inf, (1,), np.float32)
    buffer = ReplayBuffer(10, box, spaces.Discrete(3), n_envs=2)  # 5 slots per env
    assert recent_buffer_batch(buffer, 4) is None
    for t in range(7):  # wraps: slots hold steps 5, 6, 2, 3, 4; the next write goes to slot 2
        obs = np.full((2, 1), t, np.float32)
        buffer.add(obs, obs + 1, np.array([t % 3, (t + 1) % 3]), np.zeros(2), np.zeros(2), [{}, {}])
    observations, actions = recent_buffer_batch(buffer, 5)
    assert observations[:, 0].tolist() == [6, 6, 5, 5, 4]
    assert actions[:, 0].tolist() == [0, 1, 2, 0, 1]
    assert recent_buffer_batch(buffer, 100)[0].shape == (8, 1)  # the slot about to be overwritten is left out
    rollout = RolloutBuffer(8, box, spaces.Discrete(2), n_envs=2)
    for t in range(8):
        obs = np.array([[t], [t + 10]], np.float32)
        rollout.add(obs, np.zeros((2, 1)), np.zeros(2), np.ones(2), torch.zeros(2), torch.zeros(2))
        if t == 0:
            assert recent_buffer_batch(rollout, 8)[0][:, 0].tolist() == [0, 10]
    next(rollout.get(4))  # training flattens the rollout env by env: (steps * envs, ...)
    assert recent_buffer_batch(rollout, 4)[0][:, 0].tolist() == [0, 5, 12, 17]  # spread over the whole rollout


def test_dormant_samples_must_be_a_batch():
    with pytest.raises(ValueError, match="dormant_samples"):
        WnStatsCallback(dormant=True, dormant_samples=1)


def test_dormant_tau_counts_units_with_a_small_mean_activation():
    """Two hidden units whose outputs are their biases, 1.0 and 0.1: scores 1.82 and 0.18 (the layer mean is
    0.55), so neither is dormant at tau = 0 and the quiet one is at tau = 0.5."""
    model = DQN(WnMlpPolicy, "CartPole-v1", learning_starts=1_000, seed=0, policy_kwargs=dict(net_arch=[2]))
    by_tau = {
        tau: WnStatsCallback(log_freq=1_000, dormant=True, dormant_samples=8, dormant_tau=tau) for tau in (0, 0.5)
    }
    model.learn(16, callback=list(by_tau.values()))  # fills the replay buffer, no update
    hidden = model.policy.q_net.q_net[0]
    with torch.no_grad():
        hidden.g.zero_()  # w = g v / ||v|| = 0: each unit outputs its bias
        hidden.bias.copy_(torch.tensor([1.0, 0.1]))
    fractions = {tau: stats.dormant_stats()["dormant/q_net/q_net.1/fraction"] for tau, stats in by_tau.items()}
    assert fractions == {0: 0.0, 0.5: 0.5}


@pytest.mark.parametrize("tau", [-0.1, float("nan"), float("inf"), True, "0.1", None])
def test_dormant_tau_must_be_a_finite_threshold(tau):
    with pytest.raises(ValueError, match=r"dormant_tau=.* must be a finite threshold >= 0"):
        WnStatsCallback(dormant=True, dormant_tau=tau)
