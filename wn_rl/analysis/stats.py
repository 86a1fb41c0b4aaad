"""Statistics for RL studies: per-run summaries and aggregates across seeds and tasks.

Per run: the final and maximum evaluation return and the area under the evaluation curve (reported as
the curve's time-average, so it is in return units and comparable across budgets). Across runs: the
interquartile mean (IQM, the 25 % trimmed mean) with a stratified-bootstrap percentile confidence
interval, computed as ``rliable`` computes them (Agarwal et al. 2021, "Deep Reinforcement Learning at
the Edge of the Statistical Precipice"): runs are resampled with replacement *within* each task (as
many as that task has: tasks may have different numbers of runs), the statistic is recomputed on each
resample, and the interval is the (alpha/2, 1 - alpha/2) percentile of the resampled statistics.
Implemented in numpy so that no extra package is needed (rliable 1.2.0 does not run with the current
``arch`` 8, which renamed ``random_state``, nor ``arch`` 7.2 with the installed pandas); the unit tests
check it on hand-computed cases, and on four score matrices it agreed with rliable's
``get_interval_estimates`` (patched for arch 8, 50k resamples) to within 0.005.

Atari scores are human-normalised with the standard random / human table of the Atari-57 benchmark
(0 = random play, 1 = professional human tester; the values of DeepMind's DQN Zoo ``atari_data.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

__all__ = [
    "ATARI_HUMAN_RANDOM",
    "Scores",
    "area_under_curve",
    "has_human_reference",
    "human_normalized_score",
    "improvement_ci",
    "interquartile_mean",
    "probability_of_improvement",
    "stratified_bootstrap_ci",
]

# game: (random score, human score), Atari-57 with up to 30 no-ops and a 108k-frame limit.
ATARI_HUMAN_RANDOM: dict[str, tuple[float, float]] = {
    "alien": (227.8, 7127.7),
    "amidar": (5.8, 1719.5),
    "assault": (222.4, 742.0),
    "asterix": (210.0, 8503.3),
    "asteroids": (719.1, 47388.7),
    "atlantis": (12850.0, 29028.1),
    "bank_heist": (14.2, 753.1),
    "battle_zone": (2360.0, 37187.5),
    "beam_rider": (363.9, 16926.5),
    "berzerk": (123.7, 2630.4),
    "bowling": (23.1, 160.7),
    "boxing": (0.1, 12.1),
    "breakout": (1.7, 30.5),
    "centipede": (2090.9, 12017.0),
    "chopper_command": (811.0, 7387.8),
    "crazy_climber": (10780.5, 35829.4),
    "defender": (2874.5, 18688.9),
    "demon_attack": (152.1, 1971.0),
    "double_dunk": (-18.6, -16.4),
    "enduro": (0.0, 860.5),
    "fishing_derby": (-91.7, -38.7),
    "freeway": (0.0, 29.6),
    "frostbite": (65.2, 4334.7),
    "gopher": (257.6, 2412.5),
    "gravitar": (173.0, 3351.4),
    "hero": (1027.0, 30826.4),
    "ice_hockey": (-11.2, 0.9),
    "jamesbond": (29.0, 302.8),
    "kangaroo": (52.0, 3035.0),
    "krull": (1598.0, 2665.5),
    "kung_fu_master": (258.5, 22736.3),
    "montezuma_revenge": (0.0, 4753.3),
    "ms_pacman": (307.3, 6951.6),
    "name_this_game": (2292.3, 8049.0),
    "phoenix": (761.4, 7242.6),
    "pitfall": (-229.4, 6463.7),
    "pong": (-20.7, 14.6),
    "private_eye": (24.9, 69571.3),
    "qbert": (163.9, 13455.0),
    "riverraid": (1338.5, 17118.0),
    "road_runner": (11.5, 7845.0),
    "robotank": (2.2, 11.9),
    "seaquest": (68.4, 42054.7),
    "skiing": (-17098.1, -4336.9),
    "solaris": (1236.3, 12326.7),
    "space_invaders": (148.0, 1668.7),
    "star_gunner": (664.0, 10250.0),
    "surround": (-10.0, 6.5),
    "tennis": (-23.8, -8.3),
    "time_pilot": (3568.0, 5229.2),
    "tutankham": (11.4, 167.6),
    "up_n_down": (533.4, 11693.2),
    "venture": (0.0, 1187.5),
    "video_pinball": (16256.9, 17667.9),
    "wizard_of_wor": (563.5, 4756.5),
    "yars_revenge": (3092.9, 54576.9),
    "zaxxon": (32.5, 9173.3),
}


def _atari_key(game: str) -> str:
    """``SpaceInvaders``, ``space-invaders``, ``ALE/SpaceInvaders-v5`` -> ``space_invaders``; ``UpNDown`` ->
    ``up_n_down`` (a capital after a capital starts a word when a lower-case letter follows it)."""
    name = game.split("/")[-1]
    name = name.split("-v")[0].replace("NoFrameskip", "").replace("-", "_")
    out = []
    for i, ch in enumerate(name):
        before, after = name[i - 1] if i else "_", name[i + 1] if i + 1 < len(name) else ""
        if ch.isupper() and before != "_" and (not before.isupper() or after.islower()):
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


def has_human_reference(game: str) -> bool:
    """Whether ``game`` (any common spelling) is one of the Atari-57 games with random / human scores."""
    return _atari_key(game) in ATARI_HUMAN_RANDOM


def human_normalized_score(game: str, score: float | np.ndarray) -> float | np.ndarray:
    """``(score - random) / (human - random)`` for an Atari-57 game (any common spelling of its name).

    Raises ``KeyError`` naming the valid games for a game outside Atari-57 (e.g. a MinAtar game, which
    has no human reference).
    """
    key = _atari_key(game)
    if key not in ATARI_HUMAN_RANDOM:
        raise KeyError(
            f"no human/random reference scores for {game!r} (read as {key!r}); human-normalised scores exist "
            f"only for the Atari-57 games: {', '.join(sorted(ATARI_HUMAN_RANDOM))}"
        )
    random_score, human_score = ATARI_HUMAN_RANDOM[key]
    return (np.asarray(score, dtype=float) - random_score) / (human_score - random_score)


Scores = np.ndarray | Mapping[str, np.ndarray | Sequence[float]]
"""A ``(num_runs, num_tasks)`` array of scores (1-D: one task), or a mapping task -> that task's runs'
scores, which lets tasks have different numbers of runs (a run left out of one task)."""


def _per_task(scores: Scores, name: str) -> tuple[list[str], list[np.ndarray], Callable[[list[np.ndarray]], Scores]]:
    """The tasks, each task's runs, and how to put (resampled) runs back into the layout ``scores`` came in."""
    if isinstance(scores, Mapping):
        tasks = list(scores)
        columns = [np.asarray(scores[t], dtype=float).ravel() for t in tasks]
        return tasks, columns, lambda cols: dict(zip(tasks, cols, strict=True))
    x = np.asarray(scores, dtype=float)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"{name} must be (num_runs, num_tasks) with at least one value, got shape {x.shape}")
    return [f"column {i}" for i in range(x.shape[1])], list(x.T), lambda cols: np.stack(cols, axis=1)


def _check_runs(tasks: list[str], columns: list[np.ndarray], name: str) -> None:
    """At least one task, every task with at least one run, and no NaN or inf (a bootstrap would spread them)."""
    if not columns:
        raise ValueError(f"{name} has no task: expected at least one task with at least one run")
    empty = [t for t, c in zip(tasks, columns, strict=True) if c.size == 0]
    if empty:
        raise ValueError(f"{name}: task(s) {empty} have no runs: leave them out, or give each at least one run")
    bad = sum(int((~np.isfinite(c)).sum()) for c in columns)
    if bad:
        total = sum(c.size for c in columns)
        raise ValueError(
            f"{name} contain NaN or inf ({bad} of {total} values): drop or fill unfinished runs before bootstrapping"
        )


def _resample(columns: list[np.ndarray], rng: np.random.Generator, reps: tuple[int, ...]) -> list[np.ndarray]:
    """Each task's runs drawn with replacement, as many as it has, independently per task: arrays
    ``(*reps, runs of that task)``. One draw of ``(*reps, most runs, tasks)`` indices with each task's own
    bound, so that equal run counts draw exactly what a rectangular ``(runs, tasks)`` draw would."""
    counts = np.array([c.size for c in columns])
    idx = rng.integers(0, counts, size=(*reps, int(counts.max()), len(columns)))
    return [c[idx[..., : c.size, t]] for t, c in enumerate(columns)]


def interquartile_mean(scores: Scores | Sequence[float]) -> float:
    """Mean of the middle 50 % of all values, pooled over runs and tasks (``scipy.stats.trim_mean(x, 0.25,
    axis=None)``); a mapping task -> runs pools every task's runs, as rliable's IQM pools a score matrix.

    ``floor(0.25 n)`` values are cut from each end of the sorted values, as scipy (and so rliable) does.
    NaN is an error (scipy returns nan; sorting would put NaN last and cut it as if it were the highest).
    """
    if isinstance(scores, Mapping):
        parts = [np.asarray(v, dtype=float).ravel() for v in scores.values()]
        x = np.sort(np.concatenate(parts)) if parts else np.zeros(0)
    else:
        x = np.sort(np.asarray(scores, dtype=float).ravel())
    if x.size == 0:
        raise ValueError("interquartile_mean of no scores: expected at least one value")
    nan = int(np.isnan(x).sum())
    if nan:
        raise ValueError(
            f"interquartile_mean of {x.size} scores of which {nan} are NaN: leave out the runs without a score "
            "(no evaluation, or none yet) first"
        )
    cut = int(0.25 * x.size)
    return float(x[cut : x.size - cut].mean())


def stratified_bootstrap_ci(
    scores: Scores,
    statistic: Callable[[Scores], float] = interquartile_mean,
    *,
    reps: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(point, low, high)``: the statistic and its stratified-bootstrap percentile interval.

    ``scores`` is ``(num_runs, num_tasks)``, as in rliable, or a mapping task -> runs when the tasks have
    different numbers of runs; ``statistic`` gets the resampled scores in the same layout. Each replicate
    draws, in every task independently (the stratification), as many runs with replacement as that task
    has, so every task keeps its number of runs (a pooled statistic such as the IQM weighs a task by its
    runs); with equal counts a mapping gives exactly what its matrix gives. With one run the interval
    collapses to the point. NaN entries are not allowed.
    """
    tasks, columns, rebuild = _per_task(scores, "scores")
    _check_runs(tasks, columns, "scores")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence} must be in (0, 1), e.g. 0.95")
    point = float(statistic(rebuild(columns)))
    resampled = _resample(columns, np.random.default_rng(seed), (reps,))
    values = np.array([statistic(rebuild([c[r] for c in resampled])) for r in range(reps)])
    alpha = 1.0 - confidence
    low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return point, float(low), float(high)


def probability_of_improvement(x: Scores, y: Scores) -> float:
    """P(X > Y) averaged over tasks (rliable's ``probability_of_improvement``, Agarwal et al. 2021).

    ``x`` is ``(runs_x, tasks)`` and ``y`` ``(runs_y, tasks)``, or both mappings task -> runs with the same
    tasks (each task with its own run counts); per task it is the Mann-Whitney statistic
    ``mean_ij [x_i > y_j] + 0.5 [x_i == y_j]`` over all of that task's pairs: 0.5 means neither is better.
    NaN is an error (it would count as neither greater nor equal).
    """
    return float(np.mean([_mann_whitney(xc, yc) for xc, yc in zip(*_paired_tasks(x, y), strict=True)]))


def _paired_tasks(x: Scores, y: Scores) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The runs of x and of y per task, y in x's task order; an error for other tasks, a task without
    runs or NaN."""
    x_tasks, x_columns, _ = _per_task(x, "x")
    y_tasks, y_columns, _ = _per_task(y, "y")
    if sorted(x_tasks) != sorted(y_tasks):
        only_x, only_y = [t for t in x_tasks if t not in y_tasks], [t for t in y_tasks if t not in x_tasks]
        raise ValueError(
            f"x and y must have the same tasks (columns of an array, keys of a mapping): only in x: {only_x}, "
            f"only in y: {only_y}"
        )
    y_by_task = dict(zip(y_tasks, y_columns, strict=True))
    y_columns = [y_by_task[task] for task in x_tasks]
    for task, xc, yc in zip(x_tasks, x_columns, y_columns, strict=True):
        nan = int(np.isnan(xc).sum()), int(np.isnan(yc).sum())
        if xc.size == 0 or yc.size == 0 or any(nan):
            raise ValueError(
                f"probability of improvement on task {task!r}: x has {xc.size} runs ({nan[0]} NaN), y has "
                f"{yc.size} ({nan[1]} NaN); expected at least one run each and no NaN: leave out the runs without "
                "a score (no evaluation, or none yet) first"
            )
    return x_columns, y_columns


def _mann_whitney(x: np.ndarray, y: np.ndarray) -> float:
    """``mean_ij [x_i > y_j] + 0.5 [x_i == y_j]`` of one task's runs."""
    pairs = x.size * y.size
    return np.count_nonzero(x[:, None] > y[None, :]) / pairs + 0.5 * (
        np.count_nonzero(x[:, None] == y[None, :]) / pairs
    )


def improvement_ci(
    x: Scores, y: Scores, *, reps: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """``(point, low, high)`` of :func:`probability_of_improvement` with x and y resampled
    independently within each task (rliable's ``StratifiedIndependentBootstrap``), percentile interval;
    as there, each task's runs of x (and of y) are drawn as many times as it has runs."""
    x_tasks, x_columns, _ = _per_task(x, "x")
    y_tasks, y_columns, _ = _per_task(y, "y")
    _check_runs(x_tasks, x_columns, "x")
    _check_runs(y_tasks, y_columns, "y")
    x_columns, y_columns = _paired_tasks(x, y)
    point = float(np.mean([_mann_whitney(xc, yc) for xc, yc in zip(x_columns, y_columns, strict=True)]))
    rng = np.random.default_rng(seed)
    values = np.empty(reps)
    for r in range(reps):
        xs, ys = _resample(x_columns, rng, ()), _resample(y_columns, rng, ())
        values[r] = np.mean([_mann_whitney(xc, yc) for xc, yc in zip(xs, ys, strict=True)])
    alpha = 1.0 - confidence
    low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return point, float(low), float(high)


def area_under_curve(steps: np.ndarray | Sequence[float], values: np.ndarray | Sequence[float]) -> float:
    """Trapezoidal area under ``values(steps)`` divided by the step span: the curve's time-average.

    A run that learns faster has a larger value at equal final return; the unit is the return's.
    A single point gives that point; no points gives NaN.
    """
    x, y = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"steps and values differ in shape: {x.shape} vs {y.shape}")
    if x.size == 0:
        return math.nan
    if x.size == 1 or x[-1] == x[0]:
        return float(y.mean())
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0) / (x[-1] - x[0]))
