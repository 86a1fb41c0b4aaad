"""Time of one native-DQN update alone (loss, gradients, optimizer step, guard) per update mode and
parameterization, on one fixed minibatch, interleaved in one process.

The loop's ``--profile`` (``scripts/bench_dqn_throughput.py``) times the updates inside the training loop,
sampling from the replay memory included; this times ``Learner.update`` on a given batch, so the two
together say whether a difference lies in the update or around it. Networks as in the DQN configs: the
Nature CNN on 4x84x84 Atari frames, the MinAtar CNN on 4x10x10; data-dependent init first; Adam.

    python scripts/bench_dqn_update.py --game atari --update-mode eager compiled --parameterization normal weight_norm
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import replace

import numpy as np
import torch

from agents.dqn.config import AgentConfig, NetworkConfig
from agents.dqn.envs import EnvSpec
from agents.dqn.learner import Learner
from agents.dqn.networks import build_q_network
from agents.dqn.replay import ReplayBatch
from wn_rl import data_dependent_init

SPECS = {
    "atari": EnvSpec("atari", "breakout", 4, (84, 84), 4, np.dtype(np.uint8), 4, {}),
    "minatar": EnvSpec("minatar", "breakout", 1, (4, 10, 10), 1, np.dtype(np.uint8), 3, {}),
}


def random_batch(spec: EnvSpec, batch_size: int, device: torch.device) -> ReplayBatch:
    g = torch.Generator().manual_seed(0)
    high = 256 if spec.suite == "atari" else 2

    def frames() -> torch.Tensor:
        return torch.randint(0, high, (batch_size, *spec.obs_shape), generator=g, dtype=torch.uint8)

    batch = ReplayBatch(
        obs=frames(),
        actions=torch.randint(0, spec.n_actions, (batch_size,), generator=g),
        rewards=torch.randn(batch_size, 1, generator=g),
        terminals=torch.rand(batch_size, 1, generator=g) < 0.1,
        truncations=torch.zeros(batch_size, 1, dtype=torch.bool),
        next_obs=frames(),
        next_offsets=torch.ones(batch_size, dtype=torch.long),
        indices=torch.arange(batch_size),
    )
    return ReplayBatch(**{k: v.to(device) for k, v in vars(batch).items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--game", choices=sorted(SPECS), default="atari")
    parser.add_argument("--update-mode", nargs="+", default=["eager", "compiled"])
    parser.add_argument("--parameterization", nargs="+", default=["normal", "weight_norm"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--updates", type=int, default=10, help="updates per timed round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    spec = SPECS[args.game]
    batch = random_batch(spec, args.batch_size, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    learners = {}
    for parameterization in args.parameterization:
        torch.manual_seed(0)
        q = build_q_network(NetworkConfig(parameterization=parameterization), spec).to(device)
        data_dependent_init(q, batch.next_obs)
        for mode in args.update_mode:
            config = replace(AgentConfig(optimizer="adam", lr=1e-4), update_mode=mode)
            learner = Learner(copy.deepcopy(q), config, terminal_on_life_loss=False)
            t0 = time.perf_counter()
            for _ in range(3):  # the first compiles
                learner.update(batch)
            sync()
            print(f"{parameterization:>12} {mode:>9}: first 3 updates (compilation) {time.perf_counter() - t0:.1f} s")
            learners[parameterization, mode] = learner
    times: dict[tuple[str, str], list[float]] = {key: [] for key in learners}
    for _ in range(args.rounds):
        for key, learner in learners.items():
            t0 = time.perf_counter()
            for _ in range(args.updates):
                learner.update(batch)
            sync()
            times[key].append(1e3 * (time.perf_counter() - t0) / args.updates)
    first = statistics.median(next(iter(times.values())))
    print(f"\n{args.game}, batch {args.batch_size}, {device}: ms per update, median of {args.rounds} x {args.updates}")
    for (parameterization, mode), values in times.items():
        median = statistics.median(values)
        print(f"  {parameterization:>12} {mode:>9}  {median:8.2f} ms  {median / first:5.2f}x the first row")


if __name__ == "__main__":
    main()
