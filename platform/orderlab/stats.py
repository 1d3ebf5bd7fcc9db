"""Statistics over seeds for ``orderlab.results.summary``: t confidence intervals, epochs and seconds
to a target loss, and speedups against a baseline with a bootstrap confidence interval.

Curves are matrices ``[num_seeds, num_epochs]`` (one row per trial, column ``e`` = epoch index ``e``),
NaN where a trial has no row for that epoch. "Mean curve" is the mean over the seeds present at
each epoch. Pure numpy/scipy: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# A mean curve "reaches" a target loss at <= target; the relative slack only absorbs float
# summation-order differences between two averages (a tie must count as reached).
TIE_RTOL = 1e-9
NUM_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def t_ci_halfwidth(values: np.ndarray, confidence: float = 0.95) -> float:
    """Half-width of the two-sided t confidence interval of the mean: ``t_{(1+c)/2, n-1} * s / sqrt(n)``.

    Args:
        values: [n] samples (one per seed); NaNs are dropped.
        confidence: coverage of the interval, e.g. 0.95.

    Returns:
        The half-width (mean ± half-width is the interval); NaN with fewer than two samples.
    """
    # Imported here: scipy.stats takes ~1 s to import, and every Ray worker imports orderlab.results.
    from scipy import stats as scipy_stats

    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if len(values) < 2:
        return float("nan")
    quantile = scipy_stats.t.ppf((1 + confidence) / 2, df=len(values) - 1)
    return float(quantile * values.std(ddof=1) / np.sqrt(len(values)))


def mean_curve(curves: np.ndarray) -> np.ndarray:
    """Mean over seeds at each epoch, ignoring missing epochs; NaN where no seed has a value.

    Args:
        curves: [..., num_seeds, num_epochs] float, NaN for missing.

    Returns:
        [..., num_epochs] float.
    """
    present = ~np.isnan(curves)
    counts = present.sum(axis=-2)
    totals = np.where(present, curves, 0.0).sum(axis=-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, totals / np.maximum(counts, 1), np.nan)


def first_reach(curve: np.ndarray, target: np.ndarray | float) -> np.ndarray:
    """Index of the first epoch at which ``curve <= target`` (ties reach), -1 if never.

    Args:
        curve: [..., num_epochs] mean loss curve(s).
        target: scalar or [...] target loss(es); NaN never reaches.

    Returns:
        [...] int64 epoch indices (a 0-d array for one curve).
    """
    target = np.asarray(target, dtype=float)[..., None]
    with np.errstate(invalid="ignore"):
        reached = curve <= target + TIE_RTOL * np.abs(target)
    return np.where(reached.any(axis=-1), reached.argmax(axis=-1), -1)


def epochs_to_target(curve: np.ndarray, target: np.ndarray | float) -> np.ndarray:
    """Epoch count (index + 1) at which ``curve`` first reaches ``target``; NaN if never.

    Args:
        curve: [..., num_epochs] mean loss curve(s).
        target: scalar or [...] target loss(es).

    Returns:
        [...] float.
    """
    index = first_reach(curve, target)
    return np.where(index >= 0, index + 1.0, np.nan)


def seconds_to_target(curve: np.ndarray, seconds: np.ndarray, target: np.ndarray | float) -> np.ndarray:
    """Cumulative seconds (summed mean epoch seconds, up to and including the reaching epoch); NaN if never.

    Args:
        curve: [..., num_epochs] mean loss curve(s).
        seconds: [..., num_epochs] mean epoch seconds; a NaN before the reaching epoch gives NaN.
        target: scalar or [...] target loss(es).

    Returns:
        [...] float.
    """
    index = first_reach(curve, target)
    cumulative = np.cumsum(seconds, axis=-1)
    at = np.take_along_axis(cumulative, np.maximum(index, 0)[..., None], axis=-1)[..., 0]
    return np.where(index >= 0, at, np.nan)


@dataclass(frozen=True)
class Runs:
    """One ordering's completed trials in one group.

    Attributes:
        losses: [num_seeds, num_epochs] train loss by epoch index, NaN where missing.
        seconds: [num_seeds, num_epochs] epoch_seconds, NaN where missing.
        finals: [num_seeds] each trial's train loss at its last epoch.
    """

    losses: np.ndarray
    seconds: np.ndarray
    finals: np.ndarray

    @property
    def num_seeds(self) -> int:
        return len(self.finals)


@dataclass(frozen=True)
class Speedup:
    """Speedups of an ordering over the baseline; NaN where undefined."""

    epochs_to_target: float  # the ordering's mean curve reaching the baseline's final mean loss
    seconds_to_target: float
    speedup: float  # baseline epochs to its own final mean / ordering's epochs_to_target
    speedup_ci_low: float
    speedup_ci_high: float
    time_speedup: float  # the same with cumulative epoch seconds
    time_speedup_ci_low: float
    time_speedup_ci_high: float


@dataclass(frozen=True)
class Bootstrap:
    """The percentile bootstrap of ``speedup_vs_baseline`` and ``batched_speedups``.

    Attributes:
        num_resamples: bootstrap resamples.
        seed: numpy seed of the resampling, fixed so the CI is reproducible.
        confidence: coverage of the interval.
    """

    num_resamples: int = NUM_RESAMPLES
    seed: int = BOOTSTRAP_SEED
    confidence: float = 0.95

    @property
    def tails(self) -> list[float]:
        """The interval's two quantiles, e.g. [0.025, 0.975]."""
        return [(1 - self.confidence) / 2, (1 + self.confidence) / 2]

    def rows(self, num_base: int, num_runs: int, *, same: bool) -> tuple[np.ndarray, np.ndarray]:
        """The seeds each resample draws, with replacement: base [num_resamples, num_base] and runs
        [num_resamples, num_runs] int64 indices (``same``: one draw serves both sides)."""
        rng = np.random.default_rng(self.seed)
        base_rows = rng.integers(0, num_base, size=(self.num_resamples, num_base))
        rows = base_rows if same else rng.integers(0, num_runs, size=(self.num_resamples, num_runs))
        return base_rows, rows


def _speedups(base: Runs, runs: Runs, base_rows: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, ...]:
    """Targets and speedups for seed selections ``base_rows`` [B, nb] and ``rows`` [B, n] (B resamples).

    Returns:
        epochs_to_target [B], seconds_to_target [B], speedup [B], time_speedup [B]; an ordering that
        never reaches the target has speedup 0 (it would need infinitely many epochs).
    """
    target = base.finals[base_rows].mean(axis=-1)
    base_curve, base_seconds = mean_curve(base.losses[base_rows]), mean_curve(base.seconds[base_rows])
    curve, seconds = mean_curve(runs.losses[rows]), mean_curve(runs.seconds[rows])
    return _speedups_of_curves(target, base_curve, base_seconds, curve, seconds)


def _speedups_of_curves(
    target: np.ndarray,
    base_curve: np.ndarray,
    base_seconds: np.ndarray,
    curve: np.ndarray,
    seconds: np.ndarray,
) -> tuple[np.ndarray, ...]:
    """Epochs and seconds to ``target`` [...] of mean curves [..., E], and the speedups (see _speedups)."""
    base_epochs = epochs_to_target(base_curve, target)
    base_time = seconds_to_target(base_curve, base_seconds, target)
    epochs = epochs_to_target(curve, target)
    return _ratios(base_epochs, base_time, epochs, seconds_to_target(curve, seconds, target))


def _ratios(
    base_epochs: np.ndarray, base_time: np.ndarray, epochs: np.ndarray, time: np.ndarray
) -> tuple[np.ndarray, ...]:
    """epochs, time, speedup, time_speedup; 0 where ``epochs`` is NaN (the target never reached)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        speedup = np.where(np.isnan(epochs), 0.0, base_epochs / epochs)
        time_speedup = np.where(np.isnan(epochs), 0.0, base_time / time)
    return epochs, time, speedup, time_speedup


def speedup_vs_baseline(
    base: Runs,
    runs: Runs,
    *,
    same: bool = False,
    bootstrap: Bootstrap = Bootstrap(),
) -> Speedup:
    """Epochs and seconds to the baseline's final mean loss, and speedups with a percentile bootstrap CI.

    Each resample draws the baseline's seeds and the ordering's seeds with replacement, recomputes
    the target (the resampled baseline's final mean) and both speedups. A resample in which the
    ordering never reaches the target counts as speedup 0. The CI is NaN when the point estimate is,
    when either side has fewer than two seeds, or when any resample is NaN (e.g. missing timings).

    Args:
        base: the baseline ordering's runs.
        runs: the compared ordering's runs (``base`` itself for the baseline's own row).
        same: ``runs`` is ``base``; one resample serves both sides, so the speedup is exactly 1.
        bootstrap: resamples, seed and coverage of the interval.

    Returns:
        The Speedup; every field NaN when ``base`` or ``runs`` has no seeds.
    """
    nan = float("nan")
    if base.num_seeds == 0 or runs.num_seeds == 0:
        return Speedup(*[nan] * 8)
    point = [
        float(v[0])
        for v in _speedups(base, runs, np.arange(base.num_seeds)[None], np.arange(runs.num_seeds)[None])
    ]
    epochs, time, speedup, time_speedup = point
    if np.isnan(epochs):
        speedup = time_speedup = nan  # never reached: undefined, not 0
    intervals = [(nan, nan), (nan, nan)]
    if base.num_seeds >= 2 and runs.num_seeds >= 2:
        base_rows, rows = bootstrap.rows(base.num_seeds, runs.num_seeds, same=same)
        samples = _speedups(base, runs, base_rows, rows)[2:]
        for i, (estimate, sample) in enumerate(zip((speedup, time_speedup), samples, strict=True)):
            if not np.isnan(estimate) and not np.isnan(sample).any():
                low, high = np.quantile(sample, bootstrap.tails)
                intervals[i] = (float(low), float(high))
    return Speedup(epochs, time, speedup, *intervals[0], time_speedup, *intervals[1])


def resample_counts(
    num_base: int,
    num_runs: int,
    *,
    same: bool,
    bootstrap: Bootstrap = Bootstrap(),
) -> tuple[np.ndarray, np.ndarray]:
    """The bootstrap draws of ``speedup_vs_baseline`` as counts: how often each seed is drawn.

    Args:
        num_base, num_runs: seeds of the baseline and of the compared ordering.
        same: the compared ordering is the baseline (one draw serves both sides).
        bootstrap: as in ``speedup_vs_baseline`` (the same draws).

    Returns:
        base [num_resamples, num_base] and runs [num_resamples, num_runs] float64 counts; each row
        sums to its number of seeds.
    """
    base_rows, rows = bootstrap.rows(num_base, num_runs, same=same)
    return (
        (base_rows[..., None] == np.arange(num_base)).sum(axis=1, dtype=float),
        (rows[..., None] == np.arange(num_runs)).sum(axis=1, dtype=float),
    )


def _weighted_curve(counts: np.ndarray, curves: np.ndarray) -> np.ndarray:
    """``mean_curve`` of each resample: counts [B, k], curves [P, k, E] -> [P, B, E]."""
    present = ~np.isnan(curves)
    totals = counts @ np.where(present, curves, 0.0)
    drawn = counts @ present.astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(drawn > 0, totals / np.maximum(drawn, 1), np.nan)


def _weighted_mean(counts: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Mean of each resample, NaN when it draws a NaN: counts [B, k], values [P, k] -> [P, B]."""
    missing = np.isnan(values)
    totals = np.where(missing, 0.0, values) @ counts.T
    return np.where(missing.astype(float) @ counts.T > 0, np.nan, totals / counts.sum(axis=1))


def _complete(runs: Runs) -> bool:
    return not (np.isnan(runs.losses).any() or np.isnan(runs.seconds).any() or np.isnan(runs.finals).any())


def _reach_complete(runs: Runs, draws: _Draws, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Epochs and seconds to ``target`` [P, B] of each resample's mean curve, for runs without NaN.

    The mean curves of the distinct resamples only (few with few seeds: 126 with 5) as one matrix
    product; the first reaching epoch by binary search on each curve's running minimum (it reaches
    where its running minimum does); the seconds summed over epochs per seed before the resample's
    mean (the same sums in another order). Returns [P, B] each.
    """
    num_pairs, num_seeds, num_epochs = runs.losses.shape
    counts, distinct, which = draws
    drawn = counts[0].sum()  # every resample draws num_seeds seeds
    flat = runs.losses.transpose(1, 0, 2).reshape(num_seeds, num_pairs * num_epochs)
    curves = (distinct @ flat / drawn).reshape(len(distinct), num_pairs, num_epochs)
    floor = np.minimum.accumulate(curves, axis=-1)  # [U, P, E], non-increasing in E
    threshold = target + TIE_RTOL * np.abs(target)  # [P, B], as first_reach
    pairs = np.arange(num_pairs)[:, None]
    low = np.zeros(target.shape, dtype=np.int64)
    high = np.full(target.shape, num_epochs)  # num_epochs: never reached
    while (low < high).any():
        middle = (low + high) // 2
        reached = floor[which[None, :], pairs, np.minimum(middle, num_epochs - 1)] <= threshold
        searching = low < high
        high = np.where(searching & reached, middle, high)
        low = np.where(searching & ~reached, middle + 1, low)
    cumulative = np.cumsum(runs.seconds, axis=-1).transpose(0, 2, 1)  # [P, E, k]
    at = cumulative[pairs, np.minimum(low, num_epochs - 1)]  # [P, B, k]
    seconds = np.einsum("pbk,bk->pb", at, counts) / drawn
    never = low >= num_epochs
    return np.where(never, np.nan, low + 1.0), np.where(never, np.nan, seconds)


_Draws = tuple[np.ndarray, np.ndarray, np.ndarray]  # counts [B, k], its distinct rows [U, k], row of each [B]


def _draws(counts: np.ndarray) -> _Draws:
    distinct, which = np.unique(counts, axis=0, return_inverse=True)
    return counts, distinct, which.reshape(-1)


def _batched_speedups(
    base: Runs, runs: Runs, base_draws: _Draws, draws: _Draws, same: bool
) -> tuple[np.ndarray, ...]:
    """``_speedups`` for P pairs at once, the draws given as counts [B, k]: each output [P, B]."""
    base_counts, counts = base_draws[0], draws[0]
    if _complete(base) and _complete(runs):  # the usual case: every seed has every epoch
        target = (base.finals @ base_counts.T) / base_counts.sum(axis=1)
        base_epochs, base_time = _reach_complete(base, base_draws, target)
        epochs, time = (base_epochs, base_time) if same else _reach_complete(runs, draws, target)
        return _ratios(base_epochs, base_time, epochs, time)
    target = _weighted_mean(base_counts, base.finals)
    base_curve = _weighted_curve(base_counts, base.losses)
    base_seconds = _weighted_curve(base_counts, base.seconds)
    if same:
        return _speedups_of_curves(target, base_curve, base_seconds, base_curve, base_seconds)
    curve, seconds = _weighted_curve(counts, runs.losses), _weighted_curve(counts, runs.seconds)
    return _speedups_of_curves(target, base_curve, base_seconds, curve, seconds)


def batched_speedups(
    base: Runs,
    runs: Runs,
    *,
    same: bool = False,
    bootstrap: Bootstrap = Bootstrap(),
    max_elements: int = 2_000_000,
) -> dict[str, np.ndarray]:
    """``speedup_vs_baseline`` for P (baseline, ordering) pairs with equal seed counts, vectorised.

    Every pair gets the same draws as ``speedup_vs_baseline`` (they depend only on the seed counts),
    applied as count-weighted means (matrix products), so the results equal it up to float
    summation order. Work is done ``max_elements`` resampled curve values at a time.

    Args:
        base: the baselines, losses/seconds [P, num_base, E_base], finals [P, num_base]; NaN where
            missing (a padded epoch is missing), num_base >= 1.
        runs: the compared orderings, [P, num_runs, E] and [P, num_runs], num_runs >= 1.
        same: each pair compares the baseline with itself (``runs`` is ``base``).
        bootstrap: as in ``speedup_vs_baseline``.
        max_elements: resampled values per chunk of pairs (memory: about 100 bytes each).

    Returns:
        The fields of ``Speedup`` -> float64 [P].
    """
    num_pairs, num_base = base.finals.shape
    num_runs = runs.finals.shape[-1]
    ones = (_draws(np.ones((1, num_base))), _draws(np.ones((1, num_runs))))
    draws = None
    if num_base >= 2 and num_runs >= 2:
        base_counts, counts = resample_counts(num_base, num_runs, same=same, bootstrap=bootstrap)
        draws = (_draws(base_counts), _draws(counts))
    width = max(base.losses.shape[-1], runs.losses.shape[-1])
    complete = _complete(base) and _complete(runs)  # no [P, B, E] arrays: bigger chunks
    step = max(
        1,
        max_elements // (bootstrap.num_resamples * (max(num_base, num_runs) if complete else max(width, 1))),
    )
    out: dict[str, list[np.ndarray]] = {name: [] for name in Speedup.__dataclass_fields__}
    for start in range(0, num_pairs, step):
        chunk = slice(start, start + step)
        b = Runs(base.losses[chunk], base.seconds[chunk], base.finals[chunk])
        r = Runs(runs.losses[chunk], runs.seconds[chunk], runs.finals[chunk])
        epochs, time, speedup, time_speedup = (v[:, 0] for v in _batched_speedups(b, r, *ones, same))
        speedup = np.where(np.isnan(epochs), np.nan, speedup)  # never reached: undefined, not 0
        time_speedup = np.where(np.isnan(epochs), np.nan, time_speedup)
        intervals = [np.full((2, len(epochs)), np.nan) for _ in range(2)]
        if draws is not None:
            samples = _batched_speedups(b, r, *draws, same)[2:]
            for i, (estimate, sample) in enumerate(zip((speedup, time_speedup), samples, strict=True)):
                valid = ~np.isnan(estimate) & ~np.isnan(sample).any(axis=-1)
                intervals[i] = np.where(valid, np.quantile(sample, bootstrap.tails, axis=-1), np.nan)
        for name, value in zip(
            out, (epochs, time, speedup, *intervals[0], time_speedup, *intervals[1]), strict=True
        ):
            out[name].append(value)
    return {name: np.concatenate(values) if values else np.empty(0) for name, values in out.items()}
