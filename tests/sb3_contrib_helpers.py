"""Spaces, a random env and checks shared by the tests of wn_rl.sb3's sb3-contrib policies
(tests/test_sb3_contrib_*.py, tests/test_sb3_trpo.py)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

IMAGE = spaces.Box(0, 255, (3, 36, 36), np.uint8)  # the Nature CNN's smallest input
VECTOR = spaces.Box(-1, 1, (4,), np.float32)
DICT = spaces.Dict(vec=VECTOR, image=IMAGE)
DISCRETE = spaces.Discrete(4)
CONTINUOUS = spaces.Box(-1, 1, (2,), np.float32)
LR = lambda _: 1e-3  # noqa: E731


class RandomObservations(gym.Env):
    """Random observations of ``observation_space``; Discrete(4) actions with two valid ones per step
    (``action_masks``), or Box(2) actions; reward 1 for action 0 or a positive first action; 16-step episodes."""

    def __init__(self, observation_space: spaces.Space = DICT, continuous: bool = False) -> None:
        self.observation_space = observation_space
        self.action_space = CONTINUOUS if continuous else DISCRETE
        self._steps = 0
        self._valid = np.ones(4, dtype=bool)

    def _observe(self):
        self._valid = np.zeros(4, dtype=bool)
        self._valid[self.np_random.choice(4, 2, replace=False)] = True
        self.observation_space.seed(int(self.np_random.integers(2**31)))
        return self.observation_space.sample()

    def action_masks(self) -> np.ndarray:
        return self._valid.copy()

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._steps = 0
        return self._observe(), {}

    def step(self, action):
        first = float(np.asarray(action).reshape(-1)[0])
        reward = float(first > 0) if isinstance(self.action_space, spaces.Box) else float(first == 0)
        self._steps += 1
        return self._observe(), reward, False, self._steps >= 16, {}


def plain_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in module.modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d)]
