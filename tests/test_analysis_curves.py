"""Curves and tables from real TensorBoard event files written with ``SummaryWriter``; plot_curves.py."""

from __future__ import annotations

import builtins
import csv
import importlib.util
import os
import re
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from torch.utils.tensorboard import SummaryWriter

from wn_rl import checkpoint as ck
from wn_rl.analysis.curves import (
    MissingExtraError,
    aggregate_curve,
    group_runs,
    plot_sweep,
    pyplot,
    smooth,
    write_curves_csv,
)
from wn_rl.analysis.curves import plot_curves as plot_curves_figure
from wn_rl.analysis.report import aggregate_rows, improvement_rows, overall_rows, summarize_run, write_csv
from wn_rl.analysis.runs import find_run_dirs, load_run, read_scalars, run_progress

REPO = Path(__file__).resolve().parents[1]


def _load_script(name: str):
    path = REPO / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"wn_rl_script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plot_curves = _load_script("plot_curves")


def write_run(
    root: Path,
    name: str,
    parameterization: str,
    seed: int,
    game: str,
    evals: dict[int, float],
    total_agent_steps: int | None = None,
) -> Path:
    """A run directory as the DQN runner writes it: config.yaml and tb/ with train and eval scalars.
    The budget is the last evaluation's step unless given (larger: a run that stopped short of it)."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    config = {
        "env": {"suite": "minatar", "name": game},
        "network": {"parameterization": parameterization},
        "agent": {"lr": 3e-4 if parameterization == "weight_norm" else 1e-4},
        "run": {"seed": seed, "total_agent_steps": total_agent_steps or max(evals)},
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
    np.testing.assert_allclose(normal.high - normal.mean, [2**0.5, 2**0.5])  # the sample std of (1, 3)
    sem = aggregate_curve(grouped["breakout"]["normal"], "eval/return_mean", spread="sem")
    np.testing.assert_allclose(sem.high - sem.mean, [1.0, 1.0])  # sqrt(2) / sqrt(2 runs)
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
    eval_rows = [r for r in rows if r["tag"] == "eval return" and r["panel"] == "asterix" and r["group"] == "normal"]
    assert [(int(r["agent_step"]), float(r["mean"]), int(r["runs"])) for r in eval_rows] == [
        (500, 2.0, 2),
        (1000, 3.0, 2),
    ]
    table = out.with_suffix(".md").read_text()
    assert table.count("| breakout |") == 2 + 4  # two aggregate rows and every run


def test_a_failed_rerun_of_plot_curves_leaves_the_previous_outputs_whole(
    study_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "figs" / "curves.png"
    assert plot_curves.main([str(study_dir), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.parent.iterdir()}
    import matplotlib.figure

    def savefig(self, target, **kwargs):  # writes part of the image, then the disk is full (or a kill)
        if hasattr(target, "write"):
            target.write(b"\x89PNG half")
        else:
            Path(target).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    def writerow(self, row):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    with pytest.raises(OSError):
        plot_curves.main([str(study_dir), "--out", str(out)])
    runs = [load_run(d) for d in find_run_dirs([study_dir])]
    curves = [aggregate_curve(runs, "eval/return_mean")]
    real_writer = csv.writer
    half_row = lambda f: SimpleNamespace(writerow=lambda row: (f.write("half,"), writerow(None, row)))  # noqa: E731
    monkeypatch.setattr(csv, "writer", half_row)
    with pytest.raises(OSError):
        write_curves_csv(curves, out.with_suffix(".csv"))
    monkeypatch.setattr(csv, "writer", real_writer)
    monkeypatch.setattr(csv.DictWriter, "writerows", writerow)
    with pytest.raises(OSError):
        write_csv([{"a": 1}], out.with_suffix(".md"))
    assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == before


def test_a_figure_path_without_a_suffix_gets_png_as_with_matplotlib(study_dir: Path, tmp_path: Path) -> None:
    runs = [load_run(d) for d in find_run_dirs([study_dir])]
    written = plot_curves_figure([aggregate_curve(runs, "eval/return_mean")], tmp_path / "curves")
    assert written == tmp_path / "curves.png" and written.read_bytes()[:4] == b"\x89PNG"


def test_plot_curves_script_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert plot_curves.main([str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert plot_curves.main([str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")]) == 2
    assert "no run directories" in capsys.readouterr().err
    write_run(tmp_path / "runs", "a", "normal", 0, "breakout", {500: 1.0})
    assert plot_curves.main([str(tmp_path / "runs"), "--out", str(tmp_path / "x.png"), "--tags", "nope"]) == 2
    assert "none of the 1 runs logged" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "match"),
    [
        (["--group-by", "network.parametrization"], r"network\.parametrization: .*'network\.parameterization'"),
        (["--group-by", "seed", "agent.lrr"], r"--group-by agent\.lrr: .*did you mean 'agent\.lr'"),
        (["--panel-by", "env.nme"], r"--panel-by env\.nme: .*did you mean 'env\.name'"),
    ],
)
def test_a_group_or_panel_key_no_run_has_is_an_error(
    study_dir: Path, tmp_path: Path, option: list[str], match: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A misspelt key would group every run under '?': refused, with the nearest key the runs have."""
    out = tmp_path / "fig.png"
    assert plot_curves.main([str(study_dir), "--out", str(out), *option]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(match, err), err
    assert not out.exists()
    # a key some run has, or a common name (seed: run.seed), is fine
    assert plot_curves.main([str(study_dir), "--out", str(out), "--group-by", "seed", "--panel-by", "env.suite"]) == 0


def test_without_matplotlib_scripts_say_which_extra_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """matplotlib is an optional extra: plot_curves.py, study.py and the parameterization comparison stop
    at once with the install command (study.py and the comparison would have trained first, then crashed
    with a traceback at the figure)."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(MissingExtraError, match=r"pip install -e '\.\[plot\]'"):
        pyplot()
    write_run(tmp_path / "runs", "a", "normal", 0, "breakout", {500: 1.0})
    assert plot_curves.main([str(tmp_path / "runs"), "--out", str(tmp_path / "x.png")]) == 2
    assert ".[plot]" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
    study = _load_script("study")
    assert study.main([str(REPO / "configs" / "studies" / "smoke_cartpole.yaml"), f"runs_dir={tmp_path}"]) == 2
    assert ".[plot]" in capsys.readouterr().err and not any((tmp_path / "smoke_cartpole").glob("*"))
    from wn_rl.models.cli import exit_on_error
    from wn_rl.models.comparison import CompareConfig, run_comparison

    with pytest.raises(SystemExit) as stop, exit_on_error():
        run_comparison(CompareConfig())  # stops before reading any data
    assert stop.value.code == 2 and ".[plot]" in capsys.readouterr().err


def _eval_means(csv_path: Path, panel: str, group: str) -> list[tuple[int, float, int]]:
    with csv_path.open() as f:
        rows = [r for r in csv.DictReader(f) if (r["tag"], r["panel"], r["group"]) == ("eval return", panel, group)]
    return [(int(r["agent_step"]), float(r["mean"]), int(r["runs"])) for r in rows]


def test_plot_curves_leaves_incomplete_runs_out_and_says_why(
    study_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # stopped at 500 of its 1,000 agent steps, with an early evaluation far above the complete runs'
    write_run(study_dir, "breakout_n2", "normal", 2, "breakout", {500: 100.0}, total_agent_steps=1000)
    out = tmp_path / "figs" / "curves.png"
    assert plot_curves.main([str(study_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "breakout_n2" in printed and "500 of 1,000" in printed and "--include-incomplete" in printed
    assert _eval_means(out.with_suffix(".csv"), "breakout", "normal") == [(500, 2.0, 2), (1000, 3.0, 2)]
    table = out.with_suffix(".md").read_text()
    left_out = table.split("## Runs left out of the aggregates", 1)[1].split("\n## ", 1)[0]
    assert "breakout_n2" in left_out and "500 of 1,000" in left_out and "short of its budget" in left_out
    assert "--include-incomplete" in table and table.count("breakout_n2") == 2  # left out, and every run
    assert "| breakout | normal | 2 | 2 | 1 |" in table  # runs aggregated, complete, incomplete

    assert plot_curves.main([str(study_dir), "--out", str(out), "--include-incomplete"]) == 0
    assert "breakout_n2" not in capsys.readouterr().out
    means = _eval_means(out.with_suffix(".csv"), "breakout", "normal")
    assert means == [(500, pytest.approx((1.0 + 3.0 + 100.0) / 3, rel=1e-5), 3), (1000, 3.0, 2)]
    assert "## Runs left out" not in out.with_suffix(".md").read_text()

    write_run(tmp_path / "early", "a", "normal", 0, "breakout", {500: 1.0}, total_agent_steps=1000)
    assert plot_curves.main([str(tmp_path / "early"), "--out", str(tmp_path / "x.png")]) == 2
    captured = capsys.readouterr()
    assert "none of the 1 runs is complete" in captured.err and "--include-incomplete" in captured.err
    assert "500 of 1,000" in captured.out


def _save(directory: Path, step: int) -> Path:
    payload = {"weights": torch.arange(1000, dtype=torch.float32) * step}
    return ck.save_checkpoint(directory / f"checkpoint_{step:012d}.pt", payload, metadata={"agent_step": step})


def test_progress_reads_markers_never_whole_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A progress check (several per run per study or plot command) stats the newest checkpoint and
    reads its marker; it never reads or hashes the payload, which holds GBs with the replay memory."""
    (tmp_path / "checkpoints").mkdir()
    old, new = _save(tmp_path / "checkpoints", 100), _save(tmp_path / "checkpoints", 200)
    real_open = builtins.open

    def open_no_payload(file, *args, **kwargs):
        assert not str(file).endswith(".pt"), f"a progress check opened {file}"
        return real_open(file, *args, **kwargs)

    def no_hashing(*args):
        raise AssertionError("a progress check hashed a checkpoint")

    with monkeypatch.context() as patch:
        patch.setattr(builtins, "open", open_no_payload)
        patch.setattr(ck, "hashlib", SimpleNamespace(sha256=no_hashing))
        assert run_progress(tmp_path) == 200
        new.write_bytes(new.read_bytes()[:-1])  # truncated: its size is not the one the marker records
        with pytest.warns(UserWarning, match="skipping damaged checkpoint.*truncated"):
            assert run_progress(tmp_path) == 100
        new.unlink()  # a marker whose file is gone
        assert run_progress(tmp_path) == 100
    # corrupted in place with its size kept: progress cannot tell without hashing; loading still can
    data = bytearray(old.read_bytes())
    data[300] ^= 0xFF
    old.write_bytes(bytes(data))
    assert run_progress(tmp_path) == 100
    with pytest.raises(ck.CheckpointError, match="SHA-256"):
        ck.load_checkpoint(old)
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        assert ck.latest_checkpoint(tmp_path / "checkpoints") is None


def _sb3_overrides(runs_dir: Path, *extra: str) -> list[str]:
    """A few hundred steps of SB3's DQN on CartPole (seconds), written under ``runs_dir``."""
    return [
        "total_timesteps=300",
        "hyperparameters.learning_starts=100",
        "hyperparameters.train_freq=4",
        "hyperparameters.gradient_steps=1",
        "init.n_samples=64",
        "wn_stats_freq=0",
        "progress_bar=false",
        "verbose=0",
        "torch_threads=1",
        f"runs_dir={runs_dir}",
        *extra,
    ]


def test_sb3_runs_progress_and_completion(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What ``wn_rl.sb3.runner`` writes: checkpoints/model_<steps>_steps.zip, and final_model.zip with
    final_steps.json when training ends, also when a signal stopped it short of ``total_timesteps``."""
    pytest.importorskip("stable_baselines3")
    from wn_rl.sb3.config import load_sb3_config
    from wn_rl.sb3.runner import SB3Run

    overrides = _sb3_overrides(tmp_path, "checkpoint_freq=100", "eval.freq=0")
    for name in ("finished", "stopped"):
        run = SB3Run(load_sb3_config(REPO / "configs/sb3/dqn_cartpole_wn.yaml", overrides), tmp_path / name)
        if name == "stopped":
            run.stop.stop_signal = signal.SIGTERM  # as a SIGTERM at the first step: the final model is saved early
        run.train()
    finished, stopped = tmp_path / "finished", tmp_path / "stopped"
    assert run_progress(finished) == 300 and run_progress(stopped) == 1
    done, short = (summarize_run(load_run(d), ["policy"], "env_id") for d in (finished, stopped))
    assert (done.complete, done.agent_steps, done.total_agent_steps) == (True, 300, 300)
    assert (short.complete, short.agent_steps, short.total_agent_steps) == (False, 1, 300)

    out = tmp_path / "sb3.png"
    args = ["--group-by", "policy", "--panel-by", "env_id", "--tags", "rollout/ep_rew_mean"]
    assert plot_curves.main([str(finished), str(stopped), "--out", str(out), *args]) == 0
    printed = capsys.readouterr().out
    assert f"{stopped}: 1 of 300 agent steps: short of its budget" in printed and f"{finished}:" not in printed
    assert "1 of 2 runs ->" in printed

    # killed hard (SIGKILL) before the end: no final model, the checkpoints say how far it got
    for path in (finished / "final_model.zip", finished / "final_steps.json"):
        path.unlink()
    checkpoints = finished / "checkpoints"
    assert run_progress(finished) == 300  # its last checkpoint is at the budget
    (checkpoints / "model_300_steps.zip").unlink()
    assert run_progress(finished) == 200
    os.truncate(checkpoints / "model_200_steps.zip", 1000)  # a zip without its end is no model
    with pytest.warns(UserWarning, match="skipping damaged model .*model_200_steps.zip"):
        assert run_progress(finished) == 100
        run = load_run(finished)
        summary = summarize_run(run, ["policy"], "env_id")
    # how far it got: its newest intact model or its logged training returns (SB3 logs them when an
    # episode ends), whichever went further, as for a native run
    logged = int(run.curve("rollout/ep_rew_mean")[0][-1])
    assert 100 < logged <= 300 and summary.agent_steps == logged and summary.complete == (logged == 300)


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
            "runs": "0 vs 0",
            "final eval [95% CI]": "n/a (no task in common)",
            "AUC eval [95% CI]": "n/a (no task in common)",
        }
    ]


def _sb3_run(runs_dir: Path, name: str, config: str, *extra: str) -> Path:
    """A real SB3 run through scripts/train_sb3.py, evaluated (2 games) every 100 steps."""
    train_sb3 = _load_script("train_sb3")
    overrides = _sb3_overrides(runs_dir, f"run_name={name}", "eval.freq=100", "eval.episodes=2", *extra)
    assert train_sb3.main(["--config", str(REPO / "configs" / "sb3" / config), *overrides]) == 0
    return runs_dir / name


def _csv_curve(csv_path: Path, tag: str, panel: str, group: str) -> list[tuple[int, float]]:
    with csv_path.open() as f:
        rows = [r for r in csv.DictReader(f) if (r["tag"], r["panel"], r["group"]) == (tag, panel, group)]
    return [(int(r["agent_step"]), float(r["mean"])) for r in rows]


def test_sb3_runs_are_read_with_their_own_tags_and_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """SB3 logs rollout/ep_rew_mean and eval/mean_reward and keeps seed, learning rate, task and budget
    under its own config keys: plot_curves draws, tabulates and groups SB3 runs without being told."""
    pytest.importorskip("stable_baselines3")
    wn = _sb3_run(tmp_path / "runs", "wn", "dqn_cartpole_wn.yaml")
    normal = _sb3_run(tmp_path / "runs", "normal", "dqn_cartpole_normal.yaml", "seed=1")
    capsys.readouterr()
    evaluations = np.load(wn / "eval" / "evaluations.npz")
    eval_means = evaluations["results"].mean(axis=1)
    assert list(evaluations["timesteps"]) == [100, 200, 300]
    wn_group, normal_group = "WnMlpPolicy, parameterization=weight_norm", "MlpPolicy, parameterization=?"

    summary = summarize_run(load_run(wn))
    assert (summary.task, summary.group, summary.seed) == ("CartPole-v1", wn_group, 0)
    assert summary.lr == pytest.approx(2.3e-3) and summary.complete and summary.evaluations == 3
    assert summary.final_eval == pytest.approx(eval_means[-1]) and summary.max_eval == pytest.approx(eval_means.max())
    assert np.isfinite(summary.final_train)
    assert summarize_run(load_run(normal)).group == normal_group

    out = tmp_path / "sb3.png"
    curves = out.with_suffix(".csv")
    assert plot_curves.main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    curve = _csv_curve(curves, "eval return", "CartPole-v1", wn_group)
    assert [step for step, _ in curve] == [100, 200, 300]
    np.testing.assert_allclose([mean for _, mean in curve], eval_means, rtol=1e-5)
    assert _csv_curve(curves, "train return", "CartPole-v1", normal_group)
    table = out.with_suffix(".md").read_text()
    every_run = table.split("## Every run", 1)[1]
    assert f"| CartPole-v1 | {wn_group} | 0 | 0.0023 | 300 | 3 |" in every_run
    assert f"| CartPole-v1 | {normal_group} | 1 | 0.0023 | 300 | 3 |" in every_run
    assert "n/a" not in table

    # both kinds in one call: each run read with its own tags and keys, CartPole-v1 one panel for both
    write_run(tmp_path / "runs", "native", "weight_norm", 0, "CartPole-v1", {100: 7.0, 300: 9.0})
    assert plot_curves.main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    assert _csv_curve(curves, "eval return", "CartPole-v1", "weight_norm") == [(100, 7.0), (300, 9.0)]
    curve = _csv_curve(curves, "eval return", "CartPole-v1", wn_group)
    np.testing.assert_allclose([mean for _, mean in curve], eval_means, rtol=1e-5)
    assert "| CartPole-v1 | weight_norm | 0 | 0.0003 |" in out.with_suffix(".md").read_text()


def test_a_run_a_study_driver_holds_is_said_to_be_running(
    study_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = write_run(study_dir, "breakout_n2", "normal", 2, "breakout", {500: 100.0}, total_agent_steps=1000)
    (run_dir / "study.lock").write_text("host 123")
    out = tmp_path / "curves.png"
    assert plot_curves.main([str(study_dir), "--out", str(out)]) == 0
    assert f"{run_dir}: 500 of 1,000 agent steps, running: study.lock present" in capsys.readouterr().out
    left_out = out.with_suffix(".md").read_text().split("## Runs left out of the aggregates", 1)[1]
    assert "| breakout_n2 | breakout | normal | 2 | 500 of 1,000 agent steps, running: study.lock present" in left_out


@pytest.mark.parametrize("figure", ["curves", "sweep"])
def test_a_long_study_name_stays_inside_a_one_panel_figure(
    study_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, figure: str
) -> None:
    """The title is wrapped to the figure's width: a long study name over one panel ran off both edges."""
    import wn_rl.analysis.curves as curves_module

    saved = []
    save = curves_module._save_figure
    monkeypatch.setattr(curves_module, "_save_figure", lambda fig, path: saved.append(fig) or save(fig, path))
    title = "minatar_lr_top_parameterizations_100k_with_a_longer_name"
    runs = [load_run(d) for d in find_run_dirs([study_dir]) if "breakout" in d.name]
    if figure == "curves":
        grouped = group_runs(runs, ["network.parameterization"], "env.name")
        curves = [
            aggregate_curve(r, "eval/return_mean", panel="breakout", group=g) for g, r in grouped["breakout"].items()
        ]
        plot_curves_figure(curves, tmp_path / "c.png", title=title)
    else:
        summaries = [summarize_run(r, ["network.parameterization"]) for r in runs]
        plot_sweep(runs, summaries, "agent.lr", ["network.parameterization"], tmp_path / "s.png", title=title * 2)
    (fig,) = saved
    box, page = fig._suptitle.get_window_extent(), fig.bbox
    assert title in fig._suptitle.get_text().replace("\n", "")
    assert box.x0 >= page.x0 and box.x1 <= page.x1, (box, page)


def test_a_native_run_made_before_a_key_existed_reads_it_as_the_code_did_then(tmp_path: Path) -> None:
    """Old runs beside new ones group by a key added since (here ``network.init``, from study 2l): the old
    ones read the value that does what the code did when they ran (``with_older_defaults``), not a missing key."""
    old = write_run(tmp_path, "old", "normal", 0, "breakout", {500: 1.0})
    new = write_run(tmp_path, "new", "normal", 0, "breakout", {500: 2.0})
    config = yaml.safe_load((new / "config.yaml").read_text())
    config["network"]["init"] = "torch_default"
    (new / "config.yaml").write_text(yaml.safe_dump(config))
    assert load_run(old).value("network.init") == "data_dependent"
    assert load_run(new).value("network.init") == "torch_default"
    assert load_run(old).value("agent.epsilon_decay_after_learning_starts") is False
    figure = tmp_path / "fig.png"
    assert plot_curves.main([str(old), str(new), "--out", str(figure), "--group-by", "network.init"]) == 0
    groups = {row["group"] for row in csv.DictReader(figure.with_suffix(".csv").open())}
    assert groups == {"data_dependent", "torch_default"}


def test_an_sb3_run_made_before_init_method_existed_reads_data_dependent(tmp_path: Path) -> None:
    """SB3 runs group by ``init.method`` (added with the torch-default ablation): older runs read the init they ran."""
    for name, init in [("old", {"enabled": True, "n_samples": 256}), ("new", {"method": "torch_default"})]:
        (tmp_path / name).mkdir()
        config = {"algo": "dqn", "env_id": "CartPole-v1", "policy": "WnMlpPolicy", "seed": 0, "init": init}
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump(config))
    assert load_run(tmp_path / "old").value("init.method") == "data_dependent"
    assert load_run(tmp_path / "old").value("init.n_samples") == 256
    assert load_run(tmp_path / "new").value("init.method") == "torch_default"
