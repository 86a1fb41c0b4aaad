"""What the DQN loop reports about its progress: the finished episodes (raw game scores and lengths),
agent steps per second, and the optional progress bar (``run.progress_bar``)."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import numpy as np

__all__ = ["Clock", "EpisodeTracker", "progress_bar"]


class EpisodeTracker:
    """Raw game scores and lengths per env; finished episodes are kept for logging."""

    def __init__(self, num_envs: int) -> None:
        self.returns = np.zeros(num_envs)
        self.lengths = np.zeros(num_envs, dtype=np.int64)
        self.finished: list[tuple[float, int]] = []
        self.recent: deque[float] = deque(maxlen=100)
        self.episodes = 0

    def step(self, rewards: np.ndarray, done: np.ndarray, episode_start: np.ndarray) -> None:
        self.returns += rewards
        self.lengths += ~episode_start  # the autoreset step is not a move in the game
        for i in np.flatnonzero(done):
            self.finished.append((float(self.returns[i]), int(self.lengths[i])))
            self.recent.append(float(self.returns[i]))
            self.episodes += 1
        self.returns[done] = 0.0
        self.lengths[done] = 0

    def drain(self) -> list[tuple[float, int]]:
        out, self.finished = self.finished, []
        return out


class Clock:
    """Agent steps per second since the previous reading."""

    def __init__(self, step: int) -> None:
        self.step, self.time = step, time.perf_counter()

    def sps(self, step: int) -> float:
        now = time.perf_counter()
        value = (step - self.step) / max(now - self.time, 1e-9)
        self.step, self.time = step, now
        return value


def progress_bar(run: Any, start: int) -> Any:
    """A tqdm bar over ``run.total_agent_steps`` from ``start``, or ``None`` without ``run.progress_bar``."""
    if not run.progress_bar:
        return None
    from tqdm import tqdm

    return tqdm(total=run.total_agent_steps, initial=start, unit="step", dynamic_ncols=True, mininterval=1.0)
