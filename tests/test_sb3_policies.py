"""wn_rl.sb3 policies with real SB3 algorithms on real environments (tiny budgets), their layers,
save/load round trips and the errors for observation spaces they cannot handle."""

from __future__ import annotations

import re

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from sb3_contrib import QRDQN, RecurrentPPO
from sb3_contrib.common.recurrent.type_aliases import RNNStates
from stable_baselines3 import A2C, DQN, PPO, SAC, TD3
from stable_baselines3.common.env_util import make_atari_env, make_vec_env
from stable_baselines3.common.vec_env import VecFrameStack

import wn_rl
from wn_rl.sb3 import (
    WNLSTM,
    DataDependentInitCallback,
    WnActorCriticCnnPolicy,
    WnActorCriticPolicy,
    WnCnnPolicy,
    WnMaskableActorCriticPolicy,
    WnMlpPolicy,
    WnNatureCNN,
    WnQRDQNCnnPolicy,
    WnQRDQNMlpPolicy,
    WnRecurrentActorCriticCnnPolicy,
    WnRecurrentActorCriticPolicy,
    WnSACCnnPolicy,
    WnSACPolicy,
    WnStatsCallback,
    WnTD3Policy,
    WnTQCPolicy,
)
from wn_rl.sb3.envs import register_envs

ATARI = "BreakoutNoFrameskip-v4"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def atari_env(n_envs: int = 1):
    register_envs()
    return VecFrameStack(make_atari_env(ATARI, n_envs=n_envs, seed=0), n_stack=4)


def wn_keys(model) -> list[str]:
    return [k for k in model.policy.state_dict() if k.endswith(".v") or k.endswith(".g") or ".v_" in k]


OFF_POLICY = dict(buffer_size=400, learning_starts=64, batch_size=16, train_freq=4, seed=0)
CASES = {
    "dqn-cnn-atari": (DQN, WnCnnPolicy, "atari", dict(OFF_POLICY, exploration_fraction=0.5), {}),
    "qrdqn-cnn-atari": (QRDQN, WnQRDQNCnnPolicy, "atari", OFF_POLICY, dict(n_quantiles=8)),
    "ppo-cnn-atari": (PPO, WnActorCriticCnnPolicy, "atari", dict(n_steps=32, batch_size=16, n_epochs=1, seed=0), {}),
    "a2c-cnn-atari": (A2C, WnActorCriticCnnPolicy, "atari", dict(n_steps=16, seed=0), {}),
    "rppo-cnn-atari": (
        RecurrentPPO,
        WnRecurrentActorCriticCnnPolicy,
        "atari",
        dict(n_steps=32, batch_size=16, n_epochs=1, seed=0),
        dict(lstm_hidden_size=32, features_extractor_kwargs=dict(features_dim=64)),
    ),
    "dqn-mlp": (DQN, WnMlpPolicy, "CartPole-v1", OFF_POLICY, {}),
    "qrdqn-mlp": (QRDQN, WnQRDQNMlpPolicy, "CartPole-v1", OFF_POLICY, dict(n_quantiles=8)),
    "ppo-mlp": (PPO, WnActorCriticPolicy, "CartPole-v1", dict(n_steps=64, batch_size=32, n_epochs=2, seed=0), {}),
    "a2c-mlp": (A2C, WnActorCriticPolicy, "CartPole-v1", dict(n_steps=8, seed=0), {}),
    "ppo-mlp-gauss": (PPO, WnActorCriticPolicy, "Pendulum-v1", dict(n_steps=64, batch_size=32, n_epochs=1, seed=0), {}),
    "rppo-mlp": (
        RecurrentPPO,
        WnRecurrentActorCriticPolicy,
        "wn_rl/CartPoleNoVel-v1",
        dict(n_steps=32, batch_size=16, n_epochs=1, seed=0),
        dict(lstm_hidden_size=16, n_lstm_layers=2),
    ),
    "sac-mlp": (SAC, WnSACPolicy, "Pendulum-v1", OFF_POLICY, dict(net_arch=[32, 32])),
    "td3-mlp": (TD3, WnTD3Policy, "Pendulum-v1", OFF_POLICY, dict(net_arch=[32, 32])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_policy_runs_with_its_algorithm_and_holds_wn_parameters(case):
    algo, policy, env_id, hyper, policy_kwargs = CASES[case]
    register_envs()
    env = atari_env() if env_id == "atari" else make_vec_env(env_id, n_envs=1, seed=0)
    model = algo(policy, env, policy_kwargs=policy_kwargs, **hyper)
    stats = WnStatsCallback(log_freq=32)
    ddi = DataDependentInitCallback(n_samples=64)
    model.learn(128, callback=[ddi, stats])
    assert model.num_timesteps >= 128
    assert wn_keys(model), "the state_dict holds no WN parameters (v, g)"
    assert not any(isinstance(m, torch.nn.Linear | torch.nn.Conv2d | torch.nn.LSTM) for m in model.policy.modules())
    assert ddi.done and not ddi.skipped and all(report.layers for report in ddi.reports.values())
    assert stats.last_stats and all(np.isfinite(v) for v in stats.last_stats.values())
    obs = env.reset()
    action, _ = model.predict(obs, deterministic=True)
    assert env.action_space.contains(action[0])


def test_recurrent_policy_uses_wn_lstm_cells_and_matches_lstm_state_shapes():
    register_envs()
    model = RecurrentPPO(
        WnRecurrentActorCriticPolicy,
        "wn_rl/CartPoleNoVel-v1",
        n_steps=16,
        batch_size=16,
        policy_kwargs=dict(lstm_hidden_size=8, n_lstm_layers=2),
    )
    assert isinstance(model.policy.lstm_actor, WNLSTM) and isinstance(model.policy.lstm_critic, WNLSTM)
    assert model._last_lstm_states.pi[0].shape == (2, 1, 8)
    obs = model.env.reset()
    _, state = model.predict(obs, episode_start=np.ones(1, dtype=bool))
    assert state[0].shape == (2, 1, 8) and state[1].shape == (2, 1, 8)


def test_recurrent_policy_lstms_follow_the_parameterizations_exp_scale():
    register_envs()
    exp = wn_rl.Parameterization.get("weight_norm", scale="exp")
    policy_kwargs = dict(lstm_hidden_size=8, n_lstm_layers=2, parameterization=exp)
    model = RecurrentPPO(
        WnRecurrentActorCriticPolicy, "wn_rl/CartPoleNoVel-v1", n_steps=16, policy_kwargs=policy_kwargs
    )
    cells = [*model.policy.lstm_actor.cells, *model.policy.lstm_critic.cells]
    assert all(cell.scale == "exp" and hasattr(cell, "s_ih") and not hasattr(cell, "g_ih") for cell in cells)
    model.learn(16)  # trains s through the cached sequence loop


def _recurrent_batch(n_seq: int = 3, length: int = 5, hidden: int = 8, layers: int = 1):
    """Observations, actions, LSTM states and episode starts laid out as sb3-contrib's evaluate_actions
    gets them (sequence-major), with starts inside the sequences."""
    torch.manual_seed(0)
    obs, actions = torch.randn(n_seq * length, 4), torch.randint(0, 2, (n_seq * length,))
    starts = torch.zeros(n_seq * length)
    starts[[0, 2, length + 3, 2 * length]] = 1.0
    states = tuple((torch.randn(layers, n_seq, hidden), torch.randn(layers, n_seq, hidden)) for _ in range(2))
    return obs, actions, RNNStates(*states), starts


def test_recurrent_policy_in_normal_parameterization_is_sb3_contribs_policy():
    kwargs = dict(lstm_hidden_size=8, n_lstm_layers=2, net_arch=[16])
    ours = RecurrentPPO(
        WnRecurrentActorCriticPolicy, "CartPole-v1", n_steps=16, policy_kwargs=dict(kwargs, parameterization="normal")
    ).policy
    reference = RecurrentPPO("MlpLstmPolicy", "CartPole-v1", n_steps=16, policy_kwargs=kwargs).policy
    assert isinstance(ours.lstm_actor, torch.nn.LSTM) and isinstance(ours.lstm_critic, torch.nn.LSTM)
    assert not any(isinstance(m, wn_rl.WNLSTMCell | wn_rl.WNLayer) for m in ours.modules())
    state = {k: v for k, v in ours.state_dict().items() if not k.endswith("initialized")}
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in reference.state_dict().items()}
    reference.load_state_dict(state)
    obs, actions, states, starts = _recurrent_batch(layers=2)
    with torch.no_grad():
        for got, expected in zip(
            ours.evaluate_actions(obs, actions, states, starts),
            reference.evaluate_actions(obs, actions, states, starts),
            strict=True,
        ):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_recurrent_policy_computes_lstm_weights_once_per_sequence_and_trains_g_and_v(monkeypatch):
    kwargs = dict(lstm_hidden_size=8)
    model = RecurrentPPO(WnRecurrentActorCriticPolicy, "CartPole-v1", n_steps=16, policy_kwargs=kwargs)
    calls = []
    compute = wn_rl.WNLSTMCell.compute_weights
    monkeypatch.setattr(wn_rl.WNLSTMCell, "compute_weights", lambda cell: calls.append(cell) or compute(cell))
    obs, actions, states, starts = _recurrent_batch()  # starts inside: sb3-contrib loops over steps
    values, log_prob, _ = model.policy.evaluate_actions(obs, actions, states, starts)
    assert len(calls) == 2  # actor and critic cell, once each for the 5-step sequences
    (values.sum() + log_prob.sum()).backward()
    for cell in (model.policy.lstm_actor.cells[0], model.policy.lstm_critic.cells[0]):
        for name in ("g_ih", "v_ih", "g_hh", "v_hh"):
            assert getattr(cell, name).grad is not None and getattr(cell, name).grad.abs().sum() > 0, name


@pytest.mark.parametrize("lstm_kwargs", [dict(bidirectional=True), dict(proj_size=4)])
def test_recurrent_policy_refuses_lstm_kwargs_that_change_its_output_width(lstm_kwargs):
    """wn_rl.WNLSTM runs both directions (tests/test_recurrent_stacks.py), but a policy acts forward in time and its
    heads take lstm_hidden_size features."""
    with pytest.raises(ValueError, match="neither bidirectional=True nor proj_size>0 in lstm_kwargs"):
        RecurrentPPO(
            WnRecurrentActorCriticPolicy, "CartPole-v1", n_steps=8, policy_kwargs=dict(lstm_kwargs=lstm_kwargs)
        )


@pytest.mark.parametrize("parameterization", ["weight_norm", "weight_norm+mean_only_bn", "normal", "layer_norm"])
def test_one_switch_sets_every_layer_of_the_policy(parameterization):
    kwargs = dict(parameterization=parameterization)
    model = PPO(WnActorCriticPolicy, "CartPole-v1", n_steps=16, batch_size=16, policy_kwargs=kwargs)
    layers = [m for m in model.policy.modules() if isinstance(m, wn_rl.WNLinear | torch.nn.Linear)]
    assert len(layers) == 6  # 2 + 2 hidden, action head, value head
    expect_wn = parameterization.startswith("weight_norm")
    assert all(isinstance(m, wn_rl.WNLinear) == expect_wn for m in layers)
    has_mobn = any(isinstance(m, wn_rl.MeanOnlyBatchNorm) for m in model.policy.modules())
    assert has_mobn == (parameterization == "weight_norm+mean_only_bn")
    assert model.policy.action_net.init_scale == 0.01 and model.policy.value_net.init_scale == 1.0
    assert all(hasattr(m, "initialized") for m in layers)


def test_init_scale_per_part_and_its_errors():
    model = DQN(WnMlpPolicy, "CartPole-v1", policy_kwargs=dict(init_scale=dict(q=0.5, hidden=2.0)))
    q_layers = [m for m in model.policy.q_net.q_net if isinstance(m, wn_rl.WNLinear)]
    assert [m.init_scale for m in q_layers] == [2.0, 2.0, 0.5]
    with pytest.raises(ValueError, match=r"unknown part\(s\) \['action'\].*'features', 'hidden', 'q'") as error:
        DQN(WnMlpPolicy, "CartPole-v1", policy_kwargs=dict(init_scale=dict(action=0.1)))
    example = re.search(r"e\.g\. init_scale=(dict\(.*?\))\)", str(error.value)).group(1)
    DQN(WnMlpPolicy, "CartPole-v1", policy_kwargs=dict(init_scale=eval(example)))  # the suggested fix works
    with pytest.raises(ValueError, match=r"ortho_init=True is not supported.*section 3"):
        PPO(WnActorCriticPolicy, "CartPole-v1", policy_kwargs=dict(ortho_init=True))
    with pytest.raises(ValueError, match="unknown parameterization 'wn'"):
        PPO(WnActorCriticPolicy, "CartPole-v1", policy_kwargs=dict(parameterization="wn"))


@pytest.mark.parametrize(
    ("algo", "policy", "fits"),
    [
        (DQN, WnCnnPolicy, "WnMlpPolicy"),
        (QRDQN, WnQRDQNCnnPolicy, "WnQRDQNMlpPolicy"),
        (PPO, WnActorCriticCnnPolicy, "WnActorCriticPolicy"),
        (RecurrentPPO, WnRecurrentActorCriticCnnPolicy, "WnRecurrentActorCriticPolicy"),
    ],
)
def test_cnn_policy_on_vector_observations_names_the_policy_that_fits(algo, policy, fits):
    with pytest.raises(ValueError, match=rf"{policy.__name__} needs image observations.*Use {fits}"):
        algo(policy, "CartPole-v1")


def test_cnn_policy_on_continuous_actions_and_small_images():
    image = spaces.Box(0, 255, (4, 84, 84), np.uint8)
    action = spaces.Box(-1, 1, (2,), np.float32)
    policy = WnSACCnnPolicy(image, action, lambda _: 1e-3)
    out = policy.actor(torch.as_tensor(np.stack([image.sample(), image.sample()])))
    assert out.shape == (2, 2)
    with pytest.raises(ValueError, match="at least 36x36"):
        WnNatureCNN(spaces.Box(0, 255, (4, 10, 10), np.uint8))
    with pytest.raises(ValueError, match="Use WnSACPolicy for vector observations"):
        SAC(WnSACCnnPolicy, "Pendulum-v1")


def test_mlp_policy_on_dict_observations_says_how_to_fix():
    env = gym.make("CartPole-v1")
    dict_space = spaces.Dict({"a": env.observation_space})
    with pytest.raises(ValueError, match="FlattenObservation"):
        WnMlpPolicy(dict_space, env.action_space, lambda _: 1e-3)


def _trained(algo, policy, env_id, policy_kwargs, **hyper):
    register_envs()
    model = algo(policy, env_id, policy_kwargs=policy_kwargs, seed=0, **hyper)
    model.learn(256, callback=DataDependentInitCallback(n_samples=64))
    return model


SAVE_CASES = {
    "dqn": (DQN, WnMlpPolicy, "CartPole-v1", dict(learning_starts=64, buffer_size=500, train_freq=4)),
    "ppo": (PPO, WnActorCriticPolicy, "CartPole-v1", dict(n_steps=128, batch_size=32, n_epochs=2)),
    "rppo": (RecurrentPPO, WnRecurrentActorCriticPolicy, "wn_rl/CartPoleNoVel-v1", dict(n_steps=64, batch_size=32)),
    "sac": (SAC, WnSACPolicy, "Pendulum-v1", dict(learning_starts=64, buffer_size=500, train_freq=8)),
    "td3": (TD3, WnTD3Policy, "Pendulum-v1", dict(learning_starts=64, buffer_size=500, train_freq=8)),
}


@pytest.mark.parametrize("case", list(SAVE_CASES))
def test_model_and_policy_save_load_round_trip_every_tensor_exactly(case, tmp_path):
    algo, policy, env_id, hyper = SAVE_CASES[case]
    kwargs = dict(parameterization="weight_norm+mean_only_bn", net_arch=[16, 16])
    if algo is RecurrentPPO:
        kwargs.update(lstm_hidden_size=8)
    model = _trained(algo, policy, env_id, kwargs, **hyper)
    state = model.policy.state_dict()
    assert any(k.endswith("running_mean") for k in state) and any(k.endswith("initialized") for k in state)
    assert any(not torch.all(v == 0) for k, v in state.items() if k.endswith("running_mean"))
    model.save(tmp_path / "model.zip")
    loaded = algo.load(tmp_path / "model.zip", device="cpu")
    model.policy.save(tmp_path / "policy.pt")
    loaded_policy = type(model.policy).load(tmp_path / "policy.pt", device="cpu")
    for other in (loaded.policy.state_dict(), loaded_policy.state_dict()):
        assert other.keys() == state.keys()
        for key, tensor in state.items():
            assert other[key].dtype == tensor.dtype and torch.equal(other[key], tensor), key
    assert wn_rl.is_initialized(loaded.policy)


def _shares_extractor(policy) -> bool:
    if hasattr(policy, "actor"):  # SAC, TD3, TQC
        return policy.actor.features_extractor is policy.critic.features_extractor
    return policy.pi_features_extractor is policy.vf_features_extractor


SHARING_POLICIES = {
    "sac": WnSACPolicy,
    "td3": WnTD3Policy,
    "tqc": WnTQCPolicy,
    "ppo": WnActorCriticPolicy,
    "maskable_ppo": WnMaskableActorCriticPolicy,
    "recurrent_ppo": WnRecurrentActorCriticPolicy,
}


@pytest.mark.parametrize("name", list(SHARING_POLICIES))
@pytest.mark.parametrize("share", [True, False])
def test_policy_save_load_keeps_whether_actor_and_critic_share_the_features_extractor(name, share, tmp_path):
    policy_class = SHARING_POLICIES[name]
    obs_space = spaces.Box(-1.0, 1.0, (3,), np.float32)
    action_space = (
        spaces.Box(-1.0, 1.0, (2,), np.float32) if hasattr(policy_class, "actor_class") else spaces.Discrete(3)
    )
    kwargs = dict(lstm_hidden_size=8) if policy_class is WnRecurrentActorCriticPolicy else {}
    policy = policy_class(
        obs_space, action_space, lambda _: 1e-3, net_arch=[8], share_features_extractor=share, **kwargs
    )
    assert _shares_extractor(policy) is share
    policy.save(tmp_path / "policy.pt")
    loaded = policy_class.load(tmp_path / "policy.pt", device="cpu")
    assert loaded.share_features_extractor is share and _shares_extractor(loaded) is share


def test_inference_weight_cache_follows_updates_and_never_blocks_gradients():
    model = DQN(WnMlpPolicy, "CartPole-v1")
    q_net, first = model.policy.q_net, model.policy.q_net.q_net[0]
    obs = torch.randn(8, 4)
    with torch.no_grad():
        before = q_net(obs)
        first.g.mul_(2.0)  # an in-place update, as an optimizer step or a Polyak update makes
        after = q_net(obs)
    q_net._release_weight_cache()
    with torch.no_grad():
        fresh = q_net(obs)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, fresh)
    q_net(obs).sum().backward()
    assert first.g.grad is not None and first.v.grad is not None and first.v.grad.abs().sum() > 0


def test_inference_weight_cache_sees_a_fused_optimizer_step():
    """A fused optimizer's step leaves the parameters' version counters as they were: the acting cache still
    serves the new weights."""
    model = DQN(WnMlpPolicy, "CartPole-v1", policy_kwargs=dict(optimizer_kwargs=dict(fused=True)))
    q_net, obs = model.policy.q_net, torch.randn(8, 4)
    with torch.no_grad():
        before = q_net(obs)
    for p in q_net.parameters():
        p.grad = torch.randn_like(p)
    model.policy.optimizer.step()
    with torch.no_grad():
        after = q_net(obs)
        q_net._release_weight_cache()
        fresh = q_net(obs)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, fresh)


def test_q_networks_never_serve_stale_weights_after_target_updates_and_training():
    from stable_baselines3.common.callbacks import BaseCallback

    mismatches = []

    class Compare(BaseCallback):
        def _on_step(self) -> bool:
            if self.n_calls % 50 == 0:
                obs = torch.randn(5, 4)
                for net in (self.model.policy.q_net, self.model.policy.q_net_target):
                    with torch.no_grad():
                        served = net(obs)
                        net._release_weight_cache()
                        mismatches.append(float((served - net(obs)).abs().max()))
            return True

    model = DQN(WnMlpPolicy, "CartPole-v1", learning_starts=100, target_update_interval=20, train_freq=4, seed=0)
    model.learn(600, callback=[DataDependentInitCallback(n_samples=100), Compare()])
    assert len(mismatches) == 24 and max(mismatches) == 0.0
