"""Environments for the SB3 script: Atari with SB3's conventions, classic control and MuJoCo through
``make_vec_env``, partially observed variants for recurrent policies, a goal-conditioned env for HER and
one with invalid action masks for MaskablePPO.

Atari: ``<Game>NoFrameskip-v4`` ids through ale-py with SB3's ``AtariWrapper`` (``make_atari_env``:
no-op reset, frame skip 4 with max-pooling, episodic life, fire reset, 84x84 grayscale, reward
clipping) and a 4-frame stack. ``ALE/<Game>-v5`` ids already skip frames and use sticky actions
(p = 0.25), so wrapping them again would skip 16 frames: they are refused with the id to use.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from sb3_contrib.common.envs import InvalidActionEnvDiscrete
from stable_baselines3.common.env_util import make_atari_env, make_vec_env
from stable_baselines3.common.envs import BitFlippingEnv
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv, VecFrameStack

__all__ = ["MaskVelocityWrapper", "is_atari_id", "make_env", "register_envs"]

# Observation entries kept by the partially observed variants (positions and angles, no velocities).
_KEPT_ENTRIES = {
    "CartPole-v1": (0, 2),  # cart position, pole angle (velocities dropped)
    "Pendulum-v1": (0, 1),  # cos(theta), sin(theta) (angular velocity dropped)
}
_NO_VELOCITY_IDS = {f"wn_rl/{base.split('-')[0]}NoVel-{base.split('-')[1]}": base for base in _KEPT_ENTRIES}


class MaskVelocityWrapper(gym.ObservationWrapper):
    """Keep only the position-like entries of a classic-control observation, making the task
    partially observed: velocities must be inferred from the history (a job for a recurrent policy)."""

    def __init__(self, env: gym.Env, kept: tuple[int, ...]) -> None:
        super().__init__(env)
        space = env.observation_space
        if not isinstance(space, spaces.Box) or len(space.shape) != 1:
            raise ValueError(f"MaskVelocityWrapper needs a 1-D Box observation space, got {space}")
        self.kept = np.asarray(kept)
        self.observation_space = spaces.Box(space.low[self.kept], space.high[self.kept], dtype=space.dtype)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return observation[self.kept]


def _make_no_velocity(base_id: str, **kwargs: Any) -> gym.Env:
    return MaskVelocityWrapper(gym.make(base_id, **kwargs), _KEPT_ENTRIES[base_id])


_BIT_FLIPPING_ID = "wn_rl/BitFlipping-v0"


class _BitFlippingEnv(BitFlippingEnv):
    """SB3's ``BitFlippingEnv`` with the render modes it supports declared (SB3's ``make_vec_env`` asks for
    ``rgb_array``, which gymnasium warns about when ``metadata`` lists none)."""

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["human", "rgb_array"]}


_INVALID_ACTION_ID = "wn_rl/InvalidActionDiscrete-v0"


class _InvalidActionEnvDiscrete(InvalidActionEnvDiscrete):
    """sb3-contrib's ``InvalidActionEnvDiscrete`` (observe a state in ``Discrete(dim)``, reward 1 for the action
    equal to it; ``action_masks()`` marks ``n_invalid_actions`` others invalid at each step) with its render modes
    declared (as :class:`_BitFlippingEnv`)."""

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["human", "rgb_array"]}

    def __init__(self, dim: int = 10, ep_length: int = 100, n_invalid_actions: int = 8, render_mode: Any = None):
        if not 0 <= n_invalid_actions < dim:  # sb3-contrib asserts it, which the runner would show as a traceback
            raise ValueError(
                f"env_kwargs: n_invalid_actions={n_invalid_actions} with dim={dim}: expected 0 <= n_invalid_actions "
                "< dim (one action, the observed state, must stay valid); lower n_invalid_actions or raise dim"
            )
        super().__init__(dim=dim, ep_length=ep_length, n_invalid_actions=n_invalid_actions)
        self.render_mode = render_mode


def register_envs() -> None:
    """Register ale-py's Atari ids, the partially observed ``wn_rl/CartPoleNoVel-v1`` and
    ``wn_rl/PendulumNoVel-v1``, ``wn_rl/BitFlipping-v0`` (SB3's goal-conditioned ``BitFlippingEnv``
    for ``HerReplayBuffer``; ``env_kwargs``: ``n_bits``, ``continuous``, ...) and
    ``wn_rl/InvalidActionDiscrete-v0`` (sb3-contrib's ``InvalidActionEnvDiscrete`` for MaskablePPO;
    ``env_kwargs``: ``dim`` 10, ``n_invalid_actions`` 8, ``ep_length`` 100). Idempotent."""
    import ale_py

    gym.register_envs(ale_py)
    if _BIT_FLIPPING_ID not in gym.registry:  # it ends its own episodes after max_steps (n_bits by default)
        gym.register(_BIT_FLIPPING_ID, entry_point=_BitFlippingEnv)
    if _INVALID_ACTION_ID not in gym.registry:  # it ends its own episodes after ep_length steps
        gym.register(_INVALID_ACTION_ID, entry_point=_InvalidActionEnvDiscrete)
    for env_id, base in _NO_VELOCITY_IDS.items():
        if env_id not in gym.registry:
            spec = gym.spec(base)
            gym.register(
                env_id,
                entry_point=_make_no_velocity,
                kwargs={"base_id": base},
                max_episode_steps=None,  # the base env keeps its own time limit
                reward_threshold=spec.reward_threshold,
            )


def is_atari_id(env_id: str) -> bool:
    return env_id.endswith("NoFrameskip-v4")


def check_env_id(env_id: str) -> None:
    """Refuse ids the script would wrap wrongly, with the id to use instead."""
    if env_id.startswith("ALE/"):
        game = env_id.split("/", 1)[1].split("-")[0]
        raise ValueError(
            f"env_id={env_id!r}: ALE/*-v5 ids already skip 4 frames and use sticky actions, and SB3's AtariWrapper "
            f"would skip frames again. Use {game}NoFrameskip-v4 (SB3's convention, wrapped with AtariWrapper)."
        )
    register_envs()
    spec = gym.registry.get(env_id)
    entry = spec.entry_point if spec is not None else None
    if isinstance(entry, str) and entry.startswith("ale_py") and (not is_atari_id(env_id) or "-ram" in env_id):
        game = env_id.split("-")[0].replace("NoFrameskip", "").replace("Deterministic", "")
        raise ValueError(
            f"env_id={env_id!r}: only <Game>NoFrameskip-v4 Atari ids get SB3's AtariWrapper and the frame stack "
            "(this one would train on raw frames, or RAM, and the v0 ids use sticky actions). "
            f"Use {game}NoFrameskip-v4."
        )


def _make_registered(env_id: str, **kwargs: Any) -> gym.Env:
    """``gym.make(env_id)`` after :func:`register_envs`, as SB3's ``make_vec_env`` makes a string id (render mode
    ``rgb_array`` where the env takes one). For ``SubprocVecEnv``: its workers start fresh interpreters
    (forkserver or spawn), where neither ale-py's ids nor ours are registered."""
    register_envs()
    try:
        return gym.make(env_id, **{"render_mode": "rgb_array", **kwargs})
    except TypeError:
        return gym.make(env_id, **kwargs)


def make_env(
    env_id: str,
    n_envs: int,
    seed: int,
    *,
    env_kwargs: dict[str, Any] | None = None,
    atari_wrapper_kwargs: dict[str, Any] | None = None,
    frame_stack: int = 4,
    subprocess: bool = False,
) -> VecEnv:
    """A monitored vectorized env: Atari ids with ``AtariWrapper`` and a frame stack, others via
    ``make_vec_env``. Seeds are ``seed, seed + 1, ...`` per env."""
    check_env_id(env_id)
    register_envs()
    vec_env_cls = SubprocVecEnv if subprocess else DummyVecEnv
    maker: str | Callable[..., gym.Env] = functools.partial(_make_registered, env_id) if subprocess else env_id
    if is_atari_id(env_id):
        env = make_atari_env(
            maker,
            n_envs=n_envs,
            seed=seed,
            wrapper_kwargs=atari_wrapper_kwargs,
            env_kwargs=env_kwargs,
            vec_env_cls=vec_env_cls,
        )
        return VecFrameStack(env, n_stack=frame_stack) if frame_stack > 1 else env
    if atari_wrapper_kwargs:
        raise ValueError(f"atari_wrapper_kwargs={atari_wrapper_kwargs!r} only applies to *NoFrameskip-v4 Atari ids")
    return make_vec_env(maker, n_envs=n_envs, seed=seed, env_kwargs=env_kwargs, vec_env_cls=vec_env_cls)
