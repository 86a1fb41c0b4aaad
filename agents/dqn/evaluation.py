"""Acting and evaluation as in the paper's protocol (Nature DQN, the paper's section 5.4).

Evaluation plays a fixed number of *complete* games with epsilon = 0.05 under a play-time limit. With
N parallel envs, each env gets a fixed quota of games decided in advance (``games`` split as evenly as
possible), so a short game cannot finish more often and be over-represented, which a "first K games to
finish" rule would do. Returns are raw game scores. The paper's statistic is the maximum over epochs of
the epoch's mean evaluation return (:func:`best_epoch_mean`).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from agents.dqn.config import DQNConfig
from agents.dqn.envs import VecEnv, make_env
from agents.dqn.networks import QNetwork, build_q_network
from wn_rl.checkpoint import CheckpointError, atomic_write_bytes

__all__ = [
    "best_epoch_mean",
    "evaluate",
    "evaluation_epoch",
    "exploration_draws",
    "explores_everywhere",
    "game_quotas",
    "load_q_network",
    "make_eval_env",
    "select_actions",
    "write_results",
]


def exploration_draws(n: int, n_actions: int, epsilon: float, device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The random numbers of :func:`select_actions` for ``n`` envs: uniform actions and, when
    ``epsilon < 1``, the explore coin flips (in that order from the global generator)."""
    random_actions = torch.randint(0, n_actions, (n,), device=device)
    explore = torch.rand(n, device=device) < epsilon if epsilon < 1.0 else None
    return random_actions, explore


def explores_everywhere(explore: Tensor | None, device: torch.device) -> bool:
    """Whether every action is known to be the random one without a forward: no explore flags (epsilon
    1), or, on a CPU where reading them is free, every env's flag set."""
    return explore is None or (device.type == "cpu" and bool(explore.all()))


def select_actions(
    q_network: nn.Module | None,
    obs: Tensor,
    epsilon: float,
    n_actions: int,
    draws: tuple[Tensor, Tensor | None] | None = None,
) -> Tensor:
    """Epsilon-greedy actions for a batch of observations, on the observations' device.

    With ``epsilon >= 1`` (or no network) the network is not evaluated: every action is uniform.
    ``draws``: :func:`exploration_draws` made beforehand (drawn here when ``None``).
    """
    random_actions, explore = draws or exploration_draws(obs.shape[0], n_actions, epsilon, obs.device)
    if q_network is None or explores_everywhere(explore, obs.device):
        return random_actions
    with torch.no_grad():
        greedy = q_network(obs).argmax(1)
    if epsilon <= 0.0:
        return greedy
    return torch.where(explore, random_actions, greedy)


def game_quotas(games: int, num_envs: int) -> np.ndarray:
    """Games each env plays: ``games`` split as evenly as possible over ``num_envs`` envs."""
    quotas = np.full(num_envs, games // num_envs, dtype=np.int64)
    quotas[: games % num_envs] += 1
    return quotas


@torch.no_grad()
def evaluate(
    q_network: nn.Module, env: VecEnv, games: int, epsilon: float, seed: int, device: torch.device
) -> dict[str, Any]:
    """Play ``games`` complete games; returns raw scores, lengths (agent steps) and summary statistics."""
    was_training = q_network.training
    q_network.eval()
    quotas = game_quotas(games, env.spec.num_envs)
    obs = env.reset(seed=seed)
    returns_now = np.zeros(env.spec.num_envs)
    lengths_now = np.zeros(env.spec.num_envs, dtype=np.int64)
    scores: list[float] = []
    lengths: list[int] = []
    try:
        while quotas.sum() > 0:
            actions = select_actions(q_network, torch.from_numpy(obs).to(device), epsilon, env.spec.n_actions)
            step = env.step(actions.cpu().numpy())
            returns_now += step.rewards
            lengths_now += ~step.episode_start
            ended = (step.terminated | step.truncated) & (quotas > 0)
            for i in np.flatnonzero(ended):
                scores.append(float(returns_now[i]))
                lengths.append(int(lengths_now[i]))
                quotas[i] -= 1
            done = step.terminated | step.truncated
            returns_now[done] = 0.0
            lengths_now[done] = 0
            obs = step.obs
    finally:
        q_network.train(was_training)
    arr = np.asarray(scores)
    return {
        "games": len(scores),
        "return_mean": float(arr.mean()),
        "return_std": float(arr.std()),
        "return_min": float(arr.min()),
        "return_max": float(arr.max()),
        "length_mean": float(np.mean(lengths)),
        "returns": scores,
        "lengths": lengths,
    }


def make_eval_env(config: DQNConfig) -> VecEnv:
    """The evaluation envs of ``config.eval``; the play-time limit counts frames on Atari, agent steps elsewhere."""
    v, e = config.eval, config.env
    limit = v.max_episode_frames if e.suite == "atari" else v.max_episode_steps
    return make_env(e, evaluation=True, num_envs=v.num_envs, eval_limit=limit)


def load_q_network(
    config: DQNConfig, weights: dict[str, Tensor], checkpoint: Path, run_dir: Path, device: torch.device
) -> QNetwork:
    """The run's Q-network with a checkpoint's ``weights``, built and checked before the caller builds the envs
    it plays in (the observation and action shapes come from one env of the run, closed at once). Weights that do
    not fit the config (its ``config.yaml`` edited after the run, e.g. another ``network.parameterization``) are a
    :class:`CheckpointError` naming the checkpoint and the ``config.yaml``."""
    probe = make_env(config.env, num_envs=1)
    spec = probe.spec
    probe.close()
    q_network = build_q_network(config.network, spec).to(device)
    try:
        q_network.load_state_dict(weights)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"{checkpoint} does not fit this run's config ({run_dir / 'config.yaml'}): its network differs from the "
            "one the config builds, so the config.yaml was changed after the run (e.g. network.parameterization). "
            f"Restore the config.yaml the run was made with. {str(exc).strip()}"
        ) from exc
    return q_network


def evaluation_epoch(
    q_network: nn.Module, eval_env: VecEnv, config: DQNConfig, epoch: int, agent_step: int, device: torch.device
) -> dict[str, Any]:
    """Evaluation epoch ``epoch`` at ``agent_step``: :func:`evaluate` with ``config.eval``'s games and epsilon,
    seeded by the run's seed and the agent step, its result tagged with the epoch, agent step and frames."""
    v = config.eval
    result = evaluate(q_network, eval_env, v.games, v.epsilon, config.run.seed + 10**6 + agent_step, device)
    result.update(epoch=epoch, agent_step=agent_step, frames=agent_step * config.frames_per_agent_step)
    return result


def best_epoch_mean(history: list[dict[str, Any]]) -> float:
    """The paper's statistic: the maximum over evaluation epochs of the epoch's mean return."""
    means = [h["return_mean"] for h in history]
    return max(means) if means else math.nan


_CSV_FIELDS = (
    "epoch",
    "agent_step",
    "frames",
    "games",
    "return_mean",
    "return_std",
    "return_min",
    "return_max",
    "length_mean",
    "best_epoch_mean",
)


def write_results(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """``results.json`` (every epoch with all game scores, and the paper's statistic) and ``results.csv``
    (one row per epoch), both written atomically."""
    summary = {"best_epoch_mean": best_epoch_mean(history), "epochs": history}
    atomic_write_bytes(run_dir / "results.json", json.dumps(summary, indent=1).encode())
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for i, row in enumerate(history):
        writer.writerow({**row, "best_epoch_mean": best_epoch_mean(history[: i + 1])})
    atomic_write_bytes(run_dir / "results.csv", buffer.getvalue().encode())
