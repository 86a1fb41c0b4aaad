"""DataDependentInitCallback (section 3), WnStatsCallback, frozen norm statistics in on-policy
training, and learning on small tasks with each algorithm family."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3 import DQN, PPO, SAC, TD3
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.noise import NormalActionNoise
from wn_init_checks import assert_normalized, preactivations  # tests/wn_init_checks.py

import wn_rl
from wn_rl.sb3 import (
    DataDependentInitCallback,
    WnActorCriticPolicy,
    WnMlpPolicy,
    WnSACCnnPolicy,
    WnSACPolicy,
    WnStatsCallback,
    WnTD3CnnPolicy,
    WnTD3Policy,
)
from wn_rl.sb3.init import policy_is_initialized

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def test_off_policy_init_normalizes_preactivations_and_syncs_the_target():
    model = DQN(
        WnMlpPolicy,
        "CartPole-v1",
        learning_starts=300,
        gradient_steps=0,
        seed=0,
        policy_kwargs=dict(init_scale=dict(q=0.5)),
    )
    before = model.policy.q_net.state_dict()["q_net.0.g"].clone()
    callback = DataDependentInitCallback(n_samples=256)
    model.learn(320, callback=callback)
    q_net, target = model.policy.q_net, model.policy.q_net_target
    assert callback.done and not torch.equal(before, q_net.state_dict()["q_net.0.g"])
    found = preactivations(q_net, lambda: q_net(callback.init_observations))
    assert [scale for _, _, scale in found] == [1.0, 1.0, 0.5]
    assert_normalized(found, callback.reports["q_net"].dead_units)
    for key, value in q_net.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    assert wn_rl.is_initialized(q_net) and wn_rl.is_initialized(target)


@pytest.mark.parametrize("algo,policy", [(SAC, WnSACPolicy), (TD3, WnTD3Policy)])
def test_actor_critic_off_policy_init_uses_replay_actions_and_syncs_both_targets(algo, policy):
    model = algo(
        policy, "Pendulum-v1", learning_starts=256, gradient_steps=0, seed=0, policy_kwargs=dict(net_arch=[32, 32])
    )
    callback = DataDependentInitCallback(n_samples=256)
    model.learn(260, callback=callback)
    assert callback.init_actions is not None and callback.init_actions.shape == (256, 1)
    critic = model.policy.critic
    assert_normalized(
        preactivations(critic, lambda: critic(callback.init_observations, callback.init_actions)),
        callback.reports["critic"].dead_units,
    )
    pairs = [(model.policy.critic_target, critic)]
    if algo is TD3:
        pairs.append((model.policy.actor_target, model.policy.actor))
    for target, online in pairs:
        for key, value in online.state_dict().items():
            assert torch.equal(target.state_dict()[key], value), key


def record_initialized_when_acting(model, monkeypatch) -> list[bool]:
    """Whether the online networks were initialised, at every action the policy chooses (not SB3's random ones)."""
    initialized_when_acting = []
    predict = model.policy.predict

    def spy(*args, **kwargs):
        initialized_when_acting.append(policy_is_initialized(model.policy))
        return predict(*args, **kwargs)

    monkeypatch.setattr(model.policy, "predict", spy)
    return initialized_when_acting


@pytest.mark.parametrize(
    "algo,policy,env_id,n_envs,kwargs",
    [
        (DQN, WnMlpPolicy, "CartPole-v1", 1, dict(train_freq=4, exploration_initial_eps=0, exploration_final_eps=0)),
        (DQN, WnMlpPolicy, "CartPole-v1", 2, dict(train_freq=3, exploration_initial_eps=0)),
        (SAC, WnSACPolicy, "Pendulum-v1", 1, dict(train_freq=1)),
        (TD3, WnTD3Policy, "Pendulum-v1", 1, dict(train_freq=(1, "episode"))),
    ],
    ids=["dqn", "dqn-2-envs", "sac", "td3-episodes"],
)
def test_off_policy_init_happens_before_the_network_chooses_its_first_action(
    algo, policy, env_id, n_envs, kwargs, monkeypatch
):
    # SB3 acts with the policy from num_timesteps == learning_starts on; updates start a rollout later.
    env = make_vec_env(env_id, n_envs=n_envs, seed=0)
    model = algo(policy, env, learning_starts=64, gradient_steps=0, seed=0, policy_kwargs=dict(net_arch=[16]), **kwargs)
    initialized_when_acting = record_initialized_when_acting(model, monkeypatch)
    callback = DataDependentInitCallback(n_samples=64)
    model.learn(80, callback=callback)
    assert callback.done and initialized_when_acting  # the greedy policy acted after learning_starts
    assert all(initialized_when_acting), f"{initialized_when_acting.count(False)} actions before the init"
    # learning_starts == n_samples: the batch is every transition of the warm-up, the last one stored by SB3
    # only after the callback ran, each once.
    buffer = model.replay_buffer
    warm_up = slice(0, 64 // env.num_envs)
    stored = np.concatenate([buffer.observations[warm_up], buffer.actions[warm_up]], axis=-1).reshape(64, -1)
    batch = torch.cat([callback.init_observations, callback.init_actions.to(torch.float32)], dim=1).numpy()
    assert sorted(map(tuple, batch)) == sorted(map(tuple, stored))


def test_off_policy_init_resumed_past_learning_starts_runs_at_training_start(monkeypatch):
    def trained_without_init() -> DQN:
        model = DQN(WnMlpPolicy, "CartPole-v1", learning_starts=64, gradient_steps=0, seed=0)
        model.learn(100)  # the uninitialised network has acted since step 64
        return model

    model = trained_without_init()
    initialized_when_acting = record_initialized_when_acting(model, monkeypatch)
    callback = DataDependentInitCallback(n_samples=64)
    model.learn(1, callback=callback, reset_num_timesteps=False)
    assert callback.done and initialized_when_acting and all(initialized_when_acting)
    model = trained_without_init()
    model.replay_buffer.reset()  # e.g. loaded without its replay buffer
    with pytest.raises(ValueError, match="the replay buffer holds 0"):
        model.learn(1, callback=DataDependentInitCallback(n_samples=64), reset_num_timesteps=False)


def test_off_policy_init_refuses_gsde_at_warm_up():
    model = SAC(WnSACPolicy, "Pendulum-v1", learning_starts=64, use_sde=True, use_sde_at_warmup=True)
    with pytest.raises(ValueError, match="set use_sde_at_warmup=False"):
        model.learn(10, callback=DataDependentInitCallback(n_samples=64))


class RandomImages(gym.Env):
    observation_space = spaces.Box(0, 255, (3, 36, 36), np.uint8)
    action_space = spaces.Box(-1, 1, (2,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {}


@pytest.mark.parametrize("algo,policy", [(SAC, WnSACCnnPolicy), (TD3, WnTD3CnnPolicy)])
def test_cnn_actor_critic_init_reaches_the_critics_own_features_extractor(algo, policy):
    # share_features_extractor=False (SB3's default): ContinuousCritic.forward re-enables gradients for it.
    kwargs = dict(features_extractor_kwargs=dict(features_dim=16), net_arch=[8])
    model = algo(
        policy, RandomImages(), learning_starts=16, buffer_size=64, gradient_steps=0, seed=0, policy_kwargs=kwargs
    )
    callback = DataDependentInitCallback(n_samples=16)
    model.learn(20, callback=callback)
    critic = model.policy.critic
    assert critic.features_extractor is not model.policy.actor.features_extractor
    assert wn_rl.is_initialized(critic) and wn_rl.is_initialized(model.policy.actor)
    assert len(callback.reports["critic"].layers) == 4 + 2 * 2  # its own Nature CNN, then two Q heads
    for key, value in critic.state_dict().items():
        assert torch.equal(model.policy.critic_target.state_dict()[key], value), key


def test_on_policy_init_warms_up_before_the_first_rollout_with_mean_only_bn():
    env = make_vec_env("CartPole-v1", n_envs=4, seed=0)
    model = PPO(
        WnActorCriticPolicy,
        env,
        n_steps=32,
        batch_size=64,
        n_epochs=1,
        learning_rate=0.0,
        seed=0,
        policy_kwargs=dict(parameterization="weight_norm+mean_only_bn"),
    )
    seen_at_rollout = {}

    class FirstRollout(BaseCallback):
        def _on_rollout_start(self) -> None:
            seen_at_rollout.setdefault("initialized", wn_rl.is_initialized(self.model.policy))
            seen_at_rollout.setdefault("num_timesteps", self.model.num_timesteps)

        def _on_step(self) -> bool:
            return True

    callback = DataDependentInitCallback(n_samples=200)
    model.learn(128, callback=[callback, FirstRollout()])
    assert seen_at_rollout == {"initialized": True, "num_timesteps": 0}
    assert callback.init_observations.shape == (200, 4)
    policy = model.policy  # lr=0 and no refresh yet (that happens when the next rollout starts)
    found = preactivations(policy, lambda: policy.forward(callback.init_observations, deterministic=True))
    assert {scale for _, _, scale in found} == {1.0, 0.01}
    assert_normalized(found, callback.reports["policy"].dead_units)


def test_init_logs_per_layer_statistics_and_wn_stats_reach_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = PPO(WnActorCriticPolicy, "CartPole-v1", n_steps=64, batch_size=64, seed=0, tensorboard_log=str(tmp_path))
    stats = WnStatsCallback(log_freq=64, histograms=True)
    model.learn(128, callback=[DataDependentInitCallback(n_samples=64), stats], tb_log_name="run")
    events = EventAccumulator(str(next(tmp_path.glob("run_*")))).Reload()
    scalars = events.Tags()["scalars"]
    assert "wn/policy/action_net/grad_scale_mean" in scalars
    assert "ddi/policy/mlp_extractor.policy_net.0/pre_init_std" in scalars
    assert "wn/policy/value_net/g" in events.Tags()["histograms"]
    assert "rollout/ep_len_mean" in scalars  # next to SB3's own curves
    ratio = stats.last_stats["wn/policy/action_net/grad_scale_mean"]
    assert ratio == pytest.approx(
        stats.last_stats["wn/policy/action_net/g_mean"] / stats.last_stats["wn/policy/action_net/v_norm_mean"], rel=0.5
    )


def test_loading_then_learning_does_not_reinitialise(tmp_path):
    model = DQN(WnMlpPolicy, "CartPole-v1", learning_starts=128, train_freq=4, seed=0)
    model.learn(200, callback=DataDependentInitCallback(n_samples=128))
    model.save(tmp_path / "dqn.zip")
    loaded = DQN.load(tmp_path / "dqn.zip", env=make_vec_env("CartPole-v1", seed=1))
    saved_state = {k: v.clone() for k, v in loaded.policy.state_dict().items()}
    at_start = {}

    class Snapshot(BaseCallback):
        def _on_training_start(self) -> None:
            at_start.update({k: v.clone() for k, v in self.model.policy.state_dict().items()})

        def _on_step(self) -> bool:
            return True

    callback = DataDependentInitCallback(n_samples=128)
    loaded.learn(200, callback=[callback, Snapshot()], reset_num_timesteps=False)
    assert callback.skipped and callback.reports == {}
    for key, value in saved_state.items():
        assert torch.equal(at_start[key], value), key
    assert loaded.num_timesteps == model.num_timesteps + 200


def test_off_policy_init_needs_learning_starts_at_least_n_samples():
    model = DQN(WnMlpPolicy, "CartPole-v1", learning_starts=100)
    with pytest.raises(ValueError, match="set learning_starts >= 256"):
        model.learn(10, callback=DataDependentInitCallback(n_samples=256))


def test_init_callback_refuses_sb3_policies_without_init_flags():
    model = DQN("MlpPolicy", "CartPole-v1", learning_starts=300)
    with pytest.raises(TypeError, match="needs a wn_rl policy"):
        model.learn(10, callback=DataDependentInitCallback())


@pytest.mark.parametrize("parameterization", ["weight_norm+mean_only_bn", "batch_norm"])
def test_frozen_norm_statistics_make_ppo_first_epoch_ratio_one(parameterization):
    def first_epoch(freeze: bool) -> tuple[float, float, float]:
        """SB3's logged approx_kl and clip fraction of the first epoch (lr=0: parameters never move), and
        the largest |log ratio| over the rollout when the training-mode policy re-evaluates it."""
        kwargs = dict(parameterization=parameterization, freeze_norm_statistics=freeze)
        env = make_vec_env("CartPole-v1", n_envs=4, seed=0)
        model = PPO(
            WnActorCriticPolicy,
            env,
            n_steps=32,
            batch_size=32,
            n_epochs=1,
            learning_rate=0.0,
            seed=0,
            policy_kwargs=kwargs,
        )
        model.learn(128, callback=DataDependentInitCallback(n_samples=128))
        values = model.logger.name_to_value
        model.policy.set_training_mode(True)
        worst = 0.0
        with torch.no_grad():
            for batch in model.rollout_buffer.get(32):
                _, log_prob, _ = model.policy.evaluate_actions(batch.observations, batch.actions.long().flatten())
                worst = max(worst, float((log_prob - batch.old_log_prob).abs().max()))
        return abs(values["train/approx_kl"]), values["train/clip_fraction"], worst

    kl, clipped, worst = first_epoch(freeze=True)
    assert kl < 1e-7 and clipped == 0.0 and worst < 1e-5  # ratio exp(log_prob - old_log_prob) = 1
    _, _, worst_unfrozen = first_epoch(freeze=False)
    assert worst_unfrozen > 1e-3  # SB3's train/eval switch: the acting and the trained policy differ


def _frozen_statistics_ppo(**policy_kwargs) -> PPO:
    """A small PPO whose WN policy has mean-only batch norms (statistics frozen while training)."""
    policy_kwargs = dict(parameterization="weight_norm+mean_only_bn", **policy_kwargs)
    return PPO(
        WnActorCriticPolicy, "CartPole-v1", n_steps=64, batch_size=32, n_epochs=2, seed=0, policy_kwargs=policy_kwargs
    )


def test_frozen_statistics_refresh_once_when_training_ends():
    model = _frozen_statistics_ppo(norm_refresh_samples=64)
    norms = [m for m in model.policy.modules() if isinstance(m, wn_rl.MeanOnlyBatchNorm)]
    at_rollout: list[torch.Tensor] = []

    class RolloutStart(BaseCallback):
        def _on_rollout_start(self) -> None:
            at_rollout.extend(m.running_mean.clone() for m in norms)

        def _on_step(self) -> bool:
            return True

    model.learn(64, callback=[DataDependentInitCallback(n_samples=64), RolloutStart()])  # rollout, then training
    assert all(not m.training for m in norms)  # frozen even in train mode
    assert all(torch.equal(a, m.running_mean) for a, m in zip(at_rollout, norms, strict=True))
    assert model.policy._norm_batch_samples == 64  # two minibatches of 32 kept for the refresh
    model.policy.set_training_mode(False)  # back to acting: one refresh
    assert model.policy._norm_batch_samples == 0
    refreshed = [m.running_mean.clone() for m in norms]
    assert all(not torch.equal(a, b) for a, b in zip(at_rollout, refreshed, strict=True))
    model.policy.set_training_mode(False)  # acting again: nothing to refresh
    assert all(torch.equal(a, m.running_mean) for a, m in zip(refreshed, norms, strict=True))


def test_a_model_saved_right_after_learn_holds_the_statistics_it_acts_with(tmp_path):
    model = _frozen_statistics_ppo(net_arch=[16])
    model.learn(64, callback=DataDependentInitCallback(n_samples=64))  # ends with training: a refresh is pending
    model.save(tmp_path / "ppo.zip")
    loaded = PPO.load(tmp_path / "ppo.zip")
    obs = torch.as_tensor(np.random.default_rng(0).normal(size=(32, 4)), dtype=torch.float32)
    model.policy.set_training_mode(False)
    loaded.policy.set_training_mode(False)
    with torch.no_grad():
        torch.testing.assert_close(loaded.policy.predict_values(obs), model.policy.predict_values(obs), rtol=0, atol=0)


def test_ppo_learns_cartpole():
    env = make_vec_env("CartPole-v1", n_envs=4, seed=0)
    model = PPO(
        WnActorCriticPolicy,
        env,
        n_steps=256,
        batch_size=256,
        n_epochs=10,
        learning_rate=3e-3,
        gamma=0.98,
        gae_lambda=0.9,
        seed=0,
    )
    model.learn(12_000, callback=DataDependentInitCallback(n_samples=128))
    mean_return, _ = evaluate_policy(model, make_vec_env("CartPole-v1", seed=100), n_eval_episodes=10)
    assert mean_return >= 200  # random play: ~22


def test_dqn_learns_cartpole():
    # 3-step returns (SB3's n_steps) make this budget reliable: seeds 0 to 9 all scored 150 to 500.
    model = DQN(
        WnMlpPolicy,
        "CartPole-v1",
        learning_rate=1e-3,
        batch_size=64,
        buffer_size=10_000,
        learning_starts=1_000,
        target_update_interval=250,
        train_freq=2,
        n_steps=3,
        exploration_fraction=0.2,
        exploration_final_eps=0.05,
        policy_kwargs=dict(net_arch=[64, 64]),
        seed=0,
    )
    model.learn(10_000, callback=DataDependentInitCallback(n_samples=256))
    mean_return, _ = evaluate_policy(model, make_vec_env("CartPole-v1", seed=100), n_eval_episodes=10)
    assert mean_return >= 100  # random play: ~22


def test_td3_learns_pendulum():
    # rl-zoo3's learning rate, gamma and action noise; 3-step returns (SB3's n_steps) make this budget reliable:
    # seeds 0 to 9 all scored -180 to -300.
    model = TD3(
        WnTD3Policy,
        "Pendulum-v1",
        learning_rate=1e-3,
        learning_starts=300,
        gamma=0.98,
        batch_size=256,
        n_steps=3,
        action_noise=NormalActionNoise(np.zeros(1), 0.1 * np.ones(1)),
        policy_kwargs=dict(net_arch=[64, 64]),
        seed=0,
    )
    model.learn(4_000, callback=DataDependentInitCallback(n_samples=256))
    mean_return, _ = evaluate_policy(model, make_vec_env("Pendulum-v1", seed=100), n_eval_episodes=10)
    assert mean_return >= -600  # random or untrained: about -1200 to -1500


def test_recurrent_warm_up_is_one_sequence_per_env_with_its_episode_starts():
    """RecurrentPPO's policy is initialised on the warm-up as rollouts feed it: env by env, in time order, the
    LSTM state carried along and reset where an episode starts (each observation alone, from a zero state,
    normalised the layers after the LSTM on first-step hidden states only)."""
    from sb3_contrib import RecurrentPPO

    from wn_rl.sb3 import WnRecurrentActorCriticPolicy

    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    model = RecurrentPPO(WnRecurrentActorCriticPolicy, env, n_steps=16, batch_size=32, n_epochs=1, seed=0)
    ddi = DataDependentInitCallback(n_samples=50)  # 25 steps of 2 envs: no sequence cut short
    model.learn(32, callback=ddi)
    starts = ddi.init_episode_starts
    assert starts.shape == (2, 25) and len(ddi.init_observations) == 50 and starts[:, 0].all()
    assert starts[:, 1:].any(), "CartPole ends episodes within 25 random steps"
    obs = ddi.init_observations.cpu().numpy().reshape(2, 25, 4)  # env by env, each in time order
    for env_obs, env_starts in zip(obs, starts.numpy(), strict=True):
        within = ~env_starts[1:]  # CartPole's Euler step: x_{t+1} = x_t + 0.02 * x_dot_t within an episode
        np.testing.assert_allclose(np.diff(env_obs[:, 0])[within], 0.02 * env_obs[:-1, 1][within], atol=1e-6)
