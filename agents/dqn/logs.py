"""What a DQN run writes to TensorBoard: the hyperparameter table at the start, the training scalars
(``train/*``, ``perf/*``) every ``run.log_every_agent_steps``, the dormant units (``dormant/*``) beside the WN
statistics every ``run.wn_stats_every_agent_steps`` and the evaluation scalars (``eval/*``) every epoch. The
loop (:mod:`agents.dqn.runner`) decides when; these functions only write."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from agents.dqn.config import DQNConfig, config_dict
from agents.dqn.envs import EnvSpec
from agents.dqn.evaluation import best_epoch_mean
from agents.dqn.replay import ReplayMemory
from wn_rl.config import flatten_config
from wn_rl.dormant import dormant_scalars

__all__ = ["DORMANT_STATES", "log_dormant", "log_evaluation", "log_hyperparameters", "log_train"]

DORMANT_STATES = 256  # replay states per dormant-unit measurement


def log_hyperparameters(writer: SummaryWriter, config: DQNConfig, spec: EnvSpec, device: torch.device) -> None:
    """The resolved config, the env's resolved protocol and the device as a table (text ``hyperparameters``)."""
    rows = ["| key | value |", "| --- | --- |"]
    flat = flatten_config(config_dict(config))
    rows += [f"| {k} | {v} |" for k, v in flat.items()]
    rows += [f"| env.resolved.{k} | {v} |" for k, v in spec.settings.items()]
    rows.append(f"| device | {device} |")
    writer.add_text("hyperparameters", "\n".join(rows), 0)


def log_train(
    writer: SummaryWriter,
    step: int,
    metrics: dict[str, float],
    finished: list[tuple[float, int]],
    epsilon: float,
    updates: int,
    sps: float,
    frames: int,
) -> None:
    """The learner's metric means (``train/<metric>``), the mean return and length of the episodes
    ``finished`` since the last call, epsilon, the update count, agent steps per second and frames."""
    for tag, value in metrics.items():
        writer.add_scalar(f"train/{tag}", value, step)
    if finished:
        writer.add_scalar("train/episode_return", float(np.mean([f[0] for f in finished])), step)
        writer.add_scalar("train/episode_length", float(np.mean([f[1] for f in finished])), step)
    writer.add_scalar("train/epsilon", epsilon, step)
    writer.add_scalar("train/updates", updates, step)
    writer.add_scalar("perf/sps", sps, step)
    writer.add_scalar("perf/frames", frames, step)


def log_evaluation(writer: SummaryWriter, result: dict[str, Any], history: list[dict[str, Any]], step: int) -> None:
    """An evaluation epoch's ``result`` (``eval/*``) and the paper's statistic over ``history`` so far."""
    for key in ("return_mean", "return_std", "return_max", "length_mean"):
        writer.add_scalar(f"eval/{key}", result[key], step)
    writer.add_scalar("eval/best_epoch_mean", best_epoch_mean(history), step)


def log_dormant(
    writer: SummaryWriter, q_network: torch.nn.Module, replay: ReplayMemory, step: int, tau: float = 0.0
) -> None:
    """The share of the Q-network's activation units that are tau-dormant (``dormant/<layer>/fraction``, and
    ``dormant/total_fraction`` over all of them; Sokar et al. 2023; tau = 0: never active, ``run.dormant_tau``)
    on up to :data:`DORMANT_STATES` states spread over the replay memory; nothing while it holds fewer than two.
    A layer with NaN or inf activations logs NaN (a gap in TensorBoard), never an error: the run's own
    non-finite checks report the divergence. One eager forward of the online network in eval mode, outside any
    compiled graph: it draws no random number and changes no state, so a run is the same with it or without it."""
    if int(replay.valid_mask().sum()) < 2:
        return
    obs = replay.recent_observations(DORMANT_STATES)
    for tag, value in dormant_scalars(q_network, obs, tau=tau).items():
        writer.add_scalar(tag, value, step)
