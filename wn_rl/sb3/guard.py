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

Non-finite rewards or float observations from the environment are caught on the host in ``_on_step``,
before SB3 stores them, and reported as coming from the environment with the vector index and the action.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
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


class NonFiniteGuard:
    """Wraps optimizers so that a step with non-finite gradients or resulting parameters is undone on the
    device; :meth:`check` (one host read) raises :class:`NonFiniteTrainingError` for the first such step.

    Args:
        names: qualified parameter names by ``id(parameter)``, for the error message.
        check_every: gradient steps between two host reads of the flag inside ``train()``.
        context: returns text appended to the error (the environment step, the last good checkpoint).
    """

    def __init__(self, names: dict[int, str], check_every: int = 16, context: Callable[[], str] | None = None) -> None:
        self.names = names
        self.check_every = check_every
        self.context = context
        self.steps = 0  # guarded optimizer steps so far (all optimizers)
        self._tensor_names: list[str] = []
        self._bad_code: th.Tensor | None = None  # 0 ok, else a key of _WHAT (device scalar)
        self._bad_step: th.Tensor | None = None
        self._bad_mask: th.Tensor | None = None  # which of _tensor_names were bad in the first bad step

    def wrap(self, optimizer: th.optim.Optimizer, label: str) -> None:
        """Guard ``optimizer.step`` (idempotent); ``label`` names the optimizer in errors."""
        if getattr(optimizer, "_wn_rl_guard", None) is self:
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if not params:
            return
        device = params[0].device
        if self._bad_code is None:
            self._bad_code = th.zeros((), dtype=th.long, device=device)
            self._bad_step = th.zeros((), dtype=th.long, device=device)
            self._bad_mask = th.zeros(0, dtype=th.bool, device=device)
        offset = len(self._tensor_names)
        self._tensor_names += [
            f"{label}: {self.names.get(id(p), f'param_groups parameter {i}')}" for i, p in enumerate(params)
        ]
        self._bad_mask = th.cat([self._bad_mask, th.zeros(len(params), dtype=th.bool, device=device)])
        unguarded = optimizer.step

        def step(closure: Callable | None = None) -> Any:
            return self._guarded_step(optimizer, unguarded, params, offset, closure)

        optimizer.step = step
        optimizer._wn_rl_guard = self

    @staticmethod
    def _state_tensors(optimizer: th.optim.Optimizer, params: list[th.Tensor]) -> list[th.Tensor]:
        device = params[0].device
        out = [p.data for p in params]
        for p in params:
            state = optimizer.state.get(p, {})
            out += [t for t in state.values() if isinstance(t, th.Tensor) and t.device == device]
        return out

    def _guarded_step(self, optimizer: Any, unguarded: Callable, params: list, offset: int, closure: Any) -> Any:
        with th.no_grad():
            device = params[0].device
            grad_ok = th.stack(
                [
                    th.isfinite(p.grad).all() if p.grad is not None else th.ones((), dtype=th.bool, device=device)
                    for p in params
                ]
            )
            saved = [t.detach().clone() for t in self._state_tensors(optimizer, params)]
        result = unguarded(closure) if closure is not None else unguarded()
        with th.no_grad():
            param_ok = th.stack([th.isfinite(p).all() for p in params])
            ok = grad_ok.all() & param_ok.all()
            live = self._state_tensors(optimizer, params)  # moments created by this first step restart at zero
            saved += [th.zeros_like(t) for t in live[len(saved) :]]
            for tensor, old in zip(live, saved, strict=True):
                tensor.copy_(th.where(ok, tensor, old))
            self.steps += 1
            first = (self._bad_code == 0) & ~ok
            code = th.where(grad_ok.all(), 2, 1)
            self._bad_step = th.where(first, self.steps, self._bad_step)
            self._bad_code = th.where(first, code, self._bad_code)
            mask = th.where(code == 1, ~grad_ok, ~param_ok)
            window = self._bad_mask[offset : offset + len(params)]
            window.copy_(th.where(first, mask, window))
        if self.steps % self.check_every == 0:
            self.check()
        return result

    def check(self) -> None:
        """Raise :class:`NonFiniteTrainingError` if any guarded step was not finite (one host read)."""
        if self._bad_code is None or int(self._bad_code) == 0:
            return
        code, step = int(self._bad_code), int(self._bad_step)
        names = [n for n, bad in zip(self._tensor_names, self._bad_mask.tolist(), strict=True) if bad]
        tensor = names[0] if names else "?"
        raise NonFiniteTrainingError(
            f"non-finite value (NaN or inf) in {_WHAT[code]} of {', '.join(names) or 'an unnamed tensor'} at "
            f"gradient step {step:,}; that step and any later bad ones were not applied. Lower the learning rate, "
            "set max_grad_norm, or check the rewards and observations." + (self.context() if self.context else ""),
            step,
            tensor,
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


def _parameter_names(model: BaseAlgorithm) -> dict[int, str]:
    names = {id(p): f"policy.{n}" for n, p in model.policy.named_parameters()}
    for name, value in vars(model).items():
        if isinstance(value, th.Tensor) and value.requires_grad:
            names.setdefault(id(value), name)  # SAC's log_ent_coef
    return names


class NonFiniteGuardCallback(BaseCallback):
    """Installs a :class:`NonFiniteGuard` on every optimizer of the model, checks it at each rollout start
    and at the end of training, and checks rewards and float observations at every environment step.

    Args:
        last_checkpoint: returns the newest checkpoint written (or resumed from), named in the error.
    """

    def __init__(self, last_checkpoint: Callable[[], Path | None] = lambda: None, verbose: int = 0) -> None:
        super().__init__(verbose)
        self.last_checkpoint = last_checkpoint
        self.guard: NonFiniteGuard | None = None

    def _init_callback(self) -> None:
        self.guard = NonFiniteGuard(_parameter_names(self.model), context=self._context)
        for label, optimizer in model_optimizers(self.model).items():
            self.guard.wrap(optimizer, label)

    def _context(self) -> str:
        last = self.last_checkpoint() or "none written yet"
        return f" Detected at environment step {self.model.num_timesteps:,}; last good checkpoint: {last}."

    def check(self) -> None:
        """Raise :class:`NonFiniteTrainingError` naming the step, the tensor and the last good checkpoint."""
        self.guard.check()

    def _on_rollout_start(self) -> None:
        self.check()

    def _on_training_end(self) -> None:
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
