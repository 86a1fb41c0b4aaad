"""How far the compiled DQN update lands from the eager one, for correct graphs: the evidence behind the
threshold of the learner's own check (``agents.dqn.learner.COMPILED_CHECK_SHARE``).

For each game's network, parameterization and optimizer, an eager and a compiled :class:`Learner` start
from the same weights and take the same updates on one random minibatch; after each update the script
prints the largest parameter difference in units of the learning rate and the share of weights apart by
more than a tenth of it (what the learner's check counts).

    python scripts/bench_compiled_check.py --games minatar          # ~2 min on 2 CPU cores
    python scripts/bench_compiled_check.py --games atari --updates 1 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import replace

import numpy as np
import torch

from agents.dqn.benchmark import GAME_BATCHES, random_batch
from agents.dqn.config import AgentConfig, NetworkConfig
from agents.dqn.envs import EnvSpec
from agents.dqn.learner import COMPILED_CHECK_STEP_FRACTION, Learner, parameter_gap
from agents.dqn.networks import build_q_network
from wn_rl import data_dependent_init

OPTIMIZERS = {"adamax": 1e-4, "adam": 1e-4, "rmsprop": 2.5e-4}  # the learning rate each is compared at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--games", nargs="+", choices=sorted(GAME_BATCHES), default=["minatar"])
    parser.add_argument("--parameterizations", nargs="+", default=["normal", "weight_norm"])
    parser.add_argument("--optimizers", nargs="+", choices=sorted(OPTIMIZERS), default=list(OPTIMIZERS))
    parser.add_argument("--updates", type=int, default=3, help="updates compared per configuration")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mode", choices=("compiled", "cudagraph"), default="compiled")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but torch.cuda.is_available() is False")
    rows = []
    for game in args.games:
        shape, n_actions, _ = GAME_BATCHES[game]
        spec = EnvSpec(game, "breakout", 1, shape, 1, np.dtype(np.uint8), n_actions, {})
        batch = random_batch(game, args.batch_size, device)
        for parameterization in args.parameterizations:
            torch.manual_seed(0)
            q = build_q_network(NetworkConfig(parameterization=parameterization), spec).to(device)
            data_dependent_init(q, batch.next_obs)
            weights = sum(p.numel() for p in q.parameters())
            for optimizer in args.optimizers:
                config = AgentConfig(optimizer=optimizer, lr=OPTIMIZERS[optimizer])
                eager = Learner(copy.deepcopy(q), replace(config, update_mode="eager"), False)
                fast = Learner(copy.deepcopy(q), replace(config, update_mode=args.mode), False)
                for update in range(1, args.updates + 1):
                    eager.update(batch)
                    fast.update(batch)
                    gap = parameter_gap(eager.q_network, fast.q_network, COMPILED_CHECK_STEP_FRACTION * config.lr)
                    row = {
                        "game": game,
                        "parameterization": parameterization,
                        "optimizer": optimizer,
                        "update": update,
                        "max_diff_in_lr": gap["max_abs_diff"] / config.lr,
                        "share_over_check_bound": gap["share_off"],
                    }
                    rows.append(row)
                    print(
                        f"{game:8s} {parameterization:12s} {optimizer:8s} update {update}: largest difference "
                        f"{row['max_diff_in_lr']:.2e} lr, {row['share_over_check_bound']:.4%} of {weights} "
                        f"weights over {COMPILED_CHECK_STEP_FRACTION} lr",
                        flush=True,
                    )
    print(json.dumps({"torch": torch.__version__, "device": str(device), "mode": args.mode}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
