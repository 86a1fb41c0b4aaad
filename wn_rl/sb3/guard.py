"""A NaN/inf guard for SB3 training: a non-finite gradient or parameter is never applied, never saved, and
stops the run within one rollout with an error naming the step, the tensor and the last good checkpoint.

SB3 computes its losses and steps its optimizers inside ``algo.train()``, out of a callback's reach, so the
guard wraps ``step`` of every optimizer of the model (``policy.optimizer``, ``actor.optimizer``,
``critic.optimizer``, SAC's ``ent_coef_optimizer``, ...). A wrapped step checks the gradients first, runs
the real step, checks the new parameters, and where anything is not finite puts back the parameters and
the optimizer state saved before the step, all with ``torch.where`` on the device: no host
synchronisation per gradient step. A non-finite loss shows up as non-finite gradients. The flag is read
every ``check_every`` gradient steps (so a run stops within a few updates even when one ``train()`` call
makes hundreds), at every rollout start, before every checkpoint and before the final save.

sb3-contrib's TRPO moves its actor without an optimizer (conjugate gradient, then a line search that writes
``param.data``), so under TRPO the callback also watches that update (:class:`_TrpoActorCheck`): its first
line-search trial is checked before it is evaluated, and a non-finite one is undone and stops the run.

Non-finite rewards or float observations from the environment are caught on the host in ``_on_step``,
before SB3 stores them, and reported as coming from the environment with the vector index and the action.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from sb3_contrib import TRPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback

__all__ = ["EnvNonFiniteError", "NonFiniteGuard", "NonFiniteGuardCallback", "NonFiniteTrainingError"]

_WHAT = {1: "the gradient", 2: "the updated parameter"}


class NonFiniteTrainingError(FloatingPointError):
    """A gradient step produced a NaN or inf; that step (and any later bad one) was not applied."""

    def __init__(self, message: str, step: int, tensor: str) -> None:
        super().__init__(message)
        self.step = step
        self.tensor = tensor


class EnvNonFiniteError(FloatingPointError):
    """The environment returned a NaN or inf reward or observation."""


def _nonfinite(tensors: list[th.Tensor]) -> th.Tensor:
    """A one-element tensor, non-zero when any of ``tensors`` holds a NaN or inf: one fused kernel (the
    check ``torch.amp.GradScaler`` uses; the tensors are multiplied by 1, which leaves them unchanged)."""
    found = th.zeros(1, device=tensors[0].device)
    th._amp_foreach_non_finite_check_and_unscale_(tensors, found, th.ones(1, device=found.device))
    return found


def _nonfinite_mask(tensors: list[th.Tensor | None]) -> th.Tensor:
    """Per tensor, whether it holds a NaN or inf (``None`` counts as finite), on the device."""
    present = [i for i, t in enumerate(tensors) if t is not None]
    device = tensors[present[0]].device if present else "cpu"
    mask = th.zeros(len(tensors), dtype=th.bool, device=device)
    if present:  # 0 * x is 0 for finite x and NaN for NaN or inf
        norms = th._foreach_norm(th._foreach_mul([tensors[i] for i in present], 0.0))
        mask[present] = th.isnan(th.stack(norms))
    return mask


class _GuardedOptimizer:
    """One optimizer's guarded ``step``: saves the state before the step and puts it back after a bad one."""

    def __init__(self, guard: NonFiniteGuard, optimizer: th.optim.Optimizer, params: list, offset: int) -> None:
        self.guard, self.optimizer, self.params, self.offset = guard, optimizer, params, offset
        # the optimizer's own step, also where an earlier guard (an earlier learn()) had wrapped it
        self.unguarded = getattr(optimizer, "_wn_rl_unguarded_step", None) or optimizer.step
        self.saved: list[th.Tensor] = []

    def live(self) -> list[th.Tensor]:
        """Everything a step changes: the parameters and the optimizer state on their device."""
        device = self.params[0].device
        out = [p.data for p in self.params]
        for p in self.params:
            state = self.optimizer.state.get(p, {})
            out += [t for t in state.values() if isinstance(t, th.Tensor) and t.device == device]
        return out

    def save(self) -> None:
        live = self.live()
        if [t.shape for t in self.saved] == [t.shape for t in live]:
            th._foreach_copy_(self.saved, live)  # into the buffers of the previous step: no allocation
        else:
            self.saved = [t.detach().clone() for t in live]

    def restore(self, ok: th.Tensor | None = None) -> None:
        """Put back the saved state (where ``ok`` is false, without a host read, when ``ok`` is given)."""
        live = self.live()
        saved = self.saved + [th.zeros_like(t) for t in live[len(self.saved) :]]  # moments the step created
        if ok is None:
            th._foreach_copy_(live, saved)
            return
        for tensor, old in zip(live, saved, strict=True):
            tensor.copy_(th.where(ok, tensor, old))

    def step(self, closure: Callable | None = None) -> Any:
        with th.no_grad():
            if self.guard.sync_free:
                return self._step_on_device(closure)
            grads = [p.grad for p in self.params if p.grad is not None]
            if grads and _nonfinite(grads).item():  # a host read is free on the CPU
                self.guard.record_host(1, _nonfinite_mask([p.grad for p in self.params]), self.offset)
                self.guard.stepped()
                return None
            self.save()
            result = self._unguarded(closure)
            if _nonfinite([p.data for p in self.params]).item():
                self.restore()
                self.guard.record_host(2, _nonfinite_mask([p.data for p in self.params]), self.offset)
            self.guard.stepped()
            return result

    def _step_on_device(self, closure: Callable | None) -> Any:
        grad_bad = _nonfinite_mask([p.grad for p in self.params])
        self.save()
        result = self._unguarded(closure)
        param_bad = _nonfinite_mask([p.data for p in self.params])
        ok = ~(grad_bad.any() | param_bad.any())
        self.restore(ok)
        code = th.where(grad_bad.any(), 1, 2)
        self.guard.record_device(ok, code, th.where(code == 1, grad_bad, param_bad), self.offset)
        self.guard.stepped()
        return result

    def _unguarded(self, closure: Callable | None) -> Any:
        with th.enable_grad():
            return self.unguarded(closure) if closure is not None else self.unguarded()


class NonFiniteGuard:
    """Wraps optimizers so that a step with non-finite gradients or resulting parameters is never applied;
    :meth:`check` raises :class:`NonFiniteTrainingError` for the first such step.

    On the CPU a host read costs nothing: a step with non-finite gradients is skipped, and one whose new
    parameters are not finite is undone from a copy taken before it. On an accelerator (``sync_free``) the
    step always runs and is undone on the device with ``torch.where``; the flag is read every
    ``check_every`` steps and by :meth:`check`.

    Args:
        names: qualified parameter names by ``id(parameter)``, for the error message.
        check_every: gradient steps between two reads of the flag inside ``train()``.
        context: returns text appended to the error (the environment step, the last good checkpoint).
        sync_free: undo bad steps on the device without host reads; ``None``: when the parameters are
            not on the CPU.
    """

    def __init__(
        self,
        names: dict[int, str],
        check_every: int = 16,
        context: Callable[[], str] | None = None,
        sync_free: bool | None = None,
    ) -> None:
        self.names = names
        self.check_every = check_every
        self.context = context
        self.sync_free = sync_free
        self.steps = 0  # guarded optimizer steps so far (all optimizers, skipped ones included)
        self._tensor_names: list[str] = []
        self._host_bad: tuple[int, int, list[bool]] | None = None  # code, step, mask of the first bad step
        self._bad_code: th.Tensor | None = None  # the same on the device: 0 ok, else a key of _WHAT
        self._bad_step: th.Tensor | None = None
        self._bad_mask: th.Tensor | None = None

    def wrap(self, optimizer: th.optim.Optimizer, label: str) -> None:
        """Guard ``optimizer.step`` (idempotent; replaces another guard's wrapper); ``label`` names the optimizer
        in errors."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if getattr(optimizer, "_wn_rl_guard", None) is self or not params:
            return
        device = params[0].device
        if self.sync_free is None:
            self.sync_free = device.type != "cpu"
        if self._bad_code is None:
            self._bad_code = th.zeros((), dtype=th.long, device=device)
            self._bad_step = th.zeros((), dtype=th.long, device=device)
            self._bad_mask = th.zeros(0, dtype=th.bool, device=device)
        offset = len(self._tensor_names)
        self._tensor_names += [f"{label}: {self.names.get(id(p), f'parameter {i}')}" for i, p in enumerate(params)]
        self._bad_mask = th.cat([self._bad_mask, th.zeros(len(params), dtype=th.bool, device=device)])
        guarded = _GuardedOptimizer(self, optimizer, params, offset)
        optimizer.step, optimizer._wn_rl_unguarded_step = guarded.step, guarded.unguarded
        optimizer._wn_rl_guard = self

    def record_host(self, code: int, mask: th.Tensor, offset: int) -> None:
        """Note a bad step found by a host read (the first one is reported)."""
        if self._host_bad is None:
            full = [False] * len(self._tensor_names)
            full[offset : offset + len(mask)] = mask.tolist()
            self._host_bad = (code, self.steps + 1, full)

    def record_device(self, ok: th.Tensor, code: th.Tensor, mask: th.Tensor, offset: int) -> None:
        """Note on the device whether this step was bad (the first bad one is reported)."""
        first = (self._bad_code == 0) & ~ok
        self._bad_step = th.where(first, self.steps + 1, self._bad_step)
        self._bad_code = th.where(first, code, self._bad_code)
        window = self._bad_mask[offset : offset + len(mask)]
        window.copy_(th.where(first, mask, window))

    def stepped(self) -> None:
        self.steps += 1
        if self.steps % self.check_every == 0:
            self.check()

    def _first_bad(self) -> tuple[int, int, list[bool]] | None:
        if self._host_bad is not None:
            return self._host_bad
        if self._bad_code is None or int(self._bad_code) == 0:  # one host read
            return None
        return int(self._bad_code), int(self._bad_step), self._bad_mask.tolist()

    def check(self) -> None:
        """Raise :class:`NonFiniteTrainingError` if any guarded step was not finite."""
        bad = self._first_bad()
        if bad is None:
            return
        code, step, mask = bad
        names = [n for n, is_bad in zip(self._tensor_names, mask, strict=True) if is_bad]
        raise NonFiniteTrainingError(
            f"non-finite value (NaN or inf) in {_WHAT[code]} of {', '.join(names) or 'an unnamed tensor'} at "
            f"gradient step {step:,}; that step and any later bad ones were not applied. Lower the learning rate, "
            "set max_grad_norm, or check the rewards and observations." + (self.context() if self.context else ""),
            step,
            names[0] if names else "?",
        )


def model_optimizers(model: BaseAlgorithm) -> dict[str, th.optim.Optimizer]:
    """Every optimizer of an SB3 model, by attribute path (``policy.optimizer``, ``policy.critic.optimizer``...)."""
    found: dict[str, th.optim.Optimizer] = {}
    for module_name, module in model.policy.named_modules():
        optimizer = getattr(module, "optimizer", None)
        if isinstance(optimizer, th.optim.Optimizer) and all(o is not optimizer for o in found.values()):
            found[".".join(filter(None, ("policy", module_name, "optimizer")))] = optimizer
    for name, value in vars(model).items():
        if isinstance(value, th.optim.Optimizer) and all(o is not value for o in found.values()):
            found[name] = value
    return found


class _TrpoActorCheck:
    """Watches one ``TRPO.train()`` actor update, which no optimizer makes: TRPO takes the gradients of the policy
    objective and of the KL divergence with ``torch.autograd.grad``, solves for the search direction by conjugate
    gradient, then tries ``theta_old + step * direction`` by writing ``param.data`` (Schulman et al. 2015, appendix
    C). A NaN objective, KL or direction makes every trial NaN; comparisons with NaN are false, so TRPO would reject
    every update and go on never learning (or, with torch.distributions' argument checks on, stop with a
    ``ValueError`` and the NaN left in the actor).

    Installed at a rollout's end, removed at the next rollout's start (``train()`` runs in between): gradient hooks
    note non-finite actor gradients on the device, and a forward pre-hook on ``action_net`` checks the first
    trial, the first forward without autograd after one with it, with one host read per update. A non-finite trial
    or gradient puts the actor back to the copy taken at the rollout's end and raises before the trial is used.
    Later trials need no check: they are the same step, shrunk.
    """

    def __init__(self, model: TRPO, names: dict[int, str], context: Callable[[], str]) -> None:
        self.model, self.context = model, context
        # TRPO's own rule for its actor (``TRPO._compute_actor_grad``): every parameter not named "value"
        self.params = [p for n, p in model.policy.named_parameters() if "value" not in n]
        self.names = [names.get(id(p), f"actor parameter {i}") for i, p in enumerate(self.params)]
        self.saved: list[th.Tensor] = []
        self.grad_bad = th.zeros(len(self.params), dtype=th.bool, device=self.params[0].device)
        self.handles: list[th.utils.hooks.RemovableHandle] = []
        self.trial_next = False  # a forward with autograd was seen: the next one without it is the first trial
        self.error: NonFiniteTrainingError | None = None

    def install(self) -> None:
        """Copy the actor and hook it for the coming ``train()``."""
        self.remove()
        live = [p.detach() for p in self.params]
        if [t.shape for t in self.saved] == [t.shape for t in live]:
            th._foreach_copy_(self.saved, live)
        else:
            self.saved = [t.clone() for t in live]
        self.grad_bad.zero_()
        self.trial_next = False
        self.handles = [p.register_hook(self._gradient_hook(i)) for i, p in enumerate(self.params)]
        self.handles.append(self.model.policy.action_net.register_forward_pre_hook(self._before_action_net))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _gradient_hook(self, i: int) -> Callable[[th.Tensor], None]:
        def hook(grad: th.Tensor) -> None:
            with th.no_grad():
                self.grad_bad[i].logical_or_(~th.isfinite(grad).all())

        return hook

    def _before_action_net(self, module: th.nn.Module, args: tuple) -> None:
        if th.is_grad_enabled():
            self.trial_next = True
            return
        if not self.trial_next:
            return
        self.trial_next = False
        trial_bad = _nonfinite_mask([p.data for p in self.params])
        grad_bad, trial_bad = th.stack([self.grad_bad, trial_bad]).tolist()  # the one host read of this update
        if any(grad_bad) or any(trial_bad):
            with th.no_grad():
                th._foreach_copy_([p.data for p in self.params], self.saved)
            self.remove()
            self.error = self._error(grad_bad if any(grad_bad) else trial_bad, any(grad_bad))
            raise self.error

    def _error(self, mask: list[bool], in_gradients: bool) -> NonFiniteTrainingError:
        names = [n for n, is_bad in zip(self.names, mask, strict=True) if is_bad]
        what = (
            "the gradients of TRPO's actor (of the policy objective, the KL divergence or a Fisher-vector product)"
            if in_gradients
            else "the line-search step (search direction x step size)"
        )
        update = self.model._n_updates + 1
        return NonFiniteTrainingError(
            f"non-finite value (NaN or inf) in {what} of {', '.join(names)} at TRPO update {update:,}; that update "
            "was not applied (the actor is back to its parameters before it). Normalize the observations and "
            "rewards, raise cg_damping, or check the rewards and observations." + self.context(),
            update,
            names[0],
        )


def _parameter_names(model: BaseAlgorithm) -> dict[int, str]:
    names = {id(p): f"policy.{n}" for n, p in model.policy.named_parameters()}
    for name, value in vars(model).items():
        if isinstance(value, th.Tensor) and value.requires_grad:
            names.setdefault(id(value), name)  # SAC's log_ent_coef
    return names


class NonFiniteGuardCallback(BaseCallback):
    """Installs a :class:`NonFiniteGuard` on every optimizer of the model, checks it at each rollout start
    and at the end of training, and checks rewards and float observations at every environment step. Under
    TRPO it also checks each actor update (:class:`_TrpoActorCheck`), which makes no optimizer step.

    Args:
        last_checkpoint: returns the newest checkpoint written (or resumed from), named in the error.
    """

    def __init__(self, last_checkpoint: Callable[[], Path | None] = lambda: None, verbose: int = 0) -> None:
        super().__init__(verbose)
        self.last_checkpoint = last_checkpoint
        self.guard: NonFiniteGuard | None = None
        self.trpo_actor: _TrpoActorCheck | None = None

    def _init_callback(self) -> None:
        names = _parameter_names(self.model)
        self.guard = NonFiniteGuard(names, context=self._context)
        for label, optimizer in model_optimizers(self.model).items():
            self.guard.wrap(optimizer, label)
        if isinstance(self.model, TRPO):  # its actor update makes no optimizer step
            self.trpo_actor = _TrpoActorCheck(self.model, names, self._context)

    def _context(self) -> str:
        last = self.last_checkpoint() or "none written yet"
        return f" Detected at environment step {self.model.num_timesteps:,}; last good checkpoint: {last}."

    def check(self) -> None:
        """Raise :class:`NonFiniteTrainingError` naming the step, the tensor and the last good checkpoint."""
        self.guard.check()
        if self.trpo_actor is not None and self.trpo_actor.error is not None:
            raise self.trpo_actor.error

    def _on_rollout_start(self) -> None:
        if self.trpo_actor is not None:
            self.trpo_actor.remove()
        self.check()

    def _on_rollout_end(self) -> None:
        if self.trpo_actor is not None:
            self.trpo_actor.install()

    def _on_training_end(self) -> None:
        if self.trpo_actor is not None:
            self.trpo_actor.remove()
        self.check()

    def _on_step(self) -> bool:
        rewards = np.asarray(self.locals.get("rewards", ()), dtype=np.float64).reshape(-1)
        obs = self.locals.get("new_obs")
        bad = ~np.isfinite(rewards)
        if isinstance(obs, np.ndarray) and obs.dtype.kind == "f" and len(obs) == len(rewards):
            bad |= ~np.isfinite(obs.reshape(len(obs), -1)).all(1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            what = f"reward ({rewards[i]})" if not np.isfinite(rewards[i]) else "observation"
            actions = self.locals.get("actions")
            action = np.asarray(actions)[i].tolist() if actions is not None else "unknown"
            raise EnvNonFiniteError(
                f"the environment (vector index {i}) returned a non-finite {what} after action {action} at "
                f"environment step {self.num_timesteps:,}. This comes from the environment, not the learner: fix "
                "or wrap the env; nothing from this step was stored or learned. Last good checkpoint: "
                f"{self.last_checkpoint() or 'none written yet'}."
            )
        return True
