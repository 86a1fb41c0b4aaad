"""Plot learning curves across seeds, like the paper's Figure 5.

``python scripts/plot_curves.py RUN_DIR_OR_FOLDER... --out fig.png [--group-by network.parameterization]``

Reads the TensorBoard event files of every run directory given (or found under a folder), groups the
runs by config keys, and draws the mean and spread across seeds of the training and evaluation returns
against agent steps, one panel per task. Writes the numbers behind the figure next to it as CSV
(``fig.csv``) and a per-run / aggregate table (``fig.md``).

Native DQN runs (``scripts/train_dqn.py``) and SB3 runs (``scripts/train_sb3.py``) are each read with
their own tags and config keys (``wn_rl.analysis.runs.RUN_KINDS``), also mixed in one call: the returns
are ``train/episode_return`` and ``eval/return_mean``, or SB3's ``rollout/ep_rew_mean`` and
``eval/mean_reward`` (the default tags ``'train return'`` and ``'eval return'`` stand for either); the
panels are the tasks (``env.name``, SB3: ``env_id``); the groups ``network.parameterization``, SB3: the
policy and its ``policy_kwargs.parameterization``, unless ``--group-by`` names keys.

The figure and the aggregates use complete runs only, as a study's report does: runs whose newest
checkpoint (SB3: saved model) or logs reached their budget (``run.total_agent_steps``; SB3:
``total_timesteps``). The others are printed and listed in ``fig.md`` with the reason;
``--include-incomplete`` draws and aggregates them too. A run that cannot be read (an empty or damaged
``config.yaml`` or ``results.json``) is left out with the reason, printed and listed in ``fig.md``.
``--out`` is checked before any run is read: a suffix matplotlib writes, a folder that exists or can be made.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wn_rl.analysis.curves import (
    SPREADS,
    TRAINING_RETURN_TAGS,
    MissingExtraError,
    check_figure_path,
    collect_curves,
    group_runs,
    plot_curves,
    write_curves_csv,
)
from wn_rl.analysis.report import left_out_reason, markdown_table, runs_markdown, summarize_run
from wn_rl.analysis.runs import (
    EVAL_RETURN,
    TRAIN_RETURN,
    check_config_key,
    find_run_dirs,
    load_runs,
    unreadable_rows,
)
from wn_rl.checkpoint import atomic_write_bytes
from wn_rl.cli import brief_warnings
from wn_rl.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories, or folders holding them")
    parser.add_argument("--out", required=True, help="figure path (.png); the CSV and table go beside it")
    parser.add_argument("--group-by", nargs="+", default=None, help="config keys (default: each run's kind's)")
    parser.add_argument(
        "--panel-by", default=None, help="config key with one panel per value ('' for one; default: the task)"
    )
    parser.add_argument(
        "--tags", nargs="+", default=[TRAIN_RETURN, EVAL_RETURN], help="TensorBoard tags (default: both returns)"
    )
    parser.add_argument("--smoothing", type=int, default=5, help="moving-average window for training returns")
    parser.add_argument("--spread", choices=SPREADS, default="std")
    parser.add_argument("--title", default="")
    parser.add_argument(
        "--include-incomplete",
        action="store_true",
        help="also draw and aggregate runs short of their budget (crashed, killed, running); default: complete only",
    )
    args = parser.parse_args(argv)
    if args.smoothing < 1:
        parser.error(f"--smoothing={args.smoothing}: expected at least 1")
    try:
        check_figure_path(args.out)  # needs matplotlib (an optional extra); before any run is read
        runs, unreadable = _read_runs(args.runs)
        _check_keys(runs, args)
    except (FileNotFoundError, MissingExtraError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    panel_by = "task" if args.panel_by is None else args.panel_by  # '' for one panel
    summaries = [summarize_run(r, args.group_by, panel_by or "task") for r in runs]
    used = [r for r, s in zip(runs, summaries, strict=True) if s.complete or args.include_incomplete]
    for run, summary in zip(runs, summaries, strict=True):
        if not args.include_incomplete and (reason := left_out_reason(summary)):
            print(f"left out (--include-incomplete adds it): {run.run_dir}: {reason}")
    if not used:
        print(f"error: none of the {len(runs)} runs is complete; --include-incomplete draws them", file=sys.stderr)
        return 2
    grouped = group_runs(used, args.group_by, panel_by or None)
    smoothing = dict.fromkeys(TRAINING_RETURN_TAGS, args.smoothing)
    curves = collect_curves(grouped, args.tags, spread=args.spread, smoothing=smoothing)
    if not any(c.steps.size for c in curves):
        print(f"error: none of the {len(used)} runs logged any of the tags {args.tags}", file=sys.stderr)
        return 2
    out = Path(args.out)
    figure = plot_curves(curves, out, title=args.title, spread=args.spread)  # out, or out.png without a suffix
    write_curves_csv(curves, out.with_suffix(".csv"))
    table = runs_markdown(summaries, include_incomplete=args.include_incomplete)
    if unreadable:
        table += f"\n## Runs that could not be read\n\n{markdown_table(unreadable_rows(unreadable))}\n"
    atomic_write_bytes(out.with_suffix(".md"), table.encode())
    print(f"{len(used)} of {len(runs)} runs -> {figure}, {out.with_suffix('.csv')}, {out.with_suffix('.md')}")
    return 0


def _read_runs(paths: list[str]) -> tuple[list, list]:
    """The runs under ``paths`` that read, and those that do not, each printed with its reason (one damaged
    config.yaml leaves out its run, not the figure); none readable is a ConfigError."""
    runs, unreadable = load_runs(find_run_dirs(paths))
    for run_dir, reason in unreadable:
        print(f"left out (cannot be read): {run_dir}: {reason}")
    if not runs:
        raise ConfigError(f"none of the {len(unreadable)} runs can be read (see the reasons above)")
    return runs, unreadable


def _check_keys(runs, args: argparse.Namespace) -> None:
    """A --group-by or --panel-by key that no run has is an error: it would put every run under '?'."""
    for key in args.group_by or ():
        check_config_key(runs, key, "--group-by")
    if args.panel_by:
        check_config_key(runs, args.panel_by, "--panel-by")


if __name__ == "__main__":
    brief_warnings()
    sys.exit(main())
