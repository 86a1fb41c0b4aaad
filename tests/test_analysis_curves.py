"""Curves and tables from real TensorBoard event files written with ``SummaryWriter``; plot_curves.py."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import yaml
from torch.utils.tensorboard import SummaryWriter

from wn_rl.analysis.curves import aggregate_curve, group_runs, plot_sweep, smooth
from wn_rl.analysis.report import aggregate_rows, improvement_rows, overall_rows, summarize_run
from wn_rl.analysis.runs import find_run_dirs, load_run, read_scalars


def _load_script(name: str):
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"wn_rl_script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plot_curves = _load_script("plot_curves")


def write_run(root: Path, name: str, parameterization: str, seed: int, game: str, evals: dict[int, float]) -> Path:
    """A run directory as the DQN runner writes it: config.yaml and tb/ with train and eval scalars."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    config = {
        "env": {"suite": "minatar", "name": game},
        "network": {"parameterization": parameterization},
        "agent": {"lr": 3e-4 if parameterization == "weight_norm" else 1e-4},
        "run": {"seed": seed, "total_agent_steps": max(evals)},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    writer = SummaryWriter(str(run_dir / "tb"))
    for step in range(100, max(evals) + 1, 100):
        writer.add_scalar("train/episode_return", step / 100 + seed, step)
    for step, value in evals.items():
        writer.add_scalar("eval/return_mean", value, step)
    writer.close()
    return run_dir


@pytest.fixture
def study_dir(tmp_path: Path) -> Path:
    for game in ("breakout", "asterix"):
        write_run(tmp_path, f"{game}_n0", "normal", 0, game, {500: 1.0, 1000: 2.0})
        write_run(tmp_path, f"{game}_n1", "normal", 1, game, {500: 3.0, 1000: 4.0})
        # seed 1 of weight norm logs its evaluations 4 agent steps later, as a vector env can
        write_run(tmp_path, f"{game}_w0", "weight_norm", 0, game, {500: 2.0, 1000: 6.0})
        write_run(tmp_path, f"{game}_w1", "weight_norm", 1, game, {504: 4.0, 1004: 8.0})
    return tmp_path


def test_read_scalars_keeps_every_point_and_the_newest_duplicate(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path / "tb"))
    for step in range(2000):  # more than TensorBoard's default reservoir of 1000 scalars
        writer.add_scalar("x", float(step), step)
    writer.close()
    resumed = SummaryWriter(str(tmp_path / "tb"))  # a resumed run writes a second event file
    resumed.add_scalar("x", -1.0, 1999)
    resumed.close()
    steps, values = read_scalars(tmp_path)["x"]
    assert steps.size == 2000 and values[0] == 0.0 and values[-1] == -1.0


def test_groups_panels_and_aggregate_numbers(study_dir: Path) -> None:
    runs = [load_run(d) for d in find_run_dirs([study_dir])]
    grouped = group_runs(runs, ["network.parameterization"], "env.name")
    assert set(grouped) == {"breakout", "asterix"}
    assert {g: len(r) for g, r in grouped["breakout"].items()} == {"normal": 2, "weight_norm": 2}
    normal = aggregate_curve(grouped["breakout"]["normal"], "eval/return_mean")
    np.testing.assert_allclose(normal.steps, [500, 1000])
    np.testing.assert_allclose(normal.mean, [2.0, 3.0])
    np.testing.assert_allclose(normal.high - normal.mean, [1.0, 1.0])  # population std of (1, 3)
    wn = aggregate_curve(grouped["breakout"]["weight_norm"], "eval/return_mean", spread="minmax")
    np.testing.assert_allclose(wn.steps, [500, 504, 1000, 1004])
    # at step 1000 seed 1 is interpolated between (504, 4) and (1004, 8): 4 + 4 * 496 / 500
    assert wn.mean[2] == pytest.approx((6.0 + 4.0 + 4.0 * 496 / 500) / 2)
    # outside a run's own range it does not count: step 500 has only seed 0, step 1004 only seed 1
    np.testing.assert_array_equal(wn.count, [1, 2, 2, 1])
    assert wn.mean[0] == 2.0 and wn.mean[-1] == 8.0
    by_two = group_runs(runs, ["network.parameterization", "agent.lr"], None)
    assert set(by_two["all runs"]) == {"normal, lr=0.0001", "weight_norm, lr=0.0003"}


def test_smooth_is_a_trailing_mean() -> None:
    np.testing.assert_allclose(smooth(np.array([0.0, 2.0, 4.0, 6.0]), 2), [0.0, 1.0, 3.0, 5.0])
    np.testing.assert_allclose(smooth(np.array([1.0, 5.0]), 1), [1.0, 5.0])


def test_tables_from_runs(study_dir: Path) -> None:
    runs = [load_run(d) for d in find_run_dirs([study_dir])]
    summaries = [summarize_run(r, ["network.parameterization"]) for r in runs]
    w0 = next(s for s in summaries if s.run == "breakout_w0")
    assert (w0.final_eval, w0.max_eval) == (6.0, 6.0)
    assert w0.auc_eval == pytest.approx(4.0)  # (2 + 6) / 2 over [500, 1000]
    assert w0.final_train == pytest.approx(9.5)  # mean of step/100 over the last 10 %: steps 900 and 1000
    assert w0.complete and w0.agent_steps == 1000  # no checkpoint, but it logged up to its budget
    rows = {(r["task"], r["group"]): r for r in aggregate_rows(summaries, reps=200)}
    assert rows[("breakout", "normal")]["final eval (mean ± std)"].startswith("3 ± 1.4")
    assert rows[("breakout", "weight_norm")]["runs"] == "2"
    improvement = improvement_rows(summaries, reps=200)
    # weight norm beats normal in every pair on both games: finals (6, 8) vs (2, 4)
    assert improvement[0]["comparison"] == "P(weight_norm > normal)"
    assert improvement[0]["final eval [95% CI]"] == "1.00 [1.00, 1.00]"
    overall = overall_rows(summaries, reps=200)
    assert [r["group"] for r in overall] == ["normal", "weight_norm"]
    # study-max normalised: breakout and asterix both have max 8, so normal's finals are (2, 4) / 8
    assert overall[0]["IQM final eval, study-max normalised [95% CI]"].startswith("0.375")


def test_plot_curves_script_writes_figure_csv_and_table(study_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "figs" / "curves.png"
    assert plot_curves.main([str(study_dir), "--out", str(out), "--spread", "sem"]) == 0
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"
    with out.with_suffix(".csv").open() as f:
        rows = list(csv.DictReader(f))
    eval_rows = [
        r for r in rows if r["tag"] == "eval/return_mean" and r["panel"] == "asterix" and r["group"] == "normal"
    ]
    assert [(int(r["agent_step"]), float(r["mean"]), int(r["runs"])) for r in eval_rows] == [
        (500, 2.0, 2),
        (1000, 3.0, 2),
    ]
    table = out.with_suffix(".md").read_text()
    assert table.count("| breakout |") == 2 + 4  # two aggregate rows and every run


def test_plot_curves_script_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert plot_curves.main([str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert plot_curves.main([str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")]) == 2
    assert "no run directories" in capsys.readouterr().err
    write_run(tmp_path / "runs", "a", "normal", 0, "breakout", {500: 1.0})
    assert plot_curves.main([str(tmp_path / "runs"), "--out", str(tmp_path / "x.png"), "--tags", "nope"]) == 2
    assert "none of the 1 runs logged" in capsys.readouterr().err


def test_sweep_figure(study_dir: Path, tmp_path: Path) -> None:
    runs = [load_run(d) for d in find_run_dirs([study_dir])]
    summaries = [summarize_run(r, ["network.parameterization"]) for r in runs]
    out = plot_sweep(runs, summaries, "agent.lr", ["network.parameterization"], tmp_path / "sweep.png", title="t")
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 10_000


def test_report_of_a_partial_study_where_groups_share_no_task(tmp_path: Path) -> None:
    # analysing a study early: normal has data on breakout only, weight norm on asterix only
    write_run(tmp_path, "breakout_n0", "normal", 0, "breakout", {500: 1.0})
    write_run(tmp_path, "asterix_w0", "weight_norm", 0, "asterix", {500: 2.0})
    runs = [load_run(tmp_path / name) for name in ("breakout_n0", "asterix_w0")]
    summaries = [summarize_run(r, ["network.parameterization"]) for r in runs]
    rows = improvement_rows(summaries, reps=200)
    assert rows == [
        {
            "comparison": "P(weight_norm > normal)",
            "tasks": "0",
            "final eval": "n/a (no task in common)",
            "AUC eval": "n/a (no task in common)",
        }
    ]
