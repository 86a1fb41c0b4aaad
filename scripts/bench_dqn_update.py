"""Time of one native-DQN update (loss, gradients, optimizer step, guard) per update mode,
parameterization and source of the minibatch, interleaved in one process.

The loop's ``--profile`` (``scripts/bench_dqn_throughput.py``) times the updates inside the training loop;
this times them alone, so the two together say whether a difference lies in the update or around it.
``--source`` picks what one timed update does:

- ``batch``: ``Learner.update`` on one fixed minibatch (the update alone);
- ``replay``: ``Learner.sample_and_update`` from a full replay memory (``--replay-capacity`` transitions of
  random frames over ``--num-envs`` envs), sampling included, in the graph when compiled;
- ``act``: as the loop does it with ``run.acting=auto``: the epsilon-greedy actions for ``--num-envs``
  observations, then the sampling and update (one compiled call where the mode allows it, else a
  separate forward first).

Networks as in the DQN configs: the Nature CNN on 4x84x84 Atari frames, the MinAtar CNN on 4x10x10;
data-dependent init first; Adam.

    python scripts/bench_dqn_update.py --game atari --update-mode eager compiled --source batch replay act
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from agents.dqn.benchmark import random_batch_of
from agents.dqn.config import AgentConfig, NetworkConfig
from agents.dqn.envs import EnvSpec
from agents.dqn.evaluation import exploration_draws, select_actions
from agents.dqn.learner import Learner
from agents.dqn.networks import build_q_network
from agents.dqn.replay import ReplayBatch, ReplayMemory
from wn_rl import data_dependent_init

SPECS = {
    "atari": EnvSpec("atari", "breakout", 4, (84, 84), 4, np.dtype(np.uint8), 4, {}),
    "minatar": EnvSpec("minatar", "breakout", 1, (4, 10, 10), 1, np.dtype(np.uint8), 3, {}),
}


def full_replay(spec: EnvSpec, capacity: int, num_envs: int, device: torch.device) -> ReplayMemory:
    """A replay memory of ``capacity`` transitions of random frames, every slot written once."""
    replay = ReplayMemory(capacity, num_envs, spec.frame_shape, spec.frame_dtype, spec.stack, 1, device)
    g = torch.Generator(device=device).manual_seed(1)
    high = 256 if spec.suite == "atari" else 2
    replay.frames.random_(0, high, generator=g)
    replay.actions.random_(0, spec.n_actions, generator=g)
    replay.rewards.copy_(torch.rand(replay.rewards.shape, generator=g, device=device) < 0.05)
    replay.first.copy_(torch.rand(replay.first.shape, generator=g, device=device) < 0.002)
    replay.final.copy_(torch.roll(replay.first, -1, 0))
    replay.terminated.copy_(replay.final)
    replay.writes, replay.position = replay.length, 0
    replay.valid.copy_(replay.valid_mask_reference())
    replay.recount_valid()
    return replay


def timed_update(
    learner: Learner, source: str, batch: ReplayBatch, replay: ReplayMemory, n_actions: int
) -> Callable[[], None]:
    """One update of ``learner`` from ``source`` (see the module docstring), as a function of nothing."""
    if source == "batch":
        return lambda: learner.update(batch)
    size, device = batch.actions.shape[0], replay.device
    if source == "replay":
        return lambda: learner.sample_and_update(replay, size)
    obs = replay.recent_observations(replay.num_envs)

    def act_and_update() -> None:
        draws = exploration_draws(replay.num_envs, n_actions, 0.1, device)
        uniforms = torch.rand(size, device=device)
        if learner.acts_in_update:
            learner.act_sample_and_update(replay, obs, draws, uniforms)
        else:
            select_actions(learner.q_network, obs, 0.1, n_actions, draws)
            learner.sample_and_update(replay, size, uniforms)

    return act_and_update


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--game", choices=sorted(SPECS), default="atari")
    parser.add_argument(
        "--update-mode", nargs="+", choices=["eager", "compiled", "cudagraph"], default=["eager", "compiled"]
    )
    parser.add_argument("--parameterization", nargs="+", default=["normal", "weight_norm"])
    parser.add_argument("--source", nargs="+", choices=["batch", "replay", "act"], default=["batch"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--replay-capacity", type=int, default=100_000, help="transitions (--source replay, act)")
    parser.add_argument("--num-envs", type=int, default=4, help="envs of the replay memory and of acting")
    parser.add_argument("--updates", type=int, default=10, help="updates per timed round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    spec = SPECS[args.game]
    density = None if spec.suite == "atari" else 0.5  # MinAtar's planes are 0/1
    batch = random_batch_of(spec.obs_shape, spec.n_actions, args.batch_size, device, density)
    needs_replay = set(args.source) - {"batch"}
    replay = full_replay(spec, args.replay_capacity, args.num_envs, device) if needs_replay else None
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    runs: dict[tuple[str, str, str], Callable[[], None]] = {}
    for parameterization in args.parameterization:
        torch.manual_seed(0)
        q = build_q_network(NetworkConfig(parameterization=parameterization), spec).to(device)
        data_dependent_init(q, batch.next_obs)
        for mode in args.update_mode:
            for source in args.source:
                config = replace(AgentConfig(optimizer="adam", lr=1e-4), update_mode=mode)
                learner = Learner(copy.deepcopy(q), config, terminal_on_life_loss=False)
                run = timed_update(learner, source, batch, replay, spec.n_actions)
                t0 = time.perf_counter()
                for _ in range(3):  # the first compiles
                    run()
                sync()
                elapsed = time.perf_counter() - t0
                print(f"{parameterization:>12} {mode:>9} {source:>6}: first 3 updates (compilation) {elapsed:.1f} s")
                runs[parameterization, mode, source] = run
    times: dict[tuple[str, str, str], list[float]] = {key: [] for key in runs}
    for _ in range(args.rounds):
        for key, run in runs.items():
            t0 = time.perf_counter()
            for _ in range(args.updates):
                run()
            sync()
            times[key].append(1e3 * (time.perf_counter() - t0) / args.updates)
    first = statistics.median(next(iter(times.values())))
    print(f"\n{args.game}, batch {args.batch_size}, {device}: ms per update, median of {args.rounds} x {args.updates}")
    for (parameterization, mode, source), values in times.items():
        median = statistics.median(values)
        print(f"  {parameterization:>12} {mode:>9} {source:>6}  {median:8.2f} ms  {median / first:5.2f}x the first row")


if __name__ == "__main__":
    main()
