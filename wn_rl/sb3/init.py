"""Data-dependent initialization (paper section 3) of SB3 policies: which networks are online,
how each one is run on an init batch, and how target networks are synced afterwards.

Works for every wn_rl SB3 policy (any parameterization) by dispatching on SB3's base policy classes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch as th
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from sb3_contrib.common.recurrent.type_aliases import RNNStates
from sb3_contrib.qrdqn.policies import QRDQNPolicy
from sb3_contrib.tqc.policies import Critic as TQCCritic
from sb3_contrib.tqc.policies import TQCPolicy
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy, ContinuousCritic
from stable_baselines3.dqn.policies import DQNPolicy
from stable_baselines3.sac.policies import SACPolicy
from stable_baselines3.td3.policies import TD3Policy
from torch import nn

from wn_rl.batches import check_tensor_batch
from wn_rl.default_init import torch_default_init
from wn_rl.init import InitReport, data_dependent_init, initializable_layers, is_initialized

__all__ = [
    "initialize_policy",
    "network_passes",
    "online_networks",
    "policy_is_initialized",
    "sync_target_networks",
    "torch_default_init_policy",
]

Forward = Callable[[nn.Module, Any], Any]

_SUPPORTED = (ActorCriticPolicy, MaskableActorCriticPolicy, DQNPolicy, QRDQNPolicy, SACPolicy, TD3Policy, TQCPolicy)
_ACTOR_CRITIC = (ActorCriticPolicy, MaskableActorCriticPolicy)  # one module holds actor and critic (on-policy)
_SQUASHED_GAUSSIAN = (SACPolicy, TQCPolicy)  # a SAC actor and critic with one target each


def _check_policy(policy: Any) -> None:
    """Refuse, before anything runs, a ``policy`` argument that is no supported SB3 policy (an algorithm such as
    ``DQN(...)`` itself, None)."""
    if isinstance(policy, _SUPPORTED):
        return
    if isinstance(policy, BaseAlgorithm):
        raise TypeError(
            f"got a {type(policy).__name__} algorithm, where its policy is expected: pass model.policy (the "
            "algorithm's policy holds the networks)"
        )
    raise TypeError(
        f"{type(policy).__name__} is not supported: expected a policy of PPO/A2C/TRPO/RecurrentPPO "
        f"(ActorCriticPolicy), MaskablePPO, DQN, QR-DQN, SAC, TD3 or TQC, e.g. wn_rl.sb3.WnCnnPolicy"
    )


def online_networks(policy: BasePolicy) -> dict[str, nn.Module]:
    """The networks of ``policy`` that act or are trained (targets excluded), by name."""
    _check_policy(policy)
    if isinstance(policy, _ACTOR_CRITIC):
        return {"policy": policy}
    if isinstance(policy, DQNPolicy):
        return {"q_net": policy.q_net}
    if isinstance(policy, QRDQNPolicy):
        return {"quantile_net": policy.quantile_net}
    return {"actor": policy.actor, "critic": policy.critic}  # SAC, TD3, TQC


def _target_pairs(policy: BasePolicy) -> list[tuple[str, nn.Module, nn.Module]]:
    if isinstance(policy, DQNPolicy):
        return [("q_net_target", policy.q_net_target, policy.q_net)]
    if isinstance(policy, QRDQNPolicy):
        return [("quantile_net_target", policy.quantile_net_target, policy.quantile_net)]
    if isinstance(policy, TD3Policy):
        return [
            ("actor_target", policy.actor_target, policy.actor),
            ("critic_target", policy.critic_target, policy.critic),
        ]
    if isinstance(policy, _SQUASHED_GAUSSIAN):
        return [("critic_target", policy.critic_target, policy.critic)]
    return []


def sync_target_networks(policy: BasePolicy) -> list[str]:
    """Copy every online network into its target (parameters, running means and ``initialized``
    flags alike); returns the names of the targets synced."""
    _check_policy(policy)
    pairs = _target_pairs(policy)
    for _, target, online in pairs:
        target.load_state_dict(online.state_dict())
    return [name for name, _, _ in pairs]


def torch_default_init_policy(policy: BasePolicy, *, generator: th.Generator | None = None) -> dict[str, list[str]]:
    """torch's default init (:func:`wn_rl.torch_default_init`) of every online network of ``policy``, in
    :func:`online_networks` order, then every target network synced to its online network: the start that
    isolates weight norm's reparameterization from data-dependent init (section 3), for wn_rl's policies in any
    parameterization and SB3's own alike (for these it replaces SB3's orthogonal init, where the algorithm uses
    one). Draws come from ``generator`` (a CPU ``torch.Generator``; ``None``: the global one), so one seed gives
    a ``normal`` and a ``weight_norm`` policy of one architecture the same start. ``init_scale`` has no effect
    (it sets data-dependent init's target), and the ``initialized`` flags stay unset; set before the optimizer
    steps (the parameters are changed in place). Returns the layers initialised, per network."""
    layers = {name: torch_default_init(net, generator=generator) for name, net in online_networks(policy).items()}
    sync_target_networks(policy)
    return layers


def policy_is_initialized(policy: BasePolicy) -> bool:
    """True when every online network of ``policy`` carries set ``initialized`` flags (e.g. loaded)."""
    return all(is_initialized(net) for net in online_networks(policy).values())


def has_init_flags(policy: BasePolicy) -> bool:
    """Whether every initializable layer was built with an ``initialized`` buffer (wn_rl policies are;
    SB3's own are not, and adding the buffer later would break loading their saved models)."""
    layers = [m for net in online_networks(policy).values() for m in initializable_layers(net).values()]
    return bool(layers) and all("initialized" in m._buffers for m in layers)


def _zero_states(policy: RecurrentActorCriticPolicy, n: int) -> tuple[th.Tensor, th.Tensor]:
    lstm = policy.lstm_actor
    zeros = th.zeros(lstm.num_layers, n, lstm.hidden_size, device=policy.device)
    return zeros, zeros.clone()


def network_passes(
    policy: BasePolicy, actions: th.Tensor | None = None, episode_starts: th.Tensor | None = None
) -> list[tuple[str, nn.Module, Forward]]:
    """``(name, network, forward(network, observations))`` per online network of ``policy``, in init order: how
    the init (and :class:`wn_rl.sb3.WnStatsCallback`'s dormant units) run each one on a batch, without sampling
    (a recurrent policy: each observation alone from a zero state, or one sequence per row of
    ``episode_starts``). SAC's, TD3's and TQC's critics need the batch's ``actions``."""
    _check_policy(policy)
    if isinstance(policy, RecurrentActorCriticPolicy):

        def recurrent(net: nn.Module, obs: Any) -> Any:
            if episode_starts is None:  # each observation alone, from a zero state
                n = _batch_len(obs)
                starts = th.ones(n, device=net.device)
            else:  # one sequence per row, the LSTM state carried along it as in a rollout
                n = episode_starts.shape[0]
                starts = episode_starts.to(device=net.device, dtype=th.float32).flatten()
            states = RNNStates(_zero_states(net, n), _zero_states(net, n))
            return net.forward(obs, states, starts, deterministic=True)

        return [("policy", policy, recurrent)]
    if isinstance(policy, _ACTOR_CRITIC):  # MaskablePPO's: without masks (they act after the action head)
        return [("policy", policy, lambda net, obs: net.forward(obs, deterministic=True))]
    if isinstance(policy, (DQNPolicy, QRDQNPolicy)):
        name, net = next(iter(online_networks(policy).items()))
        return [(name, net, lambda net, obs: net(obs))]
    if actions is None:
        raise ValueError(
            f"initialising a {type(policy).__name__} needs actions for its critic (from the replay buffer)"
        )
    if isinstance(policy, _SQUASHED_GAUSSIAN):
        actor: Forward = lambda net, obs: net.get_action_dist_params(obs)  # noqa: E731 - no sampling
    else:
        actor = lambda net, obs: net(obs)  # noqa: E731
    return [("actor", policy.actor, actor), ("critic", policy.critic, lambda net, obs: _q_values(net, obs, actions))]


def _q_values(critic: ContinuousCritic | TQCCritic, obs: Any, actions: th.Tensor) -> tuple[th.Tensor, ...]:
    """``ContinuousCritic.forward`` (or TQC's ``Critic.forward``) without its ``set_grad_enabled(not
    share_features_extractor)``: a critic with its own features extractor would turn gradients back on inside
    the init pass, whose in-place updates of the extractor's layers then fail (the default of the SAC, TD3 and
    TQC CNN policies)."""
    features = critic.extract_features(obs, critic.features_extractor)
    return tuple(q_net(th.cat([features, actions], dim=1)) for q_net in critic.q_networks)


def _batch_len(obs: Any) -> int:
    if isinstance(obs, dict):
        obs = next(iter(obs.values()))
    return int(obs.shape[0])


def initialize_policy(
    policy: BasePolicy,
    observations: Any,
    actions: th.Tensor | None = None,
    *,
    episode_starts: th.Tensor | None = None,
    force: bool = False,
) -> dict[str, InitReport]:
    """Data-dependent init (section 3) of every online network of ``policy`` on ``observations``
    (raw, as the env returns them; the policy preprocesses), then sync every target network.

    Args:
        policy: a PPO/A2C/TRPO/RecurrentPPO, MaskablePPO, DQN, QR-DQN, SAC, TD3 or TQC policy.
        observations: a batch of observations as a tensor (or dict of tensors) on the policy's device.
        actions: the batch's actions, required for SAC, TD3 and TQC critics (replay-buffer actions).
        episode_starts: for a recurrent policy, ``(n_sequences, steps)`` flags of the observations taken as
            ``n_sequences`` sequences (``observations`` in that order, sequence by sequence), so that the layers
            after the LSTM are initialised on the hidden states a rollout carries; without it each observation
            is a sequence of its own, from a zero state.
        force: re-initialise layers that are already initialised (never needed in normal use).

    Returns:
        ``{network name: InitReport}``; a report with ``skipped=True`` for networks already initialised.
    """
    passes = network_passes(policy, actions, episode_starts)  # the policy checked first
    check_tensor_batch(observations, "initialize_policy")
    reports = {
        name: data_dependent_init(net, observations, force=force, forward=forward) for name, net, forward in passes
    }
    sync_target_networks(policy)
    return reports


def is_supported(policy: BasePolicy) -> bool:
    return isinstance(policy, _SUPPORTED)
