"""Trained wn_rl.sb3 policies are deep-copyable and picklable (self-play and population methods copy policies).

SB3's distribution objects keep the last forward's torch distribution (and gSDE its exploration matrices), built
from tensors in the autograd graph, which ``copy.deepcopy`` refuses; a copy gets them detached, the original
keeps them as they are."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from sb3_contrib import TQC, MaskablePPO, RecurrentPPO
from sb3_contrib.common.envs import InvalidActionEnvDiscrete
from stable_baselines3 import A2C, PPO, SAC, TD3
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.distributions import Distribution

from wn_rl.sb3 import (
    DataDependentInitCallback,
    WnActorCriticPolicy,
    WnMaskableActorCriticPolicy,
    WnRecurrentActorCriticPolicy,
    WnSACPolicy,
    WnTD3Policy,
    WnTQCPolicy,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

N_SAMPLES = 32  # init batch; also the off-policy learning_starts, so the init runs before the first update
STEPS = 64  # agent steps per learn() call
ON_POLICY = dict(n_steps=32, batch_size=32, n_epochs=1)
OFF_POLICY = dict(learning_starts=N_SAMPLES, buffer_size=256, batch_size=16)
SMALL = dict(net_arch=[16])  # copied per model: SB3 writes use_sde into the policy_kwargs it is given
MODELS: dict[str, Callable[[], BaseAlgorithm]] = {
    "ppo": lambda: PPO(WnActorCriticPolicy, "CartPole-v1", policy_kwargs=dict(SMALL), **ON_POLICY),
    "a2c": lambda: A2C(WnActorCriticPolicy, "CartPole-v1", n_steps=8, policy_kwargs=dict(SMALL)),
    "ppo-gsde": lambda: PPO(WnActorCriticPolicy, "Pendulum-v1", use_sde=True, policy_kwargs=dict(SMALL), **ON_POLICY),
    "sac": lambda: SAC(WnSACPolicy, "Pendulum-v1", policy_kwargs=dict(SMALL), **OFF_POLICY),
    "sac-gsde": lambda: SAC(WnSACPolicy, "Pendulum-v1", use_sde=True, policy_kwargs=dict(SMALL), **OFF_POLICY),
    "td3": lambda: TD3(WnTD3Policy, "Pendulum-v1", policy_kwargs=dict(SMALL), **OFF_POLICY),
    "tqc": lambda: TQC(WnTQCPolicy, "Pendulum-v1", policy_kwargs=dict(SMALL, n_quantiles=5), **OFF_POLICY),
    "recurrent-ppo": lambda: RecurrentPPO(
        WnRecurrentActorCriticPolicy, "CartPole-v1", policy_kwargs=dict(SMALL, lstm_hidden_size=8), **ON_POLICY
    ),
    "maskable-ppo": lambda: MaskablePPO(
        WnMaskableActorCriticPolicy,
        InvalidActionEnvDiscrete(dim=10, n_invalid_actions=3),
        policy_kwargs=dict(SMALL),
        **ON_POLICY,
    ),
}


def trained(name: str) -> BaseAlgorithm:
    """A model of ``MODELS[name]`` after a short ``learn`` with data-dependent init. SAC's and TQC's updates end
    with a no-grad forward of the actor (the TD target), so one forward with gradients is added, as the actor
    loss of the next update makes."""
    torch.manual_seed(0)
    model = MODELS[name]()
    model.set_random_seed(0)
    model.learn(STEPS, callback=DataDependentInitCallback(n_samples=N_SAMPLES))
    actor = getattr(model.policy, "actor", None)
    if hasattr(actor, "action_log_prob"):
        actor.action_log_prob(model.policy.obs_to_tensor(model.env.reset())[0])
    return model


def distributions(policy: torch.nn.Module) -> Iterator[Distribution]:
    """The SB3 distribution objects held by ``policy`` and its submodules."""
    for module in policy.modules():
        yield from (value for value in vars(module).values() if isinstance(value, Distribution))


def held_tensors(value: object) -> Iterator[torch.Tensor]:
    """The tensors an SB3 distribution holds: its own, and its torch distributions' (lists of them included)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from held_tensors(item)
    elif isinstance(value, (Distribution, torch.distributions.Distribution)):
        for item in vars(value).values():
            yield from held_tensors(item)


def actions(policy: torch.nn.Module, observations: np.ndarray, deterministic: bool) -> np.ndarray:
    torch.manual_seed(1)  # the same draw for the original and its copy
    return policy.predict(observations, deterministic=deterministic)[0]


def assert_same_state(policy: torch.nn.Module, clone: torch.nn.Module) -> None:
    """Equal distribution state, detached in the copy; parameters equal in value, distinct objects."""
    assert type(clone) is type(policy)
    for original, copied in zip(distributions(policy), distributions(clone), strict=True):
        assert copied is not original
        for a, b in zip(held_tensors(original), held_tensors(copied), strict=True):
            assert b.grad_fn is None and torch.equal(a, b)
    for a, b in zip(policy.parameters(), clone.parameters(), strict=True):
        assert b is not a and b.data_ptr() != a.data_ptr() and torch.equal(a, b)


def assert_same_actions(policy: torch.nn.Module, clone: torch.nn.Module, observations: np.ndarray) -> None:
    """Deterministic actions, and stochastic ones drawn with the same seed (gSDE: the same exploration matrix)."""
    clone.set_training_mode(False)
    for deterministic in (True, False):
        np.testing.assert_array_equal(
            actions(clone, observations, deterministic), actions(policy, observations, deterministic)
        )


@pytest.mark.parametrize("name", sorted(MODELS))
def test_trained_policy_copies_act_the_same_and_leave_the_original_training(name):
    """deepcopy and pickle of a trained policy whose distributions hold graph tensors (TD3: none) act as it
    does; the original keeps its objects and trains on."""
    model = trained(name)
    policy = model.policy
    held = [(dist, dict(vars(dist))) for dist in distributions(policy)]
    in_graph = [t for dist, _ in held for t in held_tensors(dist) if t.grad_fn is not None]
    assert in_graph or name == "td3"
    weights = {key: value.clone() for key, value in policy.state_dict().items()}
    model.observation_space.seed(0)
    observations = np.stack([model.observation_space.sample() for _ in range(4)])

    clones = [copy.deepcopy(policy), pickle.loads(pickle.dumps(policy))]
    for dist, state in held:  # the original keeps its own objects, graph included
        assert vars(dist).keys() == state.keys() and all(vars(dist)[key] is value for key, value in state.items())
    assert all(t.grad_fn is not None for t in in_graph)
    for clone in clones:
        assert_same_state(policy, clone)
    for clone in clones:
        assert_same_actions(policy, clone, observations)
    assert all(torch.equal(value, weights[key]) for key, value in policy.state_dict().items())
    model.learn(STEPS, reset_num_timesteps=False)
    assert any(not torch.equal(value, weights[key]) for key, value in policy.state_dict().items())


def test_copy_keeps_shared_objects_shared():
    """One copy per object, as deepcopy does: a copy of the model (SAC: ``model.actor`` is ``model.policy.actor``)
    keeps the alias, and the copied actor's distribution is the policy copy's."""
    model = trained("sac-gsde")
    clone = copy.deepcopy({"policy": model.policy, "actor": model.actor})
    assert clone["actor"] is clone["policy"].actor is not model.actor
    assert clone["actor"].action_dist is not model.actor.action_dist


@pytest.mark.parametrize("name", ["sac-gsde", "tqc"])
def test_the_actor_copied_on_its_own_or_first_acts_the_same(name):
    """``copy.deepcopy(model.actor)`` after a forward with gradients, and a copy that reaches the actor before
    the policy, work as the policy's copy does."""
    model = trained(name)
    model.observation_space.seed(0)
    observations = torch.as_tensor(np.stack([model.observation_space.sample() for _ in range(4)]))
    model.actor.action_log_prob(observations)  # a forward with gradients: the distribution is in the graph
    actor = copy.deepcopy(model.actor)
    assert actor is not model.actor
    for a, b in zip(distributions(model.actor), distributions(actor), strict=True):
        for x, y in zip(held_tensors(a), held_tensors(b), strict=True):
            assert y.grad_fn is None and torch.equal(x, y)
    clone = copy.deepcopy({"actor": model.actor, "policy": model.policy})
    assert clone["actor"] is clone["policy"].actor
    with torch.no_grad():
        torch.testing.assert_close(
            actor(observations, deterministic=True), model.actor(observations, deterministic=True)
        )


@pytest.mark.parametrize("name", ["ppo-gsde", "sac", "recurrent-ppo", "maskable-ppo"])
def test_a_whole_trained_model_copies_and_its_copy_trains_on_its_own(name):
    """``copy.deepcopy(model)`` (the algorithm with its env, buffers and optimizers; population methods copy
    models whole) acts as the original and learns without touching it."""
    model = trained(name)
    clone = copy.deepcopy(model)
    assert clone.policy is not model.policy
    assert_same_state(model.policy, clone.policy)
    model.observation_space.seed(0)
    observations = np.stack([model.observation_space.sample() for _ in range(4)])
    assert_same_actions(model.policy, clone.policy, observations)
    weights = {key: value.clone() for key, value in model.policy.state_dict().items()}
    clone.learn(STEPS, reset_num_timesteps=False)
    assert any(not torch.equal(value, weights[key]) for key, value in clone.policy.state_dict().items())
    assert all(torch.equal(value, weights[key]) for key, value in model.policy.state_dict().items())
