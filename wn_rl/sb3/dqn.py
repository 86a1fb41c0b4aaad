"""Weight-normalized Q-network policies for SB3's DQN and sb3-contrib's QR-DQN (paper section 5.4).

The online and target networks are built the same way (features extractor, hidden layers, head, all
in the chosen parameterization); SB3 syncs the target with ``load_state_dict`` and then
``polyak_update`` on parameters plus the ``running_mean`` buffers of mean-only batch norm.
Initialization is owned by the policy (section 3): layers start at v ~ N(0, 0.05), g = 1, b = 0 and
:class:`wn_rl.sb3.DataDependentInitCallback` initialises the online network from replay-buffer
observations once learning starts, then copies it into the target network.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch as th
from gymnasium import spaces
from sb3_contrib.qrdqn.policies import QRDQNPolicy, QuantileNetwork
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.type_aliases import Schedule
from stable_baselines3.dqn.policies import DQNPolicy, QNetwork
from torch import nn

from wn_rl.sb3.common import InferenceWeightCache, ParameterizationLike, WnPolicyOptions, default_net_arch
from wn_rl.sb3.torch_layers import WnCombinedExtractor, WnNatureCNN, head_mlp

__all__ = [
    "WnCnnPolicy",
    "WnDQNPolicy",
    "WnMlpPolicy",
    "WnMultiInputPolicy",
    "WnQNetwork",
    "WnQRDQNCnnPolicy",
    "WnQRDQNMlpPolicy",
    "WnQRDQNMultiInputPolicy",
    "WnQRDQNPolicy",
    "WnQuantileNetwork",
]

_PARTS = ("features", "hidden", "q")


class WnQNetwork(InferenceWeightCache, QNetwork):
    """SB3's ``QNetwork`` whose MLP head (``q_net``) is built in ``parameterization``; the output
    layer has no norm and ``init_scales["q"]`` as its init scale. No-grad forwards (acting, target
    values) reuse the effective weights until the parameters change (:class:`InferenceWeightCache`)."""

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
        self.q_net = head_mlp(
            self.features_dim,
            int(self.action_space.n),
            self.net_arch,
            self.activation_fn,
            parameterization,
            hidden_scale=self.init_scales["hidden"],
            output_scale=self.init_scales["q"],
        )

    def forward(self, obs: Any) -> th.Tensor:
        self._use_weight_cache()
        return super().forward(obs)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(parameterization=self.parameterization, init_scales=self.init_scales)
        return data


class WnQuantileNetwork(InferenceWeightCache, QuantileNetwork):
    """sb3-contrib's ``QuantileNetwork`` whose MLP (``quantile_net``) is built in ``parameterization``."""

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
        self.quantile_net = head_mlp(
            self.features_dim,
            int(self.action_space.n) * self.n_quantiles,
            self.net_arch,
            self.activation_fn,
            parameterization,
            hidden_scale=self.init_scales["hidden"],
            output_scale=self.init_scales["q"],
        )

    def forward(self, obs: Any) -> th.Tensor:
        self._use_weight_cache()
        return super().forward(obs)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(parameterization=self.parameterization, init_scales=self.init_scales)
        return data


class _WnQPolicyMixin(WnPolicyOptions):
    """Shared constructor of the WN DQN and QR-DQN policies."""

    init_parts = _PARTS

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Discrete,
        lr_schedule: Schedule,
        *,
        parameterization: ParameterizationLike = "weight_norm",
        init_scale: float | Mapping[str, float] | None = None,
        net_arch: list[int] | None = None,
        activation_fn: type[nn.Module] = nn.ReLU,
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
            net_arch=default_net_arch(net_arch, features_extractor_class, [], [64, 64]),
            activation_fn=activation_fn,
            features_extractor_class=features_extractor_class,
            features_extractor_kwargs=fe_kwargs,
            normalize_images=normalize_images,
            **kwargs,
        )

    def _build(self, lr_schedule: Schedule) -> None:
        super()._build(lr_schedule)
        self._online_net().weight_cache_enabled = True
        self._target_net().weight_cache_enabled = False  # updated through .data by SB3's polyak_update

    def _online_net(self) -> InferenceWeightCache:
        return self.q_net if isinstance(self, DQNPolicy) else self.quantile_net

    def _target_net(self) -> InferenceWeightCache:
        return self.q_net_target if isinstance(self, DQNPolicy) else self.quantile_net_target

    def set_training_mode(self, mode: bool) -> None:
        """SB3's switch between acting and training. Training drops the acting weight cache; acting keeps
        it: SB3 calls ``set_training_mode(False)`` on every ``predict``, and the cache's key (every
        parameter's storage and version) already tells whether an update changed the weights since."""
        if mode:
            self.release_weight_cache()
        super().set_training_mode(mode)

    def release_weight_cache(self) -> None:
        """Drop the effective weights w = g v / ||v|| that the online network keeps for acting, so the next
        no-grad forward (``predict``, ``q_net(obs)`` under ``no_grad``) computes them from the parameters again.

        Call it after writing the online network's parameters through ``.data`` (``p.data.mul_(0.5)``,
        shrink-and-perturb, SB3's ``polyak_update`` into it): such writes bump no version counter and take no
        optimizer step, so the cache cannot see them and acting would use the old weights until the next
        optimizer step or training phase (never, for a model used only to predict). No cheap check finds them:
        only the parameters' values show them, and reading every parameter per forward costs what the cache
        saves. Optimizer steps, in-place ops on the parameters themselves (``with torch.no_grad(): p.mul_(0.5)``),
        ``load_state_dict``, ``set_parameters`` and the data-dependent init need no call."""
        self._online_net()._release_weight_cache()
        self._target_net()._release_weight_cache()


class WnDQNPolicy(_WnQPolicyMixin, DQNPolicy):
    """SB3's ``DQNPolicy`` with the Q-network (and its target) in a chosen parameterization.

    Initialization is owned by the policy (paper section 3), not by PyTorch's default: use
    :class:`wn_rl.sb3.DataDependentInitCallback`; ``init_scale`` sets the target std per part
    (``features``, ``hidden``, ``q``; all 1 by default).

    Acting (no-grad forwards of ``q_net``) reuses the effective weights until an optimizer step or an in-place
    change of a parameter; after writing the parameters through ``.data`` (``p.data.mul_``, shrink-and-perturb,
    ``polyak_update`` into ``q_net``), which neither shows, call :meth:`release_weight_cache`.

    Args:
        parameterization: ``"weight_norm"`` (default) or any name of :data:`wn_rl.PARAMETERIZATIONS`.
        init_scale: one number for every part, or ``dict(features=, hidden=, q=)``.
        **kwargs: SB3's ``DQNPolicy`` arguments (``net_arch``, ``activation_fn``,
            ``features_extractor_class``, ``features_extractor_kwargs``, ``normalize_images``,
            ``optimizer_class``, ``optimizer_kwargs``).
    """

    vector_policy = "WnMlpPolicy"
    image_policy = "WnCnnPolicy"
    multi_input_policy = "WnMultiInputPolicy"

    def make_q_net(self) -> WnQNetwork:
        net_args = self._update_features_extractor(self.net_args, features_extractor=None)
        return WnQNetwork(**net_args, **self._wn_net_kwargs()).to(self.device)


class WnMlpPolicy(WnDQNPolicy):
    """:class:`WnDQNPolicy` for vector observations (``DQN(WnMlpPolicy, env)``)."""


class WnCnnPolicy(WnDQNPolicy):
    """:class:`WnDQNPolicy` with :class:`wn_rl.sb3.WnNatureCNN` for images (``DQN(WnCnnPolicy, env)``)."""

    default_features_extractor = WnNatureCNN


class WnMultiInputPolicy(WnDQNPolicy):
    """:class:`WnDQNPolicy` with :class:`wn_rl.sb3.WnCombinedExtractor` for Dict observations (images and
    vectors, goal-conditioned envs with ``HerReplayBuffer``): ``DQN(WnMultiInputPolicy, env)``."""

    default_features_extractor = WnCombinedExtractor


class WnQRDQNPolicy(_WnQPolicyMixin, QRDQNPolicy):
    """sb3-contrib's ``QRDQNPolicy`` with the quantile network (and its target) in a chosen
    parameterization; arguments, initialization and the acting weight cache (:meth:`release_weight_cache` after
    writes through ``.data``) as :class:`WnDQNPolicy`, plus ``n_quantiles``."""

    vector_policy = "WnQRDQNMlpPolicy"
    image_policy = "WnQRDQNCnnPolicy"
    multi_input_policy = "WnQRDQNMultiInputPolicy"

    def make_quantile_net(self) -> WnQuantileNetwork:
        net_args = self._update_features_extractor(self.net_args, features_extractor=None)
        return WnQuantileNetwork(**net_args, **self._wn_net_kwargs()).to(self.device)


class WnQRDQNMlpPolicy(WnQRDQNPolicy):
    """:class:`WnQRDQNPolicy` for vector observations (``QRDQN(WnQRDQNMlpPolicy, env)``)."""


class WnQRDQNCnnPolicy(WnQRDQNPolicy):
    """:class:`WnQRDQNPolicy` with :class:`wn_rl.sb3.WnNatureCNN` for images."""

    default_features_extractor = WnNatureCNN


class WnQRDQNMultiInputPolicy(WnQRDQNPolicy):
    """:class:`WnQRDQNPolicy` with :class:`wn_rl.sb3.WnCombinedExtractor` for Dict observations."""

    default_features_extractor = WnCombinedExtractor
