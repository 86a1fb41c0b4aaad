"""Q-networks, every one built through the core's :class:`wn_rl.Parameterization` builders.

- ``nature_cnn``: the Nature DQN (Mnih et al. 2015) for 4x84x84 Atari stacks: conv 32@8x8/4,
  conv 64@4x4/2, conv 64@3x3/1, fc 512, linear head; the network of the paper's section 5.4.
- ``minatar_cnn``: the MinAtar reference (Young & Tian 2019): conv 16@3x3/1, fc 128, linear head.
- ``mlp``: hidden layers for flat vector observations.

The head (the Q-values) takes the parameterization without its normalisation layer
(``Parameterization.without_norm``): a batch-norm on Q-values would couple the actions of a batch.
uint8 inputs are scaled to [0, 1] inside the network, so observations travel to the device as bytes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from agents.dqn.config import NetworkConfig
from agents.dqn.envs import EnvSpec
from wn_rl.parameterization import Parameterization, mlp

__all__ = ["QNetwork", "build_q_network", "resolve_architecture"]


class QNetwork(nn.Module):
    """``body`` (features) then ``head`` (one Q-value per action); uint8 input is divided by ``input_scale``."""

    def __init__(self, body: nn.Module, head: nn.Module, input_scale: float, n_actions: int) -> None:
        super().__init__()
        self.body = body
        self.head = head
        self.input_scale = input_scale
        self.n_actions = n_actions

    def forward(self, obs: Tensor) -> Tensor:
        x = obs.float()
        if self.input_scale != 1.0:
            x = x * (1.0 / self.input_scale)
        return self.head(self.body(x))


def resolve_architecture(config: NetworkConfig, spec: EnvSpec) -> str:
    """The architecture ``auto`` stands for, given the observations; checks an explicit choice fits."""
    arch = config.architecture
    if arch == "auto":
        arch = {"atari": "nature_cnn", "minatar": "minatar_cnn"}.get(spec.suite, "mlp")
    shape = spec.obs_shape
    expected_dims = {"nature_cnn": 3, "minatar_cnn": 3, "mlp": 1}[arch]
    if len(shape) != expected_dims:
        raise ValueError(
            f"network.architecture={arch!r} expects {expected_dims}-D observations, but {spec.suite}:{spec.name} "
            f"gives shape {shape}; use architecture 'auto'."
        )
    return arch


def _nature_body(p: Parameterization, in_channels: int, height: int, width: int, scale: float = 1.0) -> nn.Sequential:
    convs = nn.Sequential(
        p.conv2d(in_channels, 32, 8, stride=4, init_scale=scale),
        nn.ReLU(),
        p.conv2d(32, 64, 4, stride=2, init_scale=scale),
        nn.ReLU(),
        p.conv2d(64, 64, 3, stride=1, init_scale=scale),
        nn.ReLU(),
        nn.Flatten(),
    )
    with torch.no_grad():  # the flattened size, probed in eval mode (no batch statistics updated)
        flat = convs.eval()(torch.zeros(2, in_channels, height, width)).shape[1]
    convs.train()  # a norm layer left in eval mode would never update its statistics while training
    return nn.Sequential(*convs, p.linear(flat, 512, init_scale=scale), nn.ReLU())


def _minatar_body(p: Parameterization, in_channels: int, height: int, width: int, scale: float = 1.0) -> nn.Sequential:
    flat = 16 * (height - 2) * (width - 2)
    return nn.Sequential(
        p.conv2d(in_channels, 16, 3, stride=1, init_scale=scale),
        nn.ReLU(),
        nn.Flatten(),
        p.linear(flat, 128, init_scale=scale),
        nn.ReLU(),
    )


def build_q_network(config: NetworkConfig, spec: EnvSpec) -> QNetwork:
    """The Q-network for ``spec`` in ``config.parameterization`` (not yet initialised: run
    ``wn_rl.data_dependent_init`` on real observations before training, as the runner does)."""
    p = Parameterization.get(config.parameterization)
    head_p = p.without_norm()
    arch = resolve_architecture(config, spec)
    if arch == "mlp":
        sizes = [int(np.prod(spec.obs_shape)), *config.hidden_sizes]
        body = mlp(sizes, p, init_scales=config.hidden_init_scale, activate_last=True)
        features = sizes[-1]
    else:
        c, h, w = spec.obs_shape
        build = _nature_body if arch == "nature_cnn" else _minatar_body
        body = build(p, c, h, w, config.hidden_init_scale)
        features = 512 if arch == "nature_cnn" else 128
    head = head_p.linear(features, spec.n_actions, init_scale=config.head_init_scale)
    input_scale = 255.0 if spec.suite == "atari" else 1.0
    return QNetwork(body, head, input_scale, spec.n_actions)


def has_batch_statistics(model: nn.Module) -> bool:
    """Whether ``model`` behaves differently in train and eval mode (batch norm, mean-only BN, dropout)."""
    from wn_rl.mean_only_batch_norm import MeanOnlyBatchNorm

    kinds = (MeanOnlyBatchNorm, nn.modules.batchnorm._BatchNorm, nn.Dropout)
    return any(isinstance(m, kinds) for m in model.modules())
