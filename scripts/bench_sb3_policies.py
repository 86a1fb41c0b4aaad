"""SB3 training steps per second with a wn_rl policy against SB3's own, measured side by side in one run:
both models train in interleaved rounds (order alternating A-B, B-A, ...), so machine load hits both
alike, and the script prints the per-round rates and the ratio. ``--algo dqn`` (default): DQN with
WnCnnPolicy against CnnPolicy on an Atari game; ``--algo sac`` / ``--algo tqc``: SAC with WnSACPolicy /
sb3-contrib's TQC with WnTQCPolicy against MlpPolicy on Pendulum-v1 (small MLPs, where weight norm's cost
per layer is op overhead rather than arithmetic).

    python scripts/bench_sb3_policies.py --env BreakoutNoFrameskip-v4 --rounds 5 --steps 2000 --threads 1
    python scripts/bench_sb3_policies.py --threads 1 --clock cpu   # a shared machine: process CPU time
    python scripts/bench_sb3_policies.py --algo tqc --rounds 5 --steps 500 --threads 1

``--clock cpu`` divides by the process's CPU time (``time.process_time``: network, emulator and SB3's
Python alike) instead of wall time, which on a machine shared with other jobs removes the time spent
waiting for a core.

DQN: batch 32, one update every 4 agent steps, replay 10k, epsilon fixed at 0.05 (so 95% of steps run
the network, as after DQN's exploration phase), updates running from the first timed step. SAC and TQC:
SB3's defaults (batch 256, one update per step, two critics; TQC 25 quantiles each). The WN model is
initialised by DataDependentInitCallback (section 3) during the untimed warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch
from sb3_contrib import TQC
from stable_baselines3 import DQN, SAC
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.env_util import make_atari_env
from stable_baselines3.common.vec_env import VecFrameStack

from wn_rl.sb3 import DataDependentInitCallback, WnCnnPolicy, WnSACPolicy, WnTQCPolicy
from wn_rl.sb3.envs import register_envs

# per algorithm: SB3's policy, then wn_rl's (the names label the output), and the default env
ALGOS: dict[str, tuple[dict[str, Any], str]] = {
    "dqn": ({"CnnPolicy": "CnnPolicy", "WnCnnPolicy": WnCnnPolicy}, "BreakoutNoFrameskip-v4"),
    "sac": ({"MlpPolicy": "MlpPolicy", "WnSACPolicy": WnSACPolicy}, "Pendulum-v1"),
    "tqc": ({"MlpPolicy": "MlpPolicy", "WnTQCPolicy": WnTQCPolicy}, "Pendulum-v1"),
}


def build(algo: str, policy: Any, env_id: str, warmup: int, seed: int) -> BaseAlgorithm:
    if algo != "dqn":
        cls = SAC if algo == "sac" else TQC
        return cls(policy, env_id, learning_starts=warmup, seed=seed, verbose=0)
    register_envs()
    env = VecFrameStack(make_atari_env(env_id, n_envs=1, seed=seed), n_stack=4)
    return DQN(
        policy,
        env,
        buffer_size=10_000,
        learning_starts=warmup,
        batch_size=32,
        train_freq=4,
        gradient_steps=1,
        target_update_interval=1000,
        exploration_initial_eps=0.05,
        exploration_final_eps=0.05,
        optimize_memory_usage=False,
        seed=seed,
        verbose=0,
    )


def timed_learn(model: BaseAlgorithm, steps: int, clock: Any = time.perf_counter) -> float:
    """Steps per second of ``model.learn(steps)`` (continuing the step counter), timed by ``clock``."""
    start = clock()
    model.learn(steps, reset_num_timesteps=False)
    return steps / (clock() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algo", choices=sorted(ALGOS), default="dqn", help="dqn (Atari), sac or tqc (Pendulum)")
    parser.add_argument(
        "--env", default=None, help="dqn: an Atari *NoFrameskip-v4 id (default Breakout); sac/tqc: Pendulum-v1"
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per policy")
    parser.add_argument("--steps", type=int, default=2000, help="agent steps per round")
    parser.add_argument("--warmup", type=int, default=1000, help="untimed agent steps before the first update")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="wall time or process CPU time")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 4 or args.warmup < 256:
        parser.error("need --rounds >= 1, --steps >= 4 and --warmup >= 256 (the init batch comes from the replay)")
    if args.threads:
        torch.set_num_threads(args.threads)
    policies, default_env = ALGOS[args.algo]
    env_id = args.env or default_env
    plain, wn = policies
    models = {name: build(args.algo, policy, env_id, args.warmup, args.seed) for name, policy in policies.items()}
    for name, model in models.items():  # untimed: fill the replay buffer, initialise, first updates
        callback = DataDependentInitCallback(n_samples=256) if name == wn else None
        model.learn(args.warmup + 200, callback=callback)
    rates: dict[str, list[float]] = {name: [] for name in models}
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(
        f"{env_id}: {args.algo.upper()} steps per {args.clock}-clock second, {args.steps} agent steps per round, "
        f"torch threads {torch.get_num_threads()}"
    )
    for round_index in range(args.rounds):
        order = list(models) if round_index % 2 == 0 else list(reversed(models))
        for name in order:
            rates[name].append(timed_learn(models[name], args.steps, clock))
        ratio = rates[wn][-1] / rates[plain][-1]
        print(
            f"round {round_index + 1}: {plain} {rates[plain][-1]:6.1f}  {wn} {rates[wn][-1]:6.1f}  ratio {ratio:.3f}",
            flush=True,
        )
    medians = {name: statistics.median(values) for name, values in rates.items()}
    ratios = [w / c for w, c in zip(rates[wn], rates[plain], strict=True)]
    result = {
        "algo": args.algo,
        "env": env_id,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(),
        "clock": args.clock,
        "steps_per_second": rates,
        "median_steps_per_second": medians,
        "median_ratio_wn_over_plain": statistics.median(ratios),
        "ratio_of_medians": medians[wn] / medians[plain],
    }
    print(
        f"median: {plain} {medians[plain]:.1f}  {wn} {medians[wn]:.1f} steps/s; "
        f"median per-round ratio {wn} / {plain} = {result['median_ratio_wn_over_plain']:.3f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
