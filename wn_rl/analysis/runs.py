"""Reading finished (or running) runs from disk: config, TensorBoard scalars and evaluation results.

A run directory is what ``scripts/train_dqn.py`` writes (``agents/dqn/runner.py``): ``config.yaml``,
``tb/`` (TensorBoard event files), ``results.json`` and ``checkpoints/``. Any directory with TensorBoard
event files and a ``config.yaml`` works, so SB3 runs (``scripts/train_sb3.py``, ``wn_rl/sb3/runner.py``)
are read the same way, their progress from their saved models (:func:`run_progress`). The two kinds log
and configure the same things under other names; :data:`RUN_KINDS` maps them, and
:meth:`RunData.value` and :meth:`RunData.curve` accept the common names (``task``, ``seed``, ``lr``,
``budget``; :data:`TRAIN_RETURN`, :data:`EVAL_RETURN`) for either kind. Scalars are read with
TensorBoard's own ``EventAccumulator`` (all points kept, no reservoir sampling); a run that was resumed
writes a second event file, and points logged twice at the same step keep the newest value.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import warnings
import zipfile
from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wn_rl.checkpoint import CheckpointError, latest_checkpoint, read_marker
from wn_rl.config import ConfigError, flatten_config, read_run_config

__all__ = [
    "EVAL_RETURN",
    "NATIVE_DQN",
    "RUN_KINDS",
    "SB3",
    "STUDY_LOCK",
    "TRAIN_RETURN",
    "RunData",
    "RunKind",
    "check_config_key",
    "config_value",
    "find_run_dirs",
    "load_run",
    "load_runs",
    "read_scalars",
    "run_budget",
    "run_kind",
    "run_progress",
    "sb3_saved_models",
    "unreadable_rows",
]

TRAIN_RETURN = "train return"
"the training episode return of a run, whatever its kind logs it as (:attr:`RunKind.tags`)."
EVAL_RETURN = "eval return"
"the evaluation return (mean over an evaluation's games) of a run, whatever its kind logs it as."
STUDY_LOCK = "study.lock"
"the file a study driver keeps in a run directory while it runs that run (:mod:`wn_rl.analysis.backends`)."


@dataclass(frozen=True)
class RunKind:
    """Where one kind of run keeps what the tables and figures read: the config key behind each common
    name (``task``, ``suite``, ``seed``, ``lr``, ``budget``) and the TensorBoard tag behind
    :data:`TRAIN_RETURN` and :data:`EVAL_RETURN`."""

    name: str
    keys: dict[str, str]
    "common name -> dotted config key."
    tags: dict[str, str]
    "common name -> TensorBoard tag."
    group_by: tuple[str, ...]
    "the config keys whose values tell the compared groups apart, when none are given."


NATIVE_DQN = RunKind(
    "native DQN",
    keys={
        "task": "env.name",
        "suite": "env.suite",
        "seed": "run.seed",
        "lr": "agent.lr",
        "budget": "run.total_agent_steps",
    },
    tags={TRAIN_RETURN: "train/episode_return", EVAL_RETURN: "eval/return_mean"},
    group_by=("network.parameterization",),
)
SB3 = RunKind(  # wn_rl.sb3.config.SB3Config; the tags of SB3's logger and EvalCallback
    "SB3",
    keys={"task": "env_id", "seed": "seed", "lr": "hyperparameters.learning_rate", "budget": "total_timesteps"},
    tags={TRAIN_RETURN: "rollout/ep_rew_mean", EVAL_RETURN: "eval/mean_reward"},
    # SB3's own policies have no parameterization key: "MlpPolicy, parameterization=?"
    group_by=("policy", "policy_kwargs.parameterization"),
)
RUN_KINDS = (NATIVE_DQN, SB3)


def run_kind(config: dict[str, Any], tags: Container[str] = ()) -> RunKind:
    """The kind whose task key the config has; for a run without config, the kind whose tags it logged;
    :data:`NATIVE_DQN` when neither tells."""
    for kind in RUN_KINDS:
        if config_value(config, kind.keys["task"]) is not None:
            return kind
    return next((k for k in RUN_KINDS if any(tag in tags for tag in k.tags.values())), NATIVE_DQN)


@dataclass
class RunData:
    """One run: where it is, its resolved config (nested dict) and its scalar curves."""

    run_dir: Path
    config: dict[str, Any]
    scalars: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    "tag -> (steps, values), sorted by step."
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    "``results.json`` epochs (each with agent_step, return_mean, the game scores, ...)."

    @property
    def kind(self) -> RunKind:
        """Native DQN or SB3 (:func:`run_kind`)."""
        return run_kind(self.config, self.scalars)

    def curve(self, tag: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of ``tag`` (a TensorBoard tag, or :data:`TRAIN_RETURN` / :data:`EVAL_RETURN`);
        empty arrays when the run never logged it."""
        return self.scalars.get(self.kind.tags.get(tag, tag), (np.zeros(0), np.zeros(0)))

    def value(self, key: str, default: Any = None) -> Any:
        """A config value by dotted key (``network.parameterization``) or common name (``seed``: ``run.seed``
        of a native DQN run, ``seed`` of an SB3 run; see :class:`RunKind`)."""
        return config_value(self.config, self.kind.keys.get(key, key), default)


def config_value(config: dict[str, Any], key: str, default: Any = None) -> Any:
    """``config_value({"a": {"b": 1}}, "a.b") == 1``; ``default`` when a part is missing."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def check_config_key(runs: Sequence[RunData], key: str, option: str) -> None:
    """Raise :class:`ConfigError` when none of ``runs`` has ``key`` (a dotted config key or a common name,
    :meth:`RunData.value`), naming ``option`` (``--group-by``) and the nearest keys the runs do have: a
    misspelt key would otherwise put every run under ``?``."""
    missing = object()
    if any(run.value(key, missing) is not missing for run in runs):
        return
    known = sorted({name for run in runs for name in (*flatten_config(run.config), *run.kind.keys)})
    close = difflib.get_close_matches(key, known, n=3)
    hint = f"did you mean {' or '.join(map(repr, close))}?" if close else "the keys are those of a run's config.yaml"
    raise ConfigError(f"{option} {key}: none of the {len(runs)} runs' configs has this key; {hint}")


def _event_dirs(run_dir: Path) -> list[Path]:
    return sorted({p.parent for p in run_dir.rglob("events.out.tfevents.*")})


def read_scalars(run_dir: str | Path, tags: list[str] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every scalar tag (or only ``tags``) of the event files under ``run_dir`` as sorted (steps, values)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    merged: dict[str, dict[int, float]] = {}
    for directory in _event_dirs(Path(run_dir)):
        accumulator = EventAccumulator(str(directory), size_guidance={SCALARS: 0})
        accumulator.Reload()
        for tag in accumulator.Tags()[SCALARS]:
            if tags is not None and tag not in tags:
                continue
            points = merged.setdefault(tag, {})
            for event in sorted(accumulator.Scalars(tag), key=lambda e: e.wall_time):
                points[int(event.step)] = float(event.value)
    out = {}
    for tag, points in merged.items():
        steps = np.array(sorted(points), dtype=np.int64)
        out[tag] = (steps, np.array([points[s] for s in steps], dtype=float))
    return out


_TRAINERS = "scripts/train_dqn.py or scripts/train_sb3.py"


def load_run(run_dir: str | Path, tags: list[str] | None = None) -> RunData:
    """Read a run directory. Raises ``FileNotFoundError`` saying what a run directory must contain, and
    :class:`ConfigError` naming the file for an empty or damaged ``config.yaml`` or ``results.json``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} does not exist")
    config = read_run_config(run_dir, _TRAINERS) if (run_dir / "config.yaml").is_file() else {}
    if config_value(config, NATIVE_DQN.keys["task"]) is not None:
        from agents.dqn.config import with_older_defaults  # the native DQN's own history of its keys

        config = with_older_defaults(config)  # a key added since the run reads as what the code did then
    elif config_value(config, SB3.keys["task"]) is not None and isinstance(config.get("init", {}), dict):
        config = {**config, "init": {"method": "data_dependent", **config.get("init", {})}}  # before init.method
    scalars = read_scalars(run_dir, tags)
    if not scalars and not config:
        raise FileNotFoundError(
            f"{run_dir} holds neither config.yaml nor TensorBoard event files; pass run directories written "
            "by scripts/train_dqn.py (e.g. runs/dqn/<name>) or their parent"
        )
    return RunData(run_dir, config, scalars, _evaluations(run_dir / "results.json"))


def _evaluations(path: Path) -> list[dict[str, Any]]:
    """The epochs of a native DQN run's ``results.json`` (none without the file)."""
    if not path.is_file():
        return []
    try:
        return json.loads(path.read_text()).get("epochs", [])
    except (ValueError, AttributeError) as exc:  # a torn write by a tool other than the runner's atomic one
        raise ConfigError(f"{path}: not a results file of scripts/train_dqn.py ({exc})") from None


def load_runs(
    run_dirs: Sequence[str | Path], tags: list[str] | None = None
) -> tuple[list[RunData], list[tuple[Path, str]]]:
    """:func:`load_run` of every directory: the runs that read, and ``(run_dir, reason)`` for each that does not
    (an empty or damaged ``config.yaml`` or ``results.json``), so that one bad run leaves out only itself and the
    caller lists it with the reason. A directory that holds no run at all still raises ``FileNotFoundError``."""
    runs: list[RunData] = []
    unreadable: list[tuple[Path, str]] = []
    for run_dir in map(Path, run_dirs):
        try:
            runs.append(load_run(run_dir, tags))
        except ConfigError as exc:
            unreadable.append((run_dir, " ".join(str(exc).split())))  # one line, for the logs and the tables
    return runs, unreadable


def unreadable_rows(unreadable: Sequence[tuple[Path, str]]) -> list[dict[str, str]]:
    """:func:`load_runs`' runs that could not be read, as rows of a markdown table."""
    return [{"run": str(run_dir), "reason": reason.replace("|", "\\|")} for run_dir, reason in unreadable]


def find_run_dirs(paths: list[str | Path]) -> list[Path]:
    """Run directories among ``paths``: each path is a run directory or a folder holding them."""
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{str(path)!r} does not exist; expected a run directory or a folder of runs")
        if (path / "config.yaml").is_file() or (path / "tb").is_dir():
            found.append(path)
            continue
        children = sorted(p.parent for p in path.rglob("config.yaml"))
        found.extend(children or sorted({d.parent for d in _event_dirs(path)}))
    if not found:
        raise FileNotFoundError(f"no run directories (with config.yaml or tb/) under {[str(p) for p in paths]}")
    return list(dict.fromkeys(found))


def run_budget(config: dict[str, Any]) -> int | None:
    """The steps a run was started to make: ``run.total_agent_steps`` (native DQN) or ``total_timesteps``
    (SB3: environment steps summed over envs, the unit of its saved models' step counts); None when the
    config has none."""
    value = config_value(config, run_kind(config).keys["budget"])
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def run_progress(run_dir: str | Path) -> int:
    """Steps reached by the newest complete checkpoint or saved model of a run (0 when there is none).

    Native DQN: the agent step in the completion marker of the newest checkpoint whose file has the
    size the marker records. The runner writes a final checkpoint when a run ends, so a run is complete
    exactly when this reaches its ``run.total_agent_steps``. SB3 (:func:`_sb3_progress`): the step count
    of the newest saved model. Cheap: a ``stat`` and a few small reads per run, never a read of a
    checkpoint's payload (GBs with the replay memory); loading a checkpoint still verifies its hash.
    """
    run_dir = Path(run_dir)
    return max(_checkpoint_progress(run_dir / "checkpoints"), _sb3_progress(run_dir))


def _checkpoint_progress(directory: Path) -> int:
    path = latest_checkpoint(directory, check_hash=False)
    if path is None:
        return 0
    try:
        metadata = read_marker(path).get("metadata", {})
    except CheckpointError:
        return 0
    step = metadata.get("agent_step")
    return int(step) if isinstance(step, (int, float)) and math.isfinite(step) else 0


_SB3_CHECKPOINT = re.compile(r"^model_(\d+)_steps\.zip$")


def sb3_saved_models(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(num_timesteps, path)`` of every model an SB3 run saved, newest first: ``checkpoints/model_<steps>_steps.zip``
    and ``final_model.zip`` with the count in ``final_steps.json`` (which the runner writes after it when training
    ends, at ``total_timesteps`` or earlier when a signal stopped it), the final model first at equal counts. Names
    only: whether a file is complete is the caller's check (:func:`wn_rl.sb3.runner.latest_model`). Needs no SB3."""
    run_dir = Path(run_dir)
    candidates = []  # (steps, final model first at equal steps, path)
    for path in (run_dir / "checkpoints").glob("model_*_steps.zip"):
        match = _SB3_CHECKPOINT.match(path.name)
        if match:
            candidates.append((int(match.group(1)), 0, path))
    final = run_dir / "final_model.zip"
    try:
        steps = json.loads((run_dir / "final_steps.json").read_text()).get("num_timesteps")
    except (OSError, ValueError, AttributeError):
        steps = None
    if isinstance(steps, int) and not isinstance(steps, bool) and final.is_file():
        candidates.append((steps, 1, final))
    return [(steps, path) for steps, _, path in sorted(candidates, key=lambda c: c[:2], reverse=True)]


def _sb3_progress(run_dir: Path) -> int:
    """``num_timesteps`` of the newest SB3 model (:func:`sb3_saved_models`) that opens as a zip. Opening a zip reads
    its central directory at the end of the file, which a truncated file lacks; loading checks every member's CRC
    besides."""
    for steps, path in sb3_saved_models(run_dir):
        try:
            with zipfile.ZipFile(path):
                return steps
        except (OSError, zipfile.BadZipFile) as exc:
            warnings.warn(f"skipping damaged model {path}: not a readable zip ({exc})", stacklevel=3)
    return 0
