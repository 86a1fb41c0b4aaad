"""A study's tables from run summaries built by hand (no training): tasks with different numbers of runs,
normalisation by each run's own game whatever labels the tasks, runs without evaluations, NaN input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from wn_rl.analysis.report import (
    RunSummary,
    aggregate_rows,
    improvement_rows,
    markdown_table,
    overall_rows,
    summarize_run,
)
from wn_rl.analysis.runs import RunData
from wn_rl.analysis.stats import (
    human_normalized_score,
    improvement_ci,
    interquartile_mean,
    probability_of_improvement,
    stratified_bootstrap_ci,
)


def run(
    task: str,
    group: str,
    seed: int,
    final: float,
    *,
    suite: str = "minatar",
    game: str | None = None,
    complete: bool = True,
) -> RunSummary:
    """A run's summary: max eval is final + 1 and AUC final / 2; NaN final for a run without evaluations."""
    return RunSummary(
        run=f"{task}_{group}_{seed}",
        task=task,
        game=game or task,
        group=group,
        suite=suite,
        seed=seed,
        lr=1e-3,
        agent_steps=100 if complete else 50,
        total_agent_steps=100,
        complete=complete,
        evaluations=0 if math.isnan(final) else 2,
        final_eval=final,
        max_eval=final + 1,
        auc_eval=final / 2,
        final_train=0.0,
        run_dir=Path("/nonexistent"),
    )


FINALS = {
    ("breakout", "normal"): [1.0, 3.0, 2.0],
    ("breakout", "weight_norm"): [4.0, 2.5, 6.0],
    ("asterix", "normal"): [0.5, 0.25, 1.0],
    ("asterix", "weight_norm"): [0.75, 1.5, 0.5],
}


def equal_count_study() -> list[RunSummary]:
    return [run(task, group, seed, v) for (task, group), values in FINALS.items() for seed, v in enumerate(values)]


def test_equal_run_counts_give_the_numbers_they_gave_before() -> None:
    """The strings the report gave with a (runs x tasks) matrix before tasks could have different run
    counts (docs/results.md's numbers were made so): the same to the last digit."""
    summaries = equal_count_study()
    overall = overall_rows(summaries, reps=500)
    assert overall == [
        {
            "group": "normal",
            "tasks": "2",
            "runs per task": "3",
            "IQM final eval, study-max normalised [95% CI]": "0.257 [0.146, 0.379]",
            "IQM AUC eval, study-max normalised [95% CI]": "0.129 [0.073, 0.189]",
        },
        {
            "group": "weight_norm",
            "tasks": "2",
            "runs per task": "3",
            "IQM final eval, study-max normalised [95% CI]": "0.457 [0.304, 0.657]",
            "IQM AUC eval, study-max normalised [95% CI]": "0.229 [0.152, 0.329]",
        },
    ]
    (improvement,) = improvement_rows(summaries, reps=500)
    assert (improvement["final eval [95% CI]"], improvement["AUC eval [95% CI]"]) == ("0.81 [0.50, 1.00]",) * 2
    assert improvement["runs"] == "6 vs 6"
    aggregate = {(r["task"], r["group"]): r for r in aggregate_rows(summaries, reps=500)}
    assert aggregate[("breakout", "weight_norm")]["IQM final eval [95% CI]"] == "4.17 [2.5, 6]"
    assert aggregate[("asterix", "normal")]["IQM AUC [95% CI]"] == "0.292 [0.125, 0.5]"


def test_a_task_mapping_with_equal_counts_bootstraps_as_its_matrix_does() -> None:
    x = np.random.default_rng(1).normal(size=(5, 3))
    y = np.random.default_rng(2).normal(size=(4, 3)).round(0)
    as_mapping = {name: x[:, i] for i, name in enumerate("abc")}
    assert stratified_bootstrap_ci(as_mapping, reps=300, seed=3) == stratified_bootstrap_ci(x, reps=300, seed=3)
    y_mapping = {name: y[:, "abc".index(name)] for name in "cba"}  # y's tasks are matched to x's by name
    assert improvement_ci(as_mapping, y_mapping, reps=300) == improvement_ci(x, y, reps=300)
    assert interquartile_mean(as_mapping) == interquartile_mean(x)


def test_probability_of_improvement_uses_every_run_of_each_task() -> None:
    """Task a has 3 runs per group, task b 2: a (runs x tasks) matrix kept the lowest 2 seeds of a, which
    dropped normal's 10 and made wn always better (1.00 [1.00, 1.00]). Per task, wn's 5 beats normal in
    6 of a's 9 pairs and in all of b's: (2/3 + 1) / 2."""
    summaries = [run("a", "normal", k, v) for k, v in enumerate([0.0, 0.0, 10.0])]
    summaries += [run("a", "wn", k, 5.0) for k in range(3)]
    summaries += [run("b", "normal", k, 0.0) for k in range(2)] + [run("b", "wn", k, 5.0) for k in range(2)]
    expected = (6 / 9 + 1.0) / 2
    (row,) = improvement_rows(summaries, reps=2000)
    # resampled within each task: b never varies; a's three draws of normal hold K ~ Binomial(3, 1/3) tens,
    # so a gives (3 - K) / 3, and P(K = 3) = 1/27 > 2.5 %, P(K = 0) = 8/27: the interval is [(0 + 1) / 2, 1]
    assert row["final eval [95% CI]"] == "0.83 [0.50, 1.00]"
    assert (row["tasks"], row["runs"]) == ("2", "5 vs 5")
    x, y = {"a": [5.0, 5.0, 5.0], "b": [5.0, 5.0]}, {"a": [0.0, 0.0, 10.0], "b": [0.0, 0.0]}
    assert probability_of_improvement(x, y) == pytest.approx(expected)
    assert improvement_ci(x, y, reps=2000) == (pytest.approx(expected), 0.5, 1.0)


def test_overall_iqm_pools_every_run_of_each_task() -> None:
    """Asterix's normal seed 2 is left out (say, incomplete): breakout's normal seed 2 stays in."""
    summaries = [s for s in equal_count_study() if s.run != "asterix_normal_2"]
    overall = {r["group"]: r for r in overall_rows(summaries, reps=500)}
    # study-max normalised: breakout's largest max eval is 6 + 1, asterix's 1.5 + 1
    normal = [1.0 / 7, 3.0 / 7, 2.0 / 7, 0.5 / 2.5, 0.25 / 2.5]
    point = interquartile_mean(normal)
    assert point == pytest.approx((1.0 / 7 + 0.2 + 2.0 / 7) / 3)  # 5 runs: the lowest and highest cut
    assert overall["normal"]["IQM final eval, study-max normalised [95% CI]"].startswith(f"{point:.3f} [")
    assert overall["normal"]["runs per task"] == "2 to 3" and overall["weight_norm"]["runs per task"] == "3"


def test_the_bootstrap_resamples_each_task_with_its_own_count() -> None:
    # [0, 0, 3] resampled three at a time has a mean in {0, 1, 2, 3}: the 95 % interval is [0, 3]
    # (P(all three 0) = 8/27, P(all three 3) = 1/27 > 2.5 %); task b, one run, never moves
    scores = {"a": np.array([0.0, 0.0, 3.0]), "b": np.array([7.0])}
    assert stratified_bootstrap_ci(scores, lambda s: float(s["a"].mean()), reps=5000, seed=1) == (1.0, 0.0, 3.0)
    assert stratified_bootstrap_ci(scores, lambda s: float(s["b"].mean()), reps=500) == (7.0, 7.0, 7.0)
    with pytest.raises(ValueError, match=r"task\(s\) \['b'\] have no runs"):
        stratified_bootstrap_ci({"a": [1.0], "b": []})


def test_an_atari_study_labelled_by_learning_rate_is_human_normalised_by_its_game(tmp_path: Path) -> None:
    """task_key agent.lr labels the tasks 0.0001 and 0.001; the runs are normalised by env.name (breakout):
    the report crashed looking up a game called '0.0001'."""
    runs = []
    for lr in (1e-4, 1e-3):
        for parameterization, final in (("normal", 10.0), ("weight_norm", 20.0)):
            config = {
                "env": {"suite": "atari", "name": "breakout"},
                "agent": {"lr": lr},
                "network": {"parameterization": parameterization},
                "run": {"seed": 0, "total_agent_steps": 1000},
            }
            scalars = {"eval/return_mean": (np.array([500, 1000]), np.array([final / 2, final]))}
            runs.append(RunData(tmp_path / f"{lr}_{parameterization}", config, scalars))
    summaries = [summarize_run(r, ["network.parameterization"], "agent.lr") for r in runs]
    overall = {r["group"]: r for r in overall_rows(summaries, reps=200)}
    assert {(s.task, s.game) for s in summaries} == {("0.0001", "breakout"), ("0.001", "breakout")}
    expected = float(human_normalized_score("breakout", 20.0))
    assert (
        overall["weight_norm"]["IQM final eval, human-normalised [95% CI]"]
        == f"{expected:.3f} [{expected:.3f}, {expected:.3f}]"
    )


def test_a_study_mixing_suites_normalises_each_run_by_its_own_game_and_says_both() -> None:
    summaries = [
        run("space_invaders", g, k, v, suite="atari") for g in ("normal", "wn") for k, v in enumerate([148.0, 1668.7])
    ]
    summaries += [run("breakout", g, k, v) for g in ("normal", "wn") for k, v in enumerate([1.0, 2.0])]
    overall = overall_rows(summaries, reps=200)
    key = "IQM final eval, human-/study-max normalised [95% CI]"
    assert all(key in row for row in overall)
    # human-normalised Space Invaders 0 and 1, MinAtar Breakout 1 / 3 and 2 / 3 (its largest max eval is 2 + 1)
    expected = interquartile_mean([0.0, 1.0, 1 / 3, 2 / 3])
    assert overall[0][key].startswith(f"{expected:.3f} [")
    # an Atari game outside Atari-57 has no human reference: study-max normalised, not a KeyError
    other = [run(t, g, 0, 5.0, suite="atari", game="pooyan" if t == "a" else "pong") for t in "ab" for g in ("x", "y")]
    assert "IQM final eval, human-/study-max normalised [95% CI]" in overall_rows(other, reps=50)[0]


def no_evaluation_study() -> list[RunSummary]:
    """Groups normal and wn evaluated on tasks a and b; group noeval completed without evaluations on a,
    and on b has one complete run without and one unfinished run not evaluated yet; wn has a third run
    without evaluations on b."""
    summaries = []
    for task in ("a", "b"):
        summaries += [run(task, "normal", k, v) for k, v in enumerate([1.0, 2.0])]
        summaries += [run(task, "wn", k, v) for k, v in enumerate([3.0, 4.0])]
    summaries += [run("a", "noeval", k, math.nan) for k in range(2)]
    summaries += [run("b", "noeval", 0, math.nan), run("b", "noeval", 1, math.nan, complete=False)]
    return [*summaries, run("b", "wn", 2, math.nan)]


def test_runs_without_evaluations_are_counted_apart_and_called_so() -> None:
    rows = {(r["task"], r["group"]): r for r in aggregate_rows(no_evaluation_study(), reps=200)}
    assert rows[("a", "noeval")]["runs"] == "0 (+2: no evaluation)"
    assert rows[("a", "noeval")]["final eval (mean ± std)"] == "n/a (no evaluation)"
    assert rows[("b", "noeval")]["IQM final eval [95% CI]"] == "n/a (no evaluation, or not yet)"
    # the wn run without evaluations is not in the mean, and the count says so
    assert (
        rows[("b", "wn")]["runs"] == "2 (+1: no evaluation)"
        and rows[("b", "wn")]["final eval (mean ± std)"] == "3.5 ± 0.71"
    )
    unfinished = aggregate_rows([run("a", "g", 0, math.nan, complete=False)], reps=50)[0]
    assert unfinished["AUC eval (mean ± std)"] == "n/a (not evaluated yet)"
    assert aggregate_rows([run("a", "g", 0, math.nan, complete=False)], complete_only=True)[0]["runs"] == "0"
    only_complete = aggregate_rows([run("a", "g", 0, 1.0, complete=False)], complete_only=True)[0]
    assert only_complete["final eval (mean ± std)"] == "n/a (no complete run)"


def test_n_a_cells_use_the_keys_of_numbers_so_the_table_keeps_its_columns() -> None:
    summaries = no_evaluation_study()
    improvement = improvement_rows(summaries, reps=200)
    overall = overall_rows(summaries, reps=200)
    for rows in (improvement, overall):
        assert len({tuple(row) for row in rows}) == 1, rows  # every row has the same columns
    by_comparison = {r["comparison"]: r for r in improvement}
    assert by_comparison["P(wn > normal)"]["final eval [95% CI]"] == "1.00 [1.00, 1.00]"
    assert by_comparison["P(wn > normal)"]["runs"] == "4 vs 4 (+1: no evaluation)"
    no_eval = by_comparison["P(noeval > normal)"]
    assert no_eval["final eval [95% CI]"].startswith("n/a (noeval: no evaluation on a; no evaluation, or not yet on b")
    assert "unfinished" not in markdown_table(improvement)
    noeval_overall = next(r for r in overall if r["group"] == "noeval")
    assert noeval_overall["IQM final eval, study-max normalised [95% CI]"].startswith("n/a (no evaluation on a")
    assert markdown_table(overall).splitlines()[0].count("|") == len(overall[0]) + 1


def test_nan_scores_are_an_error_not_a_number() -> None:
    """Sorting puts NaN last, where the IQM cut it as if it were the highest score (4.5 here; scipy: nan)."""
    with pytest.raises(ValueError, match="8 scores of which 2 are NaN"):
        interquartile_mean([1, 2, 3, 4, 5, 6, math.nan, math.nan])
    with pytest.raises(ValueError, match=r"task 'a': x has 2 runs \(1 NaN\)"):
        probability_of_improvement({"a": [1.0, math.nan]}, {"a": [0.0]})
    with pytest.raises(ValueError, match="1 NaN"):
        probability_of_improvement(np.array([[1.0], [2.0]]), np.array([[math.nan]]))
