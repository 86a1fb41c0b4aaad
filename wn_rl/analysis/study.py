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

import difflib
import itertools
import json
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

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
from wn_rl.analysis.runs import NATIVE_DQN, STUDY_LOCK, RunData, config_value, load_run, run_progress
from wn_rl.checkpoint import atomic_write_bytes
from wn_rl.config import ConfigError, check, config_diff, config_to_dict, flatten_config, load_config, parse_overrides

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
    """Load a study config strictly: unknown keys, wrong types, empty grids, fixed overrides that would
    lose silently (:func:`_check_overrides`) and report keys that no DQN config has
    (:func:`_check_report_keys`) are a ``ConfigError`` naming the file, before any run is planned."""
    study = load_config(StudyConfig, path, list(overrides))
    try:
        _check_overrides(study)
        _check_report_keys(study)
    except ConfigError as exc:
        raise ConfigError(f"{path}{' with ' + ' '.join(overrides) if overrides else ''}: {exc}") from None
    return study


def _check_overrides(study: StudyConfig) -> None:
    """Every fixed override is the last to set its keys in a run's command: the grid's values and the
    study's own (:func:`_study_set`) come after it and would win, as would a later override of the same
    key (``a.b=1`` then ``a={c: 2}`` loses ``a.b`` too: a mapping replaces the whole section)."""
    seen: list[tuple[str, str, list[str]]] = []  # (override, its key, the dotted keys it sets)
    for item in study.overrides:
        key, _, value = (part.strip() for part in item.partition("="))
        leaves = list(flatten_config(parse_overrides([item])))
        for leaf in leaves:
            if (grid_key := _grid_key(study, leaf)) is not None:
                raise ConfigError(
                    f"overrides: {item!r} sets {grid_key}, a grid key (values {list(study.grid[grid_key])}), and each "
                    f"run's grid value comes after the overrides and wins: remove {item!r} from overrides, or "
                    f"{grid_key} from grid"
                )
            if (set_key := _study_set_key(study, leaf)) is not None:
                hint = _STUDY_SET_HINTS[set_key].format(value=value)
                raise ConfigError(
                    f"overrides: {item!r}: {set_key} is set by the study for every run, after the overrides: remove "
                    f"it from overrides ({hint})"
                )
        for earlier, earlier_key, earlier_leaves in seen:
            shared = next((a for a in earlier_leaves for b in leaves if _overlaps(a, b)), None)
            if shared is not None or earlier_key.startswith(f"{key}."):
                how = f"both set {shared}" if shared else f"the latter replaces all of {key}, {earlier_key} included"
                raise ConfigError(
                    f"overrides: {earlier!r} and then {item!r}: {how}, and the later one wins silently; keep one "
                    "(or set each key with its own dotted override)"
                )
        seen.append((item, key, leaves))


def _check_report_keys(study: StudyConfig) -> None:
    """``group_by``, ``task_key`` and ``sweep_key`` are DQN config keys (dotted, as the grid's, or a common
    name such as ``seed``: :data:`wn_rl.analysis.runs.NATIVE_DQN`): a misspelt one would put every run
    under ``?`` in the report at the end of the study. The swept key is a grid key whose values sort."""
    from agents.dqn.config import DQNConfig  # the study drives the native DQN

    known = set(flatten_config(config_to_dict(DQNConfig()))) | set(NATIVE_DQN.keys)
    keys = [
        *(("group_by", key) for key in study.group_by),
        ("task_key", study.task_key),
        ("sweep_key", study.sweep_key),
    ]
    for option, key in keys:
        if key is not None and key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f"did you mean {' or '.join(map(repr, close))}?" if close else "expected a dotted DQN config key"
            raise ConfigError(
                f"{option}: {key!r} is not a key of the DQN config, so the report would put every run under '?'; "
                f"{hint} (or a common name: {', '.join(NATIVE_DQN.keys)})"
            )
    sweep = NATIVE_DQN.keys.get(study.sweep_key, study.sweep_key)
    if sweep is not None and sweep not in study.grid:
        raise ConfigError(
            f"sweep_key: {study.sweep_key!r} is not a grid key, so every run has the same value and sweep.png one "
            f"point; expected one of the grid keys {list(study.grid)}: add {sweep} to the grid, or leave sweep_key out"
        )
    try:
        sorted(study.grid.get(sweep, ()))  # sweep.png orders the values on its x axis
    except TypeError:
        raise ConfigError(
            f"sweep_key: the grid values of {sweep}, {list(study.grid[sweep])}, cannot be ordered on sweep.png's "
            "x axis; expected values of one kind (all numbers: no null among learning rates); sweep another "
            "key, or run the odd value as a study of its own"
        ) from None


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

        saved = self.run_dir / "config.yaml"
        if not saved.is_file():
            return {}
        stored = with_older_defaults(yaml.safe_load(saved.read_text()) or {})
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


def _study_set(study: StudyConfig, name: str) -> dict[str, Any]:
    """The DQN keys the study sets in every run (``name``), after its overrides and grid values."""
    return {
        "run.runs_dir": study.study_dir,
        "run.name": name,
        "run.torch_threads": study.torch_threads,
        "run.progress_bar": "false",
    }


_STUDY_SET_HINTS = {
    "run.runs_dir": "every run goes to <runs_dir>/<study name>/<run name>: set the study's runs_dir=... or name=...",
    "run.name": "each run is named from its grid values: change the grid, or the study's name=...",
    "run.torch_threads": "set the study's torch_threads={value}",
    "run.progress_bar": "the runs write log files, where a progress bar does not belong",
}


def _overlaps(key: str, other: str) -> bool:
    """Whether setting ``key`` and ``other`` touches the same value (one is the other or holds it)."""
    return key == other or key.startswith(f"{other}.") or other.startswith(f"{key}.")


def _grid_key(study: StudyConfig, key: str) -> str | None:
    """The grid key whose value setting ``key`` touches, if any."""
    return next((k for k in study.grid if _overlaps(key, k)), None)


def _study_set_key(study: StudyConfig, key: str) -> str | None:
    """The key the study sets in every run (:func:`_study_set`) that setting ``key`` touches, if any."""
    return next((k for k in _study_set(study, "") if _overlaps(key, k)), None)


def with_run_overrides(study: StudyConfig, run_overrides: list[str] | tuple[str, ...]) -> StudyConfig:
    """``study`` with ``run_overrides`` (``--set KEY=VALUE``) added after its own fixed overrides.

    A key of the grid or one the study sets itself (:func:`_study_set`) is a :class:`ConfigError`: those
    come after the fixed overrides in every run's command, so the ``--set`` would lose silently; the
    message says where to change the key instead."""
    for item in run_overrides:
        key, _, value = (part.strip() for part in item.partition("="))
        if (grid_key := _grid_key(study, key)) is not None:
            raise ConfigError(
                f"--set {item}: {grid_key} is a grid key of study {study.name!r} (values "
                f"{list(study.grid[grid_key])}), and each run's grid value comes after --set and wins; change the "
                f"grid instead: in the study file, or with the study override 'grid={{{grid_key}: [{value}]}}' "
                "(a key=value after the study file)"
            )
        if (set_key := _study_set_key(study, key)) is not None:
            hint = _STUDY_SET_HINTS[set_key].format(value=value)
            raise ConfigError(f"--set {item}: {set_key} is set by the study for every run, after --set; {hint}")
    return replace(study, overrides=(*study.overrides, *run_overrides))


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
            *(f"{k}={v}" for k, v in _study_set(study, name).items()),
        )
        try:
            config = load_dqn_config(study.base_config, overrides)
        except ConfigError as exc:
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
    count of complete runs, and every run's row. Returns the paths written: ``curves.png`` and
    ``curves.csv`` (when some run is aggregated), ``runs.csv``, ``aggregate.csv`` and ``summary.md`` in
    :attr:`StudyConfig.report_dir`, and ``sweep.png`` when the study has a ``sweep_key``.
    """
    specs = plan_runs(study) if specs is None else specs
    started = [s for s in specs if (s.run_dir / "config.yaml").is_file()]
    if not started:
        raise FileNotFoundError(f"no run of study {study.name!r} has started yet (looked in {study.study_dir})")
    out = study.report_dir
    out.mkdir(parents=True, exist_ok=True)
    runs: list[RunData] = [load_run(s.run_dir) for s in started]
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
