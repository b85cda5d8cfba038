"""Intervals that count the test set as well as the seeds (docs/design.md §10).

A result is a matrix [S, P]: one row per seed, one column per test problem (1.0 right, 0.0 wrong, or a
problem's sampled accuracy or pass@k), every row over the same problems in the same order. The
statistic is the mean over seeds of each seed's mean over problems. A bootstrap replicate redraws
both: S seeds with replacement, and P problems with replacement. The problems are drawn once per
replicate and used for every seed and for both sides of a comparison: the test set is one draw of
problems that every arm and seed answered (problems are crossed with seeds, not nested in them), so a
problem that is hard for one seed is hard for the others, and two arms are compared on the same
problems. Seeds are drawn once for both sides when the sides are the same runs (an arm's start and
final), and apart when they are different runs (two arms).

Pure and seeded: the same inputs give the same interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95  # two-sided coverage of every interval of the report
RESAMPLES = 10_000  # bootstrap replicates
CHUNK = 1_000  # replicates drawn at once: a [CHUNK, P] matrix of problem counts
DECIMALS = 12  # replicates are rounded to this many decimals


@dataclass(frozen=True)
class Interval:
    """A statistic, its percentile-bootstrap interval, and what it rests on."""

    estimate: float  # the statistic on the data as observed
    lo: float
    hi: float
    seeds: tuple[int, ...]  # seeds of each side (one side: one entry)
    problems: int  # test problems every seed answered

    def basis(self) -> str:
        """What the interval rests on, e.g. "3 seeds x 40 problems" or "2 vs 3 seeds x 40 problems"."""
        seeds = " vs ".join(str(s) for s in self.seeds)
        plural = "" if self.seeds == (1,) else "s"
        return f"{seeds} seed{plural} x {self.problems} problem{'' if self.problems == 1 else 's'}"


def outcome_matrix(rows: Sequence[Sequence[float]]) -> np.ndarray:
    """[S, P] from one sequence of per-problem values per seed; every seed must answer as many problems."""
    if not rows or not rows[0]:
        raise ValueError("an interval needs at least one seed with at least one problem")
    if len({len(r) for r in rows}) != 1:
        raise ValueError(f"seeds answered different numbers of problems: {[len(r) for r in rows]}")
    return np.asarray(rows, dtype=np.float64)


def replicate_means(values: np.ndarray, seed_draws: np.ndarray, problem_counts: np.ndarray) -> np.ndarray:
    """The statistic of each replicate. values [S, P]; seed_draws [R, S] row indices; problem_counts
    [R, P] how often each problem was drawn (each row sums to P). Returns [R]."""
    per_seed = problem_counts @ values.T / values.shape[1]  # [R, S]: each seed's mean over the drawn problems
    return np.take_along_axis(per_seed, seed_draws, axis=1).mean(axis=1)  # [R]


def percentile_interval(replicates: np.ndarray, level: float) -> tuple[float, float]:
    """The (1 - level)/2 and (1 + level)/2 order statistics of the replicates."""
    ordered = np.sort(replicates)
    n = len(ordered)
    return float(ordered[int((1 - level) / 2 * n)]), float(ordered[min(n - 1, int((1 + level) / 2 * n))])


def difference_replicates(
    ours: np.ndarray, theirs: np.ndarray | None, same_seeds: bool, resamples: int, seed: int
) -> np.ndarray:
    """[resamples] replicates of mean(ours) - mean(theirs) (or of mean(ours) alone when theirs is None),
    the problems drawn once per replicate for both sides."""
    rng = np.random.default_rng(seed)
    P = ours.shape[1]
    out = []
    for start in range(0, resamples, CHUNK):
        R = min(CHUNK, resamples - start)
        counts = rng.multinomial(P, np.full(P, 1.0 / P), size=R).astype(np.float64)  # [R, P]
        our_seeds = rng.integers(0, ours.shape[0], size=(R, ours.shape[0]))  # [R, S]
        stat = replicate_means(ours, our_seeds, counts)
        if theirs is not None:
            their_seeds = our_seeds if same_seeds else rng.integers(0, theirs.shape[0], size=(R, theirs.shape[0]))
            stat = stat - replicate_means(theirs, their_seeds, counts)
        out.append(stat)
    # means of equal values over different numbers of seeds differ by ~1e-17: rounded, so that float
    # noise around a difference of exactly 0 cannot decide a verdict
    return np.round(np.concatenate(out), DECIMALS)


def mean_interval(
    rows: Sequence[Sequence[float]], level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0
) -> Interval:
    """The mean over seeds and problems of one side, with its interval over both."""
    values = outcome_matrix(rows)
    lo, hi = percentile_interval(difference_replicates(values, None, False, resamples, seed), level)
    return Interval(float(values.mean()), lo, hi, (values.shape[0],), values.shape[1])


def paired_difference(
    ours: Sequence[Sequence[float]],
    theirs: Sequence[Sequence[float]],
    same_seeds: bool,
    level: float = LEVEL,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Interval:
    """mean(ours) - mean(theirs) on the same problems, with its interval. `same_seeds`: row s of both
    sides is the same run (an arm's start and final), so the seeds are drawn once for both."""
    a, b = outcome_matrix(ours), outcome_matrix(theirs)
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"a paired difference needs the same problems on both sides, got {a.shape[1]} and {b.shape[1]}"
        )
    if same_seeds and a.shape[0] != b.shape[0]:
        raise ValueError(f"same_seeds needs as many seeds on both sides, got {a.shape[0]} and {b.shape[0]}")
    lo, hi = percentile_interval(difference_replicates(a, b, same_seeds, resamples, seed), level)
    seeds = (a.shape[0],) if same_seeds else (a.shape[0], b.shape[0])
    return Interval(float(a.mean() - b.mean()), lo, hi, seeds, a.shape[1])


def difference_verdict(difference: Interval) -> str:
    """supported: the interval of (ours - theirs) lies above 0; not supported: below 0; else inconclusive."""
    if difference.lo > 0:
        return "supported"
    if difference.hi < 0:
        return "not supported"
    return "inconclusive"
