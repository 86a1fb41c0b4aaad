"""The recurrent policy's frozen norm statistics are refreshed from data only: sb3-contrib's RecurrentPPO pads each
minibatch's sequences with zero rows and masks them out of its losses, and those rows must not enter the norm
layers' running statistics either."""

from __future__ import annotations

import pytest
import torch
from sb3_contrib import RecurrentPPO
from stable_baselines3.common.env_util import make_vec_env

import wn_rl
from wn_rl.sb3 import WnRecurrentActorCriticPolicy
from wn_rl.sb3.envs import register_envs
from wn_rl.sb3.on_policy import norms_on_rows, running_norms

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def model_after_one_rollout(parameterization: str = "weight_norm+mean_only_bn") -> RecurrentPPO:
    register_envs()
    kwargs = dict(parameterization=parameterization, lstm_hidden_size=16, net_arch=[16], enable_critic_lstm=False)
    env = make_vec_env("wn_rl/CartPoleNoVel-v1", n_envs=2, seed=0)
    model = RecurrentPPO(WnRecurrentActorCriticPolicy, env, n_steps=64, batch_size=64, seed=0, policy_kwargs=kwargs)
    model.policy.allow_fresh_init()
    model._setup_learn(64, callback=None)
    model.collect_rollouts(model.env, model._init_callback(None), model.rollout_buffer, 64)
    return model


def test_the_rows_found_as_padding_are_exactly_those_recurrent_ppo_masks_out():
    model = model_after_one_rollout()
    padded = 0
    for data in model.rollout_buffer.get(model.batch_size):
        args = (data.actions, data.lstm_states, data.episode_starts)
        valid = model.policy._valid_rows(data.observations, args, {})
        assert torch.equal(valid, data.mask > 1e-8)
        padded += int((~valid).sum())
    assert padded > 0  # the minibatches cut sequences, so there was padding to find


def test_the_refresh_feeds_the_norm_layers_only_the_unpadded_rows():
    model = model_after_one_rollout()
    policy = model.policy
    norm = policy.critic[-1] if isinstance(policy.critic, torch.nn.Sequential) else None
    assert isinstance(norm, wn_rl.MeanOnlyBatchNorm)  # before any LSTM: it sees the observations' features
    policy.set_training_mode(True)
    batches = list(model.rollout_buffer.get(model.batch_size))
    for data in batches:
        policy.evaluate_actions(data.observations, data.actions.long().flatten(), data.lstm_states, data.episode_starts)
    seen: list[int] = []
    forward = norm.forward
    norm.forward = lambda x: (seen.append(x.shape[0]), forward(x))[1]  # the rows the norm itself gets
    before = norm.running_mean.clone()
    expected = before.clone()
    with torch.no_grad():
        for data in batches:  # the critic norm's input is linear in the features: its mean over the valid rows
            valid = data.mask > 1e-8
            features = policy.extract_features(data.observations, policy.vf_features_extractor)
            expected.lerp_(policy.critic[:-1](features[valid]).mean(0), norm.momentum)
    policy.set_training_mode(False)  # the refresh
    del norm.forward
    assert seen == [int((data.mask > 1e-8).sum()) for data in batches]
    torch.testing.assert_close(norm.running_mean, expected)
    assert not torch.allclose(norm.running_mean, before)


def test_norms_on_rows_takes_the_statistics_from_the_valid_rows_and_zeroes_the_rest():
    norm = wn_rl.MeanOnlyBatchNorm(3, momentum=0.5)
    x = torch.randn(6, 3)
    valid = torch.tensor([True, True, False, True, False, False])
    x[~valid] = 0.0
    with norms_on_rows([norm], valid):
        out = norm(x)
        other = norm(torch.randn(4, 3))  # another row count: the norm as it is
    assert other.shape == (4, 3)
    reference = wn_rl.MeanOnlyBatchNorm(3, momentum=0.5)
    torch.testing.assert_close(out[valid], reference(x[valid]))
    assert torch.equal(out[~valid], torch.zeros(3, 3))
    assert not norm._forward_pre_hooks and not norm._forward_hooks  # removed
    with norms_on_rows(running_norms(torch.nn.Sequential(norm)), None):
        assert norm(x).shape == (6, 3)


def test_a_real_all_zero_observation_inside_a_sequence_stays():
    """Only a tail of padding-like rows is padding: a zero observation followed by data is data."""
    model = model_after_one_rollout()
    data = next(iter(model.rollout_buffer.get(model.batch_size)))
    obs = data.observations.clone()
    first_sequence = data.mask[: obs.shape[0] // data.lstm_states.pi[0].shape[1]]
    assert bool(first_sequence[:2].all())
    obs[0] = 0.0
    actions = data.actions.clone()
    actions[0] = 0.0
    starts = data.episode_starts.clone()
    starts[0] = 0.0
    valid = model.policy._valid_rows(obs, (actions, data.lstm_states, starts), {})
    assert bool(valid[0])
