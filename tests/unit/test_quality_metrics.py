"""sgl_evict.quality.metrics: exact match, Wilson intervals, McNemar, fidelity."""

import math

import pytest

from sgl_evict.quality.metrics import exact_match, fidelity, mcnemar_p, wilson


def test_exact_match_needs_every_answer():
    assert exact_match(["12", "34"], "a 12 and 34")
    assert not exact_match(["12", "34"], "a 12 only")


@pytest.mark.parametrize("k,n,low,high", [
    # reference values from the closed form (Wilson 1927), z = 1.96
    (8, 10, 0.4902, 0.9433),
    (0, 20, 0.0, 0.1611),
    (20, 20, 0.8389, 1.0),
    (100, 200, 0.4314, 0.5686),
])
def test_wilson_interval_matches_the_closed_form(k, n, low, high):
    iv = wilson(k, n)
    assert iv.low == pytest.approx(low, abs=1e-4) and iv.high == pytest.approx(high, abs=1e-4)
    assert iv.low <= iv.value <= iv.high


def test_wilson_of_nothing_is_undefined_and_bad_counts_are_refused():
    assert math.isnan(wilson(0, 0).low)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson(3, 2)


def test_wilson_narrows_with_more_samples():
    assert (wilson(90, 100).high - wilson(90, 100).low) > (wilson(900, 1000).high - wilson(900, 1000).low)


def test_mcnemar_exact_two_sided():
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(5, 5) == 1.0
    # 10 discordant pairs all one way: 2 * 0.5^10
    assert mcnemar_p(10, 0) == pytest.approx(2 / 1024)
    assert mcnemar_p(0, 10) == mcnemar_p(10, 0)
    assert mcnemar_p(7, 2) == pytest.approx(2 * sum(math.comb(9, i) for i in range(3)) / 512)


def test_fidelity_splits_at_the_lookahead_horizon():
    ref = list(range(20))
    ans = ref[:5] + [99] + ref[6:12] + [98] * 8
    f = fidelity(ans, ref, horizon=16, split=8)
    assert (f.horizon, f.inside, f.same_inside, f.beyond, f.same_beyond, f.prefix) == (16, 8, 7, 8, 4, 5)


def test_fidelity_of_identical_answers_and_short_ones():
    f = fidelity([1, 2, 3], [1, 2, 3, 4], horizon=64, split=8)
    assert f.horizon == 3 and f.prefix == 3 and f.same_inside == 3 and f.beyond == 0
    with pytest.raises(ValueError):
        fidelity([1], [1], horizon=0, split=8)
