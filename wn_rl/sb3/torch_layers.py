"""Building blocks shared by the weight-normalized SB3 policies: the Nature CNN and the Dict-observation
extractor in any parameterization, the actor-critic MLP extractor, MLP heads, per-part ``init_scale`` and
the observation-space checks that tell a user which policy fits.

Every layer is built by :class:`wn_rl.Parameterization` (the core's single source of truth), so one
``parameterization`` value switches the whole policy between the paper's five parameterizations
(section 5.1). Output heads never get a normalisation layer (``Parameterization.without_norm``): a
batch-dependent shift of a Q-value or an action logit is not what a head should compute.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym
import torch as th
from gymnasium import spaces
from stable_baselines3.common.preprocessing import get_flattened_obs_dim, is_image_space
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor, NatureCNN
from torch import nn

from wn_rl.layers import is_count
from wn_rl.parameterization import Parameterization, mlp

__all__ = [
    "DEFAULT_INIT_SCALES",
    "WnCombinedExtractor",
    "WnMlpExtractor",
    "WnNatureCNN",
    "check_dict_space",
    "check_image_space",
    "check_vector_space",
    "head_mlp",
    "resolve_init_scales",
]

# Target std of each part's pre-activations after data-dependent init (section 3). The action head
# starts small like SB3's orthogonal gain 0.01, the value and Q heads at 1.
DEFAULT_INIT_SCALES: dict[str, float] = {
    "features": 1.0,
    "hidden": 1.0,
    "action": 0.01,
    "log_std": 0.01,
    "value": 1.0,
    "q": 1.0,
}

ParameterizationLike = str | Parameterization


def resolve_init_scales(parts: Sequence[str], init_scale: float | Mapping[str, float] | None) -> dict[str, float]:
    """The per-part ``init_scale`` of one policy family.

    Args:
        parts: the parts this policy has (e.g. ``("features", "hidden", "action", "value")``).
        init_scale: ``None`` for the defaults (:data:`DEFAULT_INIT_SCALES`), one number for every part,
            or a mapping overriding some parts.
    """
    scales = {part: DEFAULT_INIT_SCALES[part] for part in parts}
    if init_scale is None:
        return scales
    if isinstance(init_scale, (int, float)) and not isinstance(init_scale, bool):
        return dict.fromkeys(parts, float(init_scale))
    if not isinstance(init_scale, Mapping):
        raise TypeError(f"init_scale={init_scale!r}: expected None, a number or a mapping {{part: number}}")
    unknown = sorted(set(init_scale) - set(parts))
    if unknown:
        head = "action" if "action" in parts else parts[-1]  # the usual override: a small output layer
        raise ValueError(
            f"init_scale has unknown part(s) {unknown}; this policy's parts are {list(parts)} "
            f"(e.g. init_scale=dict({head}=0.01))"
        )
    for part, value in init_scale.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"init_scale[{part!r}]={value!r} must be a positive number (a target std)")
        scales[part] = float(value)
    return scales


_TUPLE_FIT = (
    "No SB3 policy takes Tuple observations: return a Dict (one key per entry) for a multi-input policy, or "
    "flatten them with gymnasium.wrappers.FlattenObservation"
)


def _what_fits(
    observation_space: gym.Space, normalized_image: bool, *, vector: str, image: str = "", dict_: str = ""
) -> str:
    """The sentence naming what takes ``observation_space``: ``dict_`` for a Dict, ``image`` for an image,
    ``vector`` for any other array (a check calls this only for the kinds it refuses)."""
    if isinstance(observation_space, spaces.Dict):
        return f"Use {dict_} for Dict observations (a WnNatureCNN for each image entry)"
    if isinstance(observation_space, spaces.Tuple):
        return _TUPLE_FIT
    if is_image_space(observation_space, check_channels=False, normalized_image=normalized_image):
        return f"Use {image} for image observations"
    return f"Use {vector} for vector observations"


def check_image_space(
    observation_space: gym.Space,
    policy: str,
    *,
    normalized_image: bool = False,
    alternative: str = "an MLP policy",
    dict_alternative: str = "WnCombinedExtractor",
) -> None:
    """Raise a ``ValueError`` naming the policy that fits unless ``observation_space`` is an image:
    ``alternative`` for vector observations, ``dict_alternative`` for Dict observations."""
    if is_image_space(observation_space, check_channels=False, normalized_image=normalized_image):
        return
    fit = _what_fits(observation_space, normalized_image, vector=alternative, dict_=dict_alternative)
    raise ValueError(
        f"{policy} needs image observations (a Box of shape (C, H, W) or (H, W, C), dtype uint8, values in "
        f"[0, 255]; pass normalize_images=False for images already in [0, 1]); got {observation_space}. {fit}."
    )


def check_vector_space(
    observation_space: gym.Space, policy: str, dict_alternative: str = "WnCombinedExtractor"
) -> None:
    """Raise a ``ValueError`` naming the policy that fits when an MLP policy gets Dict (``dict_alternative``)
    or Tuple observations."""
    if isinstance(observation_space, spaces.Dict):
        raise ValueError(
            f"{policy} flattens one array observation and cannot take Dict observations ({observation_space}); "
            f"use {dict_alternative} (SB3's MultiInputPolicy, weight-normalized), or flatten them with "
            f"gymnasium.wrappers.FlattenObservation to keep {policy}."
        )
    if isinstance(observation_space, spaces.Tuple):
        raise ValueError(f"{policy} cannot take Tuple observations ({observation_space}); {_TUPLE_FIT}.")


def check_dict_space(
    observation_space: gym.Space,
    policy: str,
    *,
    normalized_image: bool = False,
    vector_alternative: str = "an MLP policy",
    image_alternative: str = "a CNN policy",
) -> None:
    """Raise a ``ValueError`` naming the policy that fits unless ``observation_space`` is a Dict:
    ``image_alternative`` for an image, ``vector_alternative`` for any other array."""
    if isinstance(observation_space, spaces.Dict):
        return
    fit = _what_fits(observation_space, normalized_image, vector=vector_alternative, image=image_alternative)
    raise ValueError(
        f"{policy} needs Dict observations (a gymnasium.spaces.Dict: e.g. an image and a vector, or a goal-conditioned "
        f"env's observation, achieved_goal and desired_goal for HerReplayBuffer); got {observation_space}. {fit}."
    )


def _conv_out(size: int, kernel: int, stride: int) -> int:
    return (size - kernel) // stride + 1


class WnNatureCNN(BaseFeaturesExtractor):
    """SB3's ``NatureCNN`` (Mnih et al. 2015) in any of the paper's parameterizations.

    Same layout: conv 32 8x8/4, conv 64 4x4/2, conv 64 3x3/1, each followed by ReLU, then a linear
    layer to ``features_dim`` and ReLU. With the default ``weight_norm`` every layer is
    w = g v / ||v|| (section 2); ``weight_norm+mean_only_bn`` adds mean-only batch norm (section 4).
    Observations are channels-first images (SB3 transposes channels-last ones for you).

    Args:
        observation_space: a ``(C, H, W)`` image Box, at least 36x36 (the Nature layout's minimum).
        features_dim: width of the output layer.
        normalized_image: the images are already in [0, 1] (skips the uint8 checks), as in ``NatureCNN``.
        parameterization: name or :class:`wn_rl.Parameterization` of every layer.
        init_scale: target std of every layer's pre-activation after data-dependent init (section 3).
    """

    def __init__(
        self,
        observation_space: gym.Space,
        features_dim: int = 512,
        normalized_image: bool = False,
        parameterization: ParameterizationLike = "weight_norm",
        init_scale: float = 1.0,
    ) -> None:
        check_image_space(observation_space, "WnNatureCNN", normalized_image=normalized_image)
        if features_dim < 1:
            raise ValueError(f"features_dim={features_dim!r} must be a positive number of features")
        super().__init__(observation_space, features_dim)
        channels, height, width = observation_space.shape
        sizes = [height, width]
        for kernel, stride in ((8, 4), (4, 2), (3, 1)):
            sizes = [_conv_out(s, kernel, stride) for s in sizes]
        if min(sizes) < 1:
            raise ValueError(
                f"WnNatureCNN needs channels-first images of at least 36x36 (the Nature CNN's 8/4, 4/2, 3/1 "
                f"convolutions); got shape {observation_space.shape}. For small images (e.g. MinAtar's 10x10) "
                "pass a features_extractor_class of your own built with wn_rl.Parameterization."
            )
        p = Parameterization.get(parameterization)
        self.parameterization = p
        self.cnn = nn.Sequential(
            p.conv2d(channels, 32, 8, stride=4, init_scale=init_scale),
            nn.ReLU(),
            p.conv2d(32, 64, 4, stride=2, init_scale=init_scale),
            nn.ReLU(),
            p.conv2d(64, 64, 3, stride=1, init_scale=init_scale),
            nn.ReLU(),
            nn.Flatten(),
        )
        n_flatten = 64 * sizes[0] * sizes[1]
        self.linear = nn.Sequential(p.linear(n_flatten, features_dim, init_scale=init_scale), nn.ReLU())

    def forward(self, observations: th.Tensor) -> th.Tensor:
        return self.linear(self.cnn(observations))


class WnCombinedExtractor(BaseFeaturesExtractor):
    """SB3's ``CombinedExtractor`` (Dict observations) in any of the paper's parameterizations.

    Each image entry of the Dict (``is_image_space``: a uint8 Box of shape (C, H, W) in [0, 255], or any
    3-D Box with ``normalized_image``) goes through its own :class:`WnNatureCNN` with ``cnn_output_dim``
    features; every other entry is flattened. The features are concatenated in the space's key order, as
    SB3's, so ``features_dim`` and the module names (``extractors.<key>``) are SB3's; with
    ``parameterization="normal"`` it is SB3's extractor with this project's initialization.

    Args:
        observation_space: a ``gymnasium.spaces.Dict`` of Box, Discrete, MultiDiscrete or MultiBinary entries.
        cnn_output_dim: features of each image entry's CNN (SB3's default 256).
        normalized_image: the images are already in [0, 1] (skips the uint8 checks), as in ``CombinedExtractor``.
        parameterization: name or :class:`wn_rl.Parameterization` of every CNN layer.
        init_scale: target std of every CNN layer's pre-activation after data-dependent init (section 3).
    """

    def __init__(
        self,
        observation_space: gym.Space,
        cnn_output_dim: int = 256,
        normalized_image: bool = False,
        parameterization: ParameterizationLike = "weight_norm",
        init_scale: float = 1.0,
    ) -> None:
        check_dict_space(
            observation_space,
            "WnCombinedExtractor",
            normalized_image=normalized_image,
            vector_alternative="SB3's FlattenExtractor",
            image_alternative="WnNatureCNN",
        )
        super().__init__(observation_space, features_dim=1)  # the true size is known after the loop, as in SB3
        self.parameterization = Parameterization.get(parameterization)
        extractors: dict[str, nn.Module] = {}
        features_dim = 0
        for key, subspace in observation_space.spaces.items():
            if is_image_space(subspace, normalized_image=normalized_image):
                try:
                    extractors[key] = WnNatureCNN(
                        subspace, cnn_output_dim, normalized_image, self.parameterization, init_scale
                    )
                except ValueError as error:
                    raise ValueError(f"WnCombinedExtractor, observation key {key!r}: {error}") from error
                features_dim += cnn_output_dim
            else:
                extractors[key] = nn.Flatten()
                features_dim += get_flattened_obs_dim(subspace)
        self.extractors = nn.ModuleDict(extractors)
        self._features_dim = features_dim

    def forward(self, observations: Mapping[str, th.Tensor]) -> th.Tensor:
        return th.cat([extractor(observations[key]) for key, extractor in self.extractors.items()], dim=1)


def check_net_arch(net_arch: Any) -> None:
    """Refuse, before any layer is built, a ``net_arch`` (a list of widths, or a dict of lists) with a width that
    is not a positive integer: a layer without units computes nothing, and a weight-normalized one has no norm."""
    sides = net_arch.values() if isinstance(net_arch, Mapping) else [net_arch]
    for widths in sides:
        try:
            found = None if isinstance(widths, (str, bytes)) else list(widths)
        except TypeError:
            found = None
        if found is None or not all(is_count(w) for w in found):
            raise ValueError(
                f"net_arch={net_arch!r} must list the hidden layers' widths as positive integers, e.g. "
                "net_arch=[64, 64] ([] for no hidden layer; dict(pi=[...], vf=[...]) for separate actor and critic "
                "layers where the policy takes it)"
            )


def head_mlp(
    input_dim: int,
    output_dim: int,
    net_arch: Sequence[int],
    activation_fn: type[nn.Module],
    parameterization: ParameterizationLike,
    *,
    hidden_scale: float,
    output_scale: float,
    squash_output: bool = False,
) -> nn.Sequential:
    """SB3's ``create_mlp`` in a parameterization: hidden layers ``net_arch`` with activations, then an
    output layer of ``output_dim`` units (none when ``output_dim <= 0``) that never gets a norm layer.

    The output layer's ``init_scale`` is ``output_scale``; a ``Tanh`` follows when ``squash_output``.
    """
    check_net_arch(net_arch)
    p = Parameterization.get(parameterization)
    sizes = [input_dim, *net_arch]
    layers: list[nn.Module] = []
    if len(sizes) > 1:
        layers.extend(mlp(sizes, p, activation_fn, init_scales=hidden_scale, activate_last=True))
    if output_dim > 0:
        layers.append(p.without_norm().linear(sizes[-1], output_dim, init_scale=output_scale))
    if squash_output:
        layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class WnMlpExtractor(nn.Module):
    """SB3's ``MlpExtractor`` (separate policy and value MLPs) in a parameterization.

    ``net_arch`` is a list (same hidden sizes for both) or ``dict(pi=[...], vf=[...])``; an empty list
    makes that side the identity. Attributes and methods match ``MlpExtractor``: ``policy_net``,
    ``value_net``, ``latent_dim_pi``, ``latent_dim_vf``, ``forward``, ``forward_actor``,
    ``forward_critic``.
    """

    def __init__(
        self,
        feature_dim: int,
        net_arch: list[int] | dict[str, list[int]],
        activation_fn: type[nn.Module],
        parameterization: ParameterizationLike = "weight_norm",
        init_scale: float = 1.0,
        device: th.device | str = "cpu",
    ) -> None:
        super().__init__()
        check_net_arch(net_arch)
        if isinstance(net_arch, Mapping):
            unknown = sorted(set(net_arch) - {"pi", "vf"})
            if unknown:
                raise ValueError(f"net_arch has unknown key(s) {unknown}; expected dict(pi=[...], vf=[...])")
            pi_dims, vf_dims = list(net_arch.get("pi", [])), list(net_arch.get("vf", []))
        else:
            pi_dims = vf_dims = list(net_arch)
        scales = {"hidden_scale": init_scale, "output_scale": init_scale}
        self.policy_net = head_mlp(feature_dim, 0, pi_dims, activation_fn, parameterization, **scales).to(device)
        self.value_net = head_mlp(feature_dim, 0, vf_dims, activation_fn, parameterization, **scales).to(device)
        self.latent_dim_pi = pi_dims[-1] if pi_dims else feature_dim
        self.latent_dim_vf = vf_dims[-1] if vf_dims else feature_dim

    def forward(self, features: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        return self.forward_actor(features), self.forward_critic(features)

    def forward_actor(self, features: th.Tensor) -> th.Tensor:
        return self.policy_net(features)

    def forward_critic(self, features: th.Tensor) -> th.Tensor:
        return self.value_net(features)


def uses_nature_layout(features_extractor_class: type) -> bool:
    """Whether SB3 would treat this extractor as the Nature CNN (default ``net_arch=[]``)."""
    return issubclass(features_extractor_class, (NatureCNN, WnNatureCNN))


def extractor_kwargs(
    features_extractor_class: type,
    features_extractor_kwargs: Mapping[str, Any] | None,
    parameterization: ParameterizationLike,
    init_scale: float,
    normalize_images: bool,
) -> dict[str, Any]:
    """The features-extractor kwargs with our ``parameterization`` / ``init_scale`` filled in for
    :class:`WnNatureCNN` and :class:`WnCombinedExtractor` (user-given values win) and ``normalized_image``
    set as SB3 does."""
    kwargs = dict(features_extractor_kwargs or {})
    if issubclass(features_extractor_class, (WnNatureCNN, WnCombinedExtractor)):
        kwargs.setdefault("parameterization", parameterization)
        kwargs.setdefault("init_scale", init_scale)
        if not normalize_images:
            kwargs["normalized_image"] = True
    return kwargs
