"""Dormant units of a saved DQN agent (``scripts/dormant_units.py``): its newest complete checkpoint's Q-network
on states collected in the run's own env by a policy (:data:`POLICIES`): ``random``, uniformly random actions, or
``agent``, the checkpoint's own Q-network acting epsilon-greedily with the run's evaluation epsilon
(``eval.epsilon``, as :func:`agents.dqn.evaluation.evaluate` plays), on the states the trained agent visits.

Per run: the tau-dormant units of each activation layer (Sokar et al. 2023, :mod:`wn_rl.dormant`), their share
over all layers, the spread of the Q-values over the states (the std over states of each action's Q, averaged
over actions) and the share of the states whose greedy action is the most frequent one. A network whose
layer died entirely has a Q std of 0 and a share of 1.0: it takes the same action everywhere. Under
``agent`` such a network still collects varied states: its epsilon share of actions is uniformly random, the rest
is that one action.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from agents.dqn.config import load_run_config
from agents.dqn.envs import VecEnv, make_env
from agents.dqn.evaluation import load_q_network, select_actions
from wn_rl.batches import eval_pass
from wn_rl.checkpoint import CheckpointError, load_latest_checkpoint
from wn_rl.dormant import dormant_units, total_fraction

__all__ = ["POLICIES", "format_table", "newest_weights", "policy_states", "run_dormant_report"]

POLICIES = ("random", "agent")
"""Who collects the measured states: uniformly random actions, or the checkpoint's Q-network at ``eval.epsilon``."""


def newest_weights(run_dir: str | Path, device: torch.device) -> tuple[int, dict[str, Tensor]]:
    """``(agent step, online Q-network state_dict on device)`` of ``run_dir``'s newest complete checkpoint; none is
    a :class:`CheckpointError` saying so. The checkpoint is mapped on the CPU and only the Q-network is read and
    moved to ``device``, never the replay memory that a run with ``run.save_replay=true`` checkpoints (GBs)."""
    _, agent_step, weights = _newest_checkpoint(run_dir, device)
    return agent_step, weights


def _newest_checkpoint(run_dir: str | Path, device: torch.device) -> tuple[Path, int, dict[str, Tensor]]:
    """:func:`newest_weights` with the checkpoint's path first."""
    found = load_latest_checkpoint(Path(run_dir) / "checkpoints", mmap=True)
    if found is None:
        raise CheckpointError(
            f"{Path(run_dir) / 'checkpoints'} holds no complete checkpoint; let the run write one "
            "(run.checkpoint_every_agent_steps, or the end of training)"
        )
    path, state = found
    weights = {name: tensor.to(device) for name, tensor in state["learner"]["q_network"].items()}
    return path, int(state["counters"]["agent_step"]), weights


@torch.no_grad()
def policy_states(
    env: VecEnv,
    steps: int,
    seed: int,
    q_network: nn.Module | None = None,
    epsilon: float = 1.0,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """``num_envs * steps`` observations of an epsilon-greedy ``q_network`` in ``env`` (none, or ``epsilon`` 1: a
    uniformly random policy), each step's observation before acting, the actions chosen by
    :func:`~agents.dqn.evaluation.select_actions` with the network in eval mode, as evaluation plays.

    Reset with ``seed``; every step draws from ``numpy.random.default_rng(seed)`` the uniform actions and, with a
    network and ``epsilon < 1``, then the explore coin flips: without a network the states are those of the random
    policy measured before ``--policy`` existed."""
    rng = np.random.default_rng(seed)
    n, n_actions = env.spec.num_envs, env.spec.n_actions
    acting = q_network is not None and epsilon < 1.0
    obs = env.reset(seed=seed)
    states = []
    with eval_pass(q_network) if q_network is not None else contextlib.nullcontext():
        for _ in range(steps):
            states.append(obs)
            random_actions = torch.from_numpy(rng.integers(n_actions, size=n)).to(device)
            explore = torch.from_numpy(rng.random(n) < epsilon).to(device) if acting else None
            obs_t = torch.from_numpy(obs).to(device)
            actions = select_actions(q_network, obs_t, epsilon, n_actions, draws=(random_actions, explore))
            obs = env.step(actions.cpu().numpy()).obs
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
    policy: str = "random",
) -> dict[str, Any]:
    """The dormant units and Q-value spread of ``run_dir``'s newest complete checkpoint on the states that
    ``policy`` collects (:func:`policy_states`: ``num_envs`` envs of the run's env for ``steps`` steps; ``agent``
    acts with the checkpoint's network at the run's ``eval.epsilon``), as plain data: run, agent_step, policy,
    epsilon (1.0 for ``random``), states, tau, layers (``{name: {"dormant", "units", "fraction"}}``),
    total_fraction, q_std, greedy_action_share."""
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r}: expected one of {POLICIES} (who collects the measured states)")
    torch_device = torch.device(device)
    config = load_run_config(run_dir)  # ConfigError: no run of scripts/train_dqn.py (no, empty or bad config.yaml)
    path, agent_step, weights = _newest_checkpoint(run_dir, torch_device)
    # CheckpointError, before the envs are built: a checkpoint that does not fit config.yaml
    q_network = load_q_network(config, weights, path, Path(run_dir), torch_device)
    epsilon = config.eval.epsilon if policy == "agent" else 1.0
    env = make_env(config.env, num_envs=num_envs)
    try:
        actor = q_network if policy == "agent" else None
        states = policy_states(env, steps, seed, actor, epsilon, torch_device)
    finally:
        env.close()
    obs = torch.from_numpy(states).to(torch_device)
    outputs: list[Tensor] = []
    stats = dormant_units(q_network, obs, tau=tau, forward=lambda net, batch: outputs.append(net(batch)))
    layers = {name: {"dormant": s.dormant, "units": s.units, "fraction": s.fraction} for name, s in stats.items()}
    return {
        "run": str(run_dir),
        "agent_step": agent_step,
        "policy": policy,
        "epsilon": float(epsilon),
        "states": int(obs.shape[0]),
        "tau": float(tau),
        "layers": layers,
        "total_fraction": total_fraction(stats),
        **_q_summary(outputs[0].cpu()),
    }


def format_table(reports: list[dict[str, Any]]) -> str:
    """A Markdown table of :func:`run_dormant_report` results: one row per run, the policy that collected its
    states (``agent eps 0.05``: the checkpoint's network at that epsilon), one column per layer (dormant/units;
    ``-`` where a run has no such layer)."""
    layer_names = list(dict.fromkeys(name for r in reports for name in r["layers"]))
    header = ["run", "agent step", "policy", *layer_names, "dormant total", "Q std", "greedy action share"]
    rows = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in reports:
        policy = f"agent eps {r['epsilon']:g}" if r["policy"] == "agent" else r["policy"]
        cells = [Path(r["run"]).name, f"{r['agent_step']:,}", policy]
        for name in layer_names:
            layer = r["layers"].get(name)
            cells.append("-" if layer is None else f"{layer['dormant']}/{layer['units']}")
        cells += [f"{r['total_fraction']:.1%}", f"{r['q_std']:.4g}", f"{r['greedy_action_share']:.2f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
