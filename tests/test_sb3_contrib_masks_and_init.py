"""Action masks and data-dependent init for wn_rl.sb3's TQC and MaskablePPO policies with the real algorithms
(tiny budgets): masks respected when acting and in the init warm-up, TQC initialised from replay when the random
warm-up ends, MaskablePPO from a warm-up that takes only valid actions, and frozen norm statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gymnasium import spaces
from sb3_contrib import TQC, MaskablePPO
from sb3_contrib.common.envs import InvalidActionEnvDiscrete
from sb3_contrib.common.maskable.distributions import make_masked_proba_distribution
from sb3_contrib_helpers import LR, VECTOR  # tests/sb3_contrib_helpers.py
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import DummyVecEnv
from wn_init_checks import assert_normalized, preactivations  # tests/wn_init_checks.py

import wn_rl
from wn_rl.sb3 import DataDependentInitCallback, WnMaskableActorCriticPolicy, WnTQCPolicy
from wn_rl.sb3.callbacks import sample_valid_actions
from wn_rl.sb3.init import policy_is_initialized

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


class RecordingInvalidActionEnv(InvalidActionEnvDiscrete):
    """sb3-contrib's ``InvalidActionEnvDiscrete`` that records whether each action it receives was valid."""

    def __init__(self) -> None:
        super().__init__(dim=10, ep_length=20, n_invalid_actions=8)  # 2 valid actions of 10 at every step
        self.valid_actions: list[bool] = []

    def step(self, action):
        self.valid_actions.append(int(action) not in self.invalid_actions)
        return super().step(action)


def recorded(env: DummyVecEnv) -> list[bool]:
    return [valid for inner in env.envs for valid in inner.unwrapped.valid_actions]


# -- masks ---------------------------------------------------------------------------------------------------

MASKED_SPACES = {
    "discrete": spaces.Discrete(5),
    "multi-discrete": spaces.MultiDiscrete([3, 2, 4]),
    "multi-binary": spaces.MultiBinary(3),
}


@pytest.mark.parametrize("name", list(MASKED_SPACES))
def test_warm_up_actions_are_uniform_over_exactly_the_actions_sb3_contrib_leaves_valid(name):
    space = MASKED_SPACES[name]
    space.seed(0)
    distribution = make_masked_proba_distribution(space)
    n_flags = distribution.action_dim if name == "discrete" else int(sum(distribution.action_dims))
    sizes = [n_flags] if name == "discrete" else list(distribution.action_dims)
    rng = np.random.default_rng(0)
    masks = rng.random((3, n_flags)) < 0.5
    for start, size in zip(np.cumsum([0, *sizes[:-1]]), sizes, strict=True):
        masks[np.arange(3), start + rng.integers(size, size=3)] = True  # every part keeps a valid choice
    draws = np.stack([sample_valid_actions(space, masks) for _ in range(400)], axis=1)  # (env, draw, ...)
    distribution.proba_distribution(torch.zeros(3, n_flags))
    distribution.apply_masking(masks)
    allowed = distribution.distribution if name == "discrete" else distribution.distributions
    for env in range(3):
        probs = [allowed.probs[env]] if name == "discrete" else [part.probs[env] for part in allowed]
        draws_env = draws[env].reshape(400, -1)
        for part, p in enumerate(probs):
            drawn = set(draws_env[:, part].tolist())
            assert drawn == set(torch.nonzero(p > 0).flatten().tolist()), (env, part)  # all valid ones, no other
    with pytest.raises(ValueError, match="do not fit"):
        sample_valid_actions(space, masks[:, :-1])
    masks[0, :] = False
    with pytest.raises(ValueError, match=r"env 0's action mask .* leaves no valid action"):
        sample_valid_actions(space, masks)


def test_wn_maskable_policy_never_picks_an_invalid_action():
    policy = WnMaskableActorCriticPolicy(VECTOR, spaces.Discrete(6), LR, net_arch=[16])
    with torch.no_grad():
        policy.action_net.bias[0] = 100.0  # the unmasked policy always prefers action 0
    rng = np.random.default_rng(0)
    obs = rng.uniform(-1, 1, (256, 4)).astype(np.float32)
    masks = rng.random((256, 6)) < 0.5
    masks[:, 0] = False
    masks[np.arange(256), rng.integers(1, 6, 256)] = True
    assert set(policy.predict(obs, deterministic=True)[0].tolist()) == {0}  # what masks must prevent
    for deterministic in (True, False):
        actions, _ = policy.predict(obs, deterministic=deterministic, action_masks=masks)
        assert masks[np.arange(256), actions].all()
    with torch.no_grad():
        probs = policy.get_distribution(torch.as_tensor(obs), masks).distribution.probs
    assert float(probs[torch.as_tensor(~masks)].max()) < 1e-30


# -- data-dependent init -------------------------------------------------------------------------------------


def record_initialized_when_acting(model, monkeypatch) -> list[bool]:
    """Whether the online networks were initialised, at every action the policy chooses (not SB3's random ones)."""
    initialized_when_acting = []
    predict = model.policy.predict

    def spy(*args, **kwargs):
        initialized_when_acting.append(policy_is_initialized(model.policy))
        return predict(*args, **kwargs)

    monkeypatch.setattr(model.policy, "predict", spy)
    return initialized_when_acting


@pytest.mark.parametrize("parameterization", ["weight_norm", "weight_norm+mean_only_bn"])
def test_tqc_init_from_replay_before_the_first_action_normalizes_actor_and_critics(parameterization, monkeypatch):
    kwargs = dict(net_arch=[16, 16], n_quantiles=5, parameterization=parameterization)
    model = TQC(WnTQCPolicy, "Pendulum-v1", learning_starts=64, gradient_steps=0, seed=0, policy_kwargs=kwargs)
    initialized_when_acting = record_initialized_when_acting(model, monkeypatch)
    ddi = DataDependentInitCallback(n_samples=64)
    model.learn(80, callback=ddi)
    assert ddi.done and initialized_when_acting and all(initialized_when_acting)
    assert set(ddi.reports) == {"actor", "critic"}
    buffer = model.replay_buffer  # learning_starts == n_samples: every warm-up transition, each once
    stored = np.concatenate([buffer.observations[:64, 0], buffer.actions[:64, 0]], axis=-1)
    batch = torch.cat([ddi.init_observations, ddi.init_actions], dim=1).numpy()
    assert sorted(map(tuple, batch)) == sorted(map(tuple, stored))
    policy, obs, actions = model.policy, ddi.init_observations, ddi.init_actions
    dead = {name: units for report in ddi.reports.values() for name, units in report.dead_units.items()}
    actor = preactivations(policy.actor, lambda: policy.actor.get_action_dist_params(obs))
    critic = preactivations(policy.critic, lambda: policy.critic(obs, actions))
    assert [scale for _, _, scale in actor] == [1.0, 1.0, 0.01, 0.01]
    assert [scale for _, _, scale in critic] == [1.0, 1.0, 1.0] * 2
    assert_normalized(actor, dead)
    assert_normalized(critic, dead)
    target = policy.critic_target.state_dict()
    assert all(torch.equal(target[key], value) for key, value in policy.critic.state_dict().items())
    assert any(key.endswith("running_mean") for key in target) == (parameterization != "weight_norm")


@pytest.mark.parametrize("parameterization", ["weight_norm", "weight_norm+mean_only_bn"])
def test_maskable_init_warm_up_takes_only_valid_actions_and_normalizes_the_policy(parameterization):
    env = DummyVecEnv([RecordingInvalidActionEnv, RecordingInvalidActionEnv])
    kwargs = dict(net_arch=[16], parameterization=parameterization)
    model = MaskablePPO(
        WnMaskableActorCriticPolicy,
        env,
        n_steps=16,
        batch_size=32,
        n_epochs=1,
        learning_rate=0.0,
        seed=0,
        policy_kwargs=kwargs,
    )
    steps_before_rollout = []

    class FirstRollout(BaseCallback):
        def _on_rollout_start(self) -> None:
            steps_before_rollout.append(len(recorded(env)))

        def _on_step(self) -> bool:
            return True

    ddi = DataDependentInitCallback(n_samples=128)
    model.learn(32, callback=[ddi, FirstRollout()])
    assert steps_before_rollout[0] == 2 * 63  # the warm-up: 64 observations per env, the first from reset
    valid = recorded(env)
    assert len(valid) == 2 * 63 + 32 and all(valid), f"{valid.count(False)} invalid actions of {len(valid)}"
    policy = model.policy  # lr=0: the parameters are those the init set
    found = preactivations(policy, lambda: policy.forward(ddi.init_observations, deterministic=True))
    assert {scale for _, _, scale in found} == {1.0, 0.01}
    assert_normalized(found, ddi.reports["policy"].dead_units)


def test_maskable_init_refuses_an_env_without_action_masks_unless_masking_is_off():
    model = MaskablePPO(WnMaskableActorCriticPolicy, "CartPole-v1", n_steps=16, batch_size=16, seed=0)
    with pytest.raises(ValueError, match=r"no action_masks\(\) method.*ActionMasker.*use_masking=False"):
        model.learn(16, callback=DataDependentInitCallback(n_samples=32))
    ddi = DataDependentInitCallback(n_samples=32)
    model.learn(16, callback=ddi, use_masking=False)
    assert ddi.done and wn_rl.is_initialized(model.policy)


@pytest.mark.parametrize("parameterization", ["weight_norm+mean_only_bn", "batch_norm"])
def test_frozen_norm_statistics_make_maskable_ppos_first_epoch_ratio_one(parameterization):
    def first_epoch(freeze: bool) -> tuple[float, float, float]:
        """SB3's logged approx_kl and clip fraction of the first epoch (lr=0), and the largest |log ratio|
        when the training-mode policy re-evaluates the rollout with its masks."""
        kwargs = dict(parameterization=parameterization, freeze_norm_statistics=freeze, net_arch=[16])
        env = DummyVecEnv([RecordingInvalidActionEnv] * 4)
        model = MaskablePPO(
            WnMaskableActorCriticPolicy,
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
                actions = batch.actions.long().flatten()
                _, log_prob, _ = model.policy.evaluate_actions(batch.observations, actions, batch.action_masks)
                worst = max(worst, float((log_prob - batch.old_log_prob).abs().max()))
        return abs(values["train/approx_kl"]), values["train/clip_fraction"], worst

    kl, clipped, worst = first_epoch(freeze=True)
    assert kl < 1e-7 and clipped == 0.0 and worst < 1e-5
    _, _, worst_unfrozen = first_epoch(freeze=False)
    assert worst_unfrozen > 1e-3  # SB3's train/eval switch: the acting and the trained policy differ
