"""Learning curves across seeds: grouping, alignment on a common step grid, mean and spread, figure, CSV.

Runs are grouped by any config keys (by default their kind's: ``network.parameterization`` for the
native DQN, as in the paper's Figure 5; the policy and its parameterization for SB3) and split into
panels by another (``task``: ``env.name`` or ``env_id``, one panel per game). Each run's curve is
linearly interpolated onto the union of all runs' logged steps *within that run's own range* (no
extrapolation), so seeds whose logging steps differ by a few agent steps still line up; the spread is
computed over the runs present at each step.
"""

from __future__ import annotations

import csv
import io
import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from wn_rl.analysis.runs import EVAL_RETURN, RUN_KINDS, TRAIN_RETURN, RunData
from wn_rl.checkpoint import atomic_write_bytes
from wn_rl.config import ConfigError

__all__ = [
    "TRAINING_RETURN_TAGS",
    "Curve",
    "MissingExtraError",
    "aggregate_curve",
    "check_figure_path",
    "group_label",
    "group_runs",
    "plot_curves",
    "plot_sweep",
    "pyplot",
    "smooth",
    "write_curves_csv",
]

Spread = Literal["std", "sem", "minmax", "none"]
RunSummaryLike = Any  # wn_rl.analysis.report.RunSummary (imported there from here)
SPREADS = ("std", "sem", "minmax", "none")
TRAINING_RETURN_TAGS = (TRAIN_RETURN, *(kind.tags[TRAIN_RETURN] for kind in RUN_KINDS))
"the tags of training returns, which the figures smooth (one episode's return is noisy)."


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the pip extra that brings it."""


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend. Without matplotlib (an optional extra) a
    :class:`MissingExtraError` naming the install command, which scripts check before any training."""
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingExtraError(
            f"figures need matplotlib ({exc}): python -m pip install -e '.[plot]' (or 'matplotlib>=3.7')"
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclass(frozen=True)
class Curve:
    """Mean and spread of one tag over the runs of one group in one panel."""

    panel: str
    group: str
    tag: str
    steps: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    count: np.ndarray
    "runs contributing at each step."


def group_label(run: RunData, keys: Sequence[str] | None = None) -> str:
    """``weight_norm`` for one key; ``weight_norm, lr=0.0003`` when grouping by several; by the run's
    kind's keys (:attr:`wn_rl.analysis.runs.RunKind.group_by`) when none are given."""
    parts = []
    for i, key in enumerate(keys or run.kind.group_by):
        value = run.value(key, "?")
        parts.append(str(value) if i == 0 else f"{key.split('.')[-1]}={value}")
    return ", ".join(parts)


def group_runs(
    runs: Sequence[RunData], group_by: Sequence[str] | None, panel_by: str | None
) -> dict[str, dict[str, list[RunData]]]:
    """``{panel: {group: [runs]}}``, panels and groups in first-seen order: groups by :func:`group_label`,
    panels by the value of ``panel_by`` (a config key or common name, ``task``), one panel for None."""
    out: dict[str, dict[str, list[RunData]]] = {}
    for run in runs:
        panel = str(run.value(panel_by, "?")) if panel_by else "all runs"
        out.setdefault(panel, {}).setdefault(group_label(run, group_by), []).append(run)
    return out


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` points (shorter at the start); ``window <= 1`` is identity."""
    if window <= 1 or values.size == 0:
        return values
    cumulative = np.cumsum(np.insert(values.astype(float), 0, 0.0))
    idx = np.arange(1, values.size + 1)
    start = np.maximum(idx - window, 0)
    return (cumulative[idx] - cumulative[start]) / (idx - start)


def aggregate_curve(
    runs: Sequence[RunData], tag: str, *, spread: Spread = "std", smoothing: int = 1, panel: str = "", group: str = ""
) -> Curve:
    """Align the runs' ``tag`` curves on a common grid and reduce across runs."""
    if spread not in SPREADS:
        raise ValueError(f"spread={spread!r}: expected one of {SPREADS}")
    curves = [run.curve(tag) for run in runs]
    curves = [(s, smooth(v, smoothing)) for s, v in curves if s.size]
    if not curves:
        empty = np.zeros(0)
        return Curve(panel, group, tag, empty, empty, empty, empty, np.zeros(0, dtype=int))
    grid = np.unique(np.concatenate([s for s, _ in curves])).astype(float)
    table = np.full((len(curves), grid.size), np.nan)
    for i, (steps, values) in enumerate(curves):
        inside = (grid >= steps[0]) & (grid <= steps[-1])
        table[i, inside] = np.interp(grid[inside], steps, values)
    count = np.sum(~np.isnan(table), axis=0)
    mean = np.nanmean(table, axis=0)
    if spread == "minmax":
        low, high = np.nanmin(table, axis=0), np.nanmax(table, axis=0)
    elif spread == "none":
        low, high = mean, mean
    else:
        # the sample std across runs, as the tables and the sweep figure give it (0 where one run covers a step)
        std = np.zeros(grid.size)
        several = count > 1
        std[several] = np.nanstd(table[:, several], axis=0, ddof=1)
        width = std / np.sqrt(np.maximum(count, 1)) if spread == "sem" else std
        low, high = mean - width, mean + width
    return Curve(panel, group, tag, grid, mean, low, high, count)


def collect_curves(
    grouped: dict[str, dict[str, list[RunData]]], tags: Sequence[str], *, spread: Spread, smoothing: dict[str, int]
) -> list[Curve]:
    """Every (panel, group, tag) curve of a grouping."""
    return [
        aggregate_curve(runs, tag, spread=spread, smoothing=smoothing.get(tag, 1), panel=panel, group=group)
        for panel, groups in grouped.items()
        for tag in tags
        for group, runs in groups.items()
    ]


def write_curves_csv(curves: Sequence[Curve], path: str | Path) -> Path:
    """The numbers behind the figure: one row per (panel, group, tag, step); written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["panel", "group", "tag", "agent_step", "mean", "low", "high", "runs"])
    for c in curves:
        for row in zip(c.steps, c.mean, c.low, c.high, c.count, strict=True):
            writer.writerow([c.panel, c.group, c.tag, int(row[0]), *(f"{x:.6g}" for x in row[1:4]), int(row[4])])
    atomic_write_bytes(path, text.getvalue().encode())
    return path


_TITLES = {
    **{kind.tags[TRAIN_RETURN]: f"training episode return ({kind.name})" for kind in RUN_KINDS},
    **{kind.tags[EVAL_RETURN]: f"evaluation return ({kind.name})" for kind in RUN_KINDS},
    TRAIN_RETURN: "training episode return",
    EVAL_RETURN: "evaluation return",
}


def plot_curves(curves: Sequence[Curve], path: str | Path, *, title: str = "", spread: Spread = "std") -> Path:
    """A grid of panels (columns) by tags (rows), one line with a shaded spread per group."""
    plt = pyplot()

    panels = list(dict.fromkeys(c.panel for c in curves))
    tags = list(dict.fromkeys(c.tag for c in curves))
    groups = list(dict.fromkeys(c.group for c in curves))
    colors = {g: plt.get_cmap("tab10")(i % 10) for i, g in enumerate(groups)}
    fig, axes = plt.subplots(
        len(tags), len(panels), figsize=(3.6 * len(panels) + 0.6, 2.8 * len(tags) + 0.6), squeeze=False
    )
    for c in curves:
        ax = axes[tags.index(c.tag), panels.index(c.panel)]
        if c.steps.size == 0:
            continue
        n = int(c.count.max())
        ax.plot(c.steps, c.mean, color=colors[c.group], label=f"{c.group} (n={n})", lw=1.6)
        if spread != "none":
            ax.fill_between(c.steps, c.low, c.high, color=colors[c.group], alpha=0.2, lw=0)
    for row, tag in enumerate(tags):
        for col, panel in enumerate(panels):
            ax = axes[row, col]
            ax.set_title(f"{panel}: {_TITLES.get(tag, tag)}", fontsize=9)
            ax.set_xlabel("agent steps", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
    spread_text = {"std": "mean ± std", "sem": "mean ± s.e.m.", "minmax": "mean, min-max", "none": "mean"}[spread]
    _suptitle(fig, f"{title} ({spread_text} across seeds)" if title else f"{spread_text} across seeds")
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_sweep(
    runs: Sequence[RunData],
    summaries: Sequence[RunSummaryLike],
    sweep_key: str,
    group_by: Sequence[str],
    path: str | Path,
    *,
    title: str = "",
) -> Path:
    """Final and area-under-curve evaluation return against a swept config value (log x for positive
    numbers), one line per group with mean ± std across seeds and every run as a dot: the paper's
    learning-rate robustness question (section 2.1) as a figure."""
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    groups = list(dict.fromkeys(group_label(r, group_by) for r in runs))
    for i, group in enumerate(groups):
        color = plt.get_cmap("tab10")(i % 10)
        members = [(r.value(sweep_key), s) for r, s in zip(runs, summaries, strict=True) if s.group == group]
        xs = sorted({x for x, _ in members})
        for ax, attribute in zip(axes, ("final_eval", "auc_eval"), strict=True):
            per_x = [np.array([getattr(s, attribute) for x, s in members if x == value]) for value in xs]
            means = np.array([np.nanmean(v) for v in per_x])
            stds = np.array(
                [np.nanstd(v, ddof=1) if np.count_nonzero(~np.isnan(v)) > 1 else 0.0 for v in per_x]
            )  # sample std, as the tables
            ax.errorbar(xs, means, yerr=stds, color=color, marker="o", capsize=3, label=group)
            for value, v in zip(xs, per_x, strict=True):
                ax.scatter([value] * v.size, v, color=color, s=8, alpha=0.4)
    numeric = all(isinstance(r.value(sweep_key), (int, float)) and r.value(sweep_key) > 0 for r in runs)
    for ax, name in zip(axes, ("final evaluation return", "evaluation return, area under curve / steps"), strict=True):
        if numeric:
            ax.set_xscale("log")
        ax.set_xlabel(sweep_key, fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.tick_params(labelsize=7)
    _suptitle(fig, f"{title} (mean ± std across seeds; dots: runs)" if title else "mean ± std across seeds")
    fig.tight_layout()
    return _save_figure(fig, path)


_TITLE_POINTS = 10
_CHARACTER_WIDTH = 0.75  # a character's width in DejaVu Sans, in units of the font size (with room: "m", "_")


def _suptitle(fig: Any, text: str) -> None:
    """The figure's title, wrapped to its width: a long study name over one panel ran off both edges."""
    width = int(fig.get_figwidth() * 72 / (_TITLE_POINTS * _CHARACTER_WIDTH))
    fig.suptitle(textwrap.fill(text, width=max(width, 20)), fontsize=_TITLE_POINTS)


def _figure_path(path: str | Path) -> Path:
    """``path``, with ``.png`` added when it has no suffix (as matplotlib's savefig does)."""
    path = Path(path)
    return path if path.suffix else path.with_name(path.name + ".png")


def check_figure_path(path: str | Path) -> Path:
    """The path :func:`plot_curves` writes for ``path``, checked before any run is read: a format matplotlib
    writes (from the suffix) and a folder that exists or can be created (created here, as the figure would be);
    else a :class:`ConfigError` naming the path. Needs matplotlib (:func:`pyplot`)."""
    pyplot()
    from matplotlib.backend_bases import FigureCanvasBase

    path = _figure_path(path)
    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    if path.suffix.lstrip(".").lower() not in formats:
        raise ConfigError(
            f"{path}: matplotlib cannot write a {path.suffix} figure; use one of {', '.join(formats)} as the suffix "
            f"(e.g. {path.with_suffix('.png')})"
        )
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give a file name in it, e.g. {path / 'curves.png'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"{path}: its folder {path.parent} cannot be created ({exc.strerror or exc}); give a path in a folder "
            "you can write to"
        ) from None
    if not os.access(path.parent, os.W_OK):
        raise ConfigError(f"{path}: its folder {path.parent} is not writable; give a path in a folder you can write to")
    return path


def _save_figure(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` (format from the suffix; none: ``.png`` added) atomically: a kill or a full
    disk leaves the previous figure, never a truncated one; closes the figure. Returns the path written."""
    plt = pyplot()

    path = _figure_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = io.BytesIO()
    try:
        fig.savefig(image, format=path.suffix.lstrip(".").lower() or "png", dpi=120)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, image.getvalue())
    return path
