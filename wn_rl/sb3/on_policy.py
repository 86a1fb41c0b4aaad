"""Weight-normalized actor-critic policies for SB3's PPO and A2C and sb3-contrib's MaskablePPO and TRPO.

SB3 collects rollouts with the policy in eval mode and trains it in train mode. With batch
statistics (mean-only batch norm, section 4, or full batch norm) the policy that acted would then
differ from the one being trained, and PPO's probability ratio would not start at 1. These
policies remove that mismatch: their normalisation layers always subtract their running statistics
(during rollouts *and* during the training epochs), and the running statistics are refreshed at one
well-defined point, when the policy goes from training back to acting (SB3's
``set_training_mode(False)`` at the start of the next rollout). The refresh is one forward pass in
batch-statistics mode over observations kept from the training phase (a random sample of the last
rollout), with the final parameters of that phase. The price is eq. (8)'s gradient centring within
a minibatch; what remains is the data-dependent centring of section 4, refreshed every iteration.
The observations are kept where the algorithm's training reads the policy: ``evaluate_actions`` (PPO,
A2C, MaskablePPO, RecurrentPPO) or ``get_distribution`` (sb3-contrib's TRPO, which never calls
``evaluate_actions``: without it the statistics would stay those of the data-dependent init).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch as th
from gymnasium import spaces
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
from stable_baselines3.common.distributions import (
    BernoulliDistribution,
    CategoricalDistribution,
    DiagGaussianDistribution,
    MultiCategoricalDistribution,
    StateDependentNoiseDistribution,
)
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.type_aliases import Schedule
from torch import nn

from wn_rl.mean_only_batch_norm import MeanOnlyBatchNorm
from wn_rl.sb3.common import ParameterizationLike, WnPolicyOptions, default_net_arch, first_rows
from wn_rl.sb3.torch_layers import WnCombinedExtractor, WnMlpExtractor, WnNatureCNN

__all__ = [
    "WnActorCriticCnnPolicy",
    "WnActorCriticPolicy",
    "WnMaskableActorCriticCnnPolicy",
    "WnMaskableActorCriticPolicy",
    "WnMaskableMultiInputActorCriticPolicy",
    "WnMultiInputActorCriticPolicy",
    "running_norms",
]

_RUNNING_NORMS = (MeanOnlyBatchNorm, nn.modules.batchnorm._BatchNorm)
_ORTHO_INIT_MESSAGE = (
    "ortho_init=True is not supported by {name}: WN policies own their initialization (Salimans & Kingma "
    "2016, section 3): v ~ N(0, 0.05), then data-dependent init from real observations "
    "(wn_rl.sb3.DataDependentInitCallback) sets each layer's pre-activation std to its part's init_scale "
    "(action head 0.01 and value head 1, as SB3's orthogonal gains). SB3's orthogonal init would write into "
    "a WN layer's recomputed .weight and change nothing. Drop ortho_init (or pass False), and set "
    "init_scale=dict(action=..., value=...) instead."
)


def running_norms(module: nn.Module) -> list[nn.Module]:
    """The normalisation layers of ``module`` that keep running statistics."""
    return [m for m in module.modules() if isinstance(m, _RUNNING_NORMS)]


@contextlib.contextmanager
def norms_on_rows(norms: list[nn.Module], valid: th.Tensor | None) -> Iterator[None]:
    """Inside the block each of ``norms`` sees only the ``valid`` rows of an input with one row per entry of
    ``valid`` (its batch statistics, and so its running statistics, come from those rows); the other rows of its
    output are 0. For a batch padded with rows that count for nothing (RecurrentPPO's sequence padding), whose
    values downstream are masked out. ``None``: every row counts, nothing changes."""
    if valid is None or bool(valid.all()):
        yield
        return
    valid = valid.bool()
    rows = int(valid.numel())

    selected: set[int] = set()  # the norms whose running call had its rows selected

    def select(norm: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = inputs[0]
        if x.shape[0] != rows:  # an input of another row count: left as it is
            selected.discard(id(norm))
            return None
        selected.add(id(norm))
        return (x[valid.to(x.device)], *inputs[1:])

    def scatter(norm: nn.Module, inputs: tuple[Any, ...], output: th.Tensor) -> th.Tensor | None:
        if id(norm) not in selected:
            return None
        full = output.new_zeros((rows, *output.shape[1:]))
        full[valid.to(output.device)] = output
        return full

    handles = [norm.register_forward_pre_hook(select) for norm in norms]
    handles += [norm.register_forward_hook(scatter) for norm in norms]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _WnActorCriticMixin(WnPolicyOptions):
    """Constructor, networks and frozen norm statistics of the WN actor-critic policies, on top of SB3's
    ``ActorCriticPolicy`` (:class:`WnActorCriticPolicy`) or sb3-contrib's ``MaskableActorCriticPolicy``
    (:class:`WnMaskableActorCriticPolicy`), which take the same constructor arguments and build steps."""

    init_parts = ("features", "hidden", "action", "value")
    # whether observations given to get_distribution while training refresh the norm statistics (TRPO's);
    # off where the layers before the norms need more than the observation (an LSTM's states)
    refresh_from_distributions = True

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        *,
        parameterization: ParameterizationLike = "weight_norm",
        init_scale: float | Mapping[str, float] | None = None,
        freeze_norm_statistics: bool = True,
        norm_refresh_samples: int = 512,
        ortho_init: bool = False,
        net_arch: list[int] | dict[str, list[int]] | None = None,
        features_extractor_class: type[BaseFeaturesExtractor] | None = None,
        features_extractor_kwargs: dict[str, Any] | None = None,
        normalize_images: bool = True,
        **kwargs: Any,
    ) -> None:
        if ortho_init:
            raise ValueError(_ORTHO_INIT_MESSAGE.format(name=type(self).__name__))
        if norm_refresh_samples < 2:
            raise ValueError(f"norm_refresh_samples={norm_refresh_samples!r} must be at least 2 observations")
        features_extractor_class, fe_kwargs = self._wn_prepare(
            observation_space,
            parameterization,
            init_scale,
            features_extractor_class,
            features_extractor_kwargs,
            normalize_images,
        )
        self.freeze_norm_statistics = freeze_norm_statistics
        self.norm_refresh_samples = norm_refresh_samples
        # (obs, args, kwargs) of an evaluate_actions call, or (obs, None, None): observations alone
        self._norm_batches: list[tuple[Any, tuple[Any, ...] | None, dict[str, Any] | None]] = []
        self._norm_batch_samples = 0
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            net_arch=default_net_arch(net_arch, features_extractor_class, [], {"pi": [64, 64], "vf": [64, 64]}),
            ortho_init=False,
            features_extractor_class=features_extractor_class,
            features_extractor_kwargs=fe_kwargs,
            normalize_images=normalize_images,
            **kwargs,
        )
        self.train(self.training)

    # -- networks ---------------------------------------------------------------------------------

    def _build_mlp_extractor(self) -> None:
        self.mlp_extractor = WnMlpExtractor(
            getattr(self, "lstm_output_dim", self.features_dim),
            net_arch=self.net_arch,
            activation_fn=self.activation_fn,
            parameterization=self.parameterization,
            init_scale=self.init_scales["hidden"],
            device=self.device,
        )

    def _plain_action_net(self, latent_dim: int) -> nn.Linear:
        """The action head SB3 would build, for its sizes; also sets ``log_std`` where SB3 does."""
        dist = self.action_dist
        if isinstance(dist, DiagGaussianDistribution):
            plain, self.log_std = dist.proba_distribution_net(latent_dim=latent_dim, log_std_init=self.log_std_init)
        elif isinstance(dist, StateDependentNoiseDistribution):
            plain, self.log_std = dist.proba_distribution_net(
                latent_dim=latent_dim, latent_sde_dim=latent_dim, log_std_init=self.log_std_init
            )
        elif isinstance(dist, (CategoricalDistribution, MultiCategoricalDistribution, BernoulliDistribution)):
            plain = dist.proba_distribution_net(latent_dim=latent_dim)
        else:
            raise NotImplementedError(f"{type(self).__name__} does not support the distribution {dist!r}")
        return plain

    def _build(self, lr_schedule: Schedule) -> None:
        """Build the MLPs, the WN heads and the optimizer (no orthogonal init: see :class:`WnActorCriticPolicy`)."""
        self._build_mlp_extractor()
        head = self.parameterization.without_norm()
        plain = self._plain_action_net(self.mlp_extractor.latent_dim_pi)
        self.action_net = head.linear(plain.in_features, plain.out_features, init_scale=self.init_scales["action"])
        self.value_net = head.linear(self.mlp_extractor.latent_dim_vf, 1, init_scale=self.init_scales["value"])
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        """SB3's, plus the norm-statistics options and ``share_features_extractor``, which SB3's
        ``ActorCriticPolicy`` leaves out (a ``policy.save`` / ``load`` round trip turned sharing back on)."""
        data = super()._get_constructor_parameters()
        data.update(
            freeze_norm_statistics=self.freeze_norm_statistics,
            norm_refresh_samples=self.norm_refresh_samples,
            share_features_extractor=self.share_features_extractor,
        )
        return data

    # -- normalisation statistics -----------------------------------------------------------------

    def train(self, mode: bool = True) -> _WnActorCriticMixin:
        """``nn.Module.train``, except that frozen norm layers stay on their running statistics."""
        super().train(mode)
        if getattr(self, "freeze_norm_statistics", False):
            for norm in running_norms(self):
                norm.train(False)
        return self

    def set_training_mode(self, mode: bool) -> None:
        """SB3's switch between acting and training; going back to acting refreshes the frozen norm
        statistics from the observations of the training phase that just ended."""
        if not mode and self.training and self._norm_batches:
            self.refresh_norm_statistics()
        super().set_training_mode(mode)

    def _keeps_norm_batch(self) -> bool:
        """Whether a call now should keep its observations for the next refresh of the norm statistics."""
        wanted = self.training and self.freeze_norm_statistics and self._norm_batch_samples < self.norm_refresh_samples
        return wanted and bool(running_norms(self))

    def evaluate_actions(self, obs: Any, *args: Any, **kwargs: Any) -> Any:
        """SB3's ``evaluate_actions``; while training, also keeps a sample of the observations for the
        next refresh of the norm statistics (references only, up to ``norm_refresh_samples``)."""
        if self._keeps_norm_batch():
            self._norm_batches.append((obs, args, kwargs))
            self._norm_batch_samples += _batch_len(obs)
        return super().evaluate_actions(obs, *args, **kwargs)

    def get_distribution(self, obs: Any, *args: Any, **kwargs: Any) -> Any:
        """SB3's ``get_distribution``; while training, also keeps up to ``norm_refresh_samples`` of the
        observations for the next refresh of the norm statistics. TRPO trains through this method alone, on
        the whole (shuffled) rollout at once, so the first rows are a random sample of it."""
        if self.refresh_from_distributions and self._keeps_norm_batch():
            kept = first_rows(obs, self.norm_refresh_samples - self._norm_batch_samples)
            self._norm_batches.append((kept, None, None))
            self._norm_batch_samples += _batch_len(kept)
        return super().get_distribution(obs, *args, **kwargs)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """``nn.Module.state_dict`` after any pending refresh of the norm statistics: ``learn`` ends with a
        training phase, and a model saved then must hold the statistics it acts with, not the previous ones."""
        if self._norm_batches:
            self.refresh_norm_statistics()
        return super().state_dict(*args, **kwargs)

    @th.no_grad()
    def refresh_norm_statistics(self) -> int:
        """Update the running statistics of every norm layer from the kept observations, one forward
        pass per kept minibatch in batch-statistics mode (each moves the running mean by the layer's
        momentum). Returns the number of observations used."""
        batches, used = self._norm_batches, self._norm_batch_samples
        self._norm_batches, self._norm_batch_samples = [], 0
        norms = running_norms(self)
        if not norms or not batches:
            return 0
        for norm in norms:
            norm.train(True)
        try:
            for obs, args, kwargs in batches:
                if args is None:
                    self._latents(obs)
                else:
                    with norms_on_rows(norms, self._valid_rows(obs, args, kwargs)):
                        super().evaluate_actions(obs, *args, **kwargs)
        finally:
            self.train(self.training)
        return used

    def _valid_rows(self, obs: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> th.Tensor | None:
        """Which rows of a kept ``evaluate_actions`` batch are data (``None``: all of them)."""
        return None

    def _latents(self, obs: Any) -> None:
        """The part of ``evaluate_actions`` that holds norm layers (features extractors and both MLPs; the
        heads have none), without actions."""
        features = self.extract_features(obs)
        if self.share_features_extractor:
            self.mlp_extractor(features)
        else:
            pi_features, vf_features = features
            self.mlp_extractor.forward_actor(pi_features)
            self.mlp_extractor.forward_critic(vf_features)


class WnActorCriticPolicy(_WnActorCriticMixin, ActorCriticPolicy):
    """SB3's ``ActorCriticPolicy`` (PPO, A2C, sb3-contrib's TRPO) with every layer in a chosen parameterization.

    The features extractor (if it is :class:`WnNatureCNN`), the policy and value MLPs and both heads
    are built by :class:`wn_rl.Parameterization`; the heads never get a normalisation layer.

    Initialization: this policy owns it (paper section 3). SB3's ``ortho_init`` is refused (on a WN
    layer it would silently do nothing useful); use :class:`wn_rl.sb3.DataDependentInitCallback`,
    which sets each part's pre-activation std to ``init_scale``: ``features`` and ``hidden`` 1, the
    ``action`` head 0.01 and the ``value`` head 1 (SB3's orthogonal gains, by default).

    Normalisation statistics (``weight_norm+mean_only_bn``, ``mean_only_bn``, ``batch_norm``): see the
    module docstring. With ``freeze_norm_statistics=True`` (default) the policy that acted is exactly
    the policy being trained, so PPO's first-epoch ratio is 1 and TRPO's KL divergence is measured from
    the policy that acted; ``False`` gives SB3's usual train/eval behaviour.

    Args:
        observation_space, action_space, lr_schedule: as SB3's ``ActorCriticPolicy``.
        parameterization: ``"weight_norm"`` (default) or any name of :data:`wn_rl.PARAMETERIZATIONS`.
        init_scale: one number for every part, or ``dict(features=, hidden=, action=, value=)``.
        freeze_norm_statistics: keep norm layers on their running statistics while training.
        norm_refresh_samples: observations kept from a training phase to refresh the statistics.
        ortho_init: must be False (see above); accepted so SB3 configs keep loading.
        **kwargs: the rest of SB3's ``ActorCriticPolicy`` arguments (``net_arch``, ``activation_fn``,
            ``features_extractor_class``, ``features_extractor_kwargs``, ``share_features_extractor``,
            ``optimizer_class``, ``optimizer_kwargs``, ``use_sde``, ``log_std_init``, ...).
    """

    vector_policy = "WnActorCriticPolicy"
    image_policy = "WnActorCriticCnnPolicy"
    multi_input_policy = "WnMultiInputActorCriticPolicy"


def _batch_len(obs: Any) -> int:
    if isinstance(obs, Mapping):
        obs = next(iter(obs.values()))
    return int(obs.shape[0])


class WnActorCriticCnnPolicy(WnActorCriticPolicy):
    """:class:`WnActorCriticPolicy` with :class:`WnNatureCNN` as features extractor (images, e.g. Atari)."""

    default_features_extractor = WnNatureCNN


class WnMultiInputActorCriticPolicy(WnActorCriticPolicy):
    """:class:`WnActorCriticPolicy` with :class:`WnCombinedExtractor` as features extractor (Dict observations)."""

    default_features_extractor = WnCombinedExtractor


class WnMaskableActorCriticPolicy(_WnActorCriticMixin, MaskableActorCriticPolicy):
    """sb3-contrib's ``MaskableActorCriticPolicy`` (``MaskablePPO``, invalid action masking; Huang & Ontañón
    2020) with every layer in a chosen parameterization.

    Masks act on the action head's logits (an invalid action's logit is replaced by -1e8), after every layer
    this package builds, so the networks, the initialization rules (no orthogonal init;
    :class:`wn_rl.sb3.DataDependentInitCallback`, whose random warm-up samples only valid actions) and the
    frozen norm statistics are those of :class:`WnActorCriticPolicy`, with the same arguments, minus SB3's
    gSDE options (MaskablePPO has discrete actions only: ``Discrete``, ``MultiDiscrete``, ``MultiBinary``).
    """

    vector_policy = "WnMaskableActorCriticPolicy"
    image_policy = "WnMaskableActorCriticCnnPolicy"
    multi_input_policy = "WnMaskableMultiInputActorCriticPolicy"

    def _plain_action_net(self, latent_dim: int) -> nn.Linear:
        """The logits layer sb3-contrib would build (its masked distributions take no other parameters)."""
        return self.action_dist.proba_distribution_net(latent_dim=latent_dim)


class WnMaskableActorCriticCnnPolicy(WnMaskableActorCriticPolicy):
    """:class:`WnMaskableActorCriticPolicy` with :class:`WnNatureCNN` as features extractor (images)."""

    default_features_extractor = WnNatureCNN


class WnMaskableMultiInputActorCriticPolicy(WnMaskableActorCriticPolicy):
    """:class:`WnMaskableActorCriticPolicy` with :class:`WnCombinedExtractor` as features extractor (Dict
    observations)."""

    default_features_extractor = WnCombinedExtractor
