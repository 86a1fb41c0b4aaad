"""wn_rl.sb3's multi-input policies (Dict observations, SB3's MultiInputPolicy) with real SB3 algorithms on
small Dict envs (tiny budgets): WnCombinedExtractor against SB3's CombinedExtractor, data-dependent init from
Dict rollout, replay and HER buffers, save/load round trips and the errors for spaces that do not fit."""

from __future__ import annotations

import copy

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from sb3_contrib import QRDQN, RecurrentPPO
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy, RecurrentMultiInputActorCriticPolicy
from sb3_contrib.common.recurrent.type_aliases import RNNStates
from sb3_contrib.qrdqn.policies import MultiInputPolicy as QRDQNMultiInputPolicy
from stable_baselines3 import A2C, DQN, PPO, SAC, TD3, HerReplayBuffer
from stable_baselines3.common.buffers import DictReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.envs import BitFlippingEnv
from stable_baselines3.common.policies import ActorCriticPolicy, MultiInputActorCriticPolicy
from stable_baselines3.common.torch_layers import CombinedExtractor
from stable_baselines3.common.utils import obs_as_tensor
from stable_baselines3.dqn.policies import MultiInputPolicy as DQNMultiInputPolicy
from stable_baselines3.sac.policies import MultiInputPolicy as SACMultiInputPolicy
from stable_baselines3.td3.policies import MultiInputPolicy as TD3MultiInputPolicy
from wn_init_checks import assert_normalized, preactivations  # tests/wn_init_checks.py

import wn_rl
from wn_rl.sb3 import (
    DataDependentInitCallback,
    WnActorCriticCnnPolicy,
    WnActorCriticPolicy,
    WnCnnPolicy,
    WnCombinedExtractor,
    WnMlpPolicy,
    WnMultiInputActorCriticPolicy,
    WnMultiInputPolicy,
    WnNatureCNN,
    WnQRDQNCnnPolicy,
    WnQRDQNMlpPolicy,
    WnQRDQNMultiInputPolicy,
    WnRecurrentActorCriticCnnPolicy,
    WnRecurrentActorCriticPolicy,
    WnRecurrentMultiInputActorCriticPolicy,
    WnSACCnnPolicy,
    WnSACMultiInputPolicy,
    WnSACPolicy,
    WnTD3CnnPolicy,
    WnTD3MultiInputPolicy,
    WnTD3Policy,
    initialize_policy,
)
from wn_rl.sb3.config import SB3Config, build_policy_kwargs, resolve_policy

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

IMAGE = spaces.Box(0, 255, (3, 36, 36), np.uint8)  # the Nature CNN's smallest input
VECTOR = spaces.Box(-1, 1, (4,), np.float32)
DICT = spaces.Dict(vec=VECTOR, image=IMAGE)  # keys in this order: features are concatenated in it
DISCRETE = spaces.Discrete(3)
CONTINUOUS = spaces.Box(-1, 1, (2,), np.float32)


class ImageAndVector(gym.Env):
    """Random Dict observations of an image and a vector; reward 1 when the (first) action has the sign of
    ``vec[0]``; episodes of 16 steps."""

    observation_space = DICT

    def __init__(self, continuous: bool = False) -> None:
        self.action_space = CONTINUOUS if continuous else DISCRETE
        self._steps = 0
        self._obs: dict[str, np.ndarray] = {}

    def _observe(self) -> dict[str, np.ndarray]:
        image = self.np_random.integers(0, 256, IMAGE.shape, dtype=np.uint8)
        self._obs = {"image": image, "vec": self.np_random.uniform(-1, 1, VECTOR.shape).astype(np.float32)}
        return self._obs

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._steps = 0
        return self._observe(), {}

    def step(self, action):
        first = float(np.asarray(action).reshape(-1)[0])
        sign = first if isinstance(self.action_space, spaces.Box) else first - 1
        reward = float(np.sign(sign) == np.sign(self._obs["vec"][0]))
        self._steps += 1
        return self._observe(), reward, False, self._steps >= 16, {}


def dict_batch(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    return {
        "image": torch.as_tensor(rng.integers(0, 256, (n, *IMAGE.shape), dtype=np.uint8)),
        "vec": torch.as_tensor(rng.uniform(-1, 1, (n, *VECTOR.shape)).astype(np.float32)),
    }


def preprocessed(obs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a policy hands its features extractor (SB3's preprocess_obs): images scaled to [0, 1]."""
    return {"image": obs["image"].float() / 255.0, "vec": obs["vec"]}


# -- the features extractor ---------------------------------------------------------------------------


def test_combined_extractor_has_sb3s_keys_sizes_and_outputs():
    ours, reference = WnCombinedExtractor(DICT, cnn_output_dim=16), CombinedExtractor(DICT, cnn_output_dim=16)
    assert list(ours.extractors) == list(reference.extractors) == ["vec", "image"]
    assert ours.features_dim == reference.features_dim == 16 + 4
    assert isinstance(ours.extractors["image"], WnNatureCNN) and isinstance(ours.extractors["vec"], torch.nn.Flatten)
    assert any(isinstance(m, wn_rl.WNConv2d) for m in ours.modules())
    obs = preprocessed(dict_batch(5))
    assert ours(obs).shape == reference(obs).shape == (5, 20)
    torch.testing.assert_close(ours(obs)[:, :4], obs["vec"])  # the vector passes through, before the image features
    goals = spaces.Dict(observation=VECTOR, achieved_goal=spaces.MultiBinary(3), desired_goal=spaces.Discrete(5))
    assert WnCombinedExtractor(goals).features_dim == CombinedExtractor(goals).features_dim == 4 + 3 + 5


def test_combined_extractor_in_normal_parameterization_is_sb3s():
    ours = WnCombinedExtractor(DICT, cnn_output_dim=16, parameterization="normal")
    reference = CombinedExtractor(DICT, cnn_output_dim=16)
    assert not any(isinstance(m, wn_rl.WNLayer) for m in ours.modules())
    state = {k: v for k, v in ours.state_dict().items() if not k.endswith("initialized")}
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in reference.state_dict().items()}
    reference.load_state_dict(state)
    obs = preprocessed(dict_batch(4))
    with torch.no_grad():
        torch.testing.assert_close(ours(obs), reference(obs), rtol=0, atol=0)


def test_combined_extractor_takes_normalized_images_and_the_policys_options():
    floats = spaces.Dict(image=spaces.Box(0, 1, (3, 36, 36), np.float32), vec=VECTOR)
    assert isinstance(WnCombinedExtractor(floats).extractors["image"], torch.nn.Flatten)  # as SB3: not a uint8 image
    assert isinstance(WnCombinedExtractor(floats, normalized_image=True).extractors["image"], WnNatureCNN)
    kwargs = dict(parameterization="weight_norm+mean_only_bn", init_scale=dict(features=0.5), normalize_images=False)
    policy = WnMultiInputPolicy(floats, DISCRETE, lambda _: 1e-3, **kwargs)
    extractor = policy.q_net.features_extractor
    assert isinstance(extractor, WnCombinedExtractor) and isinstance(extractor.extractors["image"], WnNatureCNN)
    assert any(isinstance(m, wn_rl.MeanOnlyBatchNorm) for m in extractor.modules())
    assert {m.init_scale for m in extractor.modules() if isinstance(m, wn_rl.WNLayer)} == {0.5}


# -- the policies: SB3's defaults, learning, data-dependent init --------------------------------------

REFERENCES = {  # ours, SB3's MultiInputPolicy, action space
    "dqn": (WnMultiInputPolicy, DQNMultiInputPolicy, DISCRETE),
    "qrdqn": (WnQRDQNMultiInputPolicy, QRDQNMultiInputPolicy, DISCRETE),
    "ppo": (WnMultiInputActorCriticPolicy, MultiInputActorCriticPolicy, DISCRETE),
    "ppo-gauss": (WnMultiInputActorCriticPolicy, MultiInputActorCriticPolicy, CONTINUOUS),
    "rppo": (WnRecurrentMultiInputActorCriticPolicy, RecurrentMultiInputActorCriticPolicy, DISCRETE),
    "sac": (WnSACMultiInputPolicy, SACMultiInputPolicy, CONTINUOUS),
    "td3": (WnTD3MultiInputPolicy, TD3MultiInputPolicy, CONTINUOUS),
}


@pytest.mark.parametrize("case", list(REFERENCES))
def test_multi_input_policy_in_normal_parameterization_has_sb3s_default_layers(case):
    ours_class, reference_class, action_space = REFERENCES[case]
    ours = ours_class(DICT, action_space, lambda _: 1e-3, parameterization="normal")
    reference = reference_class(DICT, action_space, lambda _: 1e-3)
    assert ours.net_arch == reference.net_arch
    state = {k: v.shape for k, v in ours.state_dict().items() if not k.endswith("initialized")}
    assert state == {k: v.shape for k, v in reference.state_dict().items()}
    wn = ours_class(DICT, action_space, lambda _: 1e-3)
    assert wn.features_extractor_class is WnCombinedExtractor
    assert any(isinstance(m, WnCombinedExtractor) for m in wn.modules())
    assert not any(type(m) in (torch.nn.Linear, torch.nn.Conv2d) for m in wn.modules())


OFF_POLICY = dict(buffer_size=256, learning_starts=64, batch_size=16, train_freq=4)
SMALL = dict(net_arch=[16], features_extractor_kwargs=dict(cnn_output_dim=16))
# algorithm, policy, continuous actions, hyperparameters, policy_kwargs (pass copies: SAC adds use_sde to them)
CASES = {
    "dqn": (DQN, WnMultiInputPolicy, False, OFF_POLICY, SMALL),
    "qrdqn": (QRDQN, WnQRDQNMultiInputPolicy, False, OFF_POLICY, dict(SMALL, n_quantiles=8)),
    "ppo": (
        PPO,
        WnMultiInputActorCriticPolicy,
        False,
        dict(n_steps=64, batch_size=32, n_epochs=2),
        dict(SMALL, parameterization="weight_norm+mean_only_bn"),  # refreshes its norm statistics from Dict batches
    ),
    "a2c": (A2C, WnMultiInputActorCriticPolicy, True, dict(n_steps=16), SMALL),
    "rppo": (
        RecurrentPPO,
        WnRecurrentMultiInputActorCriticPolicy,
        False,
        dict(n_steps=64, batch_size=32, n_epochs=1),
        dict(SMALL, lstm_hidden_size=8),
    ),
    "sac": (SAC, WnSACMultiInputPolicy, True, OFF_POLICY, SMALL),
    "td3": (TD3, WnTD3MultiInputPolicy, True, OFF_POLICY, SMALL),
}


def init_passes(policy, obs: dict[str, torch.Tensor], actions: torch.Tensor | None, starts=None) -> list:
    """``(network, forward on the init batch)`` of every online network of ``policy``, as it runs in rollouts:
    a recurrent policy's batch as the warm-up's sequences (one per env), its LSTM state carried along them."""
    if isinstance(policy, RecurrentActorCriticPolicy):
        assert starts is not None and starts.shape[0] * starts.shape[1] == len(obs["vec"])
        n, lstm = starts.shape[0], policy.lstm_actor
        zeros = (torch.zeros(lstm.num_layers, n, lstm.hidden_size),) * 2
        flags = starts.float().flatten()
        return [(policy, lambda: policy.forward(obs, RNNStates(zeros, zeros), flags, deterministic=True))]
    if isinstance(policy, ActorCriticPolicy):
        return [(policy, lambda: policy.forward(obs, deterministic=True))]
    if hasattr(policy, "critic"):
        return [(policy.actor, lambda: policy.actor(obs)), (policy.critic, lambda: policy.critic(obs, actions))]
    net = policy.q_net if hasattr(policy, "q_net") else policy.quantile_net
    return [(net, lambda: net(obs))]


class PreactivationsAfterInit(BaseCallback):
    """Records every online network's pre-activations on the init batch as soon as the init has run (on-policy:
    at training start; off-policy: in the step that reaches ``learning_starts``), before any update."""

    def __init__(self, ddi: DataDependentInitCallback) -> None:
        super().__init__()
        self.ddi = ddi
        self.found: list[list] | None = None

    def _record(self) -> None:
        if self.ddi.done and self.found is None:
            ddi = self.ddi
            passes = init_passes(self.model.policy, ddi.init_observations, ddi.init_actions, ddi.init_episode_starts)
            self.found = [preactivations(net, run) for net, run in passes]

    def _on_training_start(self) -> None:
        self._record()

    def _on_step(self) -> bool:
        self._record()
        return True


@pytest.mark.parametrize("case", list(CASES))
def test_multi_input_policy_learns_and_its_init_normalizes_every_layer(case):
    algo, policy, continuous, hyper, policy_kwargs = CASES[case]
    model = algo(policy, ImageAndVector(continuous), policy_kwargs=copy.deepcopy(policy_kwargs), seed=0, **hyper)
    ddi = DataDependentInitCallback(n_samples=64)
    probe = PreactivationsAfterInit(ddi)
    model.learn(200, callback=[ddi, probe])
    assert model.num_timesteps >= 200 and ddi.done and not ddi.skipped
    assert set(ddi.init_observations) == {"image", "vec"} and len(ddi.init_observations["image"]) == 64
    assert wn_rl.is_initialized(model.policy)
    for report in ddi.reports.values():  # every network initialises its own image CNN (4 layers), then its MLPs
        assert sum(".extractors.image." in f".{layer.name}" for layer in report.layers) == 4
    dead = {name: units for report in ddi.reports.values() for name, units in report.dead_units.items()}
    for found in probe.found:
        assert_normalized(found, dead)
    action, _ = model.predict(ImageAndVector(continuous).reset(seed=1)[0], deterministic=True)
    assert model.action_space.contains(action)


@pytest.mark.parametrize("algo", [DQN, SAC])
def test_her_on_a_goal_env_initialises_from_the_her_buffer_and_learns(algo):
    env = BitFlippingEnv(n_bits=4, continuous=algo is SAC)
    model = algo(
        WnMultiInputPolicy if algo is DQN else WnSACMultiInputPolicy,
        env,
        replay_buffer_class=HerReplayBuffer,
        replay_buffer_kwargs=dict(n_sampled_goal=2, goal_selection_strategy="future"),
        policy_kwargs=dict(net_arch=[16]),
        seed=0,
        **OFF_POLICY,
    )
    ddi = DataDependentInitCallback(n_samples=64)
    probe = PreactivationsAfterInit(ddi)
    model.learn(200, callback=[ddi, probe])
    assert isinstance(model.replay_buffer, HerReplayBuffer) and model.num_timesteps >= 200
    assert set(ddi.init_observations) == {"achieved_goal", "desired_goal", "observation"}
    dead = {name: units for report in ddi.reports.values() for name, units in report.dead_units.items()}
    for found in probe.found:
        assert_normalized(found, dead)
    assert model._n_updates > 0  # trained on HER's relabelled goals


def test_init_batch_from_a_dict_replay_buffer_is_the_stored_observations():
    model = DQN(
        WnMultiInputPolicy, ImageAndVector(), seed=0, policy_kwargs=copy.deepcopy(SMALL), gradient_steps=0, **OFF_POLICY
    )
    ddi = DataDependentInitCallback(n_samples=64)
    model.learn(64, callback=ddi)  # learning_starts == n_samples: every warm-up transition, each once
    buffer = model.replay_buffer
    assert isinstance(buffer, DictReplayBuffer)
    for key in ("image", "vec"):
        stored = buffer.observations[key][:64, 0].reshape(64, -1)
        batch = ddi.init_observations[key].reshape(64, -1).numpy()
        assert sorted(map(tuple, batch)) == sorted(map(tuple, stored)), key


# -- save / load ----------------------------------------------------------------------------------------


def initialized_model(case: str):
    """A model of ``case`` initialised by ``initialize_policy`` on random Dict observations (no learning)."""
    algo, policy, continuous, hyper, policy_kwargs = CASES[case]
    kwargs = dict(copy.deepcopy(policy_kwargs), parameterization="weight_norm+mean_only_bn")
    model = algo(policy, ImageAndVector(continuous), policy_kwargs=kwargs, seed=0, **hyper)
    obs = dict_batch(64)
    actions = torch.rand(64, 2) * 2 - 1 if continuous else None
    reports = initialize_policy(model.policy, obs, actions)
    assert reports and all(report.layers and not report.skipped for report in reports.values())
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_multi_input_model_and_policy_save_load_round_trip(case, tmp_path):
    algo = CASES[case][0]
    model = initialized_model(case)
    model.save(tmp_path / "model.zip")
    loaded = algo.load(tmp_path / "model.zip", device="cpu")
    model.policy.save(tmp_path / "policy.pt")
    loaded_policy = type(model.policy).load(tmp_path / "policy.pt", device="cpu")
    state = model.policy.state_dict()
    assert any(k.endswith("running_mean") for k in state) and any(".extractors.image." in f".{k}" for k in state)
    for other in (loaded.policy.state_dict(), loaded_policy.state_dict()):
        assert other.keys() == state.keys()
        for key, tensor in state.items():
            assert torch.equal(other[key], tensor), key
    assert wn_rl.is_initialized(loaded.policy) and wn_rl.is_initialized(loaded_policy)
    obs = {key: value.numpy() for key, value in dict_batch(8, seed=1).items()}
    expected, _ = model.predict(obs, deterministic=True)
    for other in (loaded, loaded_policy):
        got, _ = other.predict(obs, deterministic=True)
        np.testing.assert_array_equal(got, expected)
    if not isinstance(model.policy, RecurrentActorCriticPolicy) and hasattr(model.policy, "predict_values"):
        with torch.no_grad():
            torch.testing.assert_close(
                loaded.policy.predict_values(obs_as_tensor(obs, "cpu")),
                model.policy.predict_values(obs_as_tensor(obs, "cpu")),
                rtol=0,
                atol=0,
            )


# -- observation spaces that do not fit -----------------------------------------------------------------

FAMILIES = [  # multi-input, vector and image policy of each family, and its action space
    (WnMultiInputPolicy, WnMlpPolicy, WnCnnPolicy, DISCRETE),
    (WnQRDQNMultiInputPolicy, WnQRDQNMlpPolicy, WnQRDQNCnnPolicy, DISCRETE),
    (WnMultiInputActorCriticPolicy, WnActorCriticPolicy, WnActorCriticCnnPolicy, DISCRETE),
    (
        WnRecurrentMultiInputActorCriticPolicy,
        WnRecurrentActorCriticPolicy,
        WnRecurrentActorCriticCnnPolicy,
        DISCRETE,
    ),
    (WnSACMultiInputPolicy, WnSACPolicy, WnSACCnnPolicy, CONTINUOUS),
    (WnTD3MultiInputPolicy, WnTD3Policy, WnTD3CnnPolicy, CONTINUOUS),
]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family[0].__name__)
def test_each_policy_names_the_policy_that_fits_the_observation_space(family):
    multi, vector, image, action_space = family
    multi_name, vector_name, image_name = multi.__name__, vector.__name__, image.__name__
    with pytest.raises(ValueError, match=rf"{multi_name} needs Dict observations.*Use {vector_name} for vector"):
        multi(VECTOR, action_space, lambda _: 1e-3)
    with pytest.raises(ValueError, match=rf"{multi_name} needs Dict observations.*Use {image_name} for image"):
        multi(IMAGE, action_space, lambda _: 1e-3)
    with pytest.raises(ValueError, match=rf"{vector_name} flattens one array.*use {multi_name}"):
        vector(DICT, action_space, lambda _: 1e-3)
    with pytest.raises(ValueError, match=rf"{image_name} needs image observations.*Use {multi_name} for Dict"):
        image(DICT, action_space, lambda _: 1e-3)


def test_extractor_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"WnCombinedExtractor needs Dict observations.*Use WnNatureCNN for image"):
        WnCombinedExtractor(IMAGE)
    with pytest.raises(ValueError, match=r"No SB3 policy takes Tuple observations"):
        WnCombinedExtractor(spaces.Tuple((VECTOR, IMAGE)))
    with pytest.raises(ValueError, match=r"Use WnCombinedExtractor for Dict observations"):
        WnNatureCNN(DICT)
    small = spaces.Dict(image=spaces.Box(0, 255, (3, 10, 10), np.uint8), vec=VECTOR)
    with pytest.raises(ValueError, match=r"observation key 'image': WnNatureCNN needs .* at least 36x36"):
        WnCombinedExtractor(small)


def test_configs_name_the_multi_input_policies_and_the_extractor():
    assert resolve_policy("sac", "WnSACMultiInputPolicy") is WnSACMultiInputPolicy
    kwargs = dict(features_extractor_class="WnCombinedExtractor")
    config = SB3Config(
        algo="ppo",
        env_id="CartPole-v1",
        policy="WnMultiInputActorCriticPolicy",
        total_timesteps=1,
        policy_kwargs=kwargs,
    )
    assert build_policy_kwargs(config)["features_extractor_class"] is WnCombinedExtractor
