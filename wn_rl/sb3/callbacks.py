"""SB3 callbacks: the paper's data-dependent initialization from real observations, and per-layer
weight-norm statistics in SB3's logger (so they appear in TensorBoard next to SB3's curves).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.utils import obs_as_tensor

from wn_rl.init import InitReport
from wn_rl.sb3.init import has_init_flags, initialize_policy, online_networks, policy_is_initialized
from wn_rl.stats import wn_histograms, wn_stats

__all__ = ["DataDependentInitCallback", "WnStatsCallback"]

_TENSORBOARD_ONLY = ("stdout", "log", "json", "csv")


def _stack_observations(batches: list[Any]) -> Any:
    if isinstance(batches[0], dict):
        return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
    return np.concatenate(batches)


def _truncate(obs: Any, n: int) -> Any:
    if isinstance(obs, dict):
        return {key: value[:n] for key, value in obs.items()}
    return obs[:n]


class DataDependentInitCallback(BaseCallback):
    """Data-dependent initialization (Salimans & Kingma 2016, section 3) of an SB3 model's online
    networks from real observations, then a sync of every target network.

    - On-policy (PPO, A2C, RecurrentPPO): before the first rollout, a warm-up collection of
      ``n_samples`` observations with uniformly random actions (``model._last_obs`` holds only one
      observation per env), the init, then a reset of the envs so the first rollout starts fresh and
      its stored log-probabilities come from the initialised network. Warm-up steps are not counted
      in ``num_timesteps``.
    - Off-policy (DQN, QR-DQN, SAC, TD3): at the end of the first rollout after ``learning_starts``,
      just before the first update, from ``n_samples`` replay-buffer transitions (the critics of SAC
      and TD3 see the stored actions). Until then these algorithms act randomly, so the uninitialised
      network never acts. Requires ``learning_starts >= n_samples``.

    A model whose online networks are already initialised (a loaded model: the ``initialized`` flags
    travel in its state_dict) is never re-initialised. Per-layer pre-init statistics go to the
    logger under ``ddi/<network>/<layer>/...`` (TensorBoard only); the reports stay in
    :attr:`reports` and the init batch in :attr:`init_observations` / :attr:`init_actions`.

    Args:
        n_samples: observations in the init batch (the paper's reference codes used 16 to 500).
        verbose: 1 prints one line per initialised network.
    """

    def __init__(self, n_samples: int = 256, verbose: int = 0) -> None:
        super().__init__(verbose)
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 2:
            raise ValueError(f"n_samples={n_samples!r} must be an integer >= 2 (a batch to estimate mean and std)")
        self.n_samples = n_samples
        self.reports: dict[str, InitReport] = {}
        self.init_observations: Any = None
        self.init_actions: th.Tensor | None = None
        self.skipped = False
        self.done = False

    def _init_callback(self) -> None:
        online_networks(self.model.policy)  # raises a TypeError naming the supported policies
        if not has_init_flags(self.model.policy):
            raise TypeError(
                f"DataDependentInitCallback needs a wn_rl policy (e.g. wn_rl.sb3.WnCnnPolicy, any parameterization; "
                f"parameterization='normal' is the paper's plain baseline): {type(self.model.policy).__name__}'s "
                "layers carry no `initialized` flag, and adding one now would break loading its saved models."
            )

    def _on_training_start(self) -> None:
        if self.done:
            return
        if policy_is_initialized(self.model.policy):
            self.skipped = self.done = True
            if self.verbose:
                print("DataDependentInitCallback: the model is already initialised (loaded); nothing changed")
            return
        if isinstance(self.model, OffPolicyAlgorithm):
            if self.model.learning_starts < self.n_samples:
                raise ValueError(
                    f"DataDependentInitCallback(n_samples={self.n_samples}) initialises from the replay buffer before "
                    f"the first update, but learning_starts={self.model.learning_starts} leaves fewer transitions "
                    f"there: set learning_starts >= {self.n_samples} or lower n_samples."
                )
            return
        if not isinstance(self.model, OnPolicyAlgorithm):
            raise TypeError(f"{type(self.model).__name__} is neither an on-policy nor an off-policy SB3 algorithm")
        self._initialize(self._warm_up_observations(), None)
        self.model._last_obs = self.model.env.reset()
        self.model._last_episode_starts = np.ones((self.model.env.num_envs,), dtype=bool)

    def _warm_up_observations(self) -> Any:
        env = self.model.env
        batches = [self.model._last_obs]
        for _ in range(math.ceil(self.n_samples / env.num_envs) - 1):
            actions = np.array([self.model.action_space.sample() for _ in range(env.num_envs)])
            obs, _, _, _ = env.step(actions)
            batches.append(obs)
        return _truncate(_stack_observations(batches), self.n_samples)

    def _on_rollout_end(self) -> None:
        model = self.model
        if self.done or not isinstance(model, OffPolicyAlgorithm) or model.num_timesteps <= model.learning_starts:
            return
        samples = model.replay_buffer.sample(self.n_samples, env=model._vec_normalize_env)
        self._initialize(samples.observations, samples.actions, tensors=True)

    def _initialize(self, observations: Any, actions: Any, *, tensors: bool = False) -> None:
        policy = self.model.policy
        obs = observations if tensors else obs_as_tensor(observations, policy.device)
        self.init_observations, self.init_actions = obs, actions
        self.reports = initialize_policy(policy, obs, actions)
        self.done = True
        for name, report in self.reports.items():
            for key, value in report.scalars(prefix=f"ddi/{name}").items():
                self.logger.record(key, value, exclude=_TENSORBOARD_ONLY)
            if self.verbose:
                dead = report.dead_units or "none"
                print(f"DataDependentInitCallback: {name}: {len(report.layers)} layers initialised; dead units: {dead}")

    def _on_step(self) -> bool:
        return True


class WnStatsCallback(BaseCallback):
    """Log g, ||v|| and g/||v|| (the effective gradient scale of section 2.1) of every WN layer of the
    online networks into SB3's logger every ``log_freq`` environment steps, as
    ``wn/<network>/<layer>/<stat>`` (TensorBoard only), with per-unit histograms if asked.

    Args:
        log_freq: environment steps (summed over envs) between two logs; also logs at training start.
        histograms: also log per-unit histograms of g, ||v|| and g/||v||.
    """

    def __init__(self, log_freq: int = 10_000, histograms: bool = False, verbose: int = 0) -> None:
        super().__init__(verbose)
        if isinstance(log_freq, bool) or not isinstance(log_freq, int) or log_freq < 1:
            raise ValueError(f"log_freq={log_freq!r} must be a positive number of environment steps")
        self.log_freq = log_freq
        self.histograms = histograms
        self._last_logged: int | None = None
        self.last_stats: dict[str, float] = {}

    def _init_callback(self) -> None:
        online_networks(self.model.policy)

    def _on_training_start(self) -> None:
        self.log_stats()

    def _on_step(self) -> bool:
        if self._last_logged is None or self.num_timesteps - self._last_logged >= self.log_freq:
            self.log_stats()
        return True

    @th.no_grad()
    def log_stats(self) -> dict[str, float]:
        """Record the statistics now; returns the scalars recorded."""
        self._last_logged = self.num_timesteps
        stats: dict[str, float] = {}
        for name, net in online_networks(self.model.policy).items():
            stats.update(wn_stats(net, prefix=f"wn/{name}"))
            if self.histograms:
                for key, values in wn_histograms(net, prefix=f"wn/{name}").items():
                    self.logger.record(key, values, exclude=_TENSORBOARD_ONLY)
        for key, value in stats.items():
            self.logger.record(key, value, exclude=_TENSORBOARD_ONLY)
        self.last_stats = stats
        return stats
