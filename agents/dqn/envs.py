"""Vector environments for the native DQN, all with one interface and one reset convention.

- Atari: ale-py's C++ ``AtariVectorEnv`` with the Nature preprocessing (frameskip 4 with max-pool,
  84x84 grayscale, 4-frame stack, up to 30 no-op starts). Rewards are *not* clipped here (the learner
  clips them, so logged returns are game scores), ``episodic_life`` stays off (it would reset the whole
  game at every life loss) and a life loss is derived from ``info["lives"]``: it cuts the TD bootstrap
  in training under the ``nature`` protocol while the game goes on.
- MinAtar (10x10xC binary images, channels moved first, stored as uint8) and any gymnasium env with a
  flat Box observation and Discrete actions, through ``gymnasium.vector.SyncVectorEnv``.

A step is :meth:`VecEnv.send` then :meth:`VecEnv.recv` (``step`` does both). Atari's ``send`` returns at
once and the emulators step in ale-py's C++ threads until ``recv``, so the training loop runs its
updates in between; MinAtar and gym envs step inside ``recv``.

Every env autoresets on the *next* step (gymnasium's NEXT_STEP mode, ale-py's default): the step that
ends an episode returns the real final observation, and the following step ignores its action and
returns the first observation of a new episode with reward 0. :class:`StepResult` marks both.

``VecEnv.env_state()`` returns the state of every game as plain data and ``load_env_state`` puts it
back (see :mod:`agents.dqn.env_state`), so that a resumed run continues the same games bit for bit.
MinAtar and gymnasium's own envs support it; Atari's C++ vector env and envs whose state holds other
objects raise :class:`EnvStateError`, and a resumed run starts fresh games instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from agents.dqn.config import EnvConfig
from agents.dqn.env_state import EnvStateError, capture, restore

__all__ = [
    "MINATAR_GAMES",
    "EnvSpec",
    "EnvStateError",
    "StepResult",
    "VecEnv",
    "atari_games",
    "make_env",
    "protocol_settings",
]

MINATAR_GAMES = {
    "asterix": "Asterix",
    "breakout": "Breakout",
    "freeway": "Freeway",
    "seaquest": "Seaquest",
    "space_invaders": "SpaceInvaders",
}
_PRESETS = {
    "nature": {
        "repeat_action_probability": 0.0,
        "full_action_space": False,
        "terminal_on_life_loss": True,
        "fire_reset": False,
    },
    "machado": {
        "repeat_action_probability": 0.25,
        "full_action_space": True,
        "terminal_on_life_loss": False,
        "fire_reset": False,
    },
}


@dataclass(frozen=True)
class EnvSpec:
    """What the Q-network and the replay memory need to know about observations and actions.

    An observation is ``stack`` frames of ``frame_shape`` (shape ``(stack, *frame_shape)``) when
    ``stack > 1``, else one frame. ``frame_dtype`` is what the replay memory stores.
    """

    suite: str
    name: str
    num_envs: int
    frame_shape: tuple[int, ...]
    stack: int
    frame_dtype: np.dtype
    n_actions: int
    settings: dict[str, Any]

    @property
    def obs_shape(self) -> tuple[int, ...]:
        return (self.stack, *self.frame_shape) if self.stack > 1 else self.frame_shape


@dataclass
class StepResult:
    """One vector step. ``obs`` follows the NEXT_STEP convention described in the module docstring.

    ``terminated``/``truncated`` end the game; ``life_loss`` marks a life lost without game over;
    ``episode_start`` marks observations that are the first of a new episode (their previous step's
    action was ignored by the autoreset); ``rewards`` are raw game rewards.
    """

    obs: np.ndarray
    rewards: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    life_loss: np.ndarray
    episode_start: np.ndarray


def atari_games() -> list[str]:
    """Every Atari ROM name ale-py ships (snake_case)."""
    from ale_py import roms

    return sorted(roms.get_all_rom_ids())


def protocol_settings(config: EnvConfig) -> dict[str, Any]:
    """The resolved Atari protocol (preset values unless overridden), recorded in every run."""
    preset = dict(_PRESETS[config.protocol])
    for key in preset:
        value = getattr(config, key)
        if value is not None:
            preset[key] = value
    return {"protocol": config.protocol, **preset, "noop_max": config.noop_max}


class VecEnv:
    """N environments stepped together; see the module docstring for the conventions."""

    spec: EnvSpec
    _sent: np.ndarray | None = None  # the actions of a step sent and not yet received

    def reset(self, seed: int) -> np.ndarray:
        raise NotImplementedError

    def send(self, actions: np.ndarray) -> None:
        """Start a step with ``actions`` (one per env); :meth:`recv` returns its result. Atari's emulators
        step in ale-py's C++ threads in between, so the caller can work meanwhile; elsewhere the step
        happens in :meth:`recv`."""
        if self._sent is not None:
            raise RuntimeError(
                f"{type(self).__name__}.send() called twice without recv(): receive a step before sending the next"
            )
        self._start(actions)
        self._sent = actions

    def recv(self) -> StepResult:
        """The result of the step :meth:`send` started."""
        if self._sent is None:
            raise RuntimeError(f"{type(self).__name__}.recv() called without send(): send the actions first")
        actions, self._sent = self._sent, None
        return self._finish(actions)

    def _start(self, actions: np.ndarray) -> None:
        """Begin the step (Atari: hand the actions to the emulators' threads); by default nothing."""

    def _finish(self, actions: np.ndarray) -> StepResult:
        """Complete the step begun with ``actions`` and return its result."""
        raise NotImplementedError

    def step(self, actions: np.ndarray) -> StepResult:
        self.send(actions)
        return self.recv()

    def close(self) -> None:
        raise NotImplementedError

    def env_state(self) -> dict[str, Any]:
        """Every game's state as tensors and plain data; raises :class:`EnvStateError` when not capturable."""
        raise EnvStateError(f"{type(self).__name__} cannot save the state of its games")

    def load_env_state(self, state: dict[str, Any]) -> None:
        """Put back a state from :meth:`env_state` (of an env built from the same config)."""
        raise EnvStateError(f"{type(self).__name__} cannot restore the state of its games")


class AtariEnv(VecEnv):
    """ale-py's C++ vector env with life losses derived from ``info["lives"]``."""

    def __init__(self, config: EnvConfig, num_envs: int, max_episode_frames: int) -> None:
        from ale_py.vector_env import AtariVectorEnv

        settings = protocol_settings(config)
        self.env = AtariVectorEnv(
            config.name,
            num_envs,
            max_num_frames_per_episode=max_episode_frames,
            repeat_action_probability=settings["repeat_action_probability"],
            full_action_space=settings["full_action_space"],
            noop_max=config.noop_max,
            episodic_life=False,
            life_loss_info=False,
            reward_clipping=False,
            use_fire_reset=settings["fire_reset"],
        )
        settings["max_episode_frames"] = max_episode_frames
        frame_shape = tuple(self.env.single_observation_space.shape[1:])
        self.spec = EnvSpec(
            "atari",
            config.name,
            num_envs,
            frame_shape,
            4,
            np.dtype(np.uint8),
            int(self.env.single_action_space.n),
            settings,
        )
        self.lives = np.zeros(num_envs, dtype=np.int64)
        self.done = np.zeros(num_envs, dtype=bool)

    def reset(self, seed: int) -> np.ndarray:
        if self._sent is not None:  # a step in flight is dropped with the games
            self.recv()
        obs, info = self.env.reset(seed=seed)
        self.lives = info["lives"].astype(np.int64)
        self.done = np.zeros(self.spec.num_envs, dtype=bool)
        return obs

    def env_state(self) -> dict[str, Any]:
        raise EnvStateError("ale-py's C++ AtariVectorEnv does not expose the emulator states of its games")

    def _start(self, actions: np.ndarray) -> None:
        self.env.send(actions.astype(np.int64, copy=False))

    def _finish(self, actions: np.ndarray) -> StepResult:
        obs, rewards, terminated, truncated, info = self.env.recv()
        lives = info["lives"].astype(np.int64)
        episode_start = self.done  # the previous step ended a game: this one was the autoreset
        self.done = terminated | truncated
        # a game over is no life loss; a time-limit cut is no game over, so a life lost in its step still counts
        life_loss = (lives < self.lives) & ~terminated & ~episode_start
        self.lives = lives
        return StepResult(obs, rewards.astype(np.float32), terminated, truncated, life_loss, episode_start)

    def close(self) -> None:
        if self._sent is not None:  # let the emulators finish the step in flight before the env goes away
            self.recv()
        self.env.close()


class GymEnv(VecEnv):
    """MinAtar or a gymnasium env with flat Box observations, through ``SyncVectorEnv``."""

    def __init__(self, env_fns: list[Callable[[], gym.Env]], spec: EnvSpec, transform: Callable | None) -> None:
        self.env = gym.vector.SyncVectorEnv(env_fns, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
        self.spec = spec
        self.transform = transform
        self.done = np.ones(spec.num_envs, dtype=bool)

    def _obs(self, obs: np.ndarray) -> np.ndarray:
        return self.transform(obs) if self.transform is not None else obs

    def reset(self, seed: int) -> np.ndarray:
        self._sent = None  # a step sent and not received is dropped with the games
        obs, _ = self.env.reset(seed=seed)
        self.done[:] = False
        return self._obs(obs)

    def _finish(self, actions: np.ndarray) -> StepResult:
        obs, rewards, terminated, truncated, _ = self.env.step(actions)
        episode_start = self.done.copy()
        self.done = terminated | truncated
        no_lives = np.zeros_like(self.done)
        return StepResult(self._obs(obs), rewards.astype(np.float32), terminated, truncated, no_lives, episode_start)

    def env_state(self) -> dict[str, Any]:
        """Each sub-env's state (wrappers included: time limits, generators, game objects) plus the vector
        env's pending autoresets."""
        if not hasattr(self.env, "_autoreset_envs"):
            raise EnvStateError("this gymnasium version's SyncVectorEnv keeps its autoreset flags elsewhere")
        return {
            "envs": [capture(env, f"envs[{i}]") for i, env in enumerate(self.env.envs)],
            "autoreset": torch.from_numpy(np.array(self.env._autoreset_envs, dtype=bool)),
            "done": torch.from_numpy(self.done.copy()),
        }

    def load_env_state(self, state: dict[str, Any]) -> None:
        if len(state["envs"]) != self.spec.num_envs:
            raise EnvStateError(f"the saved state has {len(state['envs'])} envs, this env {self.spec.num_envs}")
        for i, (env, env_state) in enumerate(zip(self.env.envs, state["envs"], strict=True)):
            restore(env, env_state, f"envs[{i}]")
        self.env._autoreset_envs = state["autoreset"].numpy().copy()
        self.done = state["done"].numpy().copy()

    def close(self) -> None:
        self.env.close()


def _minatar_transform(obs: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(obs.transpose(0, 3, 1, 2)).astype(np.uint8)


def _make_minatar(config: EnvConfig, num_envs: int, max_steps: int | None) -> GymEnv:
    try:
        import minatar.gym
    except ImportError as exc:  # an optional extra: the base install has Atari and gymnasium only
        raise ValueError(
            f"env.suite=minatar needs the MinAtar package ({exc}): pip install -e '.[minatar]' (or 'minatar>=1.0.15')"
        ) from exc

    if f"MinAtar/{MINATAR_GAMES[config.name]}-v1" not in gym.registry:
        minatar.gym.register_envs()
    sticky = 0.1 if config.repeat_action_probability is None else config.repeat_action_probability
    env_id = f"MinAtar/{MINATAR_GAMES[config.name]}-v1"

    def make() -> gym.Env:
        return gym.make(env_id, sticky_action_prob=sticky, max_episode_steps=max_steps)

    probe = make()
    h, w, c = probe.observation_space.shape
    n_actions = int(probe.action_space.n)
    probe.close()
    settings = {"env_id": env_id, "repeat_action_probability": sticky, "max_episode_steps": max_steps}
    spec = EnvSpec("minatar", config.name, num_envs, (c, h, w), 1, np.dtype(np.uint8), n_actions, settings)
    return GymEnv([make] * num_envs, spec, _minatar_transform)


def _make_gym(config: EnvConfig, num_envs: int, max_steps: int | None) -> GymEnv:
    def make() -> gym.Env:
        return gym.make(config.name, max_episode_steps=max_steps)

    try:
        probe = make()
    except gym.error.DependencyNotInstalled as exc:  # e.g. Box2D for LunarLander: bad input, not a crash
        raise ValueError(f"env.name={config.name!r} cannot be built here: {exc}") from None
    obs_space, act_space = probe.observation_space, probe.action_space
    probe.close()
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        raise ValueError(
            f"env.name={config.name!r} has observation space {obs_space}; the native DQN's mlp needs a flat "
            "Box observation (shape (d,)). Use suite atari/minatar for images, or wrap the env to flatten it."
        )
    if not isinstance(act_space, gym.spaces.Discrete):
        raise ValueError(f"env.name={config.name!r} has action space {act_space}; DQN needs Discrete actions.")
    settings = {"env_id": config.name, "max_episode_steps": max_steps}
    spec = EnvSpec("gym", config.name, num_envs, obs_space.shape, 1, np.dtype(np.float32), int(act_space.n), settings)
    return GymEnv([make] * num_envs, spec, lambda obs: obs.astype(np.float32, copy=False))


def check_env_name(config: EnvConfig) -> None:
    """Raise ``ValueError`` listing the valid names when ``config.name`` is not a known game."""
    if config.suite == "atari":
        games = atari_games()
        if config.name not in games:
            raise ValueError(
                f"env.name={config.name!r} is not an Atari game ale-py ships; valid names (snake_case): {games}"
            )
    elif config.suite == "minatar" and config.name not in MINATAR_GAMES:
        raise ValueError(f"env.name={config.name!r} is not a MinAtar game; valid names: {sorted(MINATAR_GAMES)}")
    elif config.suite == "gym" and (other_suite := _suite_of_game_id(config.name)) is not None:
        # registered or not (importing ale_py registers ALE/...), env.suite=gym would train on raw frames
        raise ValueError(f"env.name={config.name!r} is not for env.suite=gym: {other_suite}")
    elif config.suite == "gym" and config.name not in gym.registry:
        stem = config.name.rsplit("/", 1)[-1].lower().split("-")[0]
        close = [k for k in gym.registry if stem and stem in k.rsplit("/", 1)[-1].lower()][:10]
        raise ValueError(f"env.name={config.name!r} is not a registered gymnasium id; similar ids: {close}")


def _suite_of_game_id(env_id: str) -> str | None:
    """How to train ``env_id`` when it names an Atari or MinAtar game by its gymnasium id (``ALE/Breakout-v5``,
    ``BreakoutNoFrameskip-v4``, ``MinAtar/Breakout-v1``), which suite gym does not build here; else None."""
    game = env_id.rsplit("/", 1)[-1].split("-")[0]
    if env_id.startswith("MinAtar/"):
        name = re.sub(r"(?<!^)(?=[A-Z])", "_", game).lower()
        if name in MINATAR_GAMES:
            return f"train it with env.suite=minatar env.name={name}"
        return f"MinAtar games use env.suite=minatar with env.name one of {sorted(MINATAR_GAMES)}"
    if env_id.startswith("ALE/") or "NoFrameskip" in game or game.endswith("Deterministic"):
        game = game.removesuffix("NoFrameskip").removesuffix("Deterministic")
        name = re.sub(r"(?<!^)(?=[A-Z])", "_", game).lower()
        if name in atari_games():
            return f"train it with env.suite=atari env.name={name} (the suite's preset sets frame skip and the rest)"
        return "Atari games use env.suite=atari with env.name a snake_case game name (e.g. breakout)"
    return None


def make_env(
    config: EnvConfig, *, evaluation: bool = False, num_envs: int | None = None, eval_limit: Any = None
) -> VecEnv:
    """Build the training env (or, with ``evaluation=True``, an evaluation env whose play-time limit is
    ``eval_limit``: frames for Atari, agent steps otherwise)."""
    check_env_name(config)
    n = num_envs or config.num_envs
    if config.suite == "atari":
        frames = eval_limit if evaluation else config.max_episode_frames
        return AtariEnv(config, n, frames)
    steps = eval_limit if evaluation else config.max_episode_steps
    if config.suite == "minatar":
        return _make_minatar(config, n, steps)
    return _make_gym(config, n, steps)
