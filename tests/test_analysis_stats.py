"""Statistics of studies on hand-computed cases: IQM, stratified bootstrap intervals, AUC, Atari HNS."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wn_rl.analysis.stats import (
    ATARI_HUMAN_RANDOM,
    area_under_curve,
    human_normalized_score,
    improvement_ci,
    interquartile_mean,
    probability_of_improvement,
    stratified_bootstrap_ci,
)


def test_iqm_hand_computed() -> None:
    # 8 values: floor(0.25 * 8) = 2 cut from each end -> mean(3, 4, 5, 6)
    assert interquartile_mean([8, 1, 7, 2, 6, 3, 5, 4]) == pytest.approx(4.5)
    # 5 values: floor(1.25) = 1 cut from each end -> mean(2, 3, 100) ignores 1000 and -1000
    assert interquartile_mean([1000, 2, 3, 100, -1000]) == pytest.approx(35.0)
    # 3 values: nothing cut (floor(0.75) = 0)
    assert interquartile_mean([0.0, 0.0, 3.0]) == pytest.approx(1.0)


def test_iqm_equals_scipy_trim_mean_over_all_runs_and_tasks() -> None:
    stats = pytest.importorskip("scipy.stats")
    x = np.random.default_rng(3).normal(size=(7, 3))
    assert interquartile_mean(x) == pytest.approx(stats.trim_mean(x, 0.25, axis=None))


def test_iqm_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one"):
        interquartile_mean([])


def test_bootstrap_percentile_interval_hand_computed() -> None:
    # Resampling 3 runs of [0, 0, 3]: the mean is K with K ~ Binomial(3, 1/3):
    # P(K=0) = 8/27 > 2.5 %, P(K=3) = 1/27 = 3.7 % > 2.5 %  ->  95 % interval [0, 3].
    point, low, high = stratified_bootstrap_ci(np.array([0.0, 0.0, 3.0]), np.mean, reps=20_000, seed=1)
    assert (point, low, high) == (pytest.approx(1.0), pytest.approx(0.0), pytest.approx(3.0))
    # a 50 % interval is [P25, P75] of K = [0, 2] (P(K<=0) = .30 > .25, P(K<=1) = .74 < .75)
    _, low, high = stratified_bootstrap_ci(np.array([0.0, 0.0, 3.0]), np.mean, reps=20_000, confidence=0.5, seed=1)
    assert (low, high) == (pytest.approx(0.0), pytest.approx(2.0))


def test_bootstrap_is_stratified_by_task() -> None:
    # Column 1 is constant: a stratified resample keeps it constant, so its mean never moves,
    # although column 0 varies wildly (an unstratified resample over all cells would mix them).
    scores = np.array([[0.0, 10.0], [100.0, 10.0], [-50.0, 10.0], [7.0, 10.0]])
    _, low, high = stratified_bootstrap_ci(scores, lambda s: float(s[:, 1].mean()), reps=500)
    assert low == high == pytest.approx(10.0)
    _, low0, high0 = stratified_bootstrap_ci(scores, lambda s: float(s[:, 0].mean()), reps=500)
    assert low0 < high0


def test_bootstrap_of_identical_runs_collapses_and_is_reproducible() -> None:
    assert stratified_bootstrap_ci(np.full((5, 2), 4.0)) == (4.0, 4.0, 4.0)
    x = np.random.default_rng(0).normal(size=(6, 2))
    assert stratified_bootstrap_ci(x, seed=7) == stratified_bootstrap_ci(x, seed=7)


@pytest.mark.parametrize(
    ("scores", "kwargs", "match"),
    [
        (np.array([1.0, math.nan]), {}, "NaN"),
        (np.zeros((0, 2)), {}, "at least one"),
        (np.ones(3), {"confidence": 1.5}, "confidence"),
    ],
)
def test_bootstrap_rejects_bad_input(scores: np.ndarray, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        stratified_bootstrap_ci(scores, **kwargs)


def test_area_under_curve_is_the_time_average() -> None:
    # trapezoids: (0 + 1) / 2 * 10 + (1 + 1) / 2 * 10 = 15 over a span of 20
    assert area_under_curve([0, 10, 20], [0, 1, 1]) == pytest.approx(0.75)
    assert area_under_curve([20, 0, 10], [1, 0, 1]) == pytest.approx(0.75)  # order does not matter
    assert area_under_curve([5], [3.0]) == 3.0
    assert math.isnan(area_under_curve([], []))
    # a faster learner with the same final value has the larger area
    assert area_under_curve([0, 10, 20], [0, 2, 2]) > area_under_curve([0, 10, 20], [0, 0, 2])
    with pytest.raises(ValueError, match="shape"):
        area_under_curve([0, 1], [1.0])


def test_human_normalized_score() -> None:
    assert human_normalized_score("breakout", 30.5) == pytest.approx(1.0)
    assert human_normalized_score("breakout", 1.7) == pytest.approx(0.0)
    for name in ("space_invaders", "SpaceInvaders", "ALE/SpaceInvaders-v5", "SpaceInvadersNoFrameskip-v4"):
        assert human_normalized_score(name, 1668.7) == pytest.approx(1.0)
    # the paper's best WN Space Invaders score, 2179, is 1.34 human
    assert human_normalized_score("space_invaders", 2179.0) == pytest.approx((2179 - 148) / (1668.7 - 148))
    np.testing.assert_allclose(human_normalized_score("pong", np.array([-20.7, 14.6])), [0.0, 1.0])
    assert len(ATARI_HUMAN_RANDOM) == 57
    for name in ("UpNDown", "ALE/UpNDown-v5", "UpNDownNoFrameskip-v4", "up_n_down"):  # a capital after a capital
        assert human_normalized_score(name, 11693.2) == pytest.approx(1.0)
    with pytest.raises(KeyError, match="Atari-57"):
        human_normalized_score("minatar_asterix_typo", 1.0)


def test_probability_of_improvement_hand_computed() -> None:
    # one task: of the 4 pairs (1|3) x (2|2), 3 > 2 twice -> 2 / 4
    assert probability_of_improvement(np.array([[1.0], [3.0]]), np.array([[2.0], [2.0]])) == 0.5
    assert probability_of_improvement(np.array([[2.0]]), np.array([[2.0]])) == 0.5  # a tie counts half
    assert probability_of_improvement(np.array([[3.0], [4.0]]), np.array([[1.0], [2.0]])) == 1.0
    # two tasks, X always better on the first and always worse on the second: averaged -> 0.5
    x, y = np.array([[3.0, 0.0], [4.0, 1.0]]), np.array([[1.0, 5.0], [2.0, 6.0]])
    assert probability_of_improvement(x, y) == 0.5
    assert improvement_ci(x[:, :1], y[:, :1], reps=300) == (1.0, 1.0, 1.0)
    point, low, high = improvement_ci(np.array([[1.0], [3.0]]), np.array([[2.0], [2.0]]), reps=2000)
    assert (point, low, high) == (0.5, 0.0, 1.0)  # resampling (1, 1) or (3, 3) gives 0 or 1
    with pytest.raises(ValueError, match="same tasks"):
        probability_of_improvement(np.ones((2, 2)), np.ones((2, 3)))
