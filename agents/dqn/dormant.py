"""Dormant units of a saved DQN agent (``scripts/dormant_units.py``): its newest complete checkpoint's Q-network
on states from a uniformly random policy in the run's own env.

Per run: the tau-dormant units of each activation layer (Sokar et al. 2023, :mod:`wn_rl.dormant`), their share
over all layers, the spread of the Q-values over the states (the std over states of each action's Q, averaged
over actions) and the share of the states whose greedy action is the most frequent one. A network whose
layer died entirely has a Q std of 0 and a share of 1.0: it takes the same action everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from agents.dqn.config import load_run_config
from agents.dqn.envs import VecEnv, make_env
from agents.dqn.networks import build_q_network
from wn_rl.checkpoint import CheckpointError, load_latest_checkpoint
from wn_rl.dormant import dormant_units, total_fraction

__all__ = ["format_table", "newest_weights", "random_policy_states", "run_dormant_report"]


def newest_weights(run_dir: str | Path, device: torch.device) -> tuple[int, dict[str, Tensor]]:
    """``(agent step, online Q-network state_dict)`` of ``run_dir``'s newest complete checkpoint; none is a
    :class:`CheckpointError` saying so."""
    found = load_latest_checkpoint(Path(run_dir) / "checkpoints", map_location=device)
    if found is None:
        raise CheckpointError(
            f"{Path(run_dir) / 'checkpoints'} holds no complete checkpoint; let the run write one "
            "(run.checkpoint_every_agent_steps, or the end of training)"
        )
    _, state = found
    return int(state["counters"]["agent_step"]), state["learner"]["q_network"]


def random_policy_states(env: VecEnv, steps: int, seed: int) -> np.ndarray:
    """``num_envs * steps`` observations of a uniformly random policy in ``env``: reset with ``seed``, the
    actions drawn from ``numpy.random.default_rng(seed)``; each step's observation before acting."""
    rng = np.random.default_rng(seed)
    obs = env.reset(seed=seed)
    states = []
    for _ in range(steps):
        states.append(obs)
        obs = env.step(rng.integers(env.spec.n_actions, size=env.spec.num_envs)).obs
    return np.concatenate(states)


def _q_summary(q_values: Tensor) -> dict[str, float]:
    """The std over states of each action's Q, averaged over actions; the share of the most frequent greedy action."""
    greedy = q_values.argmax(1)
    counts = torch.bincount(greedy, minlength=q_values.shape[1])
    return {
        "q_std": float(q_values.double().std(0).mean()),
        "greedy_action_share": float(counts.max()) / len(greedy),
    }


def run_dormant_report(
    run_dir: str | Path,
    *,
    num_envs: int = 8,
    steps: int = 250,
    seed: int = 0,
    tau: float = 0.0,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """The dormant units and Q-value spread of ``run_dir``'s newest complete checkpoint on random-policy states
    (:func:`random_policy_states`: ``num_envs`` envs of the run's env for ``steps`` steps), as plain data: run,
    agent_step, states, tau, layers (``{name: {"dormant", "units", "fraction"}}``), total_fraction, q_std,
    greedy_action_share."""
    torch_device = torch.device(device)
    config = load_run_config(run_dir)  # ConfigError: no config.yaml, not a run of scripts/train_dqn.py
    agent_step, weights = newest_weights(run_dir, torch_device)
    env = make_env(config.env, num_envs=num_envs)
    try:
        q_network = build_q_network(config.network, env.spec).to(torch_device)
        states = random_policy_states(env, steps, seed)
    finally:
        env.close()
    q_network.load_state_dict(weights)
    obs = torch.from_numpy(states).to(torch_device)
    outputs: list[Tensor] = []
    stats = dormant_units(q_network, obs, tau=tau, forward=lambda net, batch: outputs.append(net(batch)))
    layers = {name: {"dormant": s.dormant, "units": s.units, "fraction": s.fraction} for name, s in stats.items()}
    return {
        "run": str(run_dir),
        "agent_step": agent_step,
        "states": int(obs.shape[0]),
        "tau": float(tau),
        "layers": layers,
        "total_fraction": total_fraction(stats),
        **_q_summary(outputs[0].cpu()),
    }


def format_table(reports: list[dict[str, Any]]) -> str:
    """A Markdown table of :func:`run_dormant_report` results: one row per run, one column per layer
    (dormant/units; ``-`` where a run has no such layer)."""
    layer_names = list(dict.fromkeys(name for r in reports for name in r["layers"]))
    header = ["run", "agent step", *layer_names, "dormant total", "Q std", "greedy action share"]
    rows = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in reports:
        cells = [Path(r["run"]).name, f"{r['agent_step']:,}"]
        for name in layer_names:
            layer = r["layers"].get(name)
            cells.append("-" if layer is None else f"{layer['dormant']}/{layer['units']}")
        cells += [f"{r['total_fraction']:.1%}", f"{r['q_std']:.4g}", f"{r['greedy_action_share']:.2f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
