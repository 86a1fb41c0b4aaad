"""SB3 callbacks: the paper's data-dependent initialization from real observations, and per-layer
weight-norm statistics and dormant units in SB3's logger (so they appear in TensorBoard next to SB3's curves).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib import MaskablePPO
from sb3_contrib.common.maskable.utils import get_action_masks, is_masking_supported
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from stable_baselines3.common.buffers import BaseBuffer, ReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.utils import obs_as_tensor

from wn_rl.dormant import TAU_EXPECTED, dormant_scalars, is_tau
from wn_rl.init import InitReport
from wn_rl.sb3.common import first_rows
from wn_rl.sb3.init import (
    has_init_flags,
    initialize_policy,
    network_passes,
    online_networks,
    policy_is_initialized,
)
from wn_rl.stats import wn_histograms, wn_stats

__all__ = ["DataDependentInitCallback", "WnStatsCallback", "recent_buffer_batch", "sample_valid_actions"]

_TENSORBOARD_ONLY = ("stdout", "log", "json", "csv")


def _stack_observations(batches: list[Any]) -> Any:
    if isinstance(batches[0], dict):
        return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
    return np.concatenate(batches)


def _sequences(batches: list[Any]) -> Any:
    """Per-step batches ``(n_envs, ...)`` as one sequence per env, env by env: ``(n_envs * steps, ...)``."""

    def stack(values: list[np.ndarray]) -> np.ndarray:
        stacked = np.stack(values, axis=1)
        return stacked.reshape(-1, *stacked.shape[2:])

    if isinstance(batches[0], dict):
        return {key: stack([b[key] for b in batches]) for key in batches[0]}
    return stack(batches)


def _select(obs: Any, *index: np.ndarray) -> Any:
    if isinstance(obs, dict):
        return {key: value[index] for key, value in obs.items()}
    return obs[index]


def _per_env(obs: Any, obs_shape: Any, n_envs: int) -> Any:
    """A VecEnv's observations shaped as the replay buffer stores them (``ReplayBuffer.add``)."""
    if isinstance(obs, dict):
        return {key: np.asarray(value).reshape((n_envs, *obs_shape[key])) for key, value in obs.items()}
    return np.asarray(obs).reshape((n_envs, *obs_shape))


def sample_valid_actions(action_space: spaces.Space, masks: np.ndarray) -> np.ndarray:
    """One uniformly random valid action per row of ``masks``, drawn with the action space's generator (which SB3
    seeds), as ``action_space.sample()`` draws an unmasked one.

    Args:
        action_space: ``Discrete``, ``MultiDiscrete`` or ``MultiBinary`` (MaskablePPO's action spaces).
        masks: ``(n_envs, n_flags)`` booleans in sb3-contrib's layout (``get_action_masks``): one flag per action
            of a ``Discrete`` space, per choice of each ``MultiDiscrete`` dimension in turn, per value (0, 1) of
            each ``MultiBinary`` entry.
    """
    if isinstance(action_space, spaces.Discrete):
        sizes, offset = [int(action_space.n)], int(action_space.start)
    elif isinstance(action_space, spaces.MultiDiscrete):
        sizes, offset = [int(n) for n in action_space.nvec.ravel()], 0
    elif isinstance(action_space, spaces.MultiBinary):
        sizes, offset = [2] * int(np.prod(action_space.shape)), 0
    else:
        raise TypeError(f"action masks need a Discrete, MultiDiscrete or MultiBinary action space, got {action_space}")
    masks = np.asarray(masks, dtype=bool).reshape(len(masks), -1)
    if masks.shape[1] != sum(sizes):
        raise ValueError(f"action masks of {masks.shape[1]} flags do not fit {action_space} ({sum(sizes)} flags)")
    actions = []
    for row, mask in enumerate(masks):
        parts = np.split(mask, np.cumsum(sizes)[:-1])
        if not all(part.any() for part in parts):
            raise ValueError(f"env {row}'s action mask {mask.astype(int).tolist()} leaves no valid action in some part")
        actions.append([action_space.np_random.choice(np.flatnonzero(part)) + offset for part in parts])
    actions_array = np.asarray(actions, dtype=action_space.dtype)
    return actions_array[:, 0] if isinstance(action_space, spaces.Discrete) else actions_array


def replay_init_batch(
    buffer: ReplayBuffer, n_samples: int, pending: tuple[Any, np.ndarray] | None = None
) -> tuple[Any, np.ndarray]:
    """``n_samples`` distinct transitions drawn uniformly (with ``np.random``, which SB3 seeds) from ``buffer``
    and ``pending``, one step's ``(observations, buffer actions)`` of every env not stored yet.

    Returns:
        ``(observations, actions)``: raw observations as the buffer stores them (an array, or a dict of arrays
        for a ``DictReplayBuffer``) and the buffer's actions, each ``n_samples`` long.
    """
    n_envs = buffer.n_envs
    positions = np.arange(buffer.buffer_size if buffer.full else buffer.pos)
    if buffer.full and getattr(buffer, "optimize_memory_usage", False):
        positions = positions[positions != buffer.pos]  # holds the latest next observation (SB3's sample skips it)
    n_stored, n_pending = len(positions) * n_envs, 0 if pending is None else n_envs
    if n_stored + n_pending < n_samples:
        raise ValueError(
            f"the data-dependent init needs n_samples={n_samples} transitions before the policy acts, but the replay "
            f"buffer holds {n_stored} (+{n_pending} being stored): raise buffer_size or learning_starts, load the "
            "model's replay buffer (model.load_replay_buffer), or lower n_samples."
        )
    picks = np.random.choice(n_stored + n_pending, n_samples, replace=False)
    stored, fresh = picks[picks < n_stored], picks[picks >= n_stored] - n_stored
    rows, envs = positions[stored // n_envs], stored % n_envs
    observations, actions = [_select(buffer.observations, rows, envs)], [buffer.actions[rows, envs]]
    if pending is not None:
        obs, action = pending
        observations.append(_select(_per_env(obs, buffer.obs_shape, n_envs), fresh))
        actions.append(np.asarray(action).reshape((n_envs, buffer.action_dim))[fresh].astype(buffer.actions.dtype))
    return _stack_observations(observations), np.concatenate(actions)


class DataDependentInitCallback(BaseCallback):
    """Data-dependent initialization (Salimans & Kingma 2016, section 3) of an SB3 model's online
    networks from real observations, then a sync of every target network.

    - On-policy (PPO, A2C, TRPO, RecurrentPPO, MaskablePPO): before the first rollout, a warm-up collection of
      ``n_samples`` observations with uniformly random actions (``model._last_obs`` holds only one
      observation per env), then the init, so every log-probability the first rollout stores comes from the
      initialised network. The first rollout continues from the warm-up's last step, without a reset (which
      ``Monitor(allow_early_resets=False)`` refuses mid-episode); RecurrentPPO's first step is marked an
      episode start, so its LSTM memory starts empty there. Warm-up steps are not counted in ``num_timesteps``
      and its finished episodes are not in ``ep_info_buffer`` (``rollout/ep_rew_mean``), but the env really
      plays them: they are in a ``Monitor``'s file, and each env's first episode of training began in the
      warm-up (its ``Monitor`` record and ``ep_info_buffer`` entry count up to ``ceil(n_samples / n_envs)``
      random steps). The warm-up's steps update a ``VecNormalize``'s running statistics as training steps do;
      with ``VecNormalize`` as the outermost wrapper, the init batch is the warm-up's raw observations
      normalised once, with the statistics at its end (an inner one: as the env returned them, each with the
      statistics of its step). MaskablePPO's warm-up draws uniformly among the actions the env's masks
      allow at each step (unless ``learn(use_masking=False)``), so it visits the states its policy can.
    - Off-policy (DQN, QR-DQN, SAC, TD3, TQC): SB3 acts uniformly at random while ``num_timesteps <
      learning_starts``, then with the policy (``OffPolicyAlgorithm._sample_action``). The init runs in
      the callback step that makes ``num_timesteps`` reach ``learning_starts``, so before the policy
      chooses its first action (and before the first update, which waits for the end of that rollout).
      Its batch is ``n_samples`` distinct transitions drawn uniformly from the replay buffer and the step
      SB3 stores right after the callbacks (the critics of SAC, TD3 and TQC see the stored actions). Requires
      ``learning_starts >= n_samples``; gSDE at warm-up (``use_sde_at_warmup=True``, the policy acts
      from the first step) is refused. A model resumed past ``learning_starts`` (``reset_num_timesteps=
      False``) is initialised at training start, from its replay buffer alone.

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
        self.init_episode_starts: th.Tensor | None = None
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
            self._check_off_policy_warm_up()
            if self.model.num_timesteps >= self.model.learning_starts:  # resumed past the warm-up
                self._initialize_from_replay(pending=None)
            return
        if not isinstance(self.model, OnPolicyAlgorithm):
            raise TypeError(f"{type(self.model).__name__} is neither an on-policy nor an off-policy SB3 algorithm")
        observations, episode_starts = self._warm_up_observations()
        self._initialize(observations, None, episode_starts)

    def _warm_up_observations(self) -> tuple[Any, th.Tensor | None]:
        """The warm-up's observations and, for a recurrent policy, the episode starts of its
        sequences: RecurrentPPO's policy sees the warm-up as one sequence per env, as in its rollouts, so the
        layers after its LSTMs are initialised on the hidden states they will see (not on first steps).
        Leaves ``model._last_obs`` and ``model._last_episode_starts`` at the warm-up's last step."""
        model, env = self.model, self.model.env
        # VecNormalize's statistics move with every warm-up step: keep its raw observations, normalise them once
        vec_normalize = model._vec_normalize_env if model._vec_normalize_env is env else None

        def record(obs: Any) -> Any:
            return obs if vec_normalize is None else vec_normalize.get_original_obs()

        masked = isinstance(model, MaskablePPO) and self.locals.get("use_masking", True)
        if masked and not is_masking_supported(env):
            raise ValueError(
                "MaskablePPO's env has no action_masks() method, so neither the init's random warm-up nor the "
                "rollouts can respect invalid actions: wrap the env in sb3_contrib.common.wrappers.ActionMasker, "
                "or learn with use_masking=False."
            )
        batches = [record(model._last_obs)]
        starts = [np.asarray(model._last_episode_starts, dtype=bool)]
        for _ in range(math.ceil(self.n_samples / env.num_envs) - 1):
            if masked:
                actions = sample_valid_actions(model.action_space, get_action_masks(env))
            else:
                actions = np.array([model.action_space.sample() for _ in range(env.num_envs)])
            model._last_obs, _, dones, _ = env.step(actions)
            model._last_episode_starts = np.asarray(dones, dtype=bool)  # the next observation starts an episode
            batches.append(record(model._last_obs))
            starts.append(model._last_episode_starts)
        normalize = (lambda obs: obs) if vec_normalize is None else vec_normalize.normalize_obs
        if isinstance(model.policy, RecurrentActorCriticPolicy):  # whole sequences, none cut short
            # mid-episode, the LSTM states hold none of it: the policy zeroes them where an episode starts
            model._last_episode_starts = np.ones((env.num_envs,), dtype=bool)
            return normalize(_sequences(batches)), th.as_tensor(np.stack(starts, axis=1))
        return normalize(first_rows(_stack_observations(batches), self.n_samples)), None

    def _check_off_policy_warm_up(self) -> None:
        model = self.model
        if model.learning_starts < self.n_samples:
            raise ValueError(
                f"DataDependentInitCallback(n_samples={self.n_samples}) initialises from the replay buffer before "
                f"the policy's first action, but learning_starts={model.learning_starts} leaves fewer transitions "
                f"there: set learning_starts >= {self.n_samples} or lower n_samples."
            )
        if model.use_sde and model.use_sde_at_warmup:
            raise ValueError(
                "DataDependentInitCallback initialises from the replay buffer, but use_sde_at_warmup=True makes the "
                "policy act from the first step, before the buffer holds anything: set use_sde_at_warmup=False."
            )

    def _initialize_from_replay(self, pending: tuple[Any, np.ndarray] | None) -> None:
        model = self.model
        observations, actions = replay_init_batch(model.replay_buffer, self.n_samples, pending)
        if model._vec_normalize_env is not None:  # the buffer stores raw observations, as SB3's sample() reads them
            observations = model._vec_normalize_env.normalize_obs(observations)
        self._initialize(observations, actions)

    def _initialize(
        self, observations: Any, actions: np.ndarray | None, episode_starts: th.Tensor | None = None
    ) -> None:
        policy = self.model.policy
        obs = obs_as_tensor(observations, policy.device)
        self.init_observations = obs
        self.init_actions = None if actions is None else th.as_tensor(actions, device=policy.device)
        self.init_episode_starts = episode_starts
        self.reports = initialize_policy(policy, obs, self.init_actions, episode_starts=episode_starts)
        self.done = True
        for name, report in self.reports.items():
            for key, value in report.scalars(prefix=f"ddi/{name}").items():
                self.logger.record(key, value, exclude=_TENSORBOARD_ONLY)
            if self.verbose:
                dead = report.dead_units or "none"
                print(f"DataDependentInitCallback: {name}: {len(report.layers)} layers initialised; dead units: {dead}")

    def _on_step(self) -> bool:
        model = self.model
        if not self.done and isinstance(model, OffPolicyAlgorithm) and model.num_timesteps >= model.learning_starts:
            # SB3 stores this step's transition after the callbacks, then the policy picks the next action.
            obs = model._last_original_obs if model._vec_normalize_env is not None else model._last_obs
            self._initialize_from_replay(pending=(obs, self.locals["buffer_actions"]))
        return True


def recent_buffer_batch(buffer: BaseBuffer, n_samples: int) -> tuple[Any, np.ndarray] | None:
    """Up to ``n_samples`` observations and their actions from the newest steps of ``buffer`` (every env's,
    newest step first), as the buffer stores them; ``None`` while it holds fewer than 2. A ``RolloutBuffer``
    that training has flattened (``generator_ready``) gives observations spread over its whole rollout."""
    if getattr(buffer, "generator_ready", False):  # (steps * envs, ...), env by env
        total = buffer.buffer_size * buffer.n_envs
        pick = np.linspace(0, total - 1, min(n_samples, total)).astype(np.int64)
        return _select(buffer.observations, pick), buffer.actions[pick]
    stored = buffer.buffer_size - 1 if buffer.full else buffer.pos  # full: the slot at pos may be half written
    rows = (buffer.pos - 1 - np.arange(min(stored, math.ceil(n_samples / buffer.n_envs)))) % buffer.buffer_size
    if len(rows) * buffer.n_envs < 2:
        return None

    def flat(values: np.ndarray) -> np.ndarray:
        return values[rows].reshape(-1, *values.shape[2:])[:n_samples]

    obs = buffer.observations
    observations = {key: flat(value) for key, value in obs.items()} if isinstance(obs, dict) else flat(obs)
    return observations, flat(buffer.actions)


class WnStatsCallback(BaseCallback):
    """Log g, ||v|| and g/||v|| (the effective gradient scale of section 2.1) of every WN layer of the
    online networks into SB3's logger every ``log_freq`` environment steps, as
    ``wn/<network>/<layer>/<stat>`` (TensorBoard only), with per-unit histograms if asked, and, with
    ``dormant=True``, the share of each activation layer's units that are tau-dormant (score s_i <= tau; tau = 0:
    never active; Sokar et al. 2023, :func:`wn_rl.dormant_units`) as ``dormant/<network>/<layer>/fraction`` and
    ``dormant/<network>/total_fraction``.

    The dormant units are measured on up to ``dormant_samples`` observations of the newest steps in the replay
    buffer (off-policy; its actions for SAC's, TD3's and TQC's critics) or in the current rollout buffer
    (on-policy), one forward pass per online network in eval mode, without gradients or random draws; nothing
    is logged while the buffer holds fewer than 2 (at training start; the first step of each rollout).

    Args:
        log_freq: environment steps (summed over envs) between two logs; also logs at training start.
        histograms: also log per-unit histograms of g, ||v|| and g/||v||.
        dormant: also log the dormant-unit fractions (off by default: a forward pass on a batch per log).
        dormant_samples: observations per dormant-unit measurement, at least 2.
        dormant_tau: the dormancy threshold tau, finite and >= 0 (0: units never active on the batch; Sokar et
            al. use 0 to 0.1), as the native DQN's ``run.dormant_tau``.
    """

    def __init__(
        self,
        log_freq: int = 10_000,
        histograms: bool = False,
        verbose: int = 0,
        *,
        dormant: bool = False,
        dormant_samples: int = 256,
        dormant_tau: float = 0.0,
    ) -> None:
        super().__init__(verbose)
        if isinstance(log_freq, bool) or not isinstance(log_freq, int) or log_freq < 1:
            raise ValueError(f"log_freq={log_freq!r} must be a positive number of environment steps")
        if isinstance(dormant_samples, bool) or not isinstance(dormant_samples, int) or dormant_samples < 2:
            raise ValueError(f"dormant_samples={dormant_samples!r} must be an integer >= 2 (observations per measure)")
        if not is_tau(dormant_tau):
            raise ValueError(f"dormant_tau={dormant_tau!r} must be {TAU_EXPECTED}")
        self.log_freq = log_freq
        self.histograms = histograms
        self.dormant = dormant
        self.dormant_samples = dormant_samples
        self.dormant_tau = float(dormant_tau)
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
        if self.dormant:
            stats.update(self.dormant_stats())
        for key, value in stats.items():
            self.logger.record(key, value, exclude=_TENSORBOARD_ONLY)
        self.last_stats = stats
        return stats

    def dormant_stats(self) -> dict[str, float]:
        """``dormant/<network>/...`` scalars on the newest buffered observations; empty while too few are stored."""
        model = self.model
        off_policy = isinstance(model, OffPolicyAlgorithm)
        buffer = model.replay_buffer if off_policy else getattr(model, "rollout_buffer", None)
        batch = None if buffer is None else recent_buffer_batch(buffer, self.dormant_samples)
        if batch is None:
            return {}
        observations, actions = batch
        if off_policy and model._vec_normalize_env is not None:  # the replay stores raw observations
            observations = model._vec_normalize_env.normalize_obs(observations)
        policy = model.policy
        obs = obs_as_tensor(observations, policy.device)
        stats: dict[str, float] = {}
        for name, net, forward in network_passes(policy, th.as_tensor(actions, device=policy.device)):
            stats.update(dormant_scalars(net, obs, tau=self.dormant_tau, forward=forward, prefix=f"dormant/{name}"))
        return stats
