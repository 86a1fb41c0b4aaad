"""A study: a grid of DQN runs (games x parameterizations x learning rates x seeds, any config keys),
run in parallel, resumable, finished by a figure and tables.

A study config (``configs/studies/*.yaml``) names a base DQN config, the grid (dotted DQN config keys
to lists of values, expanded as a Cartesian product in the order written) and fixed overrides. Every
run is one ``scripts/train_dqn.py`` process with ``key=value`` overrides; its run directory is
``<runs_dir>/<study name>/<key-value...>``, named from the grid values so that it is stable across
invocations. A run is complete when its newest complete checkpoint has reached the run's
``run.total_agent_steps`` (the runner writes a checkpoint whenever it stops, with the agent step in its
completion marker, so a crashed, killed or still running run is below its budget); complete runs are
skipped and incomplete ones resume from their newest checkpoint, so an interrupted study is continued by
running the same command again. Raising the budget in the study config extends finished runs (their
replay memory restarts empty unless the runs set ``run.save_replay=true``, so prefer a new study name
for a longer budget).

A run on disk made with other settings than the study now gives it (:meth:`RunSpec.changed_settings`) is
never skipped or resumed as if it were the same run: :func:`changed_runs_error` says which runs and keys
differ, and :func:`replace_runs` deletes them to be trained again. The report aggregates complete runs
only unless asked otherwise, and lists the runs it left out and why.
"""

from __future__ import annotations

import itertools
import json
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from wn_rl.analysis.curves import (
    TRAINING_RETURN_TAGS,
    collect_curves,
    group_runs,
    plot_curves,
    plot_sweep,
    write_curves_csv,
)
from wn_rl.analysis.report import (
    RunSummary,
    aggregate_rows,
    improvement_rows,
    left_out_rows,
    markdown_table,
    overall_rows,
    run_rows,
    summarize_run,
    write_csv,
)
from wn_rl.analysis.runs import STUDY_LOCK, RunData, config_value, load_runs, run_progress, unreadable_rows
from wn_rl.analysis.study_config import RayConfig, StudyConfig, load_study_config, study_settings, with_run_overrides
from wn_rl.checkpoint import atomic_write_bytes
from wn_rl.config import ConfigError, config_diff, config_to_dict, read_run_config

__all__ = [
    "ABSENT",
    "RayConfig",
    "RunSpec",
    "StudyConfig",
    "analyze_study",
    "changed_runs",
    "changed_runs_error",
    "expand_grid",
    "load_study_config",
    "plan_runs",
    "replace_runs",
    "with_run_overrides",
]


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


ABSENT = _Absent()
"the value of a config key that a run's stored config or the study's plan does not have."


@dataclass(frozen=True)
class RunSpec:
    """One run of a study: its name, overrides, run directory and budget."""

    name: str
    point: dict[str, Any]
    "the grid values of this run."
    overrides: tuple[str, ...]
    run_dir: Path
    total_agent_steps: int
    config: dict[str, Any] = field(repr=False, compare=False)
    "the resolved DQN config as plain data: what the run's config.yaml holds once it has started."

    def command(self, study: StudyConfig, python: str) -> list[str]:
        """The training command line."""
        return [python, study.train_script, "--config", study.base_config, *self.overrides]

    def progress(self) -> int:
        return run_progress(self.run_dir)

    @property
    def complete(self) -> bool:
        return self.progress() >= self.total_agent_steps

    def changed_settings(self) -> dict[str, tuple[Any, Any]]:
        """``{dotted key: (value on disk, value planned)}`` for the run's stored ``config.yaml`` against
        this plan; empty when they agree or the run has not started.

        What the trainer lets a resume change is no difference (``agents.dqn.runner.SAFE_TO_CHANGE``:
        logging, checkpoint frequency, device, threads, the budget); a budget below the agent steps the
        run has already made is one (its numbers come from past the study's budget). A key added to the
        code since the run was made is read with the value that does what the code did before
        (:func:`agents.dqn.config.with_older_defaults`); any other key that one of the two configs lacks
        shows as :data:`ABSENT` and counts."""
        from agents.dqn.config import with_older_defaults
        from agents.dqn.runner import SAFE_TO_CHANGE

        if not (self.run_dir / "config.yaml").is_file():
            return {}
        # an empty or damaged one: a ConfigError naming it, not a run with every key changed
        stored = with_older_defaults(read_run_config(self.run_dir, "scripts/train_dqn.py"))
        diff = config_diff(stored, self.config)
        keys = [key for key in diff if key not in SAFE_TO_CHANGE]
        if "run.total_agent_steps" in diff and self.progress() > self.total_agent_steps:
            keys.append("run.total_agent_steps")
        return {key: (config_value(stored, key, ABSENT), config_value(self.config, key, ABSENT)) for key in keys}


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
    """Every run of the study with its resolved DQN config checked, its env's name included (errors come before
    any run starts, and in ``--dry-run``)."""
    from agents.dqn.config import load_dqn_config  # the study drives the native DQN
    from agents.dqn.envs import check_env_name

    if not Path(study.train_script).is_file():
        raise ConfigError(
            f"train_script={study.train_script!r} does not exist; run the study from the repository root "
            "or set train_script to the path of scripts/train_dqn.py"
        )
    specs: list[RunSpec] = []
    checked_envs = set()  # each distinct env config once (Atari's check lists ale-py's ROMs)
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
            *(f"{k}={v}" for k, v in study_settings(study, name).items()),
        )
        try:
            config = load_dqn_config(study.base_config, overrides)
            if config.env not in checked_envs:
                check_env_name(config.env)  # a misspelt game would fail every run it is in, after they start
                checked_envs.add(config.env)
        except ValueError as exc:  # ConfigError, or check_env_name's ValueError listing the valid names
            raise ConfigError(f"study {study.name!r}, run {name}: {exc}") from None
        run_dir = Path(config.run.runs_dir) / name
        specs.append(RunSpec(name, point, overrides, run_dir, config.run.total_agent_steps, config_to_dict(config)))
    return specs


def changed_runs(specs: list[RunSpec]) -> list[tuple[RunSpec, dict[str, tuple[Any, Any]]]]:
    """The runs on disk made with other settings than planned, each with its differences."""
    return [(spec, diff) for spec in specs if (diff := spec.changed_settings())]


def changed_runs_error(study: StudyConfig, changed: list[tuple[RunSpec, dict[str, tuple[Any, Any]]]]) -> ConfigError:
    """Why a study refuses to skip or resume runs made with other settings, and the ways on."""
    lines = [
        f"study {study.name!r}: {len(changed)} run(s) on disk were made with other settings than the study "
        "gives them now; skipping or resuming them would mix results of both settings:"
    ]
    for spec, diff in changed:
        lines.append(f"  {spec.run_dir} ({'complete' if spec.complete else 'incomplete'}):")
        lines += [f"    {key}: {old!r} -> {new!r}" for key, (old, new) in diff.items()]
    if any(ABSENT in values for _, diff in changed for values in diff.values()):
        lines.append(f"{ABSENT!r}: the code that made the run had no such key, or the code now has none.")
    lines.append(
        "Keep these runs by going back to the settings they were made with, or by running the new settings "
        f"in a new folder (runs_dir=... or name=..., now {study.study_dir}); or pass --replace-changed to "
        "delete these runs and train them again with the new settings."
    )
    return ConfigError("\n".join(lines))


def replace_runs(specs: list[RunSpec]) -> None:
    """Delete the runs' directories (checkpoints, TensorBoard logs, results) so that they are trained
    again from scratch: all of them, or none with a :class:`ConfigError` when a live study driver is
    running one."""
    from wn_rl.analysis.backends import acquire_run_lock  # backends imports this module

    locks = []
    for spec in specs:
        lock = spec.run_dir / STUDY_LOCK
        holder = acquire_run_lock(lock)
        if holder is not None:
            for taken in locks:
                taken.unlink(missing_ok=True)
            raise ConfigError(
                f"{spec.run_dir} is being run by {holder} ({lock}); stop that study driver or let it finish, "
                "then run this again"
            )
        locks.append(lock)
    for spec in specs:
        shutil.rmtree(spec.run_dir)


def analyze_study(
    study: StudyConfig, specs: list[RunSpec] | None = None, *, include_incomplete: bool = False
) -> dict[str, Path]:
    """Figure, CSVs and a markdown report from every run of the study that has written anything.

    The aggregates (the tables per task and group and across tasks, ``curves.png``, ``sweep.png``) use
    the complete runs only, unless ``include_incomplete``: a crashed, killed or still running run would
    enter them with its early numbers. ``summary.md`` says which runs were left out and why, each cell's
    count of complete runs, the runs that could not be read (an empty or damaged ``config.yaml`` or
    ``results.json``: each leaves out only itself) and every run's row. Returns the paths written: ``curves.png`` and
    ``curves.csv`` (when some run is aggregated), ``runs.csv``, ``aggregate.csv`` and ``summary.md`` in
    :attr:`StudyConfig.report_dir`, and ``sweep.png`` when the study has a ``sweep_key``.
    """
    specs = plan_runs(study) if specs is None else specs
    started = [s for s in specs if (s.run_dir / "config.yaml").is_file()]
    if not started:
        raise FileNotFoundError(f"no run of study {study.name!r} has started yet (looked in {study.study_dir})")
    runs, unreadable = load_runs([s.run_dir for s in started])  # a damaged run leaves out only itself
    read = {run.run_dir for run in runs}
    started = [s for s in started if s.run_dir in read]
    out = study.report_dir
    out.mkdir(parents=True, exist_ok=True)
    summaries = [_summary(study, s, run) for s, run in zip(started, runs, strict=True)]
    used = [i for i, summary in enumerate(summaries) if include_incomplete or summary.complete]
    paths = _figures(study, [runs[i] for i in used], [summaries[i] for i in used], out)
    aggregate = aggregate_rows(summaries, reps=study.bootstrap_reps, complete_only=not include_incomplete)
    paths["runs_csv"] = write_csv(summaries, out / "runs.csv")
    paths["aggregate_csv"] = write_csv(aggregate, out / "aggregate.csv")
    by_name = {s.name: summary for s, summary in zip(started, summaries, strict=True)}
    planned = [by_name.get(s.name) or _summary(study, s, RunData(s.run_dir, s.config)) for s in specs]
    left_out = left_out_rows(
        planned, include_incomplete=include_incomplete, resume_hint="running the study again continues it"
    )
    text = _summary_header(study, specs, summaries, len(used), include_incomplete)
    text += ["## Aggregates per task and group", "", markdown_table(aggregate), ""]
    used_summaries = [summaries[i] for i in used]
    overall = overall_rows(used_summaries, reps=study.bootstrap_reps)
    if overall:
        text += ["## Across tasks", "", markdown_table(overall), ""]
    improvement = improvement_rows(used_summaries, reps=min(study.bootstrap_reps, 2000))
    if improvement:
        text += ["## Probability of improvement (per task, averaged over tasks)", "", markdown_table(improvement), ""]
    if left_out:
        text += ["## Runs left out of the aggregates", "", markdown_table(left_out), ""]
    if unreadable:
        text += ["## Runs that could not be read", "", markdown_table(unreadable_rows(unreadable)), ""]
    text += ["## Every run", "", markdown_table(run_rows(summaries)), ""]
    paths["summary"] = out / "summary.md"
    atomic_write_bytes(paths["summary"], "\n".join(text).encode())
    return paths


def _summary(study: StudyConfig, spec: RunSpec, run: RunData) -> RunSummary:
    """A run's summary as the study judges it (and skips it): its progress and completeness are those of
    its newest checkpoint against the planned budget, what a resume continues from."""
    progress = spec.progress()
    return replace(
        summarize_run(run, study.group_by, study.task_key),
        agent_steps=progress,
        total_agent_steps=spec.total_agent_steps,
        complete=progress >= spec.total_agent_steps,
    )


def _figures(study: StudyConfig, runs: list[RunData], summaries: list[RunSummary], out: Path) -> dict[str, Path]:
    """``curves.png``, ``curves.csv`` and ``sweep.png`` of the aggregated runs (none without runs)."""
    if not runs:
        return {}
    smoothing = dict.fromkeys(TRAINING_RETURN_TAGS, study.train_smoothing)
    grouped = group_runs(runs, study.group_by, study.task_key)
    curves = collect_curves(grouped, study.curve_tags, spread=study.spread, smoothing=smoothing)
    paths = {
        "figure": plot_curves(curves, out / "curves.png", title=study.name, spread=study.spread),
        "curves_csv": write_curves_csv(curves, out / "curves.csv"),
    }
    if study.sweep_key:
        sweep_path = out / "sweep.png"
        paths["sweep"] = plot_sweep(runs, summaries, study.sweep_key, study.group_by, sweep_path, title=study.name)
    return paths


def _summary_header(
    study: StudyConfig, specs: list[RunSpec], summaries: list[RunSummary], used: int, include_incomplete: bool
) -> list[str]:
    complete = sum(s.complete for s in summaries)
    incomplete, missing = len(summaries) - complete, len(specs) - len(summaries)
    lines = [f"{len(summaries)} of {len(specs)} runs have data ({missing} not started), {complete} complete."]
    if include_incomplete:
        lines.append(
            f"The aggregates and figures use all {used} runs with data, incomplete ones included "
            "(--include-incomplete): their numbers stop short of the budget."
        )
    else:
        more = " (--include-incomplete adds the incomplete ones)" if incomplete else ""
        lines.append(f"The aggregates and figures use the {used} complete runs only{more}.")
    if missing or (incomplete and not include_incomplete):
        lines.append('The others are listed under "Runs left out of the aggregates".')
    if not used:
        lines.append("No run to aggregate yet: no figure.")
    return [f"# Study {study.name}", "", " ".join(lines), ""]
