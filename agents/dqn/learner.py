"""The DQN math as pure functions, and the learner that applies it (Mnih et al. 2015; the paper's 5.4).

TD target for a transition with an n-step reward sequence r_0..r_{n-1} that ends after m <= n steps:

    y = sum_{k<m} gamma^k clip(r_k) + gamma^m * (1 - terminal) * Q_target(s_m, argmax_a Q'(s_m, a))

where Q' is the target network (Nature DQN) or the online network (double DQN). A terminal (game over,
or a life loss under the ``nature`` protocol) cuts the bootstrap; a truncation (time limit) keeps it,
bootstrapping from the last real observation. The loss is the Huber loss of y - Q(s, a).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agents.dqn.config import AgentConfig
from agents.dqn.optimizer import make_optimizer, step_bound
from agents.dqn.replay import ReplayBatch, ReplayMemory
from agents.dqn.update_mode import keep_freed_memory, resolve_update_mode
from wn_rl import WNLayer, WNRNNCellBase, remove_weight_norm

__all__ = ["Learner", "NonFiniteError", "epsilon_at", "n_step_returns", "parameter_gap", "td_loss", "td_targets"]

METRICS = ("loss", "td_error_abs", "q_mean", "grad_norm", "target_mean")
NONFINITE_CHECK_EVERY = 16  # updates between host reads of the on-device non-finite flag
GRADIENT_LIMIT = 1e18  # CPU guard: gradient norms below this keep Adam's g^2 finite
PARAMETER_LIMIT = 1e37  # CPU guard: parameter norms below this (float32 max 3.4e38) are safely finite
# The first compiled update is checked against the eager one: a weight counts as moved differently when the
# two differ by more than this fraction of lr (an optimizer step is ~lr), the graph as wrong when more than
# COMPILED_CHECK_SHARE of the weights do. Correct graphs on a CPU (scripts/bench_compiled_check.py, three
# updates, each optimizer, normal and weight_norm): MinAtar at most 0.03 lr apart; the Nature CNN at most
# 0.0041% of its weights over 0.1 lr (near-zero gradients whose sign rounds differently).
COMPILED_CHECK_STEP_FRACTION = 0.1
COMPILED_CHECK_SHARE = 1e-3
_WHAT = {1: "the loss", 2: "the gradients", 3: "the parameters after the optimizer step"}


def _folded(target: nn.Module) -> nn.Module:
    """``target`` with its weight-normalized layers folded into plain ones (w = g v / ||v|| computed once),
    or ``target`` itself when it has none. The target network changes only at a sync, so its TD targets
    need no norms per update: a frozen copy computes them at ``normal``'s cost."""
    if not any(isinstance(m, (WNLayer, WNRNNCellBase)) for m in target.modules()):
        return target
    with torch.no_grad():
        folded = remove_weight_norm(copy.deepcopy(target)).eval()
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded


def parameter_gap(a: nn.Module, b: nn.Module, bound: float) -> dict[str, float]:
    """How far two copies of a network have drifted apart: the largest absolute difference between their
    parameters (``max_abs_diff``) and the share of entries apart by more than ``bound`` (``share_off``).
    A NaN on one side only counts as infinitely far."""
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    diffs = torch.cat([(x.detach() - y.detach()).abs().flatten() for x, y in pairs])
    diffs = torch.nan_to_num(diffs, nan=math.inf)
    return {"max_abs_diff": diffs.max().item(), "share_off": (diffs > bound).float().mean().item()}


class NonFiniteError(FloatingPointError):
    """A NaN or inf appeared in the loss, the gradients or the parameters (the step was not applied)."""

    def __init__(self, message: str, update: int, tensor: str) -> None:
        super().__init__(message)
        self.update = update
        self.tensor = tensor


def epsilon_at(agent_step: int, start: float, end: float, decay_agent_steps: int, begin: int = 0) -> float:
    """Linear exploration schedule: ``start`` until agent step ``begin``, then linearly to ``end`` over
    ``decay_agent_steps`` more agent steps, then flat."""
    elapsed = agent_step - begin
    if elapsed <= 0:
        return start if decay_agent_steps > 0 else end
    if elapsed >= decay_agent_steps:
        return end
    return start + (end - start) * (elapsed / decay_agent_steps)


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


QFunction = Callable[[Tensor], Tensor]  # observations -> Q-values (a module, or a functional call)


def td_loss(
    q_values: QFunction, target_q_values: QFunction, batch: ReplayBatch, c: AgentConfig
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Huber loss of ``y - Q(s, a)`` (the module docstring's y); returns ``(loss, td_error, q_taken, target)``."""
    rewards = batch.rewards.clamp(-1.0, 1.0) if c.clip_rewards else batch.rewards
    returns, discount = n_step_returns(rewards, batch.terminals, batch.truncations, c.gamma)
    with torch.no_grad():
        next_q_target = target_q_values(batch.next_obs)
        next_q_online = q_values(batch.next_obs) if c.double_dqn else None
        target = td_targets(returns, discount, next_q_target, next_q_online)
    q_taken = q_values(batch.obs).gather(1, batch.actions[:, None]).squeeze(1)
    loss = F.huber_loss(q_taken, target, delta=c.huber_delta)
    return loss, (target - q_taken).detach(), q_taken.detach(), target


def _norms(tensors: list[Tensor]) -> Tensor:
    """Per-tensor 2-norms as one tensor, outside autograd."""
    with torch.no_grad():
        return torch.stack(torch._foreach_norm(tensors))


class Learner:
    """Online and target Q-networks, the optimizer and the update. Metrics stay on the device: each
    update adds to a running sum that :meth:`read_metrics` reads (one host sync per logging interval).

    ``config.update_mode`` picks how an update runs: ``eager`` (autograd and ``torch.optim``, below) or
    ``compiled`` / ``cudagraph`` (:class:`agents.dqn.fused.FusedUpdate`: the same math as one compiled
    graph). Both apply the same step to the same batch, guard it the same way and keep the optimizer
    state in the same format.

    ``target_network`` holds the target parameters in the online network's form (what checkpoints
    store); the TD targets come from ``target_values``, the same network with its weight-normalized
    layers folded into plain ones at every sync, so weight norm costs nothing in the target's forward."""

    def __init__(
        self,
        q_network: nn.Module,
        config: AgentConfig,
        terminal_on_life_loss: bool,
        planned_updates: int | None = None,
    ) -> None:
        self.config = config
        self.q_network = q_network
        self.target_network = copy.deepcopy(q_network).eval()
        for p in self.target_network.parameters():
            p.requires_grad_(False)
        self.target_values = _folded(self.target_network)
        self.optimizer = make_optimizer(list(q_network.parameters()), config)
        self.terminal_on_life_loss = terminal_on_life_loss
        self.updates = 0
        device = next(q_network.parameters()).device
        self.update_mode = resolve_update_mode(config.update_mode, device, q_network, planned_updates)
        self._names = [name for name, _ in q_network.named_parameters()]
        self._bad_name_list = self._names
        # On-device state of the guard and the metrics; written in place by both update paths.
        self._guard_state = {
            "metric_sum": torch.zeros(len(METRICS), device=device),
            "updates": torch.zeros((), dtype=torch.long, device=device),
            "bad_code": torch.zeros((), dtype=torch.long, device=device),  # 0 ok, else a key of _WHAT
            "bad_update": torch.full((), -1, dtype=torch.long, device=device),
            "bad_names": torch.zeros(len(self._names), dtype=torch.bool, device=device),
        }
        self._metric_count = 0
        self._saved: list[Tensor] = []  # the eager guard's copy of the state before the step
        self._saved_buffers: list[Tensor] = []  # and of the float buffers before the forward (batch statistics)
        # CPU: host reads are free, so the eager guard skips bad steps and copies only when a step could overflow
        self._host_checks = device.type == "cpu" and not any(b.is_floating_point() for b in q_network.buffers())
        self._step_bound = step_bound(config)
        self._param_norm_max: float | None = None  # largest parameter norm after the last step (CPU)
        self._fused = None
        self.compiled_check: dict[str, Any] | None = None  # how the first compiled update compared to eager
        if device.type == "cpu":
            keep_freed_memory()
        if self.update_mode != "eager":
            from agents.dqn.fused import FusedUpdate

            self._fused = FusedUpdate(self, self.update_mode)

    def sync_target(self) -> None:
        """Copy the online network (parameters and buffers) into the target network."""
        self.target_network.load_state_dict(self.q_network.state_dict())
        self._refold_target()

    def _refold_target(self) -> None:
        """Bring :attr:`target_values` up to date with :attr:`target_network`, in place (compiled graphs
        and CUDA graphs hold its tensors)."""
        if self.target_values is not self.target_network:
            self.target_values.load_state_dict(_folded(self.target_network).state_dict())

    def loss(self, batch: ReplayBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Huber TD loss of a batch; returns ``(loss, td_error, q_taken, target)``."""
        return td_loss(self.q_network, self.target_values, batch, self.config)

    def update(self, batch: ReplayBatch) -> None:
        """One gradient step on ``batch``; syncs the target every ``target_update_every_updates``.

        A step whose loss, gradients or resulting parameters are not finite is not applied (parameters,
        optimizer moments and float buffers keep their values, selected with ``torch.where``; no host
        synchronisation) and recorded; :meth:`raise_if_nonfinite` runs every ``NONFINITE_CHECK_EVERY``
        updates and raises :class:`NonFiniteError`, so a run stops within a few updates."""
        if self._fused is not None:
            self._checked(lambda: self._fused.update(batch, self._guard_state), lambda: batch)
        else:
            self._eager_update(batch)
        self._after_update()

    def sample_and_update(self, replay: ReplayMemory, batch_size: int, uniforms: Tensor | None = None) -> None:
        """:meth:`update` on a minibatch drawn from ``replay`` (in compiled modes, sampling is in the graph).
        ``uniforms``: the ``(batch_size,)`` U[0, 1) draws to sample with (drawn here when ``None``)."""
        if self._fused is not None:
            if uniforms is None:
                uniforms = torch.rand(batch_size, device=replay.device)  # as ReplayMemory.sample_indices draws them
            self._checked(
                lambda: self._fused.sample_and_update(replay, uniforms, self._guard_state),
                lambda: replay.sample(batch_size, self.terminal_on_life_loss, uniforms=uniforms),
            )
            self._after_update()
        else:
            self.update(replay.sample(batch_size, self.terminal_on_life_loss, uniforms=uniforms))

    def act_sample_and_update(
        self, replay: ReplayMemory, obs: Tensor, draws: tuple[Tensor, Tensor], uniforms: Tensor
    ) -> Tensor:
        """Epsilon-greedy actions for ``obs`` with the current weights (``draws``: the random actions and
        explore flags), then :meth:`sample_and_update`, as one compiled call (:attr:`acts_in_update`).
        Returns the actions."""
        if not self.acts_in_update:
            raise RuntimeError(f"acting inside the update needs agent.update_mode=compiled, not {self.update_mode!r}")
        actions = self._checked(
            lambda: self._fused.act_sample_and_update(replay, uniforms, obs, draws, self._guard_state),
            lambda: replay.sample(uniforms.shape[0], self.terminal_on_life_loss, uniforms=uniforms),
        )
        self._after_update()
        return actions

    @property
    def acts_in_update(self) -> bool:
        """Whether :meth:`act_sample_and_update` is available (compiled updates, not CUDA graphs)."""
        return self._fused is not None and self.update_mode == "compiled"

    @property
    def compiled_if_needed(self) -> bool:
        """Whether an update can run without compiling first (eager, or the graph was compiled)."""
        return self._fused is None or self._fused.calls > 0

    def _checked(self, compiled_update: Callable[[], Any], batch: Callable[[], ReplayBatch]) -> Any:
        """``compiled_update()``; the first one is also done eagerly, on a copy of the learner, and the
        two results compared (:meth:`_compare_with_eager`). A compiled graph that computes something else
        (a torch.compile fault in the installed torch: such a graph was found under torch 2.11,
        docs/benchmarks.md) then warns at the run's first update instead of silently training wrong."""
        if self.compiled_check is not None:
            return compiled_update()
        start = copy.deepcopy(self.q_network), copy.deepcopy(self.optimizer.state_dict())
        out = compiled_update()
        self._compare_with_eager(*start, batch())
        return out

    def _compare_with_eager(self, q_network: nn.Module, optimizer_state: dict, batch: ReplayBatch) -> None:
        """Redo the update just made, from ``q_network`` and ``optimizer_state`` (copies of the state before
        it), with the eager path; record how far apart the results are in :attr:`compiled_check`, and warn
        if too far."""
        reference = Learner(q_network, replace(self.config, update_mode="eager"), self.terminal_on_life_loss)
        reference.target_network.load_state_dict(self.target_network.state_dict())
        reference._refold_target()
        reference.optimizer.load_state_dict(optimizer_state)
        try:
            reference.update(batch)
        except Exception as exc:  # e.g. an lr torch.optim cannot convert: nothing to compare with, no verdict
            self.compiled_check = {"skipped": f"the eager update failed: {type(exc).__name__}: {exc}"}
            return
        bound = COMPILED_CHECK_STEP_FRACTION * self.config.lr
        self.compiled_check = parameter_gap(reference.q_network, self.q_network, bound)
        if self.compiled_check["share_off"] > COMPILED_CHECK_SHARE:
            warnings.warn(
                f"the compiled DQN update (agent.update_mode={self.update_mode}, torch {torch.__version__}) does "
                f"not match the eager update on this run's first step: {self.compiled_check['share_off']:.2%} of "
                f"the weights moved differently by more than {bound:g} (a tenth of the learning rate; largest "
                f"difference {self.compiled_check['max_abs_diff']:.3g}), where a correct graph differs by rounding "
                "only. The compiled graph is likely wrong in this torch version: set agent.update_mode=eager to "
                "train with the eager update.",
                RuntimeWarning,
                stacklevel=4,
            )

    def _after_update(self) -> None:
        self.updates += 1
        self._metric_count += 1
        if self.updates % self.config.target_update_every_updates == 0:
            self.sync_target()
        if self.updates % NONFINITE_CHECK_EVERY == 0:
            self.raise_if_nonfinite()

    def _eager_update(self, batch: ReplayBatch) -> None:
        # a forward with batch statistics updates the norm layers' running statistics before any check: kept
        # here, so a rejected step (a non-finite batch) takes those updates back too
        buffers = [b for b in self.q_network.buffers() if b.is_floating_point()]
        if buffers:
            if [t.shape for t in self._saved_buffers] != [t.shape for t in buffers]:
                self._saved_buffers = [torch.empty_like(t) for t in buffers]
            torch._foreach_copy_(self._saved_buffers, buffers)
        loss, td_error, q_taken, target = self.loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        named = [(n, p) for n, p in zip(self._names, self.q_network.parameters(), strict=True) if p.grad is not None]
        params = [p for _, p in named]
        grad_norms = torch.stack(torch._foreach_norm([p.grad for p in params]))
        if self.config.max_grad_norm is not None:
            grad_norm = nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        else:
            grad_norm = torch.linalg.vector_norm(grad_norms)
        names = [n for n, _ in named]
        # On a CPU a bad step is simply skipped (a free host read) and the state is copied only when the
        # step could overflow; elsewhere it is always copied and selected back on the device.
        provably_finite = self._step_is_provably_finite(loss, grad_norms)
        skip = (
            not provably_finite
            and self._host_checks
            and not bool(torch.isfinite(loss) & torch.isfinite(grad_norms).all())
        )
        copy_state = not (provably_finite or skip)
        if copy_state:
            live = self._state_tensors()
            if [t.shape for t in self._saved] != [t.shape for t in live]:  # allocated once, not per update
                self._saved = [torch.empty_like(t) for t in live]
            torch._foreach_copy_(self._saved, live)
        if not skip:
            self.optimizer.step()
        param_norms = _norms(params)
        if self._host_checks and not skip:
            self._param_norm_max = float(param_norms.max())
        ok = self._guard(loss.detach(), grad_norms, param_norms, names, restore=copy_state)
        for t, old in zip(buffers, self._saved_buffers, strict=True):
            torch.where(ok, t, old, out=t)
        row = torch.stack([loss.detach(), td_error.abs().mean(), q_taken.mean(), grad_norm, target.mean()])
        self._guard_state["metric_sum"] += torch.nan_to_num(row)

    def _state_tensors(self) -> list[Tensor]:
        """Everything an optimizer step (or a forward with batch statistics) changes, on the parameters' device."""
        device = self._guard_state["metric_sum"].device
        out = [p.data for p in self.q_network.parameters()]
        out += [b for b in self.q_network.buffers() if b.is_floating_point()]
        for state in self.optimizer.state.values():
            out += [t for t in state.values() if isinstance(t, Tensor) and t.device == device]
        return out

    def _step_is_provably_finite(self, loss: Tensor, grad_norms: Tensor) -> bool:
        """Whether the optimizer step about to run cannot make anything non-finite, so the copy of the
        state that would undo it can be skipped. Only on a CPU, where reading these scalars costs no
        device synchronisation, and only for networks without float buffers (batch statistics).

        With a finite loss and every gradient norm below ``GRADIENT_LIMIT`` the moments stay finite
        (g^2 < 1e36), and each parameter moves by at most ``lr * K``, K the optimizer's bound on
        |update| / lr (:func:`step_bound`); so when the largest parameter norm after the previous step
        plus ``lr * K`` stays below ``PARAMETER_LIMIT`` the new parameters are finite too."""
        if not self._host_checks or self._param_norm_max is None or not math.isfinite(self._step_bound):
            return False
        lr = max(group["lr"] for group in self.optimizer.param_groups)
        if self._param_norm_max + lr * self._step_bound >= PARAMETER_LIMIT:
            return False
        return bool(torch.isfinite(loss) & (grad_norms < GRADIENT_LIMIT).all())

    def _guard(
        self, loss: Tensor, grad_norms: Tensor, param_norms: Tensor, names: list[str], restore: bool = True
    ) -> Tensor:
        """Record the first bad step (its update, code and tensors) and, with ``restore``, select the saved state
        back where this step is bad; returns ``ok``, a 0-d bool tensor on the device."""
        g = self._guard_state
        bad_grads, bad_params = ~torch.isfinite(grad_norms), ~torch.isfinite(param_norms)
        code = torch.where(
            ~torch.isfinite(loss),
            1,
            torch.where(bad_grads.any(), 2, torch.where(bad_params.any(), 3, 0)),
        )
        ok = code == 0
        if restore:
            live = self._state_tensors()  # optimizer moments created by the first step are restored to zero
            saved = self._saved + [torch.zeros_like(t) for t in live[len(self._saved) :]]
            for t, old in zip(live, saved, strict=True):
                torch.where(ok, t, old, out=t)  # in place: no temporary of the parameters' size
        g["updates"] += 1
        first = (g["bad_code"] == 0) & ~ok
        g["bad_update"].copy_(torch.where(first, g["updates"], g["bad_update"]))
        g["bad_code"].copy_(torch.where(first, code, g["bad_code"]))
        mask = torch.where(code == 2, bad_grads, bad_params)
        if g["bad_names"].shape != mask.shape:  # some parameter got no gradient
            g["bad_names"] = torch.zeros_like(mask)
            self._bad_name_list = names
        g["bad_names"].copy_(torch.where(first, mask, g["bad_names"]))
        return ok

    def raise_if_nonfinite(self) -> None:
        """One host read of the non-finite flag; raises :class:`NonFiniteError` naming the update and tensor."""
        g = self._guard_state
        code = int(g["bad_code"])
        if code == 0:
            return
        update = int(g["bad_update"])
        names = [n for n, bad in zip(self._bad_name_list, g["bad_names"].tolist(), strict=True) if bad]
        what = _WHAT[code] + (f" ({', '.join(names)})" if code > 1 and names else "")
        raise NonFiniteError(
            f"non-finite value (NaN or inf) in {what} at update {update}; that step and any later bad ones "
            "were not applied. Lower agent.lr, set agent.max_grad_norm, or check the rewards and observations.",
            update,
            _WHAT[code],
        )

    def read_metrics(self) -> dict[str, float]:
        """Means since the last call (one host synchronisation), ``{}`` when no update ran."""
        if self._metric_count == 0:
            return {}
        metric_sum = self._guard_state["metric_sum"]
        values = (metric_sum / self._metric_count).tolist()
        metric_sum.zero_()
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
        self._param_norm_max = None  # the CPU guard re-derives its bound from the loaded parameters
        self.q_network.load_state_dict(state["q_network"])
        self.target_network.load_state_dict(state["target_network"])
        self._refold_target()
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = int(state["updates"])
        self._guard_state["updates"].fill_(self.updates)
        if self._fused is not None:
            self._fused.refresh()  # the optimizer's state tensors were replaced
