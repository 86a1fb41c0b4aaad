"""torch's default init of SB3 policies (``wn_rl.sb3.torch_default_init_policy``, ``init.method=torch_default`` in
scripts/train_sb3.py): the data-dependent-init ablation. A ``normal`` and a ``weight_norm`` policy drawn with one
seed start as the same function, the targets start as their online networks, and a run starts from exactly that
init (a resumed run keeps its weights)."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from stable_baselines3 import DQN, PPO, SAC, TD3
from stable_baselines3.common.callbacks import BaseCallback

from wn_rl.config import ConfigError
from wn_rl.sb3 import (
    UninitializedPolicyWarning,
    WnActorCriticPolicy,
    WnMlpPolicy,
    WnSACPolicy,
    WnTD3Policy,
    online_networks,
    torch_default_init_policy,
)
from wn_rl.sb3.config import load_sb3_config
from wn_rl.sb3.runner import SB3Run

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "sb3"
SMALL = ["progress_bar=false", "verbose=0", "eval.freq=0", "checkpoint_freq=0", "policy_kwargs.net_arch=[16]"]


def build(algo: str, parameterization: str):
    kwargs = dict(net_arch=[16, 16], parameterization=parameterization)
    if algo == "dqn":
        return DQN(WnMlpPolicy, "CartPole-v1", learning_starts=0, seed=0, policy_kwargs=kwargs)
    if algo == "ppo":
        return PPO(WnActorCriticPolicy, "Pendulum-v1", n_steps=64, batch_size=64, seed=0, policy_kwargs=kwargs)
    if algo == "sac":
        return SAC(WnSACPolicy, "Pendulum-v1", learning_starts=0, seed=0, policy_kwargs=kwargs)
    return TD3(WnTD3Policy, "Pendulum-v1", learning_starts=0, seed=0, policy_kwargs=kwargs)


def outputs(model, obs: torch.Tensor) -> list[torch.Tensor]:
    """Every output of the policy that does not sample: Q-values, action means / log stds and values."""
    policy = model.policy
    with torch.no_grad():
        if isinstance(model, DQN):
            return [policy.q_net(obs)]
        if isinstance(model, PPO):
            distribution = policy.get_distribution(obs).distribution
            return [distribution.mean, distribution.stddev, policy.predict_values(obs)]
        actions = torch.rand(len(obs), 1, generator=torch.Generator().manual_seed(2)) * 4 - 2  # Pendulum's range
        critic = list(policy.critic(obs, actions))
        if isinstance(model, SAC):
            mean, log_std, _ = policy.actor.get_action_dist_params(obs)
            return [mean, log_std, *critic]
        return [policy.actor(obs), *critic]


def observations(model, n: int = 64) -> torch.Tensor:
    torch.manual_seed(1)
    low = torch.as_tensor(model.observation_space.low).clamp(min=-3)
    high = torch.as_tensor(model.observation_space.high).clamp(max=3)
    return low + (high - low) * torch.rand(n, *low.shape)


@pytest.mark.parametrize("algo", ["dqn", "ppo", "sac", "td3"])
def test_normal_and_weight_norm_policies_drawn_with_one_seed_start_as_one_function(algo):
    normal, wn = build(algo, "normal"), build(algo, "weight_norm")
    obs = observations(normal)
    fresh = outputs(wn, obs)
    layers = {}
    for model in (normal, wn):
        layers[model] = torch_default_init_policy(model.policy, generator=torch.Generator().manual_seed(3))
    assert layers[normal] == layers[wn] and all(layers[wn].values())
    assert set(layers[wn]) == set(online_networks(wn.policy))
    for a, b in zip(outputs(normal, obs), outputs(wn, obs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(outputs(wn, obs)[0], fresh[0])  # the init changed the function
    other = build(algo, "weight_norm")
    torch_default_init_policy(other.policy, generator=torch.Generator().manual_seed(4))
    assert not torch.allclose(outputs(other, obs)[0], outputs(wn, obs)[0])  # another seed, another start


@pytest.mark.parametrize("algo", ["dqn", "sac", "td3"])
def test_the_targets_start_as_their_online_networks(algo):
    model = build(algo, "weight_norm")
    policy = model.policy
    pairs = {"dqn": [("q_net_target", "q_net")], "sac": [("critic_target", "critic")]}
    pairs["td3"] = [("actor_target", "actor"), ("critic_target", "critic")]
    torch_default_init_policy(policy, generator=torch.Generator().manual_seed(0))
    for target, online in pairs[algo]:
        online_state, target_state = getattr(policy, online).state_dict(), getattr(policy, target).state_dict()
        assert online_state.keys() == target_state.keys()
        for key, value in online_state.items():
            assert torch.equal(value, target_state[key]), f"{target}.{key}"


def test_sb3_own_policy_gets_torch_init_instead_of_its_orthogonal_init():
    model = PPO("MlpPolicy", "Pendulum-v1", n_steps=64, batch_size=64, seed=0, policy_kwargs=dict(net_arch=[16]))
    head = model.policy.action_net.weight
    assert head.abs().max() < 0.05  # SB3's orthogonal init with gain 0.01
    torch_default_init_policy(model.policy, generator=torch.Generator().manual_seed(0))
    bound = 1 / 16**0.5
    assert head.abs().max() <= bound and head.abs().max() > 0.5 * bound  # U(-1/sqrt(fan_in), 1/sqrt(fan_in))


def test_a_disabled_init_takes_no_method():
    with pytest.raises(ConfigError, match=r"init.method='torch_default' is invalid: .*set init.enabled=true"):
        load_sb3_config(CONFIGS / "dqn_cartpole_wn.yaml", ["init.enabled=false", "init.method=torch_default"])
    with pytest.raises(
        ConfigError, match=r"init.method: 'orthogonal' is not one of \['data_dependent', 'torch_default'\]"
    ):
        load_sb3_config(CONFIGS / "dqn_cartpole_wn.yaml", ["init.method=orthogonal"])


def test_torch_default_needs_no_init_batch_from_the_replay():
    overrides = ["hyperparameters.learning_starts=10", "init.n_samples=256"]
    with pytest.raises(ConfigError, match=r"learning_starts >= 256"):
        load_sb3_config(CONFIGS / "sac_pendulum_wn.yaml", overrides)
    config = load_sb3_config(CONFIGS / "sac_pendulum_wn.yaml", [*overrides, "init.method=torch_default"])
    assert config.init.method == "torch_default" and not config.init.data_dependent


class _StartState(BaseCallback):
    """The policy's state_dict when training starts, and the callbacks it trains with."""

    def __init__(self, callbacks: list[BaseCallback]) -> None:
        super().__init__()
        self.names = [type(c).__name__ for c in callbacks]
        self.state: dict[str, torch.Tensor] = {}
        self.model_copy = None

    def _on_training_start(self) -> None:
        self.state = {k: v.clone() for k, v in self.model.policy.state_dict().items()}
        self.model_copy = copy.deepcopy(self.model.policy)

    def _on_step(self) -> bool:
        return True


def test_a_run_starts_from_torch_init_drawn_from_its_seed_and_a_resume_keeps_its_weights(tmp_path, monkeypatch):
    overrides = [*SMALL, f"runs_dir={tmp_path}", "total_timesteps=64", "init.method=torch_default", "seed=5"]
    overrides += ["hyperparameters.learning_starts=16", "hyperparameters.train_freq=4"]
    config = load_sb3_config(CONFIGS / "dqn_cartpole_wn.yaml", overrides)
    run_dir = tmp_path / "run"
    starts: list[_StartState] = []

    def train(run: SB3Run) -> None:
        callbacks = run._callbacks

        def watched(model):
            listed = callbacks(model)
            starts.append(_StartState(listed))
            return [*listed, starts[-1]]

        monkeypatch.setattr(run, "_callbacks", watched)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run.train()
        assert not [w for w in caught if issubclass(w.category, UninitializedPolicyWarning)]

    train(SB3Run(config, run_dir))
    first = starts[0]
    assert "DataDependentInitCallback" not in first.names
    expected = copy.deepcopy(first.model_copy)
    torch_default_init_policy(expected, generator=torch.Generator().manual_seed(5))
    for key, value in expected.state_dict().items():
        assert torch.equal(first.state[key], value), key  # the seed's draws, the target synced
    assert not torch.allclose(first.state["q_net.q_net.0.g"], torch.ones(16))  # g = ||w||, not the fresh g = 1

    trained = DQN.load(run_dir / "final_model.zip", device="cpu").policy.state_dict()
    assert any(not torch.equal(trained[key], value) for key, value in first.state.items())  # it learned
    resumed = load_sb3_config(run_dir / "config.yaml", ["total_timesteps=128", "progress_bar=false"])
    train(SB3Run(resumed, run_dir, resume=True))
    for key, value in trained.items():
        assert torch.equal(starts[1].state[key], value), key  # not drawn again


def test_action_noise_is_refused_where_actions_are_discrete():
    with pytest.raises(ConfigError, match=r"action_noise_std=0.1 is invalid: expected 0 for algo=dqn"):
        load_sb3_config(CONFIGS / "dqn_cartpole_wn.yaml", ["action_noise_std=0.1"])
    assert load_sb3_config(CONFIGS / "td3_pendulum_wn.yaml", ["action_noise_std=0.1"]).action_noise_std == 0.1
