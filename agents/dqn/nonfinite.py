"""Non-finite values in a DQN run: the check of every env step's rewards and observations
(:class:`EnvNonFiniteError`), and the run's context added to a non-finite error before it reaches the user."""

from __future__ import annotations

import numpy as np

from agents.dqn.learner import NonFiniteError

__all__ = ["EnvNonFiniteError", "check_env_step", "with_context"]


class EnvNonFiniteError(FloatingPointError):
    """The environment returned a NaN or inf reward or observation."""


def check_env_step(obs: np.ndarray, rewards: np.ndarray, actions: np.ndarray, env: str, agent_step: int) -> None:
    """Raise :class:`EnvNonFiniteError` naming the env, its index and the last action (host data, cheap)."""
    bad_reward = ~np.isfinite(rewards)
    bad_obs = ~np.isfinite(obs).reshape(len(obs), -1).all(1) if obs.dtype.kind == "f" else np.zeros_like(bad_reward)
    if not (bad_reward.any() or bad_obs.any()):
        return
    i = int(np.flatnonzero(bad_reward | bad_obs)[0])
    what = "reward" if bad_reward[i] else "observation"
    value = rewards[i] if bad_reward[i] else "non-finite entries"
    raise EnvNonFiniteError(
        f"the environment {env!r} (vector index {i}) returned a non-finite {what} ({value}) after action "
        f"{int(actions[i])} at agent step {agent_step:,}. This comes from the environment, not the learner: "
        "fix or wrap the env (e.g. a reward/observation check); nothing from this step was stored or learned."
    )


def with_context(exc: Exception, context: str) -> tuple:
    """The arguments that rebuild ``exc`` with ``context`` appended to its message (a :class:`NonFiniteError`
    keeps its update and tensor)."""
    if isinstance(exc, NonFiniteError):
        return (f"{exc} {context}", exc.update, exc.tensor)
    return (f"{exc} {context}",)
