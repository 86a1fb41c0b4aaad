"""Run a study: ``python scripts/study.py configs/studies/<name>.yaml [key=value ...] [--jobs N]``.

Expands the study's grid into DQN runs, skips runs that are already complete, runs the rest (locally,
``--jobs`` at a time, or as Ray tasks with ``--backend ray --address ...``), then writes the figure,
the per-run and aggregate tables (markdown + CSV) to the study's report folder. Running the same
command again resumes an interrupted study. ``--set KEY=VALUE`` adds a DQN override to every run
(e.g. a larger budget, which extends finished runs; their replay memory restarts empty unless the runs
set ``run.save_replay=true``); ``--set`` of a grid key or of one the study sets in each run
(``run.runs_dir``, ``run.name``, ``run.torch_threads``, ``run.progress_bar``) is an error saying where to
change it instead (the grid: ``grid={run.seed: [3]}``). ``--dry-run`` prints the plan; ``--analyze-only``
only rebuilds the figure and tables from what the runs have written so far.

A run on disk made with other settings than the study now gives it (another override, grid value or
base config) is an error naming the run and the keys that differ, before anything runs: go back to
its settings, write the new ones to a new folder (``runs_dir=...`` or ``name=...``), or pass
``--replace-changed`` to delete such runs and train them again. The tables and figures aggregate the
complete runs only (``--include-incomplete`` adds crashed, killed or still running ones); the report
lists the runs left out and why.
"""

from __future__ import annotations

import argparse
import signal
import sys

from wn_rl.analysis.curves import MissingExtraError, pyplot
from wn_rl.analysis.study import (
    analyze_study,
    changed_runs,
    changed_runs_error,
    load_study_config,
    plan_runs,
    replace_runs,
    with_run_overrides,
)
from wn_rl.cli import brief_warnings
from wn_rl.config import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="study config (configs/studies/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="study key=value overrides (e.g. max_parallel=4)")
    parser.add_argument(
        "--set",
        dest="run_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="DQN override added to every run after the study's fixed overrides (e.g. --set "
        "run.total_agent_steps=200000); not of a grid key or one the study sets (run.runs_dir, run.name, ...)",
    )
    parser.add_argument("--jobs", type=int, help="runs at once with the local backend (default: max_parallel)")
    parser.add_argument("--backend", choices=("local", "ray"), default="local")
    parser.add_argument("--address", help="Ray cluster address (default: the study's ray.address, else local Ray)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and their commands, run nothing")
    parser.add_argument("--analyze-only", action="store_true", help="only write the figure and tables")
    parser.add_argument(
        "--replace-changed",
        action="store_true",
        help="delete the runs made with other settings than the study's now and train them again",
    )
    parser.add_argument(
        "--include-incomplete",
        action="store_true",
        help="also aggregate runs short of their budget (crashed, killed, running); default: complete runs only",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_intermixed_args(argv)  # key=value overrides on both sides of a flag
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs={args.jobs}: expected at least 1")
    if args.replace_changed and args.analyze_only:
        parser.error("--replace-changed trains runs again; --analyze-only runs nothing")
    try:
        pyplot()  # the report's figures need matplotlib (an optional extra): say so before any run starts
        study = with_run_overrides(load_study_config(args.config, args.overrides), args.run_overrides)
        specs = plan_runs(study)
        replaced = _replace_changed(study, specs, args)
    except (ConfigError, MissingExtraError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    todo = [s for s in specs if s.name in replaced or not s.complete]
    print(f"study {study.name}: {len(specs)} runs, {len(specs) - len(todo)} complete, {len(todo)} to run", flush=True)
    if args.dry_run:
        _print_plan(study, specs, replaced)
        return 0
    failed = 0
    if todo and not args.analyze_only:
        failed, stopped_by = _execute_until_stopped(study, todo, args)
        if stopped_by is not None:
            return 128 + stopped_by
    try:
        paths = analyze_study(study, specs, include_incomplete=args.include_incomplete)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 1 if failed else 0


def _execute_until_stopped(study, todo, args) -> tuple[int, int | None]:
    """Run ``todo``: (failed runs, None), or (0, the signal) after Ctrl-C or a SIGTERM (a kill or a job
    scheduler, handled like Ctrl-C), having said that no further run was started and how to continue."""
    stop = {"signal": signal.SIGINT}

    def terminate(signum: int, frame: object) -> None:
        stop["signal"] = signum
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        return _execute(study, todo, args), None
    except KeyboardInterrupt:
        print(
            f"\n{signal.Signals(stop['signal']).name}: no further run was started and the running ones saved a "
            "checkpoint; run the same command again to continue",
            file=sys.stderr,
        )
        return 0, stop["signal"]
    finally:
        signal.signal(signal.SIGTERM, previous)


def _print_plan(study, specs, replaced: set[str]) -> None:
    for spec in specs:
        state = "complete" if spec.complete else f"at {spec.progress():,} of {spec.total_agent_steps:,} steps"
        state = "made with other settings: --replace-changed trains it again" if spec.name in replaced else state
        print(f"  {spec.name}: {state}\n    {' '.join(spec.command(study, 'python'))}")


def _replace_changed(study, specs, args) -> set[str]:
    """Names of the runs made with other settings, deleted (except with --dry-run) when --replace-changed
    says so; raises ConfigError naming them and the keys that differ otherwise."""
    changed = changed_runs(specs)
    if changed and not args.replace_changed:
        raise changed_runs_error(study, changed)
    if changed and not args.dry_run:
        replace_runs([spec for spec, _ in changed])
        for spec, _ in changed:
            print(f"replaced (deleted, to be trained again): {spec.run_dir}", flush=True)
    return {spec.name for spec, _ in changed}


def _execute(study, todo, args) -> int:
    from wn_rl.analysis.backends import LOCKED, run_local, run_ray

    def report(outcome, done: int, total: int) -> None:
        if outcome.returncode == LOCKED:  # another driver holds the run, or its trainer refused (one line each)
            lines = [line for line in outcome.log_tail.splitlines() if line.strip()]
            state = f"skipped: {lines[-1].removeprefix('error: ') if lines else 'the run is in use'}"
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
    brief_warnings()
    sys.exit(main())
