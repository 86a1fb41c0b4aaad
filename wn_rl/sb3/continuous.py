"""Weight-normalized policies for SB3's SAC and TD3 and sb3-contrib's TQC (continuous actions).

Actor, critics and their targets are built in the chosen parameterization; the action, log-std and
Q heads are WN layers without a norm. Initialization is owned by the policy (section 3):
:class:`wn_rl.sb3.DataDependentInitCallback` initialises actor and critic from replay-buffer
observations and actions once learning starts (SAC, TD3 and TQC act randomly before that), then copies
them into the target networks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gymnasium import spaces
from sb3_contrib.tqc.policies import Actor as TQCActor
from sb3_contrib.tqc.policies import Critic as TQCCritic
from sb3_contrib.tqc.policies import TQCPolicy
from stable_baselines3.common.policies import ContinuousCritic
from stable_baselines3.common.preprocessing import get_action_dim
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.type_aliases import Schedule
from stable_baselines3.sac.policies import Actor as SACActor
from stable_baselines3.sac.policies import SACPolicy
from stable_baselines3.td3.policies import Actor as TD3Actor
from stable_baselines3.td3.policies import TD3Policy
from torch import nn

from wn_rl.parameterization import Parameterization
from wn_rl.sb3.common import ParameterizationLike, WnPolicyOptions, deepcopy_detached, default_net_arch
from wn_rl.sb3.torch_layers import WnCombinedExtractor, WnNatureCNN, head_mlp

__all__ = [
    "WnContinuousCritic",
    "WnSACActor",
    "WnSACCnnPolicy",
    "WnSACMultiInputPolicy",
    "WnSACPolicy",
    "WnTD3Actor",
    "WnTD3CnnPolicy",
    "WnTD3MultiInputPolicy",
    "WnTD3Policy",
    "WnTQCActor",
    "WnTQCCnnPolicy",
    "WnTQCCritic",
    "WnTQCMultiInputPolicy",
    "WnTQCPolicy",
]


def _replace_q_networks(
    critic: nn.Module,
    features_dim: int,
    n_outputs: int,
    net_arch: list[int],
    activation_fn: type[nn.Module],
    parameterization: ParameterizationLike,
    init_scales: Mapping[str, float],
) -> None:
    """Rebuild a critic's ``q_networks`` (``qf0``, ``qf1``, ... on ``[features, action]``, as many as SB3 built)
    in ``parameterization``: hidden layers with ``init_scales["hidden"]``, a head of ``n_outputs`` (1 Q value, or
    TQC's quantiles) with ``init_scales["q"]`` and no norm."""
    critic.parameterization = parameterization
    critic.init_scales = dict(init_scales)
    input_dim = features_dim + get_action_dim(critic.action_space)
    scales = {"hidden_scale": critic.init_scales["hidden"], "output_scale": critic.init_scales["q"]}
    n_critics = len(critic.q_networks)
    critic.q_networks = []
    for idx in range(n_critics):
        q_net = head_mlp(input_dim, n_outputs, net_arch, activation_fn, parameterization, **scales)
        critic.add_module(f"qf{idx}", q_net)
        critic.q_networks.append(q_net)


class WnContinuousCritic(ContinuousCritic):
    """SB3's ``ContinuousCritic`` (``n_critics`` Q-networks on ``[features, action]``) in a
    parameterization; each Q head has ``init_scales["q"]``. Arguments as ``ContinuousCritic``."""

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Box,
        net_arch: list[int],
        features_extractor: BaseFeaturesExtractor,
        features_dim: int,
        activation_fn: type[nn.Module] = nn.ReLU,
        normalize_images: bool = True,
        n_critics: int = 2,
        share_features_extractor: bool = True,
        *,
        parameterization: ParameterizationLike = "weight_norm",
        init_scales: Mapping[str, float],
    ) -> None:
        super().__init__(
            observation_space,
            action_space,
            net_arch,
            features_extractor,
            features_dim,
            activation_fn,
            normalize_images,
            n_critics,
            share_features_extractor,
        )
        _replace_q_networks(self, features_dim, 1, net_arch, activation_fn, parameterization, init_scales)


class WnTQCCritic(TQCCritic):
    """sb3-contrib's TQC ``Critic`` (``n_critics`` networks of ``n_quantiles`` return quantiles each on
    ``[features, action]``; Kuznetsov et al. 2020) in a parameterization; each quantile head has
    ``init_scales["q"]``. Arguments as sb3-contrib's ``Critic``."""

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Box,
        net_arch: list[int],
        features_extractor: BaseFeaturesExtractor,
        features_dim: int,
        activation_fn: type[nn.Module] = nn.ReLU,
        normalize_images: bool = True,
        n_quantiles: int = 25,
        n_critics: int = 2,
        share_features_extractor: bool = False,
        *,
        parameterization: ParameterizationLike = "weight_norm",
        init_scales: Mapping[str, float],
    ) -> None:
        super().__init__(
            observation_space,
            action_space,
            net_arch,
            features_extractor,
            features_dim,
            activation_fn,
            normalize_images,
            n_quantiles,
            n_critics,
            share_features_extractor,
        )
        _replace_q_networks(self, features_dim, n_quantiles, net_arch, activation_fn, parameterization, init_scales)


class _WnSquashedGaussianActorMixin:
    """The squashed-Gaussian actor of SAC and TQC (same layout in SB3 and sb3-contrib) with ``latent_pi``,
    ``mu`` and ``log_std`` in a parameterization (``mu`` with ``init_scales["action"]``, ``log_std`` with
    ``init_scales["log_std"]``; gSDE keeps its ``log_std`` parameter)."""

    def __init__(
        self,
        *args: Any,
        parameterization: ParameterizationLike = "weight_norm",
        init_scales: Mapping[str, float],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.parameterization = parameterization
        self.init_scales = dict(init_scales)
        p = Parameterization.get(parameterization)
        head = p.without_norm()
        hidden = self.init_scales["hidden"]
        self.latent_pi = head_mlp(
            self.features_dim, 0, self.net_arch, self.activation_fn, p, hidden_scale=hidden, output_scale=hidden
        )
        last = self.net_arch[-1] if self.net_arch else self.features_dim
        action_dim = get_action_dim(self.action_space)
        mu = head.linear(last, action_dim, init_scale=self.init_scales["action"])
        if self.use_sde:
            self.mu = nn.Sequential(mu, nn.Hardtanh(-self.clip_mean, self.clip_mean)) if self.clip_mean > 0 else mu
        else:
            self.mu = mu
            self.log_std = head.linear(last, action_dim, init_scale=self.init_scales["log_std"])

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()  # type: ignore[misc]
        data.update(parameterization=self.parameterization, init_scales=self.init_scales)
        return data

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        """The actor copied on its own (``copy.deepcopy(model.actor)``) after a forward with gradients, as the
        policy (:func:`wn_rl.sb3.common.deepcopy_detached`)."""
        return deepcopy_detached(self, memo)  # type: ignore[arg-type]


class WnSACActor(_WnSquashedGaussianActorMixin, SACActor):
    """SB3's SAC ``Actor`` with ``latent_pi``, ``mu`` and ``log_std`` in a parameterization (``mu`` with
    ``init_scales["action"]``, ``log_std`` with ``init_scales["log_std"]``; gSDE keeps its
    ``log_std`` parameter)."""


class WnTQCActor(_WnSquashedGaussianActorMixin, TQCActor):
    """sb3-contrib's TQC ``Actor`` (SAC's squashed Gaussian) with ``latent_pi``, ``mu`` and ``log_std`` in a
    parameterization, as :class:`WnSACActor`."""


class WnTD3Actor(TD3Actor):
    """SB3's TD3 ``Actor`` (MLP then tanh) in a parameterization; the last layer has
    ``init_scales["action"]``."""

    def __init__(
        self,
        *args: Any,
        parameterization: ParameterizationLike = "weight_norm",
        init_scales: Mapping[str, float],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.parameterization = parameterization
        self.init_scales = dict(init_scales)
        self.mu = head_mlp(
            self.features_dim,
            get_action_dim(self.action_space),
            self.net_arch,
            self.activation_fn,
            parameterization,
            hidden_scale=self.init_scales["hidden"],
            output_scale=self.init_scales["action"],
            squash_output=True,
        )

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(parameterization=self.parameterization, init_scales=self.init_scales)
        return data


class _WnActorCriticOffPolicyMixin(WnPolicyOptions):
    """Shared constructor and builders of the WN SAC, TD3 and TQC policies."""

    actor_class: type[nn.Module]
    critic_class: type[nn.Module] = WnContinuousCritic
    nature_net_arch: tuple[int, ...]
    default_arch: tuple[int, ...]

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Box,
        lr_schedule: Schedule,
        *,
        parameterization: ParameterizationLike = "weight_norm",
        init_scale: float | Mapping[str, float] | None = None,
        net_arch: list[int] | dict[str, list[int]] | None = None,
        features_extractor_class: type[BaseFeaturesExtractor] | None = None,
        features_extractor_kwargs: dict[str, Any] | None = None,
        normalize_images: bool = True,
        **kwargs: Any,
    ) -> None:
        features_extractor_class, fe_kwargs = self._wn_prepare(
            observation_space,
            parameterization,
            init_scale,
            features_extractor_class,
            features_extractor_kwargs,
            normalize_images,
        )
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            net_arch=default_net_arch(
                net_arch, features_extractor_class, list(self.nature_net_arch), list(self.default_arch)
            ),
            features_extractor_class=features_extractor_class,
            features_extractor_kwargs=fe_kwargs,
            normalize_images=normalize_images,
            **kwargs,
        )

    def _get_constructor_parameters(self) -> dict[str, Any]:
        """The WN options and SB3's, plus ``share_features_extractor``: SB3's ``SACPolicy`` and
        sb3-contrib's ``TQCPolicy`` leave it out, so a ``policy.save`` / ``load`` round trip built the
        loaded policy with separate extractors (the weights still loaded, as both keys are saved)."""
        data = super()._get_constructor_parameters()
        data["share_features_extractor"] = self.share_features_extractor
        return data

    def make_actor(self, features_extractor: BaseFeaturesExtractor | None = None) -> nn.Module:
        actor_kwargs = self._update_features_extractor(self.actor_kwargs, features_extractor)
        return self.actor_class(**actor_kwargs, **self._wn_net_kwargs()).to(self.device)

    def make_critic(self, features_extractor: BaseFeaturesExtractor | None = None) -> nn.Module:
        critic_kwargs = self._update_features_extractor(self.critic_kwargs, features_extractor)
        return self.critic_class(**critic_kwargs, **self._wn_net_kwargs()).to(self.device)


class WnSACPolicy(_WnActorCriticOffPolicyMixin, SACPolicy):
    """SB3's ``SACPolicy`` with actor, critics and critic targets in a chosen parameterization.

    Initialization is owned by the policy (paper section 3): use
    :class:`wn_rl.sb3.DataDependentInitCallback`. ``init_scale`` parts: ``features``, ``hidden`` (1),
    ``action`` (the mean head, 0.01), ``log_std`` (0.01, so the initial std is ~1) and ``q`` (1).

    Args:
        parameterization: ``"weight_norm"`` (default) or any name of :data:`wn_rl.PARAMETERIZATIONS`.
        init_scale: one number for every part, or a mapping of some parts.
        **kwargs: SB3's ``SACPolicy`` arguments (``net_arch``, ``activation_fn``, ``use_sde``,
            ``log_std_init``, ``n_critics``, ``share_features_extractor``, optimizer options, ...).
    """

    init_parts = ("features", "hidden", "action", "log_std", "q")
    vector_policy = "WnSACPolicy"
    image_policy = "WnSACCnnPolicy"
    multi_input_policy = "WnSACMultiInputPolicy"
    actor_class = WnSACActor
    nature_net_arch = (256, 256)
    default_arch = (256, 256)


class WnSACCnnPolicy(WnSACPolicy):
    """:class:`WnSACPolicy` with :class:`wn_rl.sb3.WnNatureCNN` for image observations."""

    default_features_extractor = WnNatureCNN


class WnSACMultiInputPolicy(WnSACPolicy):
    """:class:`WnSACPolicy` with :class:`wn_rl.sb3.WnCombinedExtractor` for Dict observations (images and
    vectors, goal-conditioned envs with ``HerReplayBuffer``)."""

    default_features_extractor = WnCombinedExtractor


class WnTD3Policy(_WnActorCriticOffPolicyMixin, TD3Policy):
    """SB3's ``TD3Policy`` with actor, critics and both targets in a chosen parameterization.

    Initialization is owned by the policy (paper section 3): use
    :class:`wn_rl.sb3.DataDependentInitCallback`. ``init_scale`` parts: ``features``, ``hidden`` (1),
    ``action`` (the pre-tanh head, 0.01) and ``q`` (1). Arguments as :class:`WnSACPolicy` with SB3's
    ``TD3Policy`` options.
    """

    init_parts = ("features", "hidden", "action", "q")
    vector_policy = "WnTD3Policy"
    image_policy = "WnTD3CnnPolicy"
    multi_input_policy = "WnTD3MultiInputPolicy"
    actor_class = WnTD3Actor
    nature_net_arch = (256, 256)
    default_arch = (400, 300)


class WnTD3CnnPolicy(WnTD3Policy):
    """:class:`WnTD3Policy` with :class:`wn_rl.sb3.WnNatureCNN` for image observations."""

    default_features_extractor = WnNatureCNN


class WnTD3MultiInputPolicy(WnTD3Policy):
    """:class:`WnTD3Policy` with :class:`wn_rl.sb3.WnCombinedExtractor` for Dict observations."""

    default_features_extractor = WnCombinedExtractor


class WnTQCPolicy(_WnActorCriticOffPolicyMixin, TQCPolicy):
    """sb3-contrib's ``TQCPolicy`` (Truncated Quantile Critics, Kuznetsov et al. 2020) with actor, quantile
    critics and critic targets in a chosen parameterization.

    The actor is SAC's (:class:`WnTQCActor`); each critic (:class:`WnTQCCritic`) outputs ``n_quantiles``
    return quantiles through a WN head without a norm. Initialization is owned by the policy (paper
    section 3): use :class:`wn_rl.sb3.DataDependentInitCallback`, which initialises actor and critics from
    replay-buffer observations and actions when the random warm-up ends, as for SAC. ``init_scale`` parts
    as :class:`WnSACPolicy`: ``features``, ``hidden`` (1), ``action`` (0.01), ``log_std`` (0.01) and ``q``
    (1, every quantile head).

    Args:
        parameterization: ``"weight_norm"`` (default) or any name of :data:`wn_rl.PARAMETERIZATIONS`.
        init_scale: one number for every part, or a mapping of some parts.
        **kwargs: sb3-contrib's ``TQCPolicy`` arguments (``net_arch``, ``activation_fn``, ``n_quantiles``,
            ``n_critics``, ``use_sde``, ``log_std_init``, ``share_features_extractor``, optimizer options, ...).
    """

    init_parts = ("features", "hidden", "action", "log_std", "q")
    vector_policy = "WnTQCPolicy"
    image_policy = "WnTQCCnnPolicy"
    multi_input_policy = "WnTQCMultiInputPolicy"
    actor_class = WnTQCActor
    critic_class = WnTQCCritic
    nature_net_arch = (256, 256)  # sb3-contrib's TQC default for every features extractor
    default_arch = (256, 256)


class WnTQCCnnPolicy(WnTQCPolicy):
    """:class:`WnTQCPolicy` with :class:`wn_rl.sb3.WnNatureCNN` for image observations."""

    default_features_extractor = WnNatureCNN


class WnTQCMultiInputPolicy(WnTQCPolicy):
    """:class:`WnTQCPolicy` with :class:`wn_rl.sb3.WnCombinedExtractor` for Dict observations (images and
    vectors, goal-conditioned envs with ``HerReplayBuffer``)."""

    default_features_extractor = WnCombinedExtractor
