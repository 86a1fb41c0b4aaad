"""A study's config: the grid, the fixed overrides and the report keys, loaded strictly.

:func:`load_study_config` reads a ``configs/studies/*.yaml`` into a :class:`StudyConfig` and refuses,
before any run is planned, what would lose silently at run time: a fixed override naming a grid key or
a key the study sets itself (:func:`study_settings`), a key set twice, and report keys (``group_by``,
``task_key``, ``sweep_key``) that no DQN config has. :func:`with_run_overrides` adds ``--set``
overrides under the same rules. The runs themselves are planned and reported in
:mod:`wn_rl.analysis.study`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from wn_rl.analysis.runs import NATIVE_DQN
from wn_rl.config import ConfigError, check, config_to_dict, flatten_config, load_config, parse_overrides

__all__ = ["RayConfig", "StudyConfig", "load_study_config", "study_settings", "with_run_overrides"]


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
    study's own (:func:`study_settings`) come after it and would win, as would a later override of the same
    key (``a.b=1`` then ``a={b: 2}``). A mapping merges into what earlier overrides set (``a.b=1`` then
    ``a={c: 2}`` keeps both), so overrides of different keys of one section are fine."""
    seen: list[tuple[str, list[str]]] = []  # (override, the dotted keys it sets)
    for item in study.overrides:
        value = item.partition("=")[2].strip()
        leaves = list(flatten_config(parse_overrides([item])))
        match _set_later(study, item):
            case ("grid", grid_key):
                raise ConfigError(
                    f"overrides: {item!r} sets {grid_key}, a grid key (values {list(study.grid[grid_key])}), and each "
                    f"run's grid value comes after the overrides and wins: remove {item!r} from overrides, or "
                    f"{grid_key} from grid"
                )
            case ("study", set_key):
                hint = _STUDY_SET_HINTS[set_key].format(value=value)
                raise ConfigError(
                    f"overrides: {item!r}: {set_key} is set by the study for every run, after the overrides: remove "
                    f"it from overrides ({hint})"
                )
        for earlier, earlier_leaves in seen:
            shared = next((a for a in earlier_leaves for b in leaves if _overlaps(a, b)), None)
            if shared is not None:
                raise ConfigError(
                    f"overrides: {earlier!r} and then {item!r}: both set {shared}, and the later one wins silently; "
                    "keep one"
                )
        seen.append((item, leaves))


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


def study_settings(study: StudyConfig, name: str) -> dict[str, Any]:
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


def _set_later(study: StudyConfig, item: str) -> tuple[str, str] | None:
    """The first key that the override ``item`` touches and that every run's command sets again after the
    overrides, so ``item`` would lose silently: ``("grid", key)`` for a grid key, ``("study", key)`` for one the
    study sets itself (:func:`study_settings`). Judged on the dotted keys the value sets:
    ``network={hidden_sizes: [32]}`` leaves a grid key ``network.parameterization`` to the grid."""
    for leaf in flatten_config(parse_overrides([item])):
        if (key := next((k for k in study.grid if _overlaps(leaf, k)), None)) is not None:
            return "grid", key
        if (key := next((k for k in study_settings(study, "") if _overlaps(leaf, k)), None)) is not None:
            return "study", key
    return None


def with_run_overrides(study: StudyConfig, run_overrides: list[str] | tuple[str, ...]) -> StudyConfig:
    """``study`` with ``run_overrides`` (``--set KEY=VALUE``) added after its own fixed overrides.

    A key of the grid or one the study sets itself (:func:`study_settings`) is a :class:`ConfigError`: those
    come after the fixed overrides in every run's command, so the ``--set`` would lose silently; the
    message says where to change the key instead. A mapping merges into what the study's overrides set
    (``--set agent={epsilon_end: 0.1}`` keeps the study's ``agent.lr=null``); setting the same key again is what
    ``--set`` is for."""
    for item in run_overrides:
        _, _, value = (part.strip() for part in item.partition("="))
        match _set_later(study, item):
            case ("grid", grid_key):
                raise ConfigError(
                    f"--set {item}: {grid_key} is a grid key of study {study.name!r} (values "
                    f"{list(study.grid[grid_key])}), and each run's grid value comes after --set and wins; change the "
                    f"grid instead: in the study file, or with the study override 'grid={{{grid_key}: [{value}]}}' "
                    "(a key=value after the study file)"
                )
            case ("study", set_key):
                hint = _STUDY_SET_HINTS[set_key].format(value=value)
                raise ConfigError(f"--set {item}: {set_key} is set by the study for every run, after --set; {hint}")
    return replace(study, overrides=(*study.overrides, *run_overrides))
