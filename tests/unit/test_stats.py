"""Unit tests for orderlab.stats: t CIs, epochs and seconds to a target, bootstrap speedups."""

from __future__ import annotations

import math

import numpy as np
import pytest

from orderlab import stats

NAN = float("nan")
# Student t quantiles t_{0.975, df} from a printed table.
T_975 = {1: 12.7062, 2: 4.3027, 3: 3.1824}


def test_t_ci_halfwidth_matches_the_table_quantile() -> None:
    # [1, 2, 3]: std 1, n 3 -> 4.3027 / sqrt(3)
    assert stats.t_ci_halfwidth(np.array([1.0, 2.0, 3.0])) == pytest.approx(T_975[2] / math.sqrt(3), rel=1e-4)
    # [0.25, 0.75]: std sqrt(0.125), n 2 -> 12.7062 * 0.25
    assert stats.t_ci_halfwidth(np.array([0.25, 0.75])) == pytest.approx(T_975[1] * 0.25, rel=1e-4)
    # NaNs are dropped: four values with one NaN is n 3.
    assert stats.t_ci_halfwidth(np.array([1.0, NAN, 2.0, 3.0])) == pytest.approx(
        T_975[2] / math.sqrt(3), rel=1e-4
    )
    assert math.isnan(stats.t_ci_halfwidth(np.array([1.0])))
    assert math.isnan(stats.t_ci_halfwidth(np.array([])))


def test_mean_curve_ignores_missing_epochs() -> None:
    curves = np.array([[1.0, 2.0, NAN], [3.0, NAN, NAN]])
    np.testing.assert_array_equal(stats.mean_curve(curves), [2.0, 2.0, NAN])


def test_epochs_to_target_ties_reach_and_never_is_nan() -> None:
    curve = np.array([3.0, 2.0, 2.0, 1.0])
    assert stats.epochs_to_target(curve, 2.0) == 2  # tie: reached at the first 2.0
    assert stats.epochs_to_target(curve, 2.5) == 2
    assert stats.epochs_to_target(curve, 3.0) == 1
    assert math.isnan(stats.epochs_to_target(curve, 0.5))
    assert math.isnan(stats.epochs_to_target(curve, NAN))
    # A tie that differs only by summation order still reaches: 0.1 + 0.2 > 0.3 in floats.
    assert stats.epochs_to_target(np.array([1.0, 0.1 + 0.2]), 0.3) == 2
    # Vectorized over curves and targets.
    both = stats.epochs_to_target(np.array([[3.0, 1.0], [3.0, 2.0]]), np.array([1.0, 1.0]))
    np.testing.assert_array_equal(both, [2.0, NAN])


def test_seconds_to_target_sums_through_the_reaching_epoch() -> None:
    curve, seconds = np.array([3.0, 2.0, 1.0]), np.array([1.0, 2.0, 4.0])
    assert stats.seconds_to_target(curve, seconds, 1.5) == 7.0
    assert stats.seconds_to_target(curve, seconds, 2.0) == 3.0
    assert math.isnan(stats.seconds_to_target(curve, seconds, 0.0))
    assert math.isnan(stats.seconds_to_target(curve, np.array([NAN, 2.0, 4.0]), 2.0))


def runs(losses: list[list[float]], seconds: float | list[float] = 1.0) -> stats.Runs:
    matrix = np.array(losses, dtype=float)
    per_seed = np.broadcast_to(np.asarray(seconds, dtype=float).reshape(-1, 1), matrix.shape)
    return stats.Runs(matrix, per_seed.copy(), matrix[:, -1].copy())


# The summary fixture of test_results.py: rr (baseline) and cd-grab, two seeds each.
RR = runs([[1.0, 0.75, 0.5], [1.5, 1.0, 0.75]], [2.0, 4.0])
CD = runs([[1.0, 0.5, 0.25], [1.0, 0.75, 0.75]], [3.0, 5.0])


def test_speedup_point_estimates_by_hand() -> None:
    # Target 0.625; rr reaches it at its last epoch (3), cd-grab at epoch 2 (tie with 0.625).
    result = stats.speedup_vs_baseline(RR, CD)
    assert (result.epochs_to_target, result.speedup) == (2.0, 1.5)
    # Seconds: rr 3 epochs x mean 3 s = 9; cd-grab 2 epochs x mean 4 s = 8.
    assert (result.seconds_to_target, result.time_speedup) == (8.0, 9.0 / 8.0)


def test_bootstrap_ci_by_enumeration_and_deterministic() -> None:
    # Resampling 2 seeds gives {s0,s0}, {s1,s1} (1/4 each) or a mix (1/2) per side. Baseline targets
    # 0.5 / 0.75 / 0.625, always 3 epochs. cd-grab mean curves: [1, .5, .25], [1, .75, .75], [1, .625, .5].
    # Speedups: 0 (never reached) with probability 3/16, 1 with 1/8, 1.5 otherwise -> CI [0, 1.5].
    # Time speedups: the largest is 12 s / 6 s = 2 (rr s1 twice, cd-grab s0 twice), probability 1/16 >
    # 2.5%, and 0 has 3/16 -> CI [0, 2].
    result = stats.speedup_vs_baseline(RR, CD)
    assert (result.speedup_ci_low, result.speedup_ci_high) == (0.0, 1.5)
    assert (result.time_speedup_ci_low, result.time_speedup_ci_high) == (0.0, 2.0)
    assert result.speedup_ci_low <= result.speedup <= result.speedup_ci_high
    assert result.time_speedup_ci_low <= result.time_speedup <= result.time_speedup_ci_high
    assert stats.speedup_vs_baseline(RR, CD) == result  # fixed seed: the same interval every time


def test_bootstrap_ci_brackets_a_noisy_estimate_and_depends_on_the_seed() -> None:
    rng = np.random.default_rng(7)
    decay = np.exp(-np.arange(1, 21) / 5.0)
    base = runs((decay + 0.05 * rng.random((5, 20))).tolist(), rng.uniform(1, 2, 5).tolist())
    fast = runs((decay**1.5 + 0.05 * rng.random((5, 20))).tolist(), rng.uniform(1, 2, 5).tolist())
    result = stats.speedup_vs_baseline(base, fast)
    assert result.speedup > 1
    assert result.speedup_ci_low <= result.speedup <= result.speedup_ci_high
    assert result.time_speedup_ci_low <= result.time_speedup <= result.time_speedup_ci_high
    assert stats.speedup_vs_baseline(base, fast) == result
    other = stats.speedup_vs_baseline(base, fast, bootstrap=stats.Bootstrap(seed=1))
    assert (other.speedup, other.time_speedup) == (result.speedup, result.time_speedup)
    assert other != result  # the interval comes from the resamples


def test_undefined_speedups_are_nan() -> None:
    # Never reached: the point estimate and its CI are NaN, not 0.
    slow = runs([[2.0, 1.9, 1.8], [2.0, 1.9, 1.7]])
    result = stats.speedup_vs_baseline(RR, slow)
    assert all(math.isnan(v) for v in vars(result).values())
    # One seed on either side: point estimates, but no CI.
    one = stats.speedup_vs_baseline(RR, runs([[1.0, 0.5, 0.25]], 3.0))
    assert one.speedup == 1.5 and math.isnan(one.speedup_ci_low) and math.isnan(one.speedup_ci_high)
    # No baseline: everything NaN.
    empty = stats.Runs(np.empty((0, 0)), np.empty((0, 0)), np.empty(0))
    assert all(math.isnan(v) for v in vars(stats.speedup_vs_baseline(empty, CD)).values())
    # Missing timings: time speedup NaN, the epoch speedup is still defined.
    untimed = stats.Runs(CD.losses, np.full_like(CD.seconds, NAN), CD.finals)
    result = stats.speedup_vs_baseline(RR, untimed)
    assert (
        result.speedup == 1.5 and math.isnan(result.time_speedup) and math.isnan(result.time_speedup_ci_low)
    )


def test_baseline_against_itself_is_exactly_one() -> None:
    result = stats.speedup_vs_baseline(RR, RR, same=True)
    assert (result.speedup, result.speedup_ci_low, result.speedup_ci_high) == (1.0, 1.0, 1.0)
    assert (result.time_speedup, result.time_speedup_ci_low, result.time_speedup_ci_high) == (1.0, 1.0, 1.0)
