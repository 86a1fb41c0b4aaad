"""Agent steps per second of our DQN and stable-baselines3's DQN, interleaved in one invocation.

For each game, every configuration of ours (update mode x parameterization) and SB3's DQN run the same
settings (``agents/dqn/benchmark.py``: 100k replay for both, minibatch 32 unless ``--batch-size``, Atari
one update per 4 agent steps, MinAtar one per agent step); after a warm-up in which learning starts (and
compilation happens) each advances in interleaved chunks, so all see the same machine load. Prints SPS, the ratio to SB3
and, with ``--profile``, where our loop's time goes (env, acting, replay writes, learning = sampling +
update) and the bound set by the updates alone. Epsilon has decayed to its final 0.1 by the end of the
warm-up on both sides.

    python scripts/bench_dqn_throughput.py --games minatar:breakout atari:breakout --profile
    python scripts/bench_dqn_throughput.py --games atari:breakout --device cuda --num-envs 8 \\
        --update-mode eager compiled cudagraph --parameterization normal weight_norm
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

from agents.dqn.benchmark import (
    build_ours,
    build_sb3,
    ours_contender,
    profile_loop,
    sb3_contender,
    settings_for,
    throughput,
)
from wn_rl.provenance import provenance


def bench_game(game: str, num_envs: int | None, args: argparse.Namespace) -> dict:
    suite, name = game.split(":")
    num_envs = num_envs or (4 if suite == "atari" else 1)
    s = settings_for(suite, num_envs, args.learning_starts, args.replay, decay=args.warmup, batch=args.batch_size)
    total = args.warmup + args.steps * (args.rounds + 1) + 10 * num_envs
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as runs_dir:
        trainers = {
            f"ours_{mode}_{p}" + (f"_{overlap}" if len(args.overlap) > 1 else ""): build_ours(
                suite,
                name,
                s,
                total,
                0,
                runs_dir,
                p,
                (f"agent.update_mode={mode}", f"run.device={args.device}", f"run.overlap_updates={overlap}"),
            )
            for mode in args.update_mode
            for p in args.parameterization
            for overlap in args.overlap
        }
        contenders = [ours_contender(label, t) for label, t in trainers.items()]
        if not args.no_sb3:
            contenders.append(sb3_contender(build_sb3(suite, name, s, total, 0, args.device)))
        failures: dict[str, str] = {}
        sps = throughput(contenders, args.warmup, args.steps, args.rounds, failures)
        alive = {label: t for label, t in trainers.items() if label in sps}
        profiles = {label: profile_loop(t, args.steps) for label, t in alive.items()} if args.profile else {}
        modes = {label: t.learner.update_mode for label, t in trainers.items()}
        overlaps = {label: t.update_runner.mode for label, t in trainers.items()}
        for c in contenders:
            if c.name in sps:
                c.close()
    result = {"game": game, "num_envs": num_envs, "settings": s, "sps": sps, "failures": failures}
    result.update(update_mode=modes, overlap=overlaps, profile=profiles)
    if "sb3" in sps:
        result["ratio_to_sb3"] = {label: sps[label] / sps["sb3"] for label in alive}
    result["load_average"] = {"before": load_before, "after": os.getloadavg()}
    return result


def _print_table(result: dict) -> None:
    print(
        f"\n{result['game']}, {result['num_envs']} envs, minibatch {result['settings']['batch']}  "
        f"(load average {result['load_average']['before'][0]:.1f} -> "
        f"{result['load_average']['after'][0]:.1f})"
    )
    for label, sps in result["sps"].items():
        ratio = result.get("ratio_to_sb3", {}).get(label)
        line = f"  {label:36s} {sps:8.1f} SPS" + (f"   {ratio:.2f}x SB3" if ratio else "")
        prof = result["profile"].get(label)
        if prof:
            parts = ", ".join(f"{k[:-3]} {v:.2f}" for k, v in prof.items() if k.endswith("_ms") and k != "update_ms")
            line += f"\n      ms/agent step: {parts}; update {prof['update_ms']:.2f} ms"
            line += f"; bound {prof['bound_sps']:.0f} SPS, profiled loop at {prof['sps_vs_bound']:.0%} of it"
        print(line)
    for label, error in result["failures"].items():
        print(f"  {label:36s}   FAILED: {error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--games", nargs="+", default=["minatar:breakout", "atari:breakout"])
    parser.add_argument("--num-envs", type=int, nargs="+", default=[None], help="default: 4 for Atari, 1 for MinAtar")
    parser.add_argument(
        "--update-mode", nargs="+", default=["eager", "compiled"], choices=["auto", "eager", "compiled", "cudagraph"]
    )
    parser.add_argument("--parameterization", nargs="+", default=["normal", "weight_norm"])
    parser.add_argument(
        "--overlap",
        nargs="+",
        default=["auto"],
        choices=["auto", "thread", "inline"],
        help="run.overlap_updates (thread: updates in a worker thread while acting and env stepping)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (both implementations)")
    parser.add_argument("--steps", type=int, default=1000, help="agent steps per timed chunk")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved chunks per contender")
    parser.add_argument("--warmup", type=int, default=2000, help="agent steps before timing (learning starts inside)")
    parser.add_argument("--learning-starts", type=int, default=1000)
    parser.add_argument("--replay", type=int, default=100_000, help="replay capacity for both (transitions)")
    parser.add_argument("--batch-size", type=int, default=32, help="minibatch for both (the paper's DQN: 64)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--profile", action="store_true", help="also split our loops into env/acting/replay/learn")
    parser.add_argument("--no-sb3", action="store_true", help="only ours")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    for option in ("batch_size", "steps", "rounds", "replay"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [bench_game(game, n, args) for game in args.games for n in args.num_envs]
    for result in results:
        _print_table(result)
    meta = {k: provenance()[k] for k in ("git", "versions", "hardware", "time_utc")}
    meta.update(torch_threads=torch.get_num_threads(), args=vars(args))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"results": results, "provenance": meta}, f, indent=1)
    failed = [label for result in results for label in result["failures"]]
    if failed:
        sys.exit(f"{len(failed)} configuration(s) failed: {', '.join(failed)} (tracebacks above, on stderr)")


if __name__ == "__main__":
    main()
