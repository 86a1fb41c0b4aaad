"""Dormant units of saved DQN agents: ``python scripts/dormant_units.py RUN_DIR [RUN_DIR ...] [--json out.json]``.

For each run directory of ``scripts/train_dqn.py``: its newest complete checkpoint's Q-network on the states that
``--policy`` collects in the run's own env (``--envs`` x ``--steps``; ``--seed`` seeds the env reset and every
random draw), and a table of the tau-dormant units per activation layer (Sokar et al. 2023; ``--tau 0``: never
active), their share over all layers, the std of the Q-values over the states and the share of the most frequent
greedy action (a collapsed network: Q std 0, share 1.00). The table and the JSON name the policy.

``--policy random`` (the default, as every number measured before the option): uniformly random actions.
``--policy agent``: the checkpoint's own Q-network acting epsilon-greedily with the run's evaluation epsilon
(``eval.epsilon``, 0.05 by default), as evaluation plays: the states the trained agent reaches. A collapsed network
still collects varied states this way: its epsilon share of actions is random, the rest is its one action.
The logic is in :mod:`agents.dqn.dormant`.

Exit codes: 0 done; 2 bad input (a ``--json`` path whose folder does not exist included: checked before any
work), a directory that is not a run, or a run without a complete checkpoint; 1 the JSON file could not be
written (a full disk: the message names the file; the table was printed first).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from agents.dqn.dormant import POLICIES, format_table, run_dormant_report
from wn_rl.checkpoint import CheckpointError, atomic_write_bytes
from wn_rl.cli import brief_warnings
from wn_rl.config import ConfigError, resolve_device
from wn_rl.dormant import TAU_EXPECTED, is_tau


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories written by train_dqn.py")
    parser.add_argument("--steps", type=int, default=250, help="steps of the policy per env (default 250)")
    parser.add_argument("--envs", type=int, default=8, help="parallel envs (default 8: 2000 states)")
    parser.add_argument(
        "--policy",
        choices=POLICIES,
        default="random",
        help="who collects the states: uniformly random actions (default), or the checkpoint's Q-network "
        "epsilon-greedy at the run's eval.epsilon",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the env reset, random actions and epsilon draws")
    parser.add_argument("--tau", type=float, default=0.0, help="dormancy threshold on the unit score (default 0)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.envs < 1 or args.steps * args.envs < 2:
        parser.error(f"--steps {args.steps} --envs {args.envs}: need at least 2 states (the default gives 2000)")
    if not is_tau(args.tau):
        parser.error(f"--tau {args.tau}: expected {TAU_EXPECTED}")
    if args.seed < 0:
        parser.error(f"--seed {args.seed}: expected a non-negative integer (envs refuse negative seeds)")
    if args.json is not None:  # checked before any work: the write comes after every run is measured
        folder = args.json.parent
        if not folder.is_dir():
            what = "is not a folder" if folder.exists() else "does not exist"
            parser.error(f"--json {args.json}: its folder {folder} {what}; create it first or give a path in one")
        if args.json.is_dir():
            parser.error(f"--json {args.json} is a folder; give a file name, e.g. {args.json / 'dormant.json'}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        device = resolve_device(args.device, "--device")
        reports = [
            run_dormant_report(
                run,
                num_envs=args.envs,
                steps=args.steps,
                seed=args.seed,
                tau=args.tau,
                device=device,
                policy=args.policy,
            )
            for run in args.run_dirs
        ]
    except (ConfigError, CheckpointError, ValueError) as exc:  # ValueError: the run's env cannot be built here
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(reports))
    if args.json is not None:
        try:
            atomic_write_bytes(args.json, json.dumps(reports, indent=1).encode())
        except CheckpointError as exc:  # a full disk: the message names the file; no partial file is left
            print(f"error: {exc}; the table above holds the same numbers", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    brief_warnings()
    sys.exit(main())
