"""The DQN math as pure functions, and the learner that applies it (Mnih et al. 2015; the paper's 5.4).

TD target for a transition with an n-step reward sequence r_0..r_{n-1} that ends after m <= n steps:

    y = sum_{k<m} gamma^k clip(r_k) + gamma^m * (1 - terminal) * Q_target(s_m, argmax_a Q'(s_m, a))

where Q' is the target network (Nature DQN) or the online network (double DQN). A terminal (game over,
or a life loss under the ``nature`` protocol) cuts the bootstrap; a truncation (time limit) keeps it,
bootstrapping from the last real observation. The loss is the Huber loss of y - Q(s, a).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agents.dqn.config import AgentConfig
from agents.dqn.replay import ReplayBatch

__all__ = ["Learner", "epsilon_at", "n_step_returns", "td_targets"]

METRICS = ("loss", "td_error_abs", "q_mean", "grad_norm", "target_mean")


def epsilon_at(agent_step: int, start: float, end: float, decay_agent_steps: int) -> float:
    """Linear exploration schedule: ``start`` at agent step 0 to ``end`` at ``decay_agent_steps``, then flat."""
    if decay_agent_steps <= 0 or agent_step >= decay_agent_steps:
        return end
    return start + (end - start) * (agent_step / decay_agent_steps)


def n_step_returns(rewards: Tensor, terminals: Tensor, truncations: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """Discounted n-step return and bootstrap discount from ``(B, n)`` sequences.

    Rewards after the first end (terminal or truncation) are ignored. Returns ``(G, discount)`` with
    ``discount = gamma^m`` when the sequence bootstraps after m steps and 0 when a terminal ended it.
    """
    n = rewards.shape[1]
    if n == 1:  # the Nature DQN: r + gamma * (1 - terminal) * Q', in two kernels
        return rewards[:, 0], gamma * (~terminals[:, 0]).to(rewards.dtype)
    ended = terminals | truncations
    # alive[k]: no end strictly before step k, so reward k counts.
    ended_before = torch.cumsum(ended.int(), 1) - ended.int() > 0
    alive = ~ended_before
    powers = gamma ** torch.arange(n, device=rewards.device, dtype=rewards.dtype)
    returns = (rewards * alive * powers).sum(1)
    steps = torch.where(ended.any(1), ended.float().argmax(1) + 1, torch.full_like(rewards[:, 0], n).long())
    terminal_end = (terminals & alive).any(1)
    discount = torch.where(terminal_end, torch.zeros_like(returns), gamma ** steps.to(rewards.dtype))
    return returns, discount


def td_targets(returns: Tensor, discount: Tensor, next_q_target: Tensor, next_q_online: Tensor | None) -> Tensor:
    """``returns + discount * Q_target(s', a*)`` with ``a* = argmax Q_target`` (Nature DQN) or
    ``argmax Q_online`` when ``next_q_online`` is given (double DQN)."""
    chooser = next_q_target if next_q_online is None else next_q_online
    best = chooser.argmax(1, keepdim=True)
    return returns + discount * next_q_target.gather(1, best).squeeze(1)


def make_optimizer(params: list[nn.Parameter], config: AgentConfig) -> torch.optim.Optimizer:
    betas = (config.beta1, config.beta2)
    common = {"lr": config.lr, "eps": config.optimizer_eps, "foreach": True}  # one kernel per op for all tensors
    if config.optimizer == "adamax":
        return torch.optim.Adamax(params, betas=betas, **common)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, betas=betas, **common)
    return torch.optim.RMSprop(params, alpha=0.95, momentum=config.beta1, **common)


class Learner:
    """Online and target Q-networks, the optimizer and the update. Metrics stay on the device: each
    update adds to a running sum that :meth:`read_metrics` reads (one host sync per logging interval)."""

    def __init__(self, q_network: nn.Module, config: AgentConfig, terminal_on_life_loss: bool) -> None:
        self.config = config
        self.q_network = q_network
        self.target_network = copy.deepcopy(q_network).eval()
        for p in self.target_network.parameters():
            p.requires_grad_(False)
        self.optimizer = make_optimizer(list(q_network.parameters()), config)
        self.terminal_on_life_loss = terminal_on_life_loss
        self.updates = 0
        device = next(q_network.parameters()).device
        self._metric_sum = torch.zeros(len(METRICS), device=device)
        self._metric_count = 0

    def sync_target(self) -> None:
        """Copy the online network (parameters and buffers) into the target network."""
        self.target_network.load_state_dict(self.q_network.state_dict())

    def loss(self, batch: ReplayBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Huber TD loss of a batch; returns ``(loss, td_error, q_taken, target)``."""
        c = self.config
        rewards = batch.rewards.clamp(-1.0, 1.0) if c.clip_rewards else batch.rewards
        returns, discount = n_step_returns(rewards, batch.terminals, batch.truncations, c.gamma)
        with torch.no_grad():
            next_q_target = self.target_network(batch.next_obs)
            next_q_online = self.q_network(batch.next_obs) if c.double_dqn else None
            target = td_targets(returns, discount, next_q_target, next_q_online)
        q_taken = self.q_network(batch.obs).gather(1, batch.actions[:, None]).squeeze(1)
        loss = F.huber_loss(q_taken, target, delta=c.huber_delta)
        return loss, (target - q_taken).detach(), q_taken.detach(), target

    def update(self, batch: ReplayBatch) -> None:
        """One gradient step on ``batch``; syncs the target every ``target_update_every_updates``."""
        loss, td_error, q_taken, target = self.loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.q_network.parameters() if p.grad is not None]
        if self.config.max_grad_norm is not None:
            grad_norm = nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        self.optimizer.step()
        self.updates += 1
        if self.updates % self.config.target_update_every_updates == 0:
            self.sync_target()
        row = torch.stack([loss.detach(), td_error.abs().mean(), q_taken.mean(), grad_norm, target.mean()])
        self._metric_sum += row
        self._metric_count += 1

    def read_metrics(self) -> dict[str, float]:
        """Means since the last call (one host synchronisation), ``{}`` when no update ran."""
        if self._metric_count == 0:
            return {}
        values = (self._metric_sum / self._metric_count).tolist()
        self._metric_sum.zero_()
        self._metric_count = 0
        return dict(zip(METRICS, values, strict=True))

    def state_dict(self) -> dict:
        return {
            "q_network": self.q_network.state_dict(),
            "target_network": self.target_network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        self.q_network.load_state_dict(state["q_network"])
        self.target_network.load_state_dict(state["target_network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = int(state["updates"])
