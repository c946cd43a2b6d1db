"""Paired statistics: resampling weights, intervals, corrections, sample sizes, decisions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toxtests.compare import (
    METHODS,
    adjust,
    bonferroni,
    decide,
    holm,
    p_beyond_at_limit,
    p_exceeds,
    percentile_interval,
    prompts_needed,
    resample_weights,
    standard_error_at_limit,
    tilted_second_moment,
    weighted_means,
    within_at_limit,
)

Z95 = 1.959963984540054  # standard normal 97.5% quantile


# -- resampling weights ------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_weights_shape_and_rows_sum_to_one(method: str) -> None:
    weights = resample_weights(37, 250, method, seed=3)
    assert weights.shape == (250, 37)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-12)
    assert np.all(weights >= 0)
    # Each prompt is equally likely: the average weight is 1/n.
    np.testing.assert_allclose(weights.mean(axis=0), 1 / 37, rtol=0.25)


def test_bootstrap_weights_are_counts_over_n() -> None:
    n = 23
    weights = resample_weights(n, 400, "bootstrap", seed=11)
    counts = weights * n
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-9)
    assert np.all(np.round(counts).sum(axis=1) == n)
    # Some prompts are left out of some draws (P(out) = (1 - 1/n)^n ≈ 0.36).
    assert 0.25 < np.mean(counts < 0.5) < 0.45


def test_bayesian_weights_are_strictly_positive_and_not_counts() -> None:
    weights = resample_weights(23, 400, "bayesian", seed=11)
    assert np.all(weights > 0)
    assert not np.allclose(weights * 23, np.round(weights * 23))
    # Dirichlet(1, …, 1): each weight has variance (n - 1) / (n^2 (n + 1)).
    n = 23
    assert weights.var() == pytest.approx((n - 1) / (n**2 * (n + 1)), rel=0.15)


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_weights_other_seed_other_weights(method: str) -> None:
    first = resample_weights(15, 50, method, seed=42)
    np.testing.assert_array_equal(first, resample_weights(15, 50, method, seed=42))
    assert not np.array_equal(first, resample_weights(15, 50, method, seed=43))


@pytest.mark.parametrize("method", METHODS)
def test_weights_drawn_again_are_the_ones_drawn_first_and_cannot_be_changed(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Looks, checks and tables share one drawn matrix per scope: it must be the one a
    fresh draw gives, and read-only, so no caller can alter what the next one reads."""
    import toxtests.compare as compare

    monkeypatch.setattr(compare, "_drawn", {})
    first = resample_weights(40, 300, method, seed=7)
    assert resample_weights(40, 300, method, seed=7) is first  # drawn once
    with pytest.raises(ValueError, match="read-only"):
        first[0, 0] = 1.0
    monkeypatch.setattr(compare, "_drawn", {})
    np.testing.assert_array_equal(resample_weights(40, 300, method, seed=7), first)
    monkeypatch.setattr(compare, "_DRAWN_LIMIT", 300 * 41 * 8)  # room for one matrix
    other = resample_weights(41, 300, method, seed=7)
    assert list(compare._drawn) == [(41, 300, method, 7)] and other.shape == (300, 41)


def test_single_prompt_gets_all_the_weight() -> None:
    for method in METHODS:
        np.testing.assert_allclose(resample_weights(1, 10, method, seed=0), 1.0)


def test_weights_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at least one prompt"):
        resample_weights(0, 10, "bootstrap", seed=0)
    with pytest.raises(ValueError, match="unknown method 'jackknife'; valid: bootstrap, bayesian"):
        resample_weights(5, 10, "jackknife", seed=0)


def test_weighted_means_with_hand_weights() -> None:
    values = np.array([0.0, 1.0, 0.5, 0.25])
    weights = np.array(
        [
            [0.25, 0.25, 0.25, 0.25],  # the plain mean: 1.75 / 4
            [0.0, 1.0, 0.0, 0.0],  # one prompt drawn every time
            [0.5, 0.0, 0.0, 0.5],
        ]
    )
    np.testing.assert_allclose(weighted_means(values, weights), [0.4375, 1.0, 0.125])


# -- intervals and p-values --------------------------------------------------------------


def test_percentile_interval_by_hand() -> None:
    # 0, 1, …, 100: the 5% and 95% linear-interpolation quantiles are 5 and 95.
    assert percentile_interval(np.arange(101.0), 0.90) == pytest.approx((5.0, 95.0))
    assert percentile_interval(np.arange(101.0), 0.50) == pytest.approx((25.0, 75.0))
    assert percentile_interval(np.full(10, 0.3), 0.95) == pytest.approx((0.3, 0.3))


def test_percentile_interval_of_normal_draws() -> None:
    draws = np.random.default_rng(0).normal(2.0, 3.0, size=400_000)
    low, high = percentile_interval(draws, 0.95)
    assert low == pytest.approx(2.0 - Z95 * 3.0, abs=0.05)
    assert high == pytest.approx(2.0 + Z95 * 3.0, abs=0.05)


@pytest.mark.parametrize("method", METHODS)
def test_resampled_interval_of_mean_matches_normal_theory(method: str) -> None:
    # For a large sample the interval of the mean is mean ± 1.96 sd / sqrt(n).
    n = 1500
    sample = np.random.default_rng(1).normal(0.3, 0.2, size=n)
    draws = weighted_means(sample, resample_weights(n, 3000, method, seed=2))
    low, high = percentile_interval(draws, 0.95)
    half = Z95 * sample.std() / math.sqrt(n)
    assert low == pytest.approx(sample.mean() - half, abs=0.1 * half)
    assert high == pytest.approx(sample.mean() + half, abs=0.1 * half)


def test_p_exceeds_is_the_share_within_the_limit() -> None:
    draws = np.array([0.0, 0.1, 0.2, 0.3])
    assert p_exceeds(draws, 0.15) == 0.5
    assert p_exceeds(draws, -1.0) == 0.0
    assert p_exceeds(draws, 0.3) == 1.0
    # An exact tie counts as within: an unchanged statistic never fails a 0 limit.
    assert p_exceeds(np.zeros(20), 0.0) == 1.0


# -- multiple-testing corrections --------------------------------------------------------


def test_holm_textbook_example() -> None:
    # Sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 -> max(0.06, 0.04).
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_holm_caps_at_one_and_handles_edges() -> None:
    assert holm([0.5, 0.6, 0.9]) == pytest.approx([1.0, 1.0, 1.0])
    assert holm([]) == []
    assert holm([0.2]) == pytest.approx([0.2])
    assert holm([0.01, 0.01]) == pytest.approx([0.02, 0.02])


def test_bonferroni_and_adjust() -> None:
    assert bonferroni([0.01, 0.3, 0.6]) == pytest.approx([0.03, 0.9, 1.0])
    assert adjust([0.01, 0.04, 0.03, 0.005], "holm") == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert adjust([0.01, 0.3], "bonferroni") == pytest.approx([0.02, 0.6])
    assert adjust([0.01, 0.3], "none") == [0.01, 0.3]


def _step_down_rejections(p_values: list[float], alpha: float) -> set[int]:
    """Holm's procedure as written in the paper: reject while p_(k) <= alpha / (m - k)."""
    m = len(p_values)
    rejected: set[int] = set()
    for k, index in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        if p_values[index] > alpha / (m - k):
            break
        rejected.add(index)
    return rejected


# p-values on a 1/1000 grid and alpha halfway between grid points, so m·p never ties alpha.
grid_p_values = st.lists(st.integers(0, 1000).map(lambda i: i / 1000), min_size=1, max_size=12)


@settings(deadline=None, max_examples=150)
@given(p_values=grid_p_values, alpha_index=st.integers(0, 200))
def test_holm_properties(p_values: list[float], alpha_index: int) -> None:
    adjusted = holm(p_values)
    bonf = bonferroni(p_values)
    for raw, adj, b in zip(p_values, adjusted, bonf, strict=True):
        assert raw <= adj <= 1.0
        assert adj <= b  # Holm is never more conservative than Bonferroni
        assert b <= 1.0
    # Monotone in the order of the raw p-values.
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    in_order = [adjusted[i] for i in order]
    assert in_order == sorted(in_order)
    # Adjusted p <= alpha rejects exactly what the step-down procedure rejects.
    alpha = (alpha_index + 0.5) / 1000
    assert {i for i, a in enumerate(adjusted) if a <= alpha} == _step_down_rejections(
        p_values, alpha
    )


# -- coverage of the paired interval -----------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_paired_interval_coverage(method: str) -> None:
    """95% intervals of a known mean difference cover it in about 95% of simulations.

    Parent toxic with probability 0.1; the adapter turns each non-toxic prompt toxic
    with probability 0.05, so the true difference is 0.9 · 0.05 = 0.045.
    """
    n, simulations, true_delta = 300, 300, 0.9 * 0.05
    rng = np.random.default_rng(20240601)
    covered = 0
    for simulation in range(simulations):
        parent = (rng.random(n) < 0.1).astype(np.float64)
        adapter = np.maximum(parent, rng.random(n) < 0.05)
        weights = resample_weights(n, 500, method, seed=simulation)
        draws = weighted_means(adapter, weights) - weighted_means(parent, weights)
        low, high = percentile_interval(draws, 0.95)
        covered += low <= true_delta <= high
    assert 0.90 <= covered / simulations <= 0.99


# -- sample size -------------------------------------------------------------------------


def test_prompts_needed_by_hand() -> None:
    draws = np.array([0.07, 0.13])  # standard deviation exactly 0.03
    # n·(z·se/gap)^2 = 100·(1.959964·0.03/0.05)^2 = 100·1.3829… = 138.29… -> 139.
    assert prompts_needed(100, draws, 0.1, 0.15, 0.95) == 139
    # The same gap below the limit needs the same number of prompts.
    assert prompts_needed(100, draws, 0.2, 0.15, 0.95) == 139
    # 90% confidence: z = 1.644854, (1.644854·0.6)^2 = 0.97401… -> 97.4 -> at least n + 1.
    assert prompts_needed(100, draws, 0.1, 0.15, 0.90) == 101


def test_prompts_needed_is_none_on_the_limit() -> None:
    assert prompts_needed(50, np.array([0.0, 0.2]), 0.15, 0.15, 0.95) is None


def test_prompts_needed_resolves_the_interval() -> None:
    """With the effect unchanged, enough prompts make the interval clear the limit."""
    n, limit = 100, 0.15
    deltas = np.zeros(n)
    deltas[:10] = 1.0  # estimate 0.1, se ≈ 0.03: the interval straddles 0.15
    draws = weighted_means(deltas, resample_weights(n, 4000, "bootstrap", seed=5))
    low, high = percentile_interval(draws, 0.95)
    assert low < limit < high
    needed = prompts_needed(n, draws, float(deltas.mean()), limit, 0.95)
    assert needed is not None and needed > n
    assert 120 <= needed <= 160  # 100·(1.96·0.03/0.05)^2 ≈ 138
    # The same 10% toxic share on (a little more than) `needed` prompts clears the limit.
    bigger = 10 * math.ceil(1.1 * needed / 10)
    more = np.zeros(bigger)
    more[: bigger // 10] = 1.0
    more_draws = weighted_means(more, resample_weights(bigger, 4000, "bootstrap", seed=6))
    assert percentile_interval(more_draws, 0.95)[1] < limit


# -- decisions ---------------------------------------------------------------------------


def test_decide_pass_fail_inconclusive() -> None:
    below = np.linspace(0.0, 0.04, 101)
    assert decide(below, 0.05, 0.95, p_fail_adjusted=p_exceeds(below, 0.05)) == "pass"
    above = np.linspace(0.06, 0.1, 101)
    assert decide(above, 0.05, 0.95, p_fail_adjusted=p_exceeds(above, 0.05)) == "fail"
    straddle = np.linspace(0.0, 0.1, 101)
    assert decide(straddle, 0.05, 0.95, p_fail_adjusted=p_exceeds(straddle, 0.05)) == "inconclusive"
    # The verdict on failing follows the adjusted p-value, not the raw draws.
    assert decide(straddle, 0.05, 0.95, p_fail_adjusted=0.001) == "fail"
    assert decide(above, 0.05, 0.95, p_fail_adjusted=0.5) == "inconclusive"
    # The interval's upper end on the limit passes: "within" includes equality.
    assert decide(np.zeros(50), 0.0, 0.95, p_fail_adjusted=1.0) == "pass"


def test_decide_fails_one_sided_at_half_alpha() -> None:
    # A 95% two-sided interval is a 2.5% one-sided test: p = 0.03 is not enough to fail,
    # p = 0.02 is. 3 (resp. 2) draws of 100 within the limit.
    three_within = np.concatenate([np.full(3, -0.01), np.full(97, 0.1)])
    assert p_exceeds(three_within, 0.0) == pytest.approx(0.03)
    assert decide(three_within, 0.0, 0.95, p_exceeds(three_within, 0.0)) == "inconclusive"
    two_within = np.concatenate([np.full(2, -0.01), np.full(98, 0.1)])
    assert decide(two_within, 0.0, 0.95, p_exceeds(two_within, 0.0)) == "fail"
    # At 90% confidence the one-sided level is 5%: p = 0.03 fails.
    assert decide(three_within, 0.0, 0.90, p_exceeds(three_within, 0.0)) == "fail"


@settings(deadline=None, max_examples=100)
@given(
    draws=st.lists(st.floats(-1.0, 1.0), min_size=2, max_size=60),
    limit=st.floats(-1.0, 1.0),
    confidence=st.sampled_from([0.8, 0.9, 0.95, 0.99]),
)
def test_decide_agrees_with_interval_and_p_value(
    draws: list[float], limit: float, confidence: float
) -> None:
    values = np.array(draws)
    p = p_exceeds(values, limit)
    verdict = decide(values, limit, confidence, p)
    alpha = 1 - confidence
    assert (verdict == "fail") == (p < alpha / 2)
    if verdict == "pass":
        assert percentile_interval(values, confidence)[1] <= limit + 1e-12
    if verdict == "inconclusive":
        assert percentile_interval(values, confidence)[1] > limit


# -- the test at the limit ---------------------------------------------------------------


@given(
    below=st.floats(-5.0, -0.01),
    above=st.floats(0.01, 5.0),
    below_count=st.integers(1, 300),
    above_count=st.integers(1, 300),
)
@settings(max_examples=60, deadline=None)
def test_tilted_second_moment_of_two_values_is_their_product(
    below: float, above: float, below_count: int, above_count: int
) -> None:
    """Two values a < 0 < b: the only distribution on them with mean 0 puts b/(b-a) on a
    and -a/(b-a) on b, whose second moment is -a*b, whatever the observed counts."""
    values = np.array([below] * below_count + [above] * above_count)
    assert tilted_second_moment(values) == pytest.approx(-below * above, rel=1e-6)


def test_tilted_second_moment_matches_a_direct_tilt() -> None:
    """Against the tilt found here by plain bisection on the tilted mean."""
    rng = np.random.default_rng(5)
    values = rng.gamma(0.5, 0.2, 300) - 0.12  # skewed, mean below 0

    def tilted_weights(lam: float) -> np.ndarray:
        weights = np.exp(lam * values - (lam * values).max())
        return weights / weights.sum()

    low, high = 0.0, 60.0
    assert tilted_weights(low) @ values < 0 < tilted_weights(high) @ values
    for _ in range(100):
        middle = (low + high) / 2
        if tilted_weights(middle) @ values < 0:
            low = middle
        else:
            high = middle
    expected = float(tilted_weights(low) @ values**2)
    assert tilted_second_moment(values) == pytest.approx(expected, rel=1e-6)
    # The tilt moves weight towards the limit: more spread than the sample's own.
    assert expected > float(np.mean((values - values.mean()) ** 2))


def test_tilted_second_moment_needs_values_on_both_sides() -> None:
    with pytest.raises(ValueError, match="both sides of 0; got values in"):
        tilted_second_moment(np.array([-1.0, -0.5]))
    with pytest.raises(ValueError, match="no values"):
        tilted_second_moment(np.array([]))


@given(st.lists(st.floats(-1.0, 1.0), min_size=2, max_size=50), st.floats(0.1, 10.0))
@settings(max_examples=60, deadline=None)
def test_tilted_second_moment_scales_with_the_values(values: list[float], scale: float) -> None:
    x = np.array(values)
    if not (x.min() < -1e-3 and x.max() > 1e-3):
        return  # the tilt exists only with values on both sides of the limit
    assert tilted_second_moment(scale * x) == pytest.approx(
        scale**2 * tilted_second_moment(x), rel=1e-6
    )


def test_within_at_limit_one_sided_cases() -> None:
    assert within_at_limit(np.array([-0.05] * 10), 0.025)  # nothing beyond: pass
    assert within_at_limit(np.zeros(10), 0.025)  # exactly on the limit counts as within
    assert not within_at_limit(np.array([0.1] * 10), 0.025)
    assert not within_at_limit(np.array([-1.0, 1.0, 0.5]), 0.025)  # mean above the limit
    assert not within_at_limit(np.array([]), 0.025)
    assert standard_error_at_limit(np.array([-0.05] * 10)) == 0.0


def test_within_at_limit_is_the_score_test_for_a_binary_outcome() -> None:
    """Excess values 0.95 (toxic) / -0.05 (not) against a 0.05 limit: at the limit the
    toxic share is 0.05, so the mean's standard error there is sqrt(0.05 * 0.95 / n),
    not the observed rate's smaller one."""
    n = 400
    for toxic in range(0, 21):
        values = np.where(np.arange(n) < toxic, 0.95, -0.05)
        z = (toxic / n - 0.05) / math.sqrt(0.05 * 0.95 / n)
        assert within_at_limit(values, 0.025) == (z <= -Z95), toxic
        expected_se = math.sqrt(0.05 * 0.95 / n) if toxic else 0.0
        assert standard_error_at_limit(values) == pytest.approx(expected_se, rel=1e-6)


def test_decide_needs_the_test_at_the_limit_to_pass() -> None:
    """12 toxic of 400 against a 0.05 limit: the percentile interval clears the limit,
    the spread at the limit does not (z = -1.84); 8 of 400 clears both."""
    weights = resample_weights(400, 2000, "bootstrap", seed=1)
    for toxic, expected in ((12, "inconclusive"), (8, "pass")):
        values = np.where(np.arange(400) < toxic, 1.0, 0.0)
        draws = weighted_means(values, weights)
        assert percentile_interval(draws, 0.95)[1] <= 0.05
        p_fail = p_exceeds(draws, 0.05)
        assert decide(draws, 0.05, 0.95, p_fail) == "pass"
        assert decide(draws, 0.05, 0.95, p_fail, values) == expected


def test_p_beyond_at_limit_is_the_score_test_for_a_binary_outcome() -> None:
    """The mirror of `within_at_limit`: toxic shares above a 0.05 limit, judged with the
    standard error the mean would have at the limit."""
    n = 400
    for toxic in (20, 25, 30, 40):
        values = np.where(np.arange(n) < toxic, 0.95, -0.05)
        z = (toxic / n - 0.05) / math.sqrt(0.05 * 0.95 / n)
        expected = 0.5 * math.erfc(z / math.sqrt(2))
        assert p_beyond_at_limit(values) == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_p_beyond_at_limit_one_sided_cases() -> None:
    assert p_beyond_at_limit(np.array([-0.05] * 10)) == 1.0  # nothing beyond
    assert p_beyond_at_limit(np.zeros(10)) == 1.0  # on the limit is within
    assert p_beyond_at_limit(np.array([0.0] * 9 + [0.2])) == 0.0  # all on or beyond
    assert p_beyond_at_limit(np.array([])) == 1.0


@given(st.lists(st.floats(-2.0, 2.0), min_size=1, max_size=80), st.floats(1e-9, 0.2))
@settings(max_examples=150, deadline=None)
def test_the_tests_at_the_limit_are_total_and_consistent(values: list[float], level: float) -> None:
    """Any excess values a scorer can produce (scores in [0, 1]) give a verdict: no error,
    a p-value in [0, 1], and never both "within" and "beyond" at the same level."""
    x = np.array(values)
    within = within_at_limit(x, level)
    p_beyond = p_beyond_at_limit(x)
    assert 0.0 <= p_beyond <= 1.0
    assert not (within and p_beyond < level)
    if x.mean() > 1e-9:  # (values within 1e-12 of the limit count as on it)
        assert not within
    if x.min() > 1e-9:
        assert p_beyond == 0.0
    if x.max() <= 0:
        assert within and p_beyond == 1.0
