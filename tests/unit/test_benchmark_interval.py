"""The benchmarks' interval for a median of rounds holds it as often as it says,
and their rounds order the paths fairly."""

from __future__ import annotations

import random

import pytest

from benchmarks.common import median_interval, round_order


@pytest.mark.parametrize(("n", "k", "coverage"), [
    (2, 1, 0.5), (5, 1, 0.9375), (8, 2, 1 - 2 * 9 / 256), (22, 7, None),
])
def test_the_interval_is_the_kth_smallest_and_largest_with_binomial_coverage(
    n: int, k: int, coverage: float | None
) -> None:
    values = [float(v) for v in range(n)]
    random.Random(n).shuffle(values)
    low, high, cover = median_interval(values)
    assert (low, high) == (k - 1, n - k)
    if coverage is not None:
        assert cover == pytest.approx(coverage)
    assert cover >= 0.9 or k == 1


@pytest.mark.parametrize("n", [5, 8, 16])
def test_the_interval_holds_the_true_median_as_often_as_its_coverage(n: int) -> None:
    # Rounds drawn from a skewed distribution whose median is known: the
    # interval must contain it in about the share of trials it claims.
    rng = random.Random(n)
    # An exponential of rate ln 2 has median 1: shifted, its median is sqrt 2.
    true_median = 2.0 ** 0.5
    trials, held, claimed = 4000, 0, 0.0
    for _ in range(trials):
        values = [true_median - 1.0 + rng.expovariate(0.6931471805599453) for _ in range(n)]
        low, high, claimed = median_interval(values)
        held += low <= true_median <= high
    assert abs(held / trials - claimed) < 0.025


def test_no_values_is_an_error() -> None:
    with pytest.raises(ValueError):
        median_interval([])


def test_rounds_run_the_paths_forward_then_backward() -> None:
    paths = ["pgbouncer", "pump", "nomirror", "hung"]
    orders = [round_order(paths, rnd) for rnd in range(4)]
    assert orders[0] == orders[2] == paths
    assert orders[1] == orders[3] == paths[::-1]
    # Over two rounds every path has the same summed position: none is
    # favoured by running first, or last, when the machine drifts.
    assert len({orders[0].index(p) + orders[1].index(p) for p in paths}) == 1
    assert paths == ["pgbouncer", "pump", "nomirror", "hung"]  # not reordered in place
