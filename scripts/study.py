"""Run a study: ``python scripts/study.py configs/studies/<name>.yaml [key=value ...] [--jobs N]``.

Expands the study's grid into DQN runs, skips runs that are already complete, runs the rest (locally,
``--jobs`` at a time, or as Ray tasks with ``--backend ray --address ...``), then writes the figure,
the per-run and aggregate tables (markdown + CSV) to the study's report folder. Running the same
command again resumes an interrupted study. ``--set KEY=VALUE`` adds a DQN override to every run
(e.g. a larger budget, which extends finished runs; their replay memory restarts empty unless the runs
set ``run.save_replay=true``); ``--dry-run`` prints the plan; ``--analyze-only``
only rebuilds the figure and tables from what the runs have written so far.
"""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import replace

from wn_rl.analysis.study import analyze_study, load_study_config, plan_runs
from wn_rl.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="study config (configs/studies/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="study key=value overrides (e.g. max_parallel=4)")
    parser.add_argument(
        "--set",
        dest="run_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="DQN override added to every run after the study's own (e.g. --set run.total_agent_steps=200000)",
    )
    parser.add_argument("--jobs", type=int, help="runs at once with the local backend (default: max_parallel)")
    parser.add_argument("--backend", choices=("local", "ray"), default="local")
    parser.add_argument("--address", help="Ray cluster address (default: the study's ray.address, else local Ray)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and their commands, run nothing")
    parser.add_argument("--analyze-only", action="store_true", help="only write the figure and tables")
    args = parser.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs={args.jobs}: expected at least 1")
    try:
        study = load_study_config(args.config, args.overrides)
        study = replace(study, overrides=(*study.overrides, *args.run_overrides))
        specs = plan_runs(study)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    todo = [s for s in specs if not s.complete]
    print(f"study {study.name}: {len(specs)} runs, {len(specs) - len(todo)} complete, {len(todo)} to run", flush=True)
    if args.dry_run:
        for spec in specs:
            state = "complete" if spec.complete else f"at {spec.progress():,} of {spec.total_agent_steps:,} steps"
            print(f"  {spec.name}: {state}\n    {' '.join(spec.command(study, 'python'))}")
        return 0
    failed = 0
    if todo and not args.analyze_only:
        stop = {"signal": signal.SIGINT}

        def terminate(signum: int, frame: object) -> None:  # a kill or a job scheduler: stop like Ctrl-C
            stop["signal"] = signum
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, terminate)
        try:
            failed = _execute(study, todo, args)
        except KeyboardInterrupt:
            print(
                f"\n{signal.Signals(stop['signal']).name}: no further run was started and the running ones saved a "
                "checkpoint; run the same command again to continue",
                file=sys.stderr,
            )
            return 128 + stop["signal"]
        finally:
            signal.signal(signal.SIGTERM, previous)
    try:
        paths = analyze_study(study, specs)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 1 if failed else 0


def _execute(study, todo, args) -> int:
    from wn_rl.analysis.backends import LOCKED, run_local, run_ray

    def report(outcome, done: int, total: int) -> None:
        if outcome.returncode == LOCKED:
            state = f"skipped: {outcome.log_tail}"
        else:
            state = "ok" if outcome.ok else f"FAILED (exit {outcome.returncode}, log {outcome.log})"
        print(f"[{done}/{total}] {outcome.name}: {state} in {outcome.seconds:.0f} s", flush=True)

    if args.backend == "ray":
        outcomes = run_ray(study, todo, address=args.address, on_done=report)
    else:
        outcomes = run_local(study, todo, max_parallel=args.jobs, on_done=report)
    failed = [o for o in outcomes if not o.ok and o.returncode != LOCKED]
    for outcome in failed:
        print(
            f"--- {outcome.name} (exit {outcome.returncode}), end of {outcome.log}:\n{outcome.log_tail}",
            file=sys.stderr,
        )
    return len(failed)


if __name__ == "__main__":
    sys.exit(main())
