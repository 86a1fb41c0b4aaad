"""The optimizers of the DQN update (``agent.optimizer``: Adamax, Adam, or the Nature DQN's RMSprop) and
the bound on how far one step of each can move a parameter, which the learner's CPU guard uses."""

from __future__ import annotations

import math

import torch
from torch import nn

from agents.dqn.config import AgentConfig

__all__ = ["RMSPROP_ALPHA", "make_optimizer", "step_bound"]

RMSPROP_ALPHA = 0.95  # the squared-gradient average of RMSprop (the Nature DQN's 0.95)


def make_optimizer(params: list[nn.Parameter], config: AgentConfig) -> torch.optim.Optimizer:
    if config.lr is None:
        raise ValueError(
            "agent.lr is None: the default learning rate depends on the parameterization and is filled in by "
            "DQNConfig (load_dqn_config); an AgentConfig used on its own needs an explicit lr, e.g. "
            "AgentConfig(lr=1e-4)."
        )
    betas = (config.beta1, config.beta2)
    common = {"lr": config.lr, "eps": config.optimizer_eps, "foreach": True}  # one kernel per op for all tensors
    if config.optimizer == "adamax":
        return torch.optim.Adamax(params, betas=betas, **common)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, betas=betas, **common)
    return torch.optim.RMSprop(params, alpha=RMSPROP_ALPHA, momentum=config.beta1, **common)


def step_bound(config: AgentConfig) -> float:
    """K with |parameter change| <= lr * K for every step of ``config.optimizer`` (inf if unbounded).

    Adam: |m_hat / sqrt(v_hat)| <= 1 / sqrt((1 - b2)(1 - b1^2 / b2)) when b1^2 < b2 (Cauchy-Schwarz
    over the moments' sums). Adamax: |m_hat| / u <= 1 / (1 - b1 / b2) when b1 < b2 (u >= b2^j |g_{t-j}|).
    RMSprop: |g| / sqrt(avg) <= 1 / sqrt(1 - alpha), and momentum sums that to 1 / (1 - momentum).
    """
    b1, b2 = config.beta1, config.beta2
    if config.optimizer == "adam":
        return 1.0 / math.sqrt((1 - b2) * (1 - b1 * b1 / b2)) if b1 * b1 < b2 else math.inf
    if config.optimizer == "adamax":
        return 1.0 / (1 - b1 / b2) if b1 < b2 else math.inf
    return 1.0 / ((1 - b1) * math.sqrt(1 - RMSPROP_ALPHA))
