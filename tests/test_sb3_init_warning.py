"""UninitializedPolicyWarning: a WN policy that starts training without data-dependent init (section 3)
warns once, and only then (not with the callback, after loading an initialised model, after an init by
hand, or without WN / mean-only batch-norm layers)."""

from __future__ import annotations

import copy
import pickle
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from stable_baselines3 import A2C, DQN, PPO, SAC
from stable_baselines3.common.utils import obs_as_tensor

import wn_rl
import wn_rl.sb3.common
from wn_rl.sb3 import (
    DataDependentInitCallback,
    UninitializedPolicyWarning,
    WnActorCriticPolicy,
    WnMlpPolicy,
    WnSACPolicy,
    initialize_policy,
)
from wn_rl.sb3.config import load_sb3_config
from wn_rl.sb3.init import policy_is_initialized
from wn_rl.sb3.runner import SB3Run

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

ROOT = Path(__file__).resolve().parents[1]
N_SAMPLES = 32  # the init batch: small, so the off-policy warm-up (learning_starts) stays short


@contextmanager
def recorded() -> Iterator[list[warnings.WarningMessage]]:
    """Every UninitializedPolicyWarning issued inside the block, whatever the filters outside."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found: list[warnings.WarningMessage] = []
        yield found
    found.extend(w for w in caught if issubclass(w.category, UninitializedPolicyWarning))


def ppo(**policy_kwargs):
    kwargs = dict(net_arch=[16], **policy_kwargs)
    return PPO(WnActorCriticPolicy, "CartPole-v1", n_steps=64, batch_size=64, n_epochs=1, seed=0, policy_kwargs=kwargs)


def a2c():
    return A2C(WnActorCriticPolicy, "CartPole-v1", n_steps=8, seed=0, policy_kwargs=dict(net_arch=[16]))


def dqn():
    kwargs = dict(net_arch=[16])
    return DQN(WnMlpPolicy, "CartPole-v1", learning_starts=N_SAMPLES, train_freq=4, seed=0, policy_kwargs=kwargs)


def sac():
    return SAC(WnSACPolicy, "Pendulum-v1", learning_starts=N_SAMPLES, seed=0, policy_kwargs=dict(net_arch=[16]))


MODELS: dict[str, tuple[Callable, int]] = {  # a model and a budget that calls train() more than once
    "ppo": (ppo, 192),
    "a2c": (a2c, 48),
    "dqn": (dqn, 64),
    "sac": (sac, 40),
}


def train_calls(model) -> int:
    """How many times ``train()`` ran: PPO counts epochs, A2C and off-policy algorithms gradient steps."""
    return model._n_updates // (model.n_epochs if isinstance(model, PPO) else 1)


@pytest.mark.parametrize("name", ["ppo", "dqn", "sac"])
def test_training_without_init_warns_once(name):
    make, steps = MODELS[name]
    model = make()
    with recorded() as found:
        model.learn(steps)
    assert train_calls(model) >= 2
    assert len(found) == 1, [str(w.message) for w in found]
    assert found[0].filename == __file__  # the user's learn(), not a line inside wn_rl or SB3
    message = str(found[0].message)
    assert type(model.policy).__name__ in message and "init_scale" in message
    assert "callback=wn_rl.sb3.DataDependentInitCallback()" in message
    assert "data_dependent_init" in message and "UninitializedPolicyWarning" in message
    with recorded() as found:  # a second learn() with the same policy stays silent
        model.learn(steps)
    assert found == []


@pytest.mark.parametrize("name", sorted(MODELS))
def test_training_with_the_callback_does_not_warn(name):
    make, steps = MODELS[name]
    model = make()
    with recorded() as found:
        model.learn(steps, callback=DataDependentInitCallback(n_samples=N_SAMPLES))
    assert train_calls(model) >= 2 and policy_is_initialized(model.policy)
    assert found == []


def test_a_model_loaded_from_an_initialised_one_does_not_warn(tmp_path):
    model = ppo()
    model.learn(64, callback=DataDependentInitCallback(n_samples=N_SAMPLES))
    model.save(tmp_path / "model")
    loaded = PPO.load(tmp_path / "model", env=model.get_env())
    assert policy_is_initialized(loaded.policy)
    with recorded() as found:
        loaded.learn(128)
    assert train_calls(loaded) >= 2 and found == []


HAND_INITS = {
    "initialize_policy": initialize_policy,
    "data_dependent_init of the q_net": lambda policy, batch: wn_rl.data_dependent_init(policy.q_net, batch),
}


@pytest.mark.parametrize("init", HAND_INITS.values(), ids=HAND_INITS.keys())
def test_an_init_by_hand_does_not_warn(init):
    model = dqn()
    observations = obs_as_tensor(model.env.reset(), model.policy.device)
    init(model.policy, torch.cat([observations] * N_SAMPLES) + torch.randn(N_SAMPLES, 4))
    with recorded() as found:
        model.learn(64)
    assert found == []


def test_parameterization_normal_does_not_warn():
    model = ppo(parameterization="normal")
    with recorded() as found:
        model.learn(128)
    assert train_calls(model) >= 2 and found == []


@pytest.mark.parametrize(
    "parameterization,warns",
    [
        ("weight_norm", True),
        ("weight_norm+mean_only_bn", True),
        ("mean_only_bn", True),
        ("normal", False),
        ("batch_norm", False),
        ("layer_norm", False),
    ],
)
def test_only_wn_or_mean_only_bn_layers_need_the_init(parameterization, warns):
    policy = ppo(parameterization=parameterization).policy
    with recorded() as found:
        policy.set_training_mode(True)
    assert len(found) == int(warns)


def test_the_decision_is_taken_once_per_policy(monkeypatch):
    calls = []
    check = wn_rl.sb3.common.lacks_data_dependent_init
    monkeypatch.setattr(wn_rl.sb3.common, "lacks_data_dependent_init", lambda policy: calls.append(1) or check(policy))
    policy, other = ppo().policy, ppo().policy
    with recorded() as found:
        for _ in range(3):
            policy.set_training_mode(True)
            policy.set_training_mode(False)
        other.set_training_mode(True)
    assert len(calls) == 2 and len(found) == 2  # one scan and one warning per policy object


def test_copies_pickle_and_decide_from_their_own_flags(tmp_path):
    model = ppo()
    policy = model.policy
    with recorded() as found:
        policy.set_training_mode(True)
    assert len(found) == 1
    observation = torch.as_tensor(model.env.reset())
    for clone in (copy.deepcopy(policy), pickle.loads(pickle.dumps(policy))):
        logits = clone.get_distribution(observation).distribution.logits
        assert torch.equal(logits, policy.get_distribution(observation).distribution.logits)
        with recorded() as found:
            clone.set_training_mode(True)
        assert len(found) == 1  # a copy of a fresh policy is fresh too
    initialize_policy(policy, torch.randn(N_SAMPLES, 4))
    policy.save(tmp_path / "policy.pt")
    for clone in (
        copy.deepcopy(policy),
        pickle.loads(pickle.dumps(policy)),
        WnActorCriticPolicy.load(tmp_path / "policy.pt"),
    ):
        with recorded() as found:
            clone.set_training_mode(True)
        assert found == [], type(clone).__name__


@pytest.mark.parametrize("init_enabled", [True, False])
def test_train_sb3_runs_do_not_warn(tmp_path, init_enabled):
    """scripts/train_sb3.py adds the callback, or (init.enabled=false) trains from the fresh init on purpose."""
    overrides = [
        f"runs_dir={tmp_path}",
        "progress_bar=false",
        "total_timesteps=128",
        f"init.enabled={str(init_enabled).lower()}",
        f"init.n_samples={N_SAMPLES}",
        f"hyperparameters.learning_starts={N_SAMPLES}",
        "hyperparameters.train_freq=16",
        "hyperparameters.gradient_steps=1",
        "policy_kwargs.net_arch=[16]",
        "eval.freq=1000",
        "eval.episodes=1",
    ]
    config = load_sb3_config(ROOT / "configs" / "sb3" / "dqn_cartpole_wn.yaml", overrides)
    with recorded() as found:
        SB3Run(config, tmp_path / "run").train()
    assert not found


@pytest.mark.parametrize("name", sorted(MODELS))
def test_allow_fresh_init_silences_that_policy_object_only(name):
    """The fresh init on purpose, told to the policy (SAC: its actor and critics train through it), not to the
    process's warning filters; a copy decides afresh from its flags."""
    make, steps = MODELS[name]
    model = make()
    model.policy.allow_fresh_init()
    clone = copy.deepcopy(model.policy)
    with recorded() as found:
        model.learn(steps)
    assert train_calls(model) >= 2 and found == []
    with recorded() as found:
        clone.set_training_mode(True)
    assert len(found) == 1


@pytest.mark.parametrize("extractor", ["NatureCNN", "CombinedExtractor"])
def test_a_wn_policy_with_sb3s_plain_extractor_takes_the_init_and_loads(tmp_path, extractor):
    """SB3's own extractors inside a wn_rl policy: their plain layers carry init flags from the start, so the
    callback initialises them (the paper's plain baseline) instead of skipping the whole policy."""
    from stable_baselines3.common.envs import FakeImageEnv, SimpleMultiObsEnv
    from stable_baselines3.common.torch_layers import CombinedExtractor, NatureCNN

    from wn_rl.sb3 import WnActorCriticCnnPolicy, WnMultiInputActorCriticPolicy
    from wn_rl.sb3.init import has_init_flags

    if extractor == "NatureCNN":
        env, policy = FakeImageEnv(screen_height=40, screen_width=40, n_channels=1), WnActorCriticCnnPolicy
        kwargs = dict(features_extractor_class=NatureCNN)
    else:
        env, policy = SimpleMultiObsEnv(random_start=True), WnMultiInputActorCriticPolicy
        kwargs = dict(features_extractor_class=CombinedExtractor, features_extractor_kwargs=dict(cnn_output_dim=16))
    model = PPO(policy, env, n_steps=N_SAMPLES, batch_size=N_SAMPLES, n_epochs=1, seed=0, policy_kwargs=kwargs)
    assert type(model.policy.features_extractor).__name__ == extractor and has_init_flags(model.policy)
    layers = wn_rl.init.initializable_layers(model.policy.features_extractor)
    before = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    with recorded() as warned:
        model.learn(N_SAMPLES, callback=DataDependentInitCallback(n_samples=N_SAMPLES))
    assert not warned and policy_is_initialized(model.policy)
    assert all(not torch.equal(layer.weight, before[name]) for name, layer in layers.items())  # rescaled
    model.save(tmp_path / "model.zip")
    loaded = PPO.load(tmp_path / "model.zip")
    assert policy_is_initialized(loaded.policy)
