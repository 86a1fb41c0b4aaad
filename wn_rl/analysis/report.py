"""Tables of a study: one row per run (nothing left out) and aggregates per task and group.

A run is complete when it reached its budget (:attr:`RunSummary.complete`); the aggregates can be
restricted to complete runs (``complete_only``), as a study's report and ``scripts/plot_curves.py`` are by
default, so that a crashed, killed or still running run does not enter the means and intervals with its
early numbers; :func:`left_out_rows` says which runs that leaves out and why, for both.

Each run is read by its kind (:class:`wn_rl.analysis.runs.RunKind`: native DQN or SB3): its evaluation
and training returns, task, seed, learning rate and budget under the tags and keys that kind uses.

Per run (:func:`summarize_run`): final evaluation return (the last evaluation's mean over its games),
maximum evaluation return (the paper's statistic: the best epoch's mean), the area under the evaluation
curve as its time-average (:func:`wn_rl.analysis.stats.area_under_curve`) and *late train*: the mean of
the training-return logs at or after 90 % of the run's last logged training step (near the budget for a
complete run, how far it got for another). Each log is itself a mean over earlier episodes, so the span
covered starts before that 90 %: a native DQN log (``train/episode_return``) is the mean return of the
episodes that ended in its logging interval (up to one ``run.log_every_agent_steps`` more), an SB3 log
(``rollout/ep_rew_mean``) the mean of the last 100 episodes (SB3's ``stats_window_size``).

Per (task, group) (:func:`aggregate_rows`): mean and standard deviation across seeds, and the
interquartile mean with a 95 % bootstrap interval. Across tasks (:func:`overall_rows`): IQM of
normalised scores with a stratified bootstrap over tasks, as rliable reports it, each run normalised by
its own game (:attr:`RunSummary.game`, whichever key labels the tasks): human-normalised for an Atari-57
game of the Atari suite; otherwise divided by the largest absolute score any run of the study reached on
that task and game ("study-max normalised"), which makes tasks comparable only within the study. Probability of
improvement (:func:`improvement_rows`) compares raw scores within each task. Neither needs equal run
counts: every task keeps all of its runs, and the bootstrap resamples each task's runs with its own count.
Runs without evaluation numbers (a complete run with evaluations off, ``eval.every_agent_steps=0``, or an
unfinished one not evaluated yet) are left out of the statistics, and the tables count them and say why.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from wn_rl.analysis.curves import group_label
from wn_rl.analysis.runs import EVAL_RETURN, STUDY_LOCK, TRAIN_RETURN, RunData, run_budget, run_progress
from wn_rl.analysis.stats import (
    area_under_curve,
    has_human_reference,
    human_normalized_score,
    improvement_ci,
    interquartile_mean,
    stratified_bootstrap_ci,
)
from wn_rl.checkpoint import atomic_write_bytes

__all__ = [
    "NOT_STARTED",
    "RunSummary",
    "aggregate_rows",
    "improvement_rows",
    "left_out_reason",
    "left_out_rows",
    "markdown_table",
    "overall_rows",
    "run_rows",
    "runs_markdown",
    "summarize_run",
    "write_csv",
]

NOT_STARTED = "not started"
"the reason :func:`left_out_reason` gives for a planned run whose directory has no config.yaml yet."


@dataclass(frozen=True)
class RunSummary:
    """The numbers of one run that enter the tables."""

    run: str
    task: str
    "the task label: the value of the report's task key (by default the game; a study may pick another key)."
    game: str
    "the run's game, ``env.name`` (native DQN) or ``env_id`` (SB3), whatever the task label: what normalises it."
    group: str
    suite: str
    seed: int | None
    lr: float | str | None
    "a number, or a schedule's name (SB3's ``lin_2.5e-4``); None when the config does not set it."
    agent_steps: int
    total_agent_steps: int | None
    "the budget: ``run.total_agent_steps`` (native DQN) or ``total_timesteps`` (SB3); None when unknown."
    complete: bool
    "reached ``total_agent_steps`` by its newest checkpoint (SB3: saved model) or its logs (a study: checkpoint only)."
    evaluations: int
    final_eval: float
    max_eval: float
    auc_eval: float
    final_train: float
    "late train: the mean of the training-return logs at or after 90 % of the run's last logged step (see the module)."
    run_dir: Path
    "where the run is (:func:`left_out_reason` looks there for config.yaml and a study's lock)."


def _eval_curve(run: RunData) -> tuple[np.ndarray, np.ndarray]:
    if run.evaluations:
        steps = np.array([e["agent_step"] for e in run.evaluations], dtype=float)
        return steps, np.array([e["return_mean"] for e in run.evaluations], dtype=float)
    return run.curve(EVAL_RETURN)


def summarize_run(run: RunData, group_by: Sequence[str] | None = None, task_key: str = "task") -> RunSummary:
    """Final / max / AUC of the evaluation curve and the late training return (the mean of the training-return
    logs at or after 90 % of its last logged step) of one run, grouped by ``group_by`` (by default the run's
    kind's keys, :func:`wn_rl.analysis.curves.group_label`), its task label the value of ``task_key``."""
    steps, values = _eval_curve(run)
    train_steps, train_values = run.curve(TRAIN_RETURN)
    late = train_values[train_steps >= 0.9 * train_steps[-1]] if train_steps.size else train_values
    progress = run_progress(run.run_dir)
    logged = int(max(steps.max(initial=0), train_steps.max(initial=0)))
    total = run_budget(run.config)
    return RunSummary(
        run=run.run_dir.name,
        task=str(run.value(task_key, "?")),
        game=str(run.value("task", "?")),
        group=group_label(run, group_by),
        suite=str(run.value("suite", "")),
        seed=run.value("seed"),
        lr=run.value("lr"),
        agent_steps=max(progress, logged),
        total_agent_steps=total,
        complete=total is not None and max(progress, logged) >= total,
        evaluations=int(steps.size),
        final_eval=float(values[-1]) if values.size else math.nan,
        max_eval=float(values.max()) if values.size else math.nan,
        auc_eval=area_under_curve(steps, values),
        final_train=float(late.mean()) if late.size else math.nan,
        run_dir=run.run_dir,
    )


def _scored(s: RunSummary) -> bool:
    """Whether a run has evaluation numbers: a complete run with evaluations off (``eval.every_agent_steps=0``)
    or an unfinished one not evaluated yet has none (NaN)."""
    return math.isfinite(s.final_eval) and math.isfinite(s.auc_eval)


def _without_evaluation(runs: Sequence[RunSummary]) -> str:
    """Why ``runs`` (none :func:`_scored`) have no evaluation numbers."""
    complete = sum(s.complete for s in runs)
    if complete == len(runs):
        return "no evaluation"
    return "not evaluated yet" if complete == 0 else "no evaluation, or not yet"


def _counted(scored: int | str, unscored: Sequence[RunSummary]) -> str:
    """``scored`` runs, and the runs left out of the statistics for lack of evaluation numbers, if any."""
    return f"{scored} (+{len(unscored)}: {_without_evaluation(unscored)})" if unscored else str(scored)


def _mean_std(x: np.ndarray, missing: str) -> str:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return f"n/a ({missing})"
    return f"{x.mean():.3g} ± {x.std(ddof=1):.2g}" if x.size > 1 else f"{x.mean():.3g}"


def _iqm_ci(x: np.ndarray, reps: int, seed: int, missing: str) -> str:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return f"n/a ({missing})"
    point, low, high = stratified_bootstrap_ci(x[:, None], interquartile_mean, reps=reps, seed=seed)
    return f"{point:.3g} [{low:.3g}, {high:.3g}]"


def aggregate_rows(
    summaries: Sequence[RunSummary], *, reps: int = 10_000, seed: int = 0, complete_only: bool = False
) -> list[dict[str, str]]:
    """One row per (task, group): mean ± std (sample std) and IQM [95 % CI] of the statistics over its
    runs, or over its complete runs only with ``complete_only``. ``runs`` counts the runs in the
    statistics, followed by those left out for having no evaluation (``+2: no evaluation``: complete
    runs with evaluations off; ``not evaluated yet``: unfinished ones); ``complete`` and ``incomplete``
    count all of the cell's runs. A cell without such runs keeps its row, with n/a and the reason."""
    keys = list(dict.fromkeys((s.task, s.group) for s in summaries))
    rows = []
    for task, group in keys:
        cell = [s for s in summaries if (s.task, s.group) == (task, group)]
        members = [s for s in cell if s.complete or not complete_only]
        scored = [s for s in members if _scored(s)]
        unscored = [s for s in members if not _scored(s)]
        missing = _without_evaluation(unscored) if members else "no complete run"
        final, best, auc = (np.array([getattr(s, a) for s in scored]) for a in ("final_eval", "max_eval", "auc_eval"))
        complete = sum(s.complete for s in cell)
        rows.append(
            {
                "task": task,
                "group": group,
                "runs": _counted(len(scored), unscored),
                "complete": str(complete),
                "incomplete": str(len(cell) - complete),
                "final eval (mean ± std)": _mean_std(final, missing),
                "max eval (mean ± std)": _mean_std(best, missing),
                "AUC eval (mean ± std)": _mean_std(auc, missing),
                "IQM final eval [95% CI]": _iqm_ci(final, reps, seed, missing),
                "IQM AUC [95% CI]": _iqm_ci(auc, reps, seed, missing),
            }
        )
    return rows


_NORMALISATIONS = {"human": "human-normalised", "study-max": "study-max normalised"}


def _normalization(summaries: Sequence[RunSummary]) -> tuple[str, Callable[[RunSummary, float], float]]:
    """The label of the normalisations the runs get, and ``normalize(run, score)``: by the run's own game,
    human-normalised for an Atari-57 game of the Atari suite, else divided by the largest absolute max eval
    of any of ``summaries`` with the same task label and game (study-max; 1 when there is none or it is 0):
    with the game as task label, per game; with another key (``agent.lr``), per value and game."""
    study_max: dict[tuple[str, str, str], float] = {}
    for s in summaries:
        if math.isfinite(s.max_eval):
            key = (s.task, s.suite, s.game)
            study_max[key] = max(study_max.get(key, 0.0), abs(s.max_eval))

    def kind(s: RunSummary) -> str:
        return "human" if s.suite == "atari" and has_human_reference(s.game) else "study-max"

    def normalize(s: RunSummary, score: float) -> float:
        if kind(s) == "human":
            return float(human_normalized_score(s.game, score))
        return float(np.asarray(score, dtype=float) / (study_max.get((s.task, s.suite, s.game)) or 1.0))

    kinds = [k for k in _NORMALISATIONS if any(kind(s) == k for s in summaries)]
    label = "human-/study-max normalised" if len(kinds) > 1 else _NORMALISATIONS[kinds[0] if kinds else "study-max"]
    return label, normalize


def _missing_tasks(cells: dict[str, list[RunSummary]], tasks: Sequence[str]) -> str:
    """Why these tasks have no run with evaluation numbers: ``no evaluation on breakout; no run on asterix``."""
    reasons: dict[str, list[str]] = {}
    for task in tasks:
        reasons.setdefault(_without_evaluation(cells[task]) if cells[task] else "no run", []).append(task)
    return "; ".join(f"{reason} on {', '.join(names)}" for reason, names in reasons.items())


def overall_rows(summaries: Sequence[RunSummary], *, reps: int = 10_000, seed: int = 0) -> list[dict[str, str]]:
    """Per group: IQM of the normalised final eval and AUC of all its runs over all tasks, with a stratified
    bootstrap interval, as rliable reports it (:func:`_normalization`: each run by its own game).

    The IQM pools every run's normalised score (rliable's; with equal run counts it is the IQM of the
    ``(runs, tasks)`` matrix), and each bootstrap replicate resamples every task's runs with that task's
    own count, so a run left out of one task leaves out only itself. Runs without evaluation numbers are
    left out (``runs per task`` says how many); a group with no such run on some task gets n/a and why.
    """
    tasks = list(dict.fromkeys(s.task for s in summaries))
    if len(tasks) < 2:
        return []
    kind, normalize = _normalization(summaries)
    rows = []
    for group in dict.fromkeys(s.group for s in summaries):
        cells = {t: sorted((s for s in summaries if s.group == group and s.task == t), key=_seed_key) for t in tasks}
        scored = {t: [s for s in runs if _scored(s)] for t, runs in cells.items()}
        counts = sorted(len(runs) for runs in scored.values())
        per_task = str(counts[0]) if counts[0] == counts[-1] else f"{counts[0]} to {counts[-1]}"
        unscored = [s for t in tasks for s in cells[t] if not _scored(s)]
        row = {"group": group, "tasks": str(len(tasks)), "runs per task": _counted(per_task, unscored)}
        missing = [t for t in tasks if not scored[t]]
        for label, attribute in (("final eval", "final_eval"), ("AUC eval", "auc_eval")):
            key = f"IQM {label}, {kind} [95% CI]"
            if missing:
                row[key] = f"n/a ({_missing_tasks(cells, missing)})"
                continue
            scores = {t: np.array([normalize(s, getattr(s, attribute)) for s in runs]) for t, runs in scored.items()}
            point, low, high = stratified_bootstrap_ci(scores, interquartile_mean, reps=reps, seed=seed)
            row[key] = f"{point:.3f} [{low:.3f}, {high:.3f}]"
        rows.append(row)
    return rows


def improvement_rows(summaries: Sequence[RunSummary], *, reps: int = 2000, seed: int = 0) -> list[dict[str, str]]:
    """Per other group: P(group > the first group) over the tasks both have runs with evaluation numbers
    on, on final eval and AUC, with a 95 % interval (independent stratified bootstrap), as rliable reports
    probability of improvement: per task from all of that task's runs of either group (counts may differ),
    averaged over tasks. Scores are compared within a task only, so no normalisation is needed. ``runs``
    counts the runs compared (group vs first group), and those left out for having no evaluation."""
    groups = list(dict.fromkeys(s.group for s in summaries))
    if len(groups) < 2:
        return []
    baseline, rows = groups[0], []
    for group in groups[1:]:
        common = [t for t in dict.fromkeys(s.task for s in summaries) if _has(summaries, t, group, baseline)]
        cells = {
            g: {t: sorted((s for s in summaries if s.group == g and s.task == t), key=_seed_key) for t in common}
            for g in (group, baseline)
        }
        compared = [t for t in common if all(any(map(_scored, cells[g][t])) for g in cells)]
        scored = {g: {t: [s for s in cells[g][t] if _scored(s)] for t in compared} for g in cells}
        unscored = [s for g in cells for t in common for s in cells[g][t] if not _scored(s)]
        counts = " vs ".join(str(sum(map(len, scored[g].values()))) for g in cells)
        left_out = [t for t in common if t not in compared]
        why = _not_compared(cells, left_out) if common else "no task in common"
        row = {
            "comparison": f"P({group} > {baseline})",
            "tasks": f"{len(compared)} (left out: {why})" if left_out else str(len(compared)),
            "runs": _counted(counts, unscored),
        }
        for label, attribute in (("final eval", "final_eval"), ("AUC eval", "auc_eval")):
            if not compared:
                row[f"{label} [95% CI]"] = f"n/a ({why})"
                continue
            x, y = (
                {t: np.array([getattr(s, attribute) for s in runs]) for t, runs in scored[g].items()} for g in cells
            )
            point, low, high = improvement_ci(x, y, reps=reps, seed=seed)
            row[f"{label} [95% CI]"] = f"{point:.2f} [{low:.2f}, {high:.2f}]"
        rows.append(row)
    return rows


def _not_compared(cells: dict[str, dict[str, list[RunSummary]]], tasks: Sequence[str]) -> str:
    """Why tasks both groups have runs on are not compared: ``weight_norm: no evaluation on breakout``."""
    parts = []
    for group, by_task in cells.items():
        bare = [t for t in tasks if not any(map(_scored, by_task[t]))]
        if bare:
            parts.append(f"{group}: {_missing_tasks(by_task, bare)}")
    return "; ".join(parts)


def _has(summaries: Sequence[RunSummary], task: str, *groups: str) -> bool:
    return all(any(s.task == task and s.group == g for s in summaries) for g in groups)


def _seed_key(s: RunSummary) -> tuple[int, str]:
    return (s.seed if isinstance(s.seed, int) else 0, s.run)


def run_rows(summaries: Sequence[RunSummary]) -> list[dict[str, str]]:
    """Every run, formatted for a table."""

    def f(x: float | str | None) -> str:
        if isinstance(x, str):
            return x
        return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.4g}"

    return [
        {
            "task": s.task,
            "group": s.group,
            "seed": str(s.seed),
            "lr": f(s.lr),
            "agent steps": f"{s.agent_steps:,}" + ("" if s.complete else " (incomplete)"),
            "evals": str(s.evaluations),
            "final eval": f(s.final_eval),
            "max eval": f(s.max_eval),
            "AUC eval": f(s.auc_eval),
            "late train": f(s.final_train),
            "run": s.run,
        }
        for s in summaries
    ]


def left_out_reason(summary: RunSummary, resume_hint: str = "") -> str | None:
    """Why a run stays out of the aggregates unless incomplete runs are included; None when it is complete.

    Looks into the run's directory: a planned run without ``config.yaml`` has not started
    (:data:`NOT_STARTED`), and one with a :data:`~wn_rl.analysis.runs.STUDY_LOCK` is being run by a study
    driver. ``resume_hint`` (how to continue it) follows the reason of a run that stopped short.
    """
    if summary.complete:
        return None
    if summary.total_agent_steps is None:
        return (
            f"no budget: at {summary.agent_steps:,} agent steps, but its config.yaml has neither "
            "run.total_agent_steps (native DQN) nor total_timesteps (SB3), so it cannot be told complete"
        )
    if not (summary.run_dir / "config.yaml").is_file():
        return NOT_STARTED
    steps = f"{summary.agent_steps:,} of {summary.total_agent_steps:,} agent steps"
    if (summary.run_dir / STUDY_LOCK).is_file():
        return f"{steps}, running: {STUDY_LOCK} present (a study driver is running it, or was killed while it did)"
    hint = f"; {resume_hint}" if resume_hint else ""
    return f"{steps}: short of its budget (crashed, killed, interrupted or still running){hint}"


def left_out_rows(
    summaries: Sequence[RunSummary], *, include_incomplete: bool = False, resume_hint: str = ""
) -> list[dict[str, str]]:
    """The runs the aggregates leave out, formatted for a table, each with :func:`left_out_reason`: the
    incomplete ones, or only those not started when ``include_incomplete`` adds the others."""
    rows = []
    for s in summaries:
        reason = left_out_reason(s, resume_hint)
        if reason is not None and (reason == NOT_STARTED or not include_incomplete):
            rows.append({"run": s.run, "task": s.task, "group": s.group, "seed": str(s.seed), "reason": reason})
    return rows


def runs_markdown(summaries: Sequence[RunSummary], *, include_incomplete: bool = False, reps: int = 10_000) -> str:
    """The tables of a set of runs (``scripts/plot_curves.py``): which runs the aggregates and the figure
    use (the complete ones only, unless ``include_incomplete``), the aggregates per task and group, the
    runs left out and why, and every run."""
    complete = sum(s.complete for s in summaries)
    incomplete = len(summaries) - complete
    lines = [f"{len(summaries)} runs, {complete} complete."]
    if include_incomplete:
        lines.append(
            f"The aggregates and the figure use all {len(summaries)} runs, incomplete ones included "
            "(--include-incomplete): their numbers stop short of the budget."
        )
    elif incomplete:
        lines.append(
            f"The aggregates and the figure use the {complete} complete runs only; the {incomplete} others are "
            'listed under "Runs left out of the aggregates" (--include-incomplete adds them).'
        )
    else:
        lines.append("The aggregates and the figure use all of them.")
    aggregate = aggregate_rows(summaries, reps=reps, complete_only=not include_incomplete)
    text = [" ".join(lines), "", "## Aggregates", "", markdown_table(aggregate), ""]
    left_out = left_out_rows(summaries, include_incomplete=include_incomplete)
    if left_out:
        text += ["## Runs left out of the aggregates", "", markdown_table(left_out), ""]
    text += ["## Every run", "", markdown_table(run_rows(summaries)), ""]
    return "\n".join(text)


def markdown_table(rows: Sequence[dict[str, str]]) -> str:
    """A GitHub markdown table (columns from the first row); empty string for no rows."""
    if not rows:
        return ""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(rows: Sequence[dict[str, str]] | Sequence[RunSummary], path: str | Path) -> Path:
    """Rows (dicts or :class:`RunSummary`) as CSV with a header; written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dicts = [asdict(r) if isinstance(r, RunSummary) else r for r in rows]
    columns = list(dict.fromkeys(k for r in dicts for k in r))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(dicts)
    atomic_write_bytes(path, text.getvalue().encode())
    return path
