"""wn_rl.sb3's policies for sb3-contrib's TQC (Truncated Quantile Critics) and MaskablePPO (invalid action
masking) with the real algorithms on small envs (tiny budgets): layers against sb3-contrib's own policies, the
one parameterization switch, per-part init_scale, data-dependent init (TQC from replay when the random warm-up
ends, MaskablePPO from a warm-up that takes only valid actions), masks respected, frozen norm statistics,
save/load round trips, the errors for spaces that do not fit, and the configs and runner."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from sb3_contrib import TQC, MaskablePPO
from sb3_contrib.common.envs import InvalidActionEnvDiscrete
from sb3_contrib.common.maskable.distributions import make_masked_proba_distribution
from sb3_contrib.ppo_mask import CnnPolicy as MaskableCnnPolicy
from sb3_contrib.ppo_mask import MlpPolicy as MaskableMlpPolicy
from sb3_contrib.ppo_mask import MultiInputPolicy as MaskableMultiInputPolicy
from sb3_contrib.tqc import CnnPolicy as TQCCnnPolicy
from sb3_contrib.tqc import MlpPolicy as TQCMlpPolicy
from sb3_contrib.tqc import MultiInputPolicy as TQCMultiInputPolicy
from sb3_contrib.tqc.policies import TQCPolicy
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import DummyVecEnv
from wn_init_checks import assert_normalized, preactivations  # tests/wn_init_checks.py

import wn_rl
from wn_rl.config import ConfigError
from wn_rl.sb3 import (
    DataDependentInitCallback,
    WnMaskableActorCriticCnnPolicy,
    WnMaskableActorCriticPolicy,
    WnMaskableMultiInputActorCriticPolicy,
    WnStatsCallback,
    WnTQCCnnPolicy,
    WnTQCCritic,
    WnTQCMultiInputPolicy,
    WnTQCPolicy,
)
from wn_rl.sb3.callbacks import sample_valid_actions
from wn_rl.sb3.config import ALGORITHMS, load_sb3_config, resolve_policy
from wn_rl.sb3.init import policy_is_initialized
from wn_rl.sb3.runner import SB3Run

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

IMAGE = spaces.Box(0, 255, (3, 36, 36), np.uint8)  # the Nature CNN's smallest input
VECTOR = spaces.Box(-1, 1, (4,), np.float32)
DICT = spaces.Dict(vec=VECTOR, image=IMAGE)
DISCRETE = spaces.Discrete(4)
CONTINUOUS = spaces.Box(-1, 1, (2,), np.float32)
LR = lambda _: 1e-3  # noqa: E731


class RandomObservations(gym.Env):
    """Random observations of ``observation_space``; Discrete(4) actions with two valid ones per step
    (``action_masks``), or Box(2) actions; reward 1 for action 0 or a positive first action; 16-step episodes."""

    def __init__(self, observation_space: spaces.Space = DICT, continuous: bool = False) -> None:
        self.observation_space = observation_space
        self.action_space = CONTINUOUS if continuous else DISCRETE
        self._steps = 0
        self._valid = np.ones(4, dtype=bool)

    def _observe(self):
        self._valid = np.zeros(4, dtype=bool)
        self._valid[self.np_random.choice(4, 2, replace=False)] = True
        self.observation_space.seed(int(self.np_random.integers(2**31)))
        return self.observation_space.sample()

    def action_masks(self) -> np.ndarray:
        return self._valid.copy()

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._steps = 0
        return self._observe(), {}

    def step(self, action):
        first = float(np.asarray(action).reshape(-1)[0])
        reward = float(first > 0) if isinstance(self.action_space, spaces.Box) else float(first == 0)
        self._steps += 1
        return self._observe(), reward, False, self._steps >= 16, {}


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


def plain_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in module.modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d)]


# -- layers: sb3-contrib's defaults, the parameterization switch, init_scale ---------------------------------

REFERENCES = {  # ours, sb3-contrib's, observation space, action space
    "tqc-mlp": (WnTQCPolicy, TQCMlpPolicy, VECTOR, CONTINUOUS),
    "tqc-cnn": (WnTQCCnnPolicy, TQCCnnPolicy, IMAGE, CONTINUOUS),
    "tqc-multi-input": (WnTQCMultiInputPolicy, TQCMultiInputPolicy, DICT, CONTINUOUS),
    "maskable-mlp": (WnMaskableActorCriticPolicy, MaskableMlpPolicy, VECTOR, DISCRETE),
    "maskable-cnn": (WnMaskableActorCriticCnnPolicy, MaskableCnnPolicy, IMAGE, DISCRETE),
    "maskable-multi-input": (WnMaskableMultiInputActorCriticPolicy, MaskableMultiInputPolicy, DICT, DISCRETE),
}


def batch_of(space: spaces.Space, n: int) -> np.ndarray | dict[str, np.ndarray]:
    space.seed(0)
    samples = [space.sample() for _ in range(n)]
    if isinstance(space, spaces.Dict):
        return {key: np.stack([sample[key] for sample in samples]) for key in space.spaces}
    return np.stack(samples)


def _outputs(policy, obs, actions, masks) -> list[torch.Tensor]:
    if isinstance(policy, TQCPolicy):
        mean, log_std, _ = policy.actor.get_action_dist_params(obs)
        return [mean, log_std, policy.critic(obs, actions), policy.critic_target(obs, actions)]
    values, log_prob, entropy = policy.evaluate_actions(obs, actions, action_masks=masks)
    return [values, log_prob, entropy, policy.get_distribution(obs, masks).distribution.probs]


@pytest.mark.parametrize("case", list(REFERENCES))
def test_normal_parameterization_is_sb3_contribs_policy_and_weight_norm_has_no_plain_layer(case):
    ours_class, reference_class, observation_space, action_space = REFERENCES[case]
    torch.manual_seed(0)
    ours = ours_class(observation_space, action_space, LR, parameterization="normal")
    reference = reference_class(observation_space, action_space, LR)
    assert ours.net_arch == reference.net_arch
    state = {k: v for k, v in ours.state_dict().items() if not k.endswith("initialized")}
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in reference.state_dict().items()}
    reference.load_state_dict(state)
    obs, _ = ours.obs_to_tensor(batch_of(observation_space, 5))
    actions = torch.rand(5, 2) * 2 - 1 if action_space is CONTINUOUS else torch.tensor([0, 1, 2, 3, 1])
    masks = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]], dtype=bool)
    with torch.no_grad():
        for got, expected in zip(
            _outputs(ours, obs, actions, masks), _outputs(reference, obs, actions, masks), strict=True
        ):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    wn = ours_class(observation_space, action_space, LR)
    assert not plain_layers(wn) and any(isinstance(m, wn_rl.WNLayer) for m in wn.modules())


def _tqc(parameterization: str, **kwargs) -> WnTQCPolicy:
    kwargs = dict(net_arch=[8, 8], n_quantiles=3, parameterization=parameterization, **kwargs)
    return WnTQCPolicy(VECTOR, CONTINUOUS, LR, **kwargs)


def _maskable(parameterization: str, **kwargs) -> WnMaskableActorCriticPolicy:
    return WnMaskableActorCriticPolicy(
        VECTOR, DISCRETE, LR, net_arch=[8, 8], parameterization=parameterization, **kwargs
    )


NORM_TYPES = {
    "batch_norm": torch.nn.BatchNorm1d,
    "mean_only_bn": wn_rl.MeanOnlyBatchNorm,
    "layer_norm": torch.nn.LayerNorm,
}


@pytest.mark.parametrize("parameterization", sorted(wn_rl.PARAMETERIZATIONS))
def test_one_switch_sets_every_layer_and_heads_never_get_a_norm(parameterization):
    p = wn_rl.Parameterization.get(parameterization)
    tqc, maskable = _tqc(parameterization), _maskable(parameterization)
    # TQC: actor 2 hidden + mu + log_std; critic and its target: 2 critics x (2 hidden + quantile head)
    # MaskablePPO: policy and value MLPs 2 + 2, action and value heads
    for policy, n_layers, n_hidden, heads in (
        (tqc, 4 + 6 + 6, 2 + 4 + 4, [tqc.actor.mu, tqc.actor.log_std, tqc.critic.qf0[-1], tqc.critic.qf1[-1]]),
        (maskable, 6, 4, [maskable.action_net, maskable.value_net]),
    ):
        layers = [m for m in policy.modules() if isinstance(m, wn_rl.WNLinear | torch.nn.Linear)]
        assert len(layers) == n_layers
        assert all(isinstance(m, wn_rl.WNLinear) == p.weight_norm for m in layers)
        assert all(hasattr(m, "initialized") for m in layers)
        norms = [m for m in policy.modules() if isinstance(m, tuple(NORM_TYPES.values()))]
        assert len(norms) == (n_hidden if p.norm else 0)
        assert all(isinstance(norm, NORM_TYPES[p.norm]) for norm in norms)
        assert all(isinstance(head, wn_rl.WNLinear | torch.nn.Linear) for head in heads)  # a layer, no norm after
    assert [tqc.actor.mu.init_scale, tqc.actor.log_std.init_scale, tqc.critic.qf0[-1].init_scale] == [0.01, 0.01, 1.0]
    assert [maskable.action_net.init_scale, maskable.value_net.init_scale] == [0.01, 1.0]
    assert isinstance(tqc.critic, WnTQCCritic) and tqc.critic.qf0[-1].out_features == 3


def test_init_scale_per_part_and_its_errors():
    tqc = _tqc("weight_norm", init_scale=dict(q=0.5, hidden=2.0, action=0.2, log_std=0.1))
    for q_net in (*tqc.critic.q_networks, *tqc.critic_target.q_networks):
        assert [m.init_scale for m in q_net if isinstance(m, wn_rl.WNLinear)] == [2.0, 2.0, 0.5]
    assert [tqc.actor.mu.init_scale, tqc.actor.log_std.init_scale] == [0.2, 0.1]
    assert {m.init_scale for m in tqc.actor.latent_pi if isinstance(m, wn_rl.WNLinear)} == {2.0}
    maskable = _maskable("weight_norm", init_scale=dict(action=0.1, value=2.0))
    assert [maskable.action_net.init_scale, maskable.value_net.init_scale] == [0.1, 2.0]
    with pytest.raises(
        ValueError, match=r"unknown part\(s\) \['value'\].*'features', 'hidden', 'action', 'log_std', 'q'"
    ):
        _tqc("weight_norm", init_scale=dict(value=1.0))
    with pytest.raises(ValueError, match=r"unknown part\(s\) \['q'\].*'features', 'hidden', 'action', 'value'"):
        _maskable("weight_norm", init_scale=dict(q=1.0))
    with pytest.raises(ValueError, match=r"ortho_init=True is not supported by WnMaskableActorCriticPolicy"):
        _maskable("weight_norm", ortho_init=True)


FAMILIES = [  # multi-input, vector and image policy of each family, and its action space
    (WnTQCMultiInputPolicy, WnTQCPolicy, WnTQCCnnPolicy, CONTINUOUS),
    (WnMaskableMultiInputActorCriticPolicy, WnMaskableActorCriticPolicy, WnMaskableActorCriticCnnPolicy, DISCRETE),
]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family[1].__name__)
def test_each_policy_names_the_policy_that_fits_the_observation_space(family):
    multi, vector, image, action_space = (family[0].__name__, family[1].__name__, family[2].__name__, family[3])
    with pytest.raises(ValueError, match=rf"{multi} needs Dict observations.*Use {vector} for vector"):
        family[0](VECTOR, action_space, LR)
    with pytest.raises(ValueError, match=rf"{multi} needs Dict observations.*Use {image} for image"):
        family[0](IMAGE, action_space, LR)
    with pytest.raises(ValueError, match=rf"{vector} flattens one array.*use {multi}"):
        family[1](DICT, action_space, LR)
    with pytest.raises(ValueError, match=rf"{image} needs image observations.*Use {multi} for Dict"):
        family[2](DICT, action_space, LR)
    with pytest.raises(ValueError, match=rf"{image} needs image observations.*Use {vector} for vector"):
        family[2](VECTOR, action_space, LR)


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


# -- learning, save / load -----------------------------------------------------------------------------------

SMALL = dict(net_arch=[16], features_extractor_kwargs=dict(features_dim=16))
OFF_POLICY = dict(learning_starts=64, buffer_size=256, batch_size=16, train_freq=4)
CASES = {  # algorithm, policy, env, hyperparameters, policy_kwargs
    "tqc-mlp": (TQC, WnTQCPolicy, lambda: "Pendulum-v1", OFF_POLICY, dict(net_arch=[16], n_quantiles=5)),
    "tqc-cnn": (TQC, WnTQCCnnPolicy, lambda: RandomObservations(IMAGE, continuous=True), OFF_POLICY, SMALL),
    "tqc-multi-input": (
        TQC,
        WnTQCMultiInputPolicy,
        lambda: RandomObservations(DICT, continuous=True),
        OFF_POLICY,
        dict(net_arch=[16], features_extractor_kwargs=dict(cnn_output_dim=16), n_quantiles=5),
    ),
    "maskable-mlp": (
        MaskablePPO,
        WnMaskableActorCriticPolicy,
        lambda: InvalidActionEnvDiscrete(dim=10, n_invalid_actions=8),
        dict(n_steps=64, batch_size=32, n_epochs=2),
        dict(net_arch=[16]),
    ),
    "maskable-cnn": (
        MaskablePPO,
        WnMaskableActorCriticCnnPolicy,
        lambda: RandomObservations(IMAGE),
        dict(n_steps=64, batch_size=32, n_epochs=1),
        SMALL,
    ),
    "maskable-multi-input": (
        MaskablePPO,
        WnMaskableMultiInputActorCriticPolicy,
        lambda: RandomObservations(DICT),
        dict(n_steps=64, batch_size=32, n_epochs=1),
        dict(net_arch=[16], features_extractor_kwargs=dict(cnn_output_dim=16)),
    ),
}


def masks_of(model) -> np.ndarray | None:
    return np.stack(model.env.env_method("action_masks")) if isinstance(model, MaskablePPO) else None


@pytest.mark.parametrize("case", list(CASES))
def test_policy_learns_with_its_algorithm_after_data_dependent_init(case):
    algo, policy, make, hyper, policy_kwargs = CASES[case]
    model = algo(policy, make(), policy_kwargs=dict(policy_kwargs), seed=0, **hyper)
    ddi, stats = DataDependentInitCallback(n_samples=64), WnStatsCallback(log_freq=64)
    model.learn(128, callback=[ddi, stats])
    assert model.num_timesteps >= 128 and ddi.done and not ddi.skipped
    assert all(report.layers for report in ddi.reports.values()) and wn_rl.is_initialized(model.policy)
    assert not plain_layers(model.policy) and any(isinstance(m, wn_rl.WNLayer) for m in model.policy.modules())
    assert stats.last_stats and all(np.isfinite(v) for v in stats.last_stats.values())
    assert model._n_updates > 0
    obs = model.env.reset()
    masks = masks_of(model)
    action, _ = model.predict(obs, deterministic=True, **({} if masks is None else {"action_masks": masks}))
    assert model.action_space.contains(action[0])
    if masks is not None:
        assert masks[0, int(action[0])]


@pytest.mark.parametrize("algo", [TQC, MaskablePPO], ids=["tqc", "maskable_ppo"])
def test_model_and_policy_save_load_round_trip_and_no_reinit(algo, tmp_path):
    kwargs = dict(parameterization="weight_norm+mean_only_bn", net_arch=[16, 16])
    if algo is TQC:
        model = TQC(WnTQCPolicy, "Pendulum-v1", seed=0, policy_kwargs=dict(kwargs, n_quantiles=5), **OFF_POLICY)
    else:
        env = InvalidActionEnvDiscrete(dim=10, n_invalid_actions=8)
        model = MaskablePPO(WnMaskableActorCriticPolicy, env, n_steps=64, batch_size=32, seed=0, policy_kwargs=kwargs)
    model.learn(128, callback=DataDependentInitCallback(n_samples=64))
    state = model.policy.state_dict()
    assert any(k.endswith("running_mean") and not torch.all(v == 0) for k, v in state.items())
    model.save(tmp_path / "model.zip")
    loaded = algo.load(tmp_path / "model.zip", env=model.env, device="cpu")
    model.policy.save(tmp_path / "policy.pt")
    loaded_policy = type(model.policy).load(tmp_path / "policy.pt", device="cpu")
    assert type(loaded.policy) is type(model.policy) and loaded_policy.parameterization == model.policy.parameterization
    for other in (loaded.policy.state_dict(), loaded_policy.state_dict()):
        assert other.keys() == state.keys()
        for key, tensor in state.items():
            assert torch.equal(other[key], tensor), key
    obs, masks = model.env.reset(), masks_of(model)
    extra = {} if masks is None else {"action_masks": masks}
    expected, _ = model.predict(obs, deterministic=True, **extra)
    for other in (loaded, loaded_policy):
        np.testing.assert_array_equal(other.predict(obs, deterministic=True, **extra)[0], expected)
    ddi = DataDependentInitCallback(n_samples=64)
    loaded.learn(64, callback=ddi, reset_num_timesteps=False)
    assert ddi.skipped and ddi.reports == {}


# -- configs and the runner ----------------------------------------------------------------------------------

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "sb3"


@pytest.mark.parametrize("name", ["tqc_pendulum", "maskable_ppo_invalid_actions"])
def test_shipped_configs_resolve_to_our_policy_and_sb3_contribs(name):
    wn, normal = load_sb3_config(f"{CONFIGS}/{name}_wn.yaml"), load_sb3_config(f"{CONFIGS}/{name}_normal.yaml")
    algo = ALGORITHMS[wn.algo]
    assert wn.algo == normal.algo and algo in (TQC, MaskablePPO)
    assert resolve_policy(wn.algo, wn.policy) is (WnTQCPolicy if algo is TQC else WnMaskableActorCriticPolicy)
    assert resolve_policy(normal.algo, normal.policy) == "MlpPolicy"
    assert {k: v for k, v in vars(wn).items() if k not in ("policy", "policy_kwargs")} == {
        k: v for k, v in vars(normal).items() if k not in ("policy", "policy_kwargs")
    }
    if algo is TQC:
        assert wn.hyperparameters["learning_starts"] >= wn.init.n_samples
    with pytest.raises(ConfigError, match=r"init\.n_samples=256 needs hyperparameters\.learning_starts >= 256"):
        load_sb3_config(f"{CONFIGS}/tqc_pendulum_wn.yaml", ["hyperparameters.learning_starts=100"])
    with pytest.raises(ConfigError, match=r"hyperparameters\.learning_starts is not an argument of MaskablePPO"):
        load_sb3_config(f"{CONFIGS}/maskable_ppo_invalid_actions_wn.yaml", ["hyperparameters.learning_starts=1"])


@pytest.mark.parametrize(
    ("algo", "policy", "fits"),
    [
        ("tqc", "WnSACPolicy", "WnTQCPolicy"),  # sac -> tqc keeping the policy: it crashed at the first update
        ("sac", "WnTQCPolicy", "WnSACPolicy"),
        ("maskable_ppo", "WnActorCriticPolicy", "WnMaskableActorCriticPolicy"),
        ("ppo", "WnMaskableActorCriticPolicy", "WnActorCriticPolicy"),
        ("ppo", "WnRecurrentActorCriticPolicy", "WnActorCriticPolicy"),  # a subclass of PPO's, with another call
        ("recurrent_ppo", "WnActorCriticPolicy", "WnRecurrentActorCriticPolicy"),
        ("td3", "WnSACPolicy", "WnTD3Policy"),
    ],
)
def test_a_policy_of_another_algorithm_is_a_config_error_naming_the_ones_that_fit(algo, policy, fits):
    with pytest.raises(ConfigError, match=rf"policy='{policy}' is not a policy of {ALGORITHMS[algo].__name__}.*{fits}"):
        load_sb3_config(f"{CONFIGS}/tqc_pendulum_wn.yaml", [f"algo={algo}", f"policy={policy}", "hyperparameters={}"])
    for name in ("WnTQCPolicy", "WnTQCCnnPolicy", "WnMaskableMultiInputActorCriticPolicy", "WnSACPolicy"):
        owner = "tqc" if "TQC" in name else "maskable_ppo" if "Maskable" in name else "sac"
        assert resolve_policy(owner, name).__name__ == name


def _run(tmp_path, name: str, *overrides: str) -> tuple[SB3Run, dict]:
    common = [f"runs_dir={tmp_path}", f"run_name={name}", "progress_bar=false", "verbose=0", "torch_threads=1"]
    config = load_sb3_config(f"{CONFIGS}/{name}_wn.yaml", [*common, *overrides])
    resume = (tmp_path / name / "config.yaml").is_file()
    run = SB3Run(config, tmp_path / name, resume=resume)
    return run, run.train()


def test_runner_trains_checkpoints_and_resumes_tqc_with_its_replay_buffer(tmp_path):
    tiny = [
        "hyperparameters.learning_starts=64",
        "hyperparameters.batch_size=16",
        "policy_kwargs.net_arch=[16]",
        "policy_kwargs.n_quantiles=5",
        "init.n_samples=64",
        "checkpoint_freq=100",
        "save_replay_buffer=true",
        "eval.freq=0",
        "wn_stats_freq=50",
    ]
    _, first = _run(tmp_path, "tqc_pendulum", *tiny, "total_timesteps=200")
    run_dir = tmp_path / "tqc_pendulum"
    assert first["num_timesteps"] == 200 and (run_dir / "checkpoints" / "replay_buffer_200_steps.pkl").is_file()
    _, resumed = _run(tmp_path, "tqc_pendulum", *tiny, "total_timesteps=250")
    assert resumed["start_timesteps"] == 200 and resumed["num_timesteps"] == 250
    assert resumed["resumed_from"].endswith("final_model.zip")
    model = TQC.load(run_dir / "final_model.zip")
    model.load_replay_buffer(run_dir / "final_replay_buffer.pkl")
    assert isinstance(model.policy, WnTQCPolicy) and wn_rl.is_initialized(model.policy)
    assert model.num_timesteps == 250 and model.replay_buffer.size() == 250  # the first run's transitions kept


def test_runner_trains_evaluates_with_masks_and_resumes_maskable_ppo(tmp_path):
    tiny = [
        "n_envs=2",
        "hyperparameters.n_steps=64",
        "hyperparameters.n_epochs=1",
        "policy_kwargs.net_arch=[16]",
        "init.n_samples=64",
        "checkpoint_freq=128",
        "eval.freq=128",
        "eval.episodes=2",
    ]
    _, first = _run(tmp_path, "maskable_ppo_invalid_actions", *tiny, "total_timesteps=128")
    run_dir = tmp_path / "maskable_ppo_invalid_actions"
    assert first["num_timesteps"] == 128 and (run_dir / "checkpoints" / "model_128_steps.zip").is_file()
    with np.load(run_dir / "eval" / "evaluations.npz") as data:
        # Two valid actions of ten at each step, one rewarded: a policy acting with masks scores about half of
        # the 100 steps even untrained; without them its greedy action is valid about a fifth of the time.
        assert data["results"].mean() >= 30
    _, resumed = _run(tmp_path, "maskable_ppo_invalid_actions", *tiny, "total_timesteps=256")
    assert resumed["start_timesteps"] == 128 and resumed["num_timesteps"] == 256
    model = MaskablePPO.load(run_dir / "final_model.zip")
    assert isinstance(model.policy, WnMaskableActorCriticPolicy) and model.num_timesteps == 256
    with np.load(run_dir / "eval" / "evaluations.npz") as data:
        assert data["timesteps"].tolist() == [128, 256]  # the evaluations continued
