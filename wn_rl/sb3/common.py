"""What every weight-normalized SB3 policy shares: the ``parameterization`` and ``init_scale``
options, the observation-space check, the default ``net_arch`` and the features-extractor kwargs.

Policies own their initialization (section 3 of the paper): layers start at v ~ N(0, 0.05), g = 1,
b = 0 and :class:`wn_rl.sb3.DataDependentInitCallback` sets g and b from real observations. SB3's
orthogonal initialization is not used: on a WN layer it would write into a ``.weight`` that is
recomputed from g and v on every forward pass.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym
import sb3_contrib
import stable_baselines3
import torch
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor, CombinedExtractor, FlattenExtractor

from wn_rl.caching import optimizer_steps
from wn_rl.init import initializable_layers
from wn_rl.layers import WNLayer, cached, mark_initializable
from wn_rl.mean_only_batch_norm import MeanOnlyBatchNorm
from wn_rl.parameterization import Parameterization
from wn_rl.sb3.torch_layers import (
    WnCombinedExtractor,
    check_dict_space,
    check_image_space,
    check_vector_space,
    extractor_kwargs,
    resolve_init_scales,
    uses_nature_layout,
)

__all__ = ["InferenceWeightCache", "UninitializedPolicyWarning", "WnPolicyOptions", "default_net_arch"]

ParameterizationLike = str | Parameterization


class UninitializedPolicyWarning(UserWarning):
    """A WN policy started training without data-dependent init (section 3 of the paper).

    Issued once per policy object, at the first SB3 ``train()``, when the policy has weight-normalized
    or mean-only batch-norm layers and none of them was initialised (by
    :class:`wn_rl.sb3.DataDependentInitCallback`, by hand, or in the model it was loaded from). If the
    fresh init is intended, say so to the policy with ``model.policy.allow_fresh_init()`` (that policy object
    only, safe with runs in several threads), or silence the class for the whole process with
    ``warnings.filterwarnings("ignore", category=wn_rl.sb3.UninitializedPolicyWarning)``.
    """


_UNINITIALIZED_MESSAGE = (
    "{name} starts training from its fresh initialization (weights ~ N(0, 0.05), g = 1, b = 0): none of its "
    "weight-normalized or mean-only batch-norm layers has been data-dependent initialised (Salimans & Kingma "
    "2016, section 3), so init_scale (e.g. the action head's 0.01) has no effect. Fix: "
    "model.learn(..., callback=wn_rl.sb3.DataDependentInitCallback()) (off-policy: with learning_starts >= its "
    "n_samples), or initialise by hand before learning with wn_rl.sb3.initialize_policy(model.policy, "
    "observations[, actions]) (wn_rl.data_dependent_init(network, batch) for one network). If the fresh init "
    "is intended: model.policy.allow_fresh_init() before learning, or "
    'warnings.filterwarnings("ignore", category=wn_rl.sb3.UninitializedPolicyWarning).'
)


# Frames in these packages are skipped when a warning names its caller: the user's learn() is the place to fix.
_LIBRARY_DIRS = tuple(
    os.path.dirname(os.path.abspath(path)) + os.sep
    for path in (os.path.dirname(__file__), stable_baselines3.__file__, sb3_contrib.__file__)
)


def _caller_outside_libraries() -> int:
    """The ``stacklevel`` (for a ``warnings.warn`` in the calling function) of the first frame outside
    wn_rl, SB3 and sb3-contrib."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def lacks_data_dependent_init(policy: torch.nn.Module) -> bool:
    """True when ``policy`` has WN or mean-only batch-norm layers and none of its layers' ``initialized``
    flags is set (one host-device sync, for all the flags at once)."""
    modules = list(policy.modules())
    if not any(isinstance(m, (WNLayer, MeanOnlyBatchNorm)) for m in modules):
        return False  # normal, batch_norm, layer_norm: SB3's usual init story, nothing to warn about
    flags = [m.initialized for m in modules if "initialized" in m._buffers]
    return bool(flags) and not bool(torch.stack([f.to(flags[0].device) for f in flags]).any())


class WnPolicyOptions:
    """Mixin holding the WN options of a policy; call :meth:`_wn_prepare` before SB3's ``__init__``.

    Class attributes name the policy family's parts and the policies to suggest when an observation
    space does not fit.
    """

    init_parts: tuple[str, ...] = ()
    vector_policy: str = ""
    image_policy: str = ""
    multi_input_policy: str = ""
    default_features_extractor: type[BaseFeaturesExtractor] = FlattenExtractor

    parameterization: Parameterization
    init_scales: dict[str, float]
    _init_checked: bool = False  # whether set_training_mode(True) has looked at the init flags (or need not)

    def _wn_prepare(
        self,
        observation_space: gym.Space,
        parameterization: ParameterizationLike,
        init_scale: float | Mapping[str, float] | None,
        features_extractor_class: type[BaseFeaturesExtractor] | None,
        features_extractor_kwargs: Mapping[str, Any] | None,
        normalize_images: bool,
    ) -> tuple[type[BaseFeaturesExtractor], dict[str, Any]]:
        """Check the options and the observation space; return the features-extractor class (None: the
        policy's ``default_features_extractor``) and its kwargs.

        Runs before ``nn.Module.__init__`` (plain attributes only), so that a wrong space fails before
        any layer is allocated.
        """
        features_extractor_class = features_extractor_class or self.default_features_extractor
        self.parameterization = Parameterization.get(parameterization)
        self._parameterization_arg = parameterization
        self._init_scale_arg = dict(init_scale) if isinstance(init_scale, Mapping) else init_scale
        self.init_scales = resolve_init_scales(self.init_parts, init_scale)
        self._check_observation_space(observation_space, features_extractor_class, normalize_images)
        fe_kwargs = extractor_kwargs(
            features_extractor_class,
            features_extractor_kwargs,
            self.parameterization,
            self.init_scales["features"],
            normalize_images,
        )
        return features_extractor_class, fe_kwargs

    def _check_observation_space(
        self, observation_space: gym.Space, features_extractor_class: type, normalize_images: bool
    ) -> None:
        """The space check of the features extractor SB3 will build, naming this family's policy that fits."""
        name = type(self).__name__
        vector = self.vector_policy or "an MLP policy"
        image = self.image_policy or "a CNN policy"
        multi_input = self.multi_input_policy or "a multi-input policy"
        normalized_image = not normalize_images
        if issubclass(features_extractor_class, (WnCombinedExtractor, CombinedExtractor)):
            check_dict_space(
                observation_space,
                name,
                normalized_image=normalized_image,
                vector_alternative=vector,
                image_alternative=image,
            )
        elif uses_nature_layout(features_extractor_class):
            check_image_space(
                observation_space,
                name,
                normalized_image=normalized_image,
                alternative=vector,
                dict_alternative=multi_input,
            )
        elif issubclass(features_extractor_class, FlattenExtractor):
            check_vector_space(observation_space, name, dict_alternative=multi_input)

    def make_features_extractor(self) -> BaseFeaturesExtractor:
        """SB3's, then every plain linear or conv layer of the extractor (SB3's ``NatureCNN`` or
        ``CombinedExtractor``, a user's own) given the ``initialized`` flag from the start, so data-dependent init
        sets it as the paper's plain baseline (target std: its ``init_scale``, else the ``features`` part) and
        saved models load into a fresh policy. Without flags the whole policy counted as one that cannot take the
        init (SB3's own), and the init was skipped."""
        extractor = super().make_features_extractor()  # type: ignore[misc]
        scale = self.init_scales.get("features", 1.0)
        for layer in initializable_layers(extractor).values():
            if "initialized" not in layer._buffers:
                mark_initializable(layer, getattr(layer, "init_scale", scale))
        return extractor

    def _wn_net_kwargs(self) -> dict[str, Any]:
        """The WN options every network of the policy is built with."""
        return {"parameterization": self.parameterization, "init_scales": self.init_scales}

    def _get_constructor_parameters(self) -> dict[str, Any]:
        """SB3's (the policy class next in the MRO) plus the WN options as given (``policy.save``)."""
        data = super()._get_constructor_parameters()  # type: ignore[misc]
        data.update(parameterization=self._parameterization_arg, init_scale=self._init_scale_arg)
        return data

    def allow_fresh_init(self) -> None:
        """Train from the fresh initialization on purpose: this policy object never issues
        :class:`UninitializedPolicyWarning`. Its actor and critics (SAC, TD3, TQC) are trained through it, so
        they are covered too. Unlike a ``warnings`` filter this changes no process-wide state, so runs in other
        threads keep their warnings; a copy or a reloaded model decides afresh from its ``initialized`` flags."""
        self._init_checked = True

    def set_training_mode(self, mode: bool) -> None:
        """SB3's switch between acting and training, which every algorithm's ``train()`` opens with
        ``set_training_mode(True)``. The first such call warns (:class:`UninitializedPolicyWarning`) if
        data-dependent init never ran; later calls cost one attribute lookup."""
        if mode and not self._init_checked:
            self._init_checked = True
            if lacks_data_dependent_init(self):  # type: ignore[arg-type]
                message = _UNINITIALIZED_MESSAGE.format(name=type(self).__name__)
                warnings.warn(message, UninitializedPolicyWarning, stacklevel=_caller_outside_libraries())
        super().set_training_mode(mode)  # type: ignore[misc]

    def __getstate__(self) -> dict[str, Any]:
        """A copy (pickle, deepcopy) decides afresh, from the ``initialized`` flags it carries."""
        state = dict(super().__getstate__())  # type: ignore[misc]
        state.pop("_init_checked", None)
        return state

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return deepcopy_detached(self, memo)  # type: ignore[arg-type]


def deepcopy_detached(module: torch.nn.Module, memo: dict[int, Any]) -> Any:
    """``copy.deepcopy`` of a trained policy or actor (self-play, population methods), as its ``__deepcopy__``.
    SB3's distribution objects on the module and its submodules (SAC's and TQC's actors) keep the last forward's
    torch distribution and gSDE's exploration matrices, built from tensors in the autograd graph, which
    ``Tensor.__deepcopy__`` refuses. The copy gets them detached (same values: same gSDE exploration, same cached
    ``probs``); the original keeps its own. Entered in ``memo`` first, they are copied once wherever reached."""
    for submodule in module.modules():
        for value in vars(submodule).values():
            if isinstance(value, Distribution) and id(value) not in memo:
                memo[id(value)] = copy.deepcopy(_detached(value), memo)
    clone = type(module).__new__(type(module))
    memo[id(module)] = clone
    clone.__setstate__(copy.deepcopy(module.__getstate__(), memo))
    return clone


def _detached(value: Any) -> Any:
    """``value`` with every tensor it holds detached from the autograd graph, without changing ``value``: a
    tensor, a list or tuple of them, or a shallow copy of an SB3 or torch distribution with its state detached."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(item) for item in value)
    if isinstance(value, (Distribution, torch.distributions.Distribution)):
        clone = copy.copy(value)
        vars(clone).update({key: _detached(item) for key, item in vars(value).items()})
        return clone
    return value


def default_net_arch(
    net_arch: Sequence[int] | Mapping[str, Sequence[int]] | None,
    features_extractor_class: type,
    nature: Any,
    other: Any,
) -> Any:
    """SB3's default ``net_arch`` rule, extended to :class:`wn_rl.sb3.WnNatureCNN`."""
    if net_arch is not None:
        return net_arch
    return nature if uses_nature_layout(features_extractor_class) else other


class InferenceWeightCache:
    """Reuse the effective weights w = g v / ||v|| across no-grad forward passes (acting, target
    networks) for as long as the parameters are unchanged, instead of recomputing them every step.

    :meth:`_use_weight_cache` is called at the start of each forward entry point: with gradients
    enabled (or ``weight_cache_enabled`` False) it drops the cache (training must see fresh weights that
    gradients flow through); without gradients it keeps a :func:`wn_rl.cached` context open, keyed by
    every parameter's storage and in-place version counter and the process's count of ``torch.optim`` steps, so
    an optimizer step (fused ones too, whose writes leave the version counter as it was) or ``load_state_dict``
    invalidates it. Updates through ``.data`` (SB3's ``polyak_update``, shrink-and-perturb) bump no version
    counter, and no cheap key shows them (only the values do): networks updated that way (targets) must set
    ``weight_cache_enabled = False``, owners release the cache whenever training starts, and a user who writes
    an online network through ``.data`` calls its policy's ``release_weight_cache()``.
    """

    weight_cache_enabled: bool = True
    _weight_cache: contextlib.ExitStack | None = None
    _weight_cache_key: tuple[Any, ...] | None = None

    def _release_weight_cache(self) -> None:
        stack, self._weight_cache, self._weight_cache_key = self._weight_cache, None, None
        if stack is not None:
            stack.close()

    def _use_weight_cache(self) -> None:
        if torch.is_grad_enabled() or not self.weight_cache_enabled:
            self._release_weight_cache()
            return
        key = (optimizer_steps(), *((p.data_ptr(), p._version) for p in self.parameters()))
        if key != self._weight_cache_key:
            self._release_weight_cache()
            stack = contextlib.ExitStack()
            stack.enter_context(cached(self))
            self._weight_cache, self._weight_cache_key = stack, key

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state["_weight_cache"] = None
        state["_weight_cache_key"] = None
        return state


def first_rows(obs: Any, n: int) -> Any:
    """The first ``n`` observations of a batch: an array or tensor, or a mapping of them (Dict spaces)."""
    if isinstance(obs, Mapping):
        return {key: value[:n] for key, value in obs.items()}
    return obs[:n]
