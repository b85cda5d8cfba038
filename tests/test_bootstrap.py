"""Intervals over seeds and test problems (report/bootstrap.py): properties derived by hand."""

from __future__ import annotations

import pytest

from dlr.report.bootstrap import Interval, difference_verdict, mean_interval, paired_difference


def right(count: int, problems: int = 40) -> list[float]:
    """One seed's outcomes: the first `count` of `problems` right."""
    return [1.0] * count + [0.0] * (problems - count)


def test_when_every_seed_and_problem_agree_the_interval_is_a_point():
    assert mean_interval([[0.5] * 10] * 3) == Interval(0.5, 0.5, 0.5, (3,), 10)
    same = paired_difference([right(7)] * 2, [right(7)] * 3, same_seeds=False)
    assert (same.estimate, same.lo, same.hi) == (0.0, 0.0, 0.0) and difference_verdict(same) == "inconclusive"


def test_pairing_on_problems_removes_what_the_problems_share():
    """Both sides right on the same 20 of 40 problems: each side alone varies with the problems drawn,
    their difference on the same drawn problems never does."""
    alone = mean_interval([right(20)])
    assert alone.lo < 0.5 < alone.hi
    paired = paired_difference([right(20)], [right(20)], same_seeds=False)
    assert (paired.lo, paired.hi) == (0.0, 0.0)


def test_pairing_by_seed_removes_what_a_seed_shares_between_start_and_final():
    """Seed 0 scores 0.2 at the start and 0.3 at the end on every problem, seed 1 0.6 and 0.7: paired by
    seed the gain is 0.1 in every replicate; drawn apart, the seeds' spread (0.4) swamps it."""
    start, final = [[0.2] * 10, [0.6] * 10], [[0.3] * 10, [0.7] * 10]
    paired = paired_difference(final, start, same_seeds=True)
    assert (paired.lo, paired.hi) == pytest.approx((0.1, 0.1)) and difference_verdict(paired) == "supported"
    apart = paired_difference(final, start, same_seeds=False)
    assert apart.lo < 0 < apart.hi and difference_verdict(apart) == "inconclusive"


def test_four_right_against_none_reaches_down_to_one_problem():
    """4 of 40 right on both seeds against 0 of 40: the drawn problems hold X ~ Binomial(40, 0.1) of the
    four (seeds agree, so only problems matter). P(X = 0) = 0.9^40 = 0.0148 < 0.025 <= P(X <= 1) = 0.0805,
    so the lower end is 1/40; P(X <= 7) = 0.958 < 0.975 <= P(X <= 8) = 0.985, so the upper end is 8/40."""
    d = paired_difference([right(4)] * 2, [right(0)] * 2, same_seeds=False)
    assert (d.estimate, d.lo, d.hi) == pytest.approx((0.1, 1 / 40, 8 / 40))
    assert d.basis() == "2 vs 2 seeds x 40 problems"


def test_two_disagreeing_seeds_with_few_right_answers_are_inconclusive():
    """Seeds with 2 and 6 of 40 right (the first two shared) against 0 of 40: a replicate that draws
    seed 0 twice (1/4) and none of its two problems ((38/40)^40 = 0.128) has a difference of 0, so
    P(difference = 0) >= 0.032 > 0.025 and the interval starts at 0."""
    d = paired_difference([right(2), right(6)], [right(0)] * 2, same_seeds=False)
    assert d.estimate == pytest.approx(0.1) and d.lo == 0.0 and d.hi > 0.1
    assert difference_verdict(d) == "inconclusive"


def test_a_loss_on_every_seed_is_not_supported_and_the_bootstrap_is_seeded():
    """10 against 30 of 40 right on three agreeing seeds: the 20 problems only the other side gets right
    are drawn X ~ Binomial(40, 1/2) times, the difference is -X/40. P(X <= 13) = 0.019 < 0.025 <=
    P(X <= 14) = 0.040 and, by symmetry, the upper quantile is 26: the interval is [-26/40, -14/40]."""
    d = paired_difference([right(10)] * 3, [right(30)] * 3, same_seeds=True)
    assert (d.estimate, d.lo, d.hi) == pytest.approx((-0.5, -0.65, -0.35))
    assert difference_verdict(d) == "not supported" and d.basis() == "3 seeds x 40 problems"
    assert paired_difference([right(10)] * 3, [right(30)] * 3, same_seeds=True) == d  # same inputs, same interval


def test_sides_that_do_not_match_are_refused():
    with pytest.raises(ValueError, match="same problems"):
        paired_difference([right(1, 40)], [right(1, 39)], same_seeds=False)
    with pytest.raises(ValueError, match="as many seeds"):
        paired_difference([right(1)] * 2, [right(1)] * 3, same_seeds=True)
    with pytest.raises(ValueError, match="different numbers of problems"):
        mean_interval([right(1, 40), right(1, 39)])
