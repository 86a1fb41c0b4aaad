"""Cost of the SB3 NaN guard (``wn_rl.sb3.guard``) per gradient step, measured side by side in one run:
two identical SB3 DQN models (WnMlpPolicy on CartPole-v1), one with its optimizer's ``step`` guarded,
run ``model.train`` in interleaved rounds (order alternating), and the script prints the per-round
times and the ratio guarded / plain.

    python scripts/bench_nan_guard.py --rounds 6 --gradient-steps 300 --threads 1 [--device cuda]

Both models: net_arch [256, 256], batch 64, a replay buffer filled by 1,000 untimed random steps.
The guard checks gradients and parameters on the device and reads its flag every 16 steps, as in
``train_sb3.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from stable_baselines3 import DQN

from wn_rl.sb3 import WnMlpPolicy
from wn_rl.sb3.guard import NonFiniteGuard


def build(device: str, seed: int) -> DQN:
    model = DQN(
        WnMlpPolicy,
        "CartPole-v1",
        policy_kwargs={"net_arch": [256, 256]},
        learning_starts=1_000,
        batch_size=64,
        device=device,
        seed=seed,
        verbose=0,
    )
    model.learn(1_000)  # fills the buffer with random steps; no update yet
    return model


def timed_train(model: DQN, gradient_steps: int) -> float:
    """Milliseconds per gradient step of ``model.train``."""
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    model.train(gradient_steps=gradient_steps, batch_size=model.batch_size)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / gradient_steps * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds per model (interleaved)")
    parser.add_argument("--gradient-steps", type=int, default=300, help="gradient steps per round")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = {"plain": build(args.device, 0), "guarded": build(args.device, 0)}
    guard = NonFiniteGuard({})
    guard.wrap(models["guarded"].policy.optimizer, "policy.optimizer")
    for model in models.values():  # untimed warm-up round
        timed_train(model, args.gradient_steps // 4)
    times: dict[str, list[float]] = {name: [] for name in models}
    for r in range(args.rounds):
        order = list(models) if r % 2 == 0 else list(reversed(models))
        for name in order:
            times[name].append(timed_train(models[name], args.gradient_steps))
    guard.check()  # the benchmark must not have skipped steps
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "device": args.device,
        "threads": args.threads,
        "ms_per_gradient_step": {name: [round(v, 3) for v in values] for name, values in times.items()},
        "median_ms": {name: round(v, 3) for name, v in medians.items()},
        "ratio_guarded_over_plain": round(medians["guarded"] / medians["plain"], 3),
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
