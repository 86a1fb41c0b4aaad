"""A study: a grid of DQN runs (games x parameterizations x learning rates x seeds, any config keys),
run in parallel, resumable, finished by a figure and tables.

A study config (``configs/studies/*.yaml``) names a base DQN config, the grid (dotted DQN config keys
to lists of values, expanded as a Cartesian product in the order written) and fixed overrides. Every
run is one ``scripts/train_dqn.py`` process with ``key=value`` overrides; its run directory is
``<runs_dir>/<study name>/<key-value...>``, named from the grid values so that it is stable across
invocations. A run is complete when its newest complete checkpoint has reached the run's
``run.total_agent_steps`` (the runner writes a final checkpoint); complete runs are skipped and
incomplete ones resume from their newest checkpoint, so an interrupted study is continued by running
the same command again. Raising the budget in the study config extends finished runs (their replay memory restarts empty
unless the runs set ``run.save_replay=true``, so prefer a new study name for a longer budget).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from wn_rl.analysis.curves import collect_curves, group_runs, plot_curves, plot_sweep, write_curves_csv
from wn_rl.analysis.report import (
    aggregate_rows,
    improvement_rows,
    markdown_table,
    overall_rows,
    run_rows,
    summarize_run,
    write_csv,
)
from wn_rl.analysis.runs import RunData, load_run, run_progress
from wn_rl.config import ConfigError, check, load_config

__all__ = ["RayConfig", "RunSpec", "StudyConfig", "analyze_study", "expand_grid", "load_study_config", "plan_runs"]


@dataclass(frozen=True)
class RayConfig:
    """Resources of each run when the study runs on Ray (``--backend ray``)."""

    address: str | None = None
    "Ray cluster address (``auto``, ``ray://host:10001``); None starts a local Ray instance."
    cpus_per_run: float = 1.0
    "CPUs reserved per run (a Ray task's ``num_cpus``)."
    gpus_per_run: float = 0.0
    "GPU share per run (``num_gpus``; 0.25 packs four small runs on a GPU)."


@dataclass(frozen=True)
class StudyConfig:
    """A grid of DQN runs and how to report them."""

    name: str
    "study name; runs go to <runs_dir>/<name>/, tables and figure to <out_dir or runs_dir/name>."
    base_config: str
    "the DQN config every run starts from (e.g. configs/dqn/minatar_breakout.yaml)."
    grid: dict[str, Any] = field(default_factory=dict)
    "dotted DQN config key -> list of values; the runs are the Cartesian product (in the order written)."
    overrides: tuple[str, ...] = ()
    "fixed key=value overrides for every run (e.g. run.total_agent_steps=100000)."
    runs_dir: str = "runs/studies"
    "parent of the study's run directories."
    out_dir: str | None = None
    "where curves.png, the tables and CSVs go (None: the study's run folder)."
    train_script: str = "scripts/train_dqn.py"
    "the training entry point each run executes."
    max_parallel: int = 2
    "runs at once with the local backend (about one per CPU core for small networks)."
    torch_threads: int = 1
    "torch / OpenMP threads per run."
    group_by: tuple[str, ...] = ("network.parameterization",)
    "config keys whose values form the compared groups (lines in the figure)."
    task_key: str = "env.name"
    "config key that names the task (a panel in the figure, a stratum in the bootstrap)."
    sweep_key: str | None = None
    "a swept config key (e.g. agent.lr): also draw sweep.png, final and AUC eval return against it."
    curve_tags: tuple[str, ...] = ("train/episode_return", "eval/return_mean")
    "TensorBoard tags drawn (one row of panels each)."
    train_smoothing: int = 5
    "moving-average window (in logged points) for training returns."
    spread: Literal["std", "sem", "minmax", "none"] = "std"
    "the shaded band around the mean across seeds."
    bootstrap_reps: int = 10_000
    "bootstrap resamples for the IQM confidence intervals."
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        check(bool(self.name) and "/" not in self.name, "name", self.name, "a folder name without '/'")
        check(bool(self.grid), "grid", self.grid, "at least one key with a list of values (e.g. run.seed: [0, 1])")
        for key, values in self.grid.items():
            ok = isinstance(values, (list, tuple)) and len(values) > 0
            check(ok, f"grid.{key}", values, "a non-empty list of values")
            check(len(set(map(str, values))) == len(values), f"grid.{key}", values, "values without repeats")
        check(self.max_parallel >= 1, "max_parallel", self.max_parallel, "at least 1")
        check(self.torch_threads >= 1, "torch_threads", self.torch_threads, "at least 1")
        check(bool(self.group_by), "group_by", self.group_by, "at least one config key")
        check(self.train_smoothing >= 1, "train_smoothing", self.train_smoothing, "at least 1")
        check(self.bootstrap_reps >= 100, "bootstrap_reps", self.bootstrap_reps, "at least 100")
        check(self.ray.cpus_per_run > 0, "ray.cpus_per_run", self.ray.cpus_per_run, "a positive CPU count")
        check(self.ray.gpus_per_run >= 0, "ray.gpus_per_run", self.ray.gpus_per_run, ">= 0")
        object.__setattr__(self, "grid", {k: tuple(v) for k, v in self.grid.items()})

    @property
    def study_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    @property
    def report_dir(self) -> Path:
        return Path(self.out_dir) if self.out_dir else self.study_dir


def load_study_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> StudyConfig:
    """Load a study config strictly (unknown keys, wrong types and empty grids are ``ConfigError``)."""
    return load_config(StudyConfig, path, list(overrides))


@dataclass(frozen=True)
class RunSpec:
    """One run of a study: its name, overrides, run directory and budget."""

    name: str
    point: dict[str, Any]
    "the grid values of this run."
    overrides: tuple[str, ...]
    run_dir: Path
    total_agent_steps: int

    def command(self, study: StudyConfig, python: str) -> list[str]:
        """The training command line."""
        return [python, study.train_script, "--config", study.base_config, *self.overrides]

    def progress(self) -> int:
        return run_progress(self.run_dir)

    @property
    def complete(self) -> bool:
        return self.progress() >= self.total_agent_steps


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _override_value(value: Any) -> str:
    """A grid value as the run's ``key=value`` override: exact (``_format_value`` rounds floats to six
    digits for the run name) and ``null`` for None, as the YAML override parser reads them."""
    if isinstance(value, float):
        return repr(value)
    return "null" if value is None else _format_value(value)


def _run_name(point: dict[str, Any]) -> str:
    parts = [f"{key.split('.')[-1]}-{_format_value(value)}" for key, value in point.items()]
    return "__".join(parts).replace("/", "_").replace(" ", "")


def expand_grid(grid: dict[str, Any]) -> list[dict[str, Any]]:
    """The Cartesian product of the grid's value lists, as ``{key: value}`` dicts, first key slowest."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


def plan_runs(study: StudyConfig) -> list[RunSpec]:
    """Every run of the study with its resolved DQN config checked (errors come before any run starts)."""
    from agents.dqn.config import load_dqn_config  # the study drives the native DQN

    if not Path(study.train_script).is_file():
        raise ConfigError(
            f"train_script={study.train_script!r} does not exist; run the study from the repository root "
            "or set train_script to the path of scripts/train_dqn.py"
        )
    specs: list[RunSpec] = []
    for point in expand_grid(study.grid):
        name = _run_name(point)
        same = next((s for s in specs if s.name == name), None)
        if same is not None:
            raise ConfigError(
                f"study {study.name!r}: grid points {same.point} and {point} share the run directory {name}; "
                "make the values differ in their first six significant digits"
            )
        overrides = (
            *study.overrides,
            *(f"{k}={_override_value(v)}" for k, v in point.items()),
            f"run.runs_dir={study.study_dir}",
            f"run.name={name}",
            f"run.torch_threads={study.torch_threads}",
            "run.progress_bar=false",
        )
        try:
            config = load_dqn_config(study.base_config, overrides)
        except ConfigError as exc:
            raise ConfigError(f"study {study.name!r}, run {name}: {exc}") from None
        run_dir = Path(config.run.runs_dir) / name
        specs.append(RunSpec(name, point, overrides, run_dir, config.run.total_agent_steps))
    return specs


def analyze_study(study: StudyConfig, specs: list[RunSpec] | None = None) -> dict[str, Path]:
    """Figure, CSVs and a markdown report from every run of the study that has written anything.

    Returns the paths written: ``curves.png``, ``curves.csv``, ``runs.csv``, ``aggregate.csv`` and
    ``summary.md`` (the aggregates, then every run's row) in :attr:`StudyConfig.report_dir`, and
    ``sweep.png`` when the study has a ``sweep_key``.
    """
    specs = plan_runs(study) if specs is None else specs
    runs: list[RunData] = [load_run(s.run_dir) for s in specs if (s.run_dir / "config.yaml").is_file()]
    if not runs:
        raise FileNotFoundError(f"no run of study {study.name!r} has started yet (looked in {study.study_dir})")
    out = study.report_dir
    out.mkdir(parents=True, exist_ok=True)
    smoothing = {"train/episode_return": study.train_smoothing}
    grouped = group_runs(runs, study.group_by, study.task_key)
    curves = collect_curves(grouped, study.curve_tags, spread=study.spread, smoothing=smoothing)
    summaries = [summarize_run(r, study.group_by, study.task_key) for r in runs]
    per_run, aggregate = run_rows(summaries), aggregate_rows(summaries, reps=study.bootstrap_reps)
    overall = overall_rows(summaries, reps=study.bootstrap_reps)
    improvement = improvement_rows(summaries, reps=min(study.bootstrap_reps, 2000))
    paths = {
        "figure": plot_curves(curves, out / "curves.png", title=study.name, spread=study.spread),
        "curves_csv": write_curves_csv(curves, out / "curves.csv"),
        "runs_csv": write_csv(summaries, out / "runs.csv"),
        "aggregate_csv": write_csv(aggregate, out / "aggregate.csv"),
    }
    if study.sweep_key:
        sweep_path = out / "sweep.png"
        paths["sweep"] = plot_sweep(runs, summaries, study.sweep_key, study.group_by, sweep_path, title=study.name)
    missing = len(specs) - len(runs)
    text = [f"# Study {study.name}", "", f"{len(runs)} of {len(specs)} runs have data ({missing} not started).", ""]
    text += ["## Aggregates per task and group", "", markdown_table(aggregate), ""]
    if overall:
        text += ["## Across tasks", "", markdown_table(overall), ""]
    if improvement:
        text += ["## Probability of improvement (per task, averaged over tasks)", "", markdown_table(improvement), ""]
    text += ["## Every run", "", markdown_table(per_run), ""]
    paths["summary"] = out / "summary.md"
    paths["summary"].write_text("\n".join(text))
    return paths
