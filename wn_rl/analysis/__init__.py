"""Evidence from runs: reading TensorBoard logs, curves across seeds, statistics and studies.

- :mod:`wn_rl.analysis.runs`: run directories -> config, scalar curves, evaluations, progress.
- :mod:`wn_rl.analysis.stats`: IQM, stratified bootstrap intervals, area under the curve, Atari
  human-normalised scores.
- :mod:`wn_rl.analysis.curves`: grouping by config keys, mean and spread across seeds, figure, CSV.
- :mod:`wn_rl.analysis.report`: per-run and aggregate tables (markdown, CSV).
- :mod:`wn_rl.analysis.study_config`: study configs, loaded strictly (overrides that would lose, report keys).
- :mod:`wn_rl.analysis.study`: grid expansion, resumable plans, the final report;
  :mod:`wn_rl.analysis.backends` runs them locally or on Ray.
"""

from wn_rl.analysis.curves import Curve, aggregate_curve, group_runs, plot_curves, write_curves_csv
from wn_rl.analysis.report import RunSummary, aggregate_rows, markdown_table, overall_rows, summarize_run
from wn_rl.analysis.runs import RunData, find_run_dirs, load_run, read_scalars, run_progress
from wn_rl.analysis.stats import (
    ATARI_HUMAN_RANDOM,
    area_under_curve,
    human_normalized_score,
    interquartile_mean,
    stratified_bootstrap_ci,
)

__all__ = [
    "ATARI_HUMAN_RANDOM",
    "Curve",
    "RunData",
    "RunSummary",
    "aggregate_curve",
    "aggregate_rows",
    "area_under_curve",
    "find_run_dirs",
    "group_runs",
    "human_normalized_score",
    "interquartile_mean",
    "load_run",
    "markdown_table",
    "overall_rows",
    "plot_curves",
    "read_scalars",
    "run_progress",
    "stratified_bootstrap_ci",
    "summarize_run",
    "write_curves_csv",
]
