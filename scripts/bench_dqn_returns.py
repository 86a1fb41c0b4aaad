"""MinAtar Breakout return after N agent steps: our DQN against stable-baselines3's DQN.

Both use SB3's DQN settings for the same network (conv 16@3x3 + fc 128, ``normal`` parameterization,
Adam, Huber, max grad norm 10; ``agents/dqn/benchmark.py``) and train for the same number of agent steps
at the same time in two processes (one torch thread each); prints the mean return of the last 100
training episodes of each. Throughput is ``scripts/bench_dqn_throughput.py``.

    python scripts/bench_dqn_returns.py --steps 150000 --seeds 0
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

from agents.dqn.benchmark import build_ours, build_sb3, settings_for
from wn_rl.provenance import provenance

SETTINGS = settings_for("minatar", 1, learning_starts=5000, replay=100_000, decay=100_000)


def _returns_ours(seed: int, steps: int, runs_dir: str) -> dict:
    torch.set_num_threads(1)
    trainer = build_ours("minatar", "breakout", SETTINGS, steps, seed, runs_dir, "normal")
    t0 = time.perf_counter()
    trainer.run()
    seconds = time.perf_counter() - t0
    return {
        "last100_return": float(np.mean(trainer.tracker.recent)),
        "sps": steps / seconds,
        "episodes": trainer.tracker.episodes,
    }


def _returns_sb3(seed: int, steps: int) -> dict:
    torch.set_num_threads(1)
    model = build_sb3("minatar", "breakout", SETTINGS, steps, seed)
    t0 = time.perf_counter()
    model.learn(steps)
    seconds = time.perf_counter() - t0
    return {"last100_return": float(np.mean([e["r"] for e in model.ep_info_buffer])), "sps": steps / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    if args.steps <= SETTINGS["learning_starts"]:
        parser.error(
            f"--steps {args.steps}: expected more than the {SETTINGS['learning_starts']:,} agent steps before "
            "learning starts (otherwise no update ever happens)"
        )
    out = {"game": "minatar:breakout", "steps": args.steps, "settings": SETTINGS, "seeds": {}}
    with tempfile.TemporaryDirectory() as runs_dir, ProcessPoolExecutor(max_workers=2) as pool:
        for seed in args.seeds:
            ours = pool.submit(_returns_ours, seed, args.steps, runs_dir)
            sb3 = pool.submit(_returns_sb3, seed, args.steps)
            out["seeds"][seed] = {"ours": ours.result(), "sb3": sb3.result()}
            print(json.dumps({seed: out["seeds"][seed]}), flush=True)
    out["provenance"] = {k: provenance()[k] for k in ("git", "versions", "hardware", "time_utc")}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
