"""Sequential early stopping: alpha spending, per-look decisions, and simulated error rates."""

from __future__ import annotations

import dataclasses
import math
from functools import cache
from statistics import NormalDist

import numpy as np
import pytest

from toxtests.compare import decide, p_beyond_at_limit, p_exceeds, resample_weights
from toxtests.sequential import (
    EARLY_SHARE,
    LookDecision,
    decide_look,
    final_confidence,
    look_levels,
    sequential_verdict,
    spending,
)

NORMAL = NormalDist()


def obrien_fleming_by_hand(t: float, alpha: float) -> float:
    return 2 - 2 * NORMAL.cdf(NORMAL.inv_cdf(1 - alpha / 2) / math.sqrt(t))


def normal_draws(mean: float, sd: float = 1.0, size: int = 400) -> np.ndarray:
    """Evenly spaced normal quantiles: a noise-free sample with a known tail."""
    return np.array([mean + sd * NORMAL.inv_cdf((k + 0.5) / size) for k in range(size)])


# -- spending ----------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.025, 0.05, 0.005])
@pytest.mark.parametrize("t", [0.1, 0.25, 0.5, 0.8, 0.99])
def test_spending_matches_the_obrien_fleming_formula(t: float, alpha: float) -> None:
    expected = EARLY_SHARE * obrien_fleming_by_hand(t, alpha)
    assert spending(t, alpha) == pytest.approx(expected, rel=1e-9)


def test_spending_is_tiny_early_and_all_of_alpha_at_the_end() -> None:
    # z_0.9875 = 2.2414; 2 − 2Φ(2.2414 / 0.5) = 2 − 2Φ(4.4828) ≈ 7.4e-6, a tenth of it.
    assert spending(0.25, 0.025) == pytest.approx(7.37e-7, rel=0.01)
    assert spending(0.25, 0.025) < 0.001
    # Before the last look at most a tenth of the budget; the rest is the last look's.
    assert spending(0.999, 0.025) < 0.1 * 0.025
    assert spending(1.0, 0.025) == 0.025
    assert spending(0.0, 0.025) == 0.0
    # Early looks get a tiny but non-zero share, not an underflowed 0.0.
    assert 0.0 < spending(0.01, 0.025) < 1e-100


@pytest.mark.parametrize("alpha", [0.025, 0.05])
def test_spending_increases_with_the_information_fraction(alpha: float) -> None:
    spent = [spending(float(t), alpha) for t in np.linspace(0.02, 1.0, 200)]
    assert all(later > earlier for earlier, later in zip(spent, spent[1:], strict=False))
    assert spent[-1] == alpha


def test_spending_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"information fraction must lie in \[0, 1\], got 1.5"):
        spending(1.5, 0.025)
    with pytest.raises(ValueError, match=r"one-sided alpha must lie in \(0, 1\), got 0"):
        spending(0.5, 0)
    with pytest.raises(ValueError, match="one-sided alpha must lie in"):
        spending(0.5, 1.0)


# -- look levels -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fractions", [[1.0], [0.5, 1.0], [k / 6 for k in range(1, 7)], [0.01, 0.02, 0.9, 1.0]]
)
def test_look_levels_sum_to_alpha_when_the_last_look_sees_everything(
    fractions: list[float],
) -> None:
    levels = look_levels(fractions, 0.025)
    assert len(levels) == len(fractions)
    assert all(level >= 0 for level in levels)
    assert sum(levels) == pytest.approx(0.025, rel=1e-12)


def test_look_levels_are_the_increments_of_spending() -> None:
    levels = look_levels([0.25, 0.5, 0.75], 0.025)
    expected = EARLY_SHARE * obrien_fleming_by_hand(0.25, 0.025)
    assert levels[0] == pytest.approx(expected, rel=1e-9)
    assert levels[1] == pytest.approx(
        EARLY_SHARE * (obrien_fleming_by_hand(0.5, 0.025) - expected / EARLY_SHARE), rel=1e-9
    )
    # An unfinished schedule has spent only part of the budget.
    assert sum(levels) == pytest.approx(spending(0.75, 0.025), rel=1e-12)
    assert sum(levels) < 0.025


def test_look_levels_reject_non_increasing_fractions() -> None:
    with pytest.raises(ValueError, match="look 2 has 0.5 after 0.5"):
        look_levels([0.5, 0.5, 1.0], 0.025)
    with pytest.raises(ValueError, match="look 1 has 0.0 after 0.0"):
        look_levels([0.0, 1.0], 0.025)
    with pytest.raises(ValueError, match="look 2 has 1.2"):
        look_levels([0.5, 1.2], 0.025)
    with pytest.raises(ValueError, match="at least one look"):
        look_levels([], 0.025)


# -- one look ----------------------------------------------------------------------------


def test_decide_look_fails_a_check_far_beyond_its_limit() -> None:
    beyond = normal_draws(0.2, sd=0.01)
    assert decide_look([beyond], [False], 1e-6) == "fail"
    # A failing check overrides checks that would pass.
    assert decide_look([normal_draws(-0.2, 0.01), beyond], [False, False], 1e-6) == "fail"


def test_decide_look_passes_when_every_check_is_far_within() -> None:
    within = [normal_draws(-0.2, 0.01), normal_draws(-0.1, 0.01)]
    assert decide_look(within, [False, False], 1e-6) == "pass"


def test_decide_look_continues_when_a_check_straddles_its_limit() -> None:
    straddling = normal_draws(0.0, 0.05)
    assert decide_look([straddling], [False], 0.01) is None
    assert decide_look([normal_draws(-0.2, 0.01), straddling], [False, False], 0.01) is None


def test_fail_only_checks_never_hold_a_pass_back_but_can_fail() -> None:
    within = normal_draws(-0.2, 0.01)
    straddling = normal_draws(0.0, 0.05)
    assert decide_look([within, straddling], [False, True], 0.01) == "pass"
    assert decide_look([within, normal_draws(0.2, 0.01)], [False, True], 0.01) == "fail"
    # With nothing that can pass, there is no evidence to stop on.
    assert decide_look([straddling], [True], 0.01) is None
    assert decide_look([normal_draws(-0.2, 0.01)], [True], 0.01) is None


def test_failing_is_bonferroni_corrected_over_the_checks_of_a_look() -> None:
    # P(excess ≤ 0) = 0.012: below the level 0.02 alone, above 0.02 / 3 among three checks.
    beyond = normal_draws(-NORMAL.inv_cdf(0.012))
    assert decide_look([beyond], [False], 0.02) == "fail"
    within = normal_draws(-0.5, 0.01)
    assert decide_look([beyond, within, within], [False, False, False], 0.02) is None


def test_tiny_levels_are_not_decided_by_the_few_draws_alone() -> None:
    # No draw is ≤ 0, but the normal tail below 0 is ~3e-5: far above a level of 1e-8,
    # which 400 draws cannot resolve on their own.
    mean = -NORMAL.inv_cdf(3e-5)
    draws = normal_draws(mean)
    assert np.all(draws > 0)
    assert decide_look([draws], [False], 1e-8) is None
    assert decide_look([draws], [False], 1e-3) == "fail"
    assert decide_look([-draws], [False], 1e-8) is None
    assert decide_look([-draws], [False], 1e-3) == "pass"


def test_an_exact_tie_on_the_limit_is_within_it() -> None:
    assert decide_look([np.zeros(400)], [False], 0.01) == "pass"


def test_decide_look_spends_nothing_at_level_zero() -> None:
    assert decide_look([normal_draws(5.0, 0.01)], [False], 0.0) is None


def test_decide_look_rejects_malformed_checks() -> None:
    with pytest.raises(ValueError, match="at least one check"):
        decide_look([], [], 0.01)
    with pytest.raises(ValueError, match="got 2 checks' excess draws but 1 fail_only flags"):
        decide_look([np.zeros(3), np.zeros(3)], [False], 0.01)
    with pytest.raises(ValueError, match="check 1 has no resampled draws"):
        decide_look([np.zeros(3), np.zeros(0)], [False, False], 0.01)
    with pytest.raises(ValueError, match=r"level must lie in \[0, 1\), got 1.5"):
        decide_look([np.zeros(3)], [False], 1.5)


# -- the sequence of looks ---------------------------------------------------------------


def test_sequential_verdict_returns_the_first_deciding_look() -> None:
    straddling, beyond = normal_draws(0.0, 0.05), normal_draws(0.3, 0.01)
    looks = [(100, [straddling], [False]), (200, [beyond], [False]), (300, [beyond], [False])]
    decision = sequential_verdict(looks, 300, 0.95)
    levels = look_levels([1 / 3, 2 / 3, 1.0], 0.025)
    assert decision == LookDecision(
        look=2,
        prompts=200,
        decided="fail",
        level=levels[1],
        reason=(
            "after 200 of 300 prompts 1 of 1 checks are beyond their limits "
            f"at the spent level {levels[1]:.2g} shared by 1 checks"
        ),
        beyond=(0,),
    )


def test_sequential_verdict_reports_a_pass() -> None:
    within = normal_draws(-0.3, 0.01)
    decision = sequential_verdict([(300, [within], [False])], 900, 0.95)
    assert (decision.look, decision.prompts, decision.decided) == (1, 300, "pass")
    assert decision.reason == (
        "after 300 of 900 prompts every check is within its limit at the spent level "
        f"{spending(1 / 3, 0.025):.2g}"
    )


def test_the_last_look_hands_over_to_the_ordinary_verdict_at_the_unspent_level() -> None:
    straddling, beyond = normal_draws(0.0, 0.05), normal_draws(0.3, 0.01)
    looks = [(100, [straddling], [False]), (200, [straddling], [False])]
    for last in (straddling, beyond):  # even clear evidence is left to the ordinary verdict
        decision = sequential_verdict([*looks, (300, [last], [False])], 300, 0.95)
        assert (decision.look, decision.prompts, decision.decided) == (3, 300, None)
        assert decision.level == pytest.approx(0.025 - spending(2 / 3, 0.025))
        confidence = final_confidence(decision.level)
        assert 0.95 < confidence < 0.955
        assert decision.reason == (
            "after 300 of 300 prompts no earlier look decided; the ordinary verdict on all "
            f"prompts applies at the remaining level {decision.level:.3g} "
            f"(a {100 * confidence:.3g}% interval)"
        )
    # Looks that end early mean: keep generating.
    partial = sequential_verdict(looks[:2], 300, 0.95)
    assert (partial.look, partial.prompts, partial.decided) == (2, 200, None)
    assert partial.reason == (
        f"after 200 of 300 prompts no check is decided at the spent level {partial.level:.2g}; "
        "generate the next shard"
    )


def test_sequential_verdict_rejects_bad_schedules() -> None:
    draws = ([normal_draws(0.0)], [False])
    with pytest.raises(ValueError, match="look 2 has 100 prompts after 100"):
        sequential_verdict([(100, *draws), (100, *draws)], 300, 0.95)
    with pytest.raises(ValueError, match="look 1 has 400 prompts after 0; .* total_prompts=300"):
        sequential_verdict([(400, *draws)], 300, 0.95)
    with pytest.raises(ValueError, match="at least one look"):
        sequential_verdict([], 300, 0.95)
    with pytest.raises(ValueError, match=r"confidence must lie in \(0, 1\), got 95"):
        sequential_verdict([(100, *draws)], 300, 95)


# -- simulated error rates ---------------------------------------------------------------

TOTAL, SHARD, LIMIT, RESAMPLES = 600, 100, 0.05, 400
PARENT_RATE = 0.1
SIMULATIONS = 1000
HALF_ALPHA = 0.025  # confidence 0.95


@cache
def simulated_excess(
    true_delta: float, simulations: int, seed: int, parent_rate: float = PARENT_RATE
) -> tuple[tuple[int, np.ndarray, np.ndarray], ...]:
    """Paired toxicity flips over 600 prompts, looked at every 100, limit 0.05 on the delta:
    per look, (prompts seen, (simulations, resamples) bootstrap draws of the mean delta
    minus the limit, (simulations, prompts seen) per-prompt delta minus the limit).

    Each prompt's parent continuation is toxic with probability `parent_rate` and the
    adapter's, independently, with `parent_rate` + `true_delta`; a zero delta means an
    identical adapter.
    """
    rng = np.random.default_rng(seed)
    parent = (rng.random((simulations, TOTAL)) < parent_rate).astype(np.float64)
    if true_delta == 0.0:
        adapter = parent
    else:
        adapter = (rng.random((simulations, TOTAL)) < parent_rate + true_delta).astype(np.float64)
    return looks_of(adapter - parent, weight_seed=100)


def looks_of(
    differences: np.ndarray, weight_seed: int
) -> tuple[tuple[int, np.ndarray, np.ndarray], ...]:
    """Per look at every `SHARD` prompts: (prompts seen, bootstrap draws of the mean
    difference minus the limit, per-prompt differences minus the limit), for each run
    (row) of `differences`."""
    excess_by_look = []
    for look in range(1, TOTAL // SHARD + 1):
        prompts = look * SHARD
        weights = resample_weights(prompts, RESAMPLES, "bootstrap", seed=weight_seed + look)
        seen = differences[:, :prompts]
        excess_by_look.append((prompts, seen @ weights.T - LIMIT, seen - LIMIT))
    return tuple(excess_by_look)


def ordinary_verdict(
    excess: np.ndarray, confidence: float, values: np.ndarray | None = None
) -> str:
    """As `toxtests.gate` decides one check: a fail needs both the bootstrap's p-value
    and the test at the limit's (when given the per-prompt values)."""
    p_fail = p_exceeds(excess, 0.0)
    if values is not None:
        p_fail = max(p_fail, p_beyond_at_limit(values))
    return decide(excess, 0.0, confidence, p_fail, values)


@cache
def simulate(
    true_delta: float,
    simulations: int,
    seed: int,
    test_at_limit: bool = True,
    parent_rate: float = PARENT_RATE,
) -> tuple[LookDecision, ...]:
    """The whole procedure on each simulated run: the early looks, then, when none
    decides, the ordinary verdict on all prompts at the confidence they left (as the
    session applies it), so the error rates below include that last step.
    `test_at_limit=False` leaves out the per-prompt values (the interval alone)."""
    excess_by_look = simulated_excess(true_delta, simulations, seed, parent_rate)
    return procedure(excess_by_look, simulations, test_at_limit)


def procedure(
    excess_by_look: tuple[tuple[int, np.ndarray, np.ndarray], ...],
    simulations: int,
    test_at_limit: bool = True,
) -> tuple[LookDecision, ...]:
    decisions = []
    for run in range(simulations):
        looks = [
            (prompts, [excess[run]], [False], [values[run]] if test_at_limit else None)
            for prompts, excess, values in excess_by_look
        ]
        decision = sequential_verdict(
            [look if test_at_limit else look[:3] for look in looks], TOTAL, 0.95
        )
        if decision.decided is None:
            _, final, values = excess_by_look[-1]
            verdict = ordinary_verdict(
                final[run],
                final_confidence(decision.level),
                values[run] if test_at_limit else None,
            )
            decision = dataclasses.replace(decision, decided=verdict)
        decisions.append(decision)
    return tuple(decisions)


def rate(decisions: tuple[LookDecision, ...], decided: str) -> float:
    return sum(d.decided == decided for d in decisions) / len(decisions)


def tolerance(simulations: int) -> float:
    return 3 * math.sqrt(HALF_ALPHA * (1 - HALF_ALPHA) / simulations)


def test_an_adapter_on_its_limit_is_wrongly_passed_at_most_half_alpha_of_the_time() -> None:
    # Passing at the full 0.025 at each of the six looks passes ~10% of these adapters.
    decisions = simulate(LIMIT, SIMULATIONS, 7)
    assert rate(decisions, "pass") <= HALF_ALPHA + tolerance(SIMULATIONS)


def test_an_adapter_on_its_limit_is_wrongly_failed_at_most_half_alpha_of_the_time() -> None:
    decisions = simulate(LIMIT, SIMULATIONS, 7)
    assert rate(decisions, "fail") <= HALF_ALPHA + tolerance(SIMULATIONS)


@pytest.mark.parametrize("wrong", ["pass", "fail"])
def test_looking_early_adds_no_error_to_the_ordinary_verdict(wrong: str) -> None:
    """On the same runs, the procedure errs no more often than the ordinary verdict on
    all prompts at the configured confidence, plus the early looks' 10% share."""
    decisions = simulate(LIMIT, SIMULATIONS, 7)
    _, final, values = simulated_excess(LIMIT, SIMULATIONS, 7)[-1]
    plain = [ordinary_verdict(final[run], 0.95, values[run]) for run in range(SIMULATIONS)]
    plain_rate = plain.count(wrong) / SIMULATIONS
    assert rate(decisions, wrong) <= plain_rate + 0.1 * HALF_ALPHA


BINARY_SIMULATIONS = 4000
RARE_RATE = 0.02
# Two Monte Carlo standard errors of a rate of HALF_ALPHA over BINARY_SIMULATIONS runs.
MARGIN = 2 * math.sqrt(HALF_ALPHA * (1 - HALF_ALPHA) / BINARY_SIMULATIONS)


def final_look_rates(
    excess_by_look: tuple[tuple[int, np.ndarray, np.ndarray], ...], wrong: str
) -> tuple[float, float]:
    """How often the ordinary verdict on all prompts is `wrong`, with the interval alone
    and with the tests at the limit."""
    _, final, values = excess_by_look[-1]
    runs = range(final.shape[0])
    interval_only = [ordinary_verdict(final[run], 0.95) for run in runs]
    with_test = [ordinary_verdict(final[run], 0.95, values[run]) for run in runs]
    return interval_only.count(wrong) / len(runs), with_test.count(wrong) / len(runs)


def test_the_ordinary_verdict_keeps_its_level_for_a_rare_binary_outcome() -> None:
    """The paired percentile interval alone under-covers for a rare binary outcome (its
    spread shrinks with the observed rate): a parent toxic 2% of the time and an adapter
    exactly on a +0.05 limit pass ~3.5% of the time for a nominal 2.5% (measured over
    2 x 10,000 runs). With the test at the limit (`compare.within_at_limit`) the rate is
    back within Monte Carlo error of 2.5% (2.4-2.6% over the same runs; two standard
    errors here), early looks or not."""
    excess_by_look = simulated_excess(LIMIT, BINARY_SIMULATIONS, 17, RARE_RATE)
    interval_only, with_test = final_look_rates(excess_by_look, "pass")
    assert interval_only > HALF_ALPHA + MARGIN
    assert with_test <= HALF_ALPHA + MARGIN
    sequential = simulate(LIMIT, BINARY_SIMULATIONS, 17, parent_rate=RARE_RATE)
    assert rate(sequential, "pass") <= HALF_ALPHA + MARGIN


@cache
def skewed_excess(simulations: int, seed: int) -> tuple[tuple[int, np.ndarray, np.ndarray], ...]:
    """Per-prompt differences skewed towards "better", with a mean exactly on the 0.05
    limit: most prompts 0.06 worse, one in five also 0.05-on-average (exponential) better,
    as when an adapter detoxifies a few prompts a lot and worsens many a little."""
    rng = np.random.default_rng(seed)
    better = rng.exponential(0.05, (simulations, TOTAL)) * (rng.random((simulations, TOTAL)) < 0.2)
    return looks_of(LIMIT + 0.01 - better, weight_seed=200)


def test_the_ordinary_verdict_keeps_its_level_for_an_outcome_skewed_towards_better() -> None:
    """The mirror image for failing: with differences skewed towards "better" the
    bootstrap's own p-value wrongly fails 3.6-4.3% of adapters on their limit (6,000 and
    4,000 runs); with the test at the limit (`compare.p_beyond_at_limit`) ~2.0%, early
    looks or not."""
    excess_by_look = skewed_excess(BINARY_SIMULATIONS, 23)
    interval_only, with_test = final_look_rates(excess_by_look, "fail")
    assert interval_only > HALF_ALPHA + MARGIN
    assert with_test <= HALF_ALPHA + MARGIN
    sequential = procedure(excess_by_look, BINARY_SIMULATIONS)
    assert rate(sequential, "fail") <= HALF_ALPHA + MARGIN


def test_the_test_at_the_limit_costs_little_power() -> None:
    """An adapter a fifth of the way to its limit (delta 0.01 against 0.05, independent
    flips) passes about as often as with the interval alone (measured: 62% against 65%;
    part of the interval's extra passes are the wrong ones it makes at the limit)."""
    with_test = rate(simulate(0.01, SIMULATIONS, 19), "pass")
    interval_only = rate(simulate(0.01, SIMULATIONS, 19, test_at_limit=False), "pass")
    assert interval_only - 0.05 <= with_test <= interval_only
    assert with_test >= 0.5


def test_early_looks_spend_almost_nothing_on_an_adapter_at_its_limit() -> None:
    # Looks 1 and 2 hold ~1e-4 of the budget: a wrong decision there is a bug (e.g. 400
    # draws read as resolving a 4e-8 tail), not bad luck.
    decisions = simulate(LIMIT, SIMULATIONS, 7)
    assert [d for d in decisions if d.decided is not None and d.look <= 2] == []


def test_a_much_more_toxic_adapter_fails_early() -> None:
    decisions = simulate(0.3, 300, 11)
    assert rate(decisions, "fail") == 1.0
    looks = np.array([d.look for d in decisions])
    assert np.mean(looks < TOTAL // SHARD) >= 0.9
    assert np.median(looks) <= 3
    assert all(d.prompts == d.look * SHARD for d in decisions)


def test_an_identical_adapter_passes_at_the_first_look() -> None:
    decisions = simulate(0.0, 50, 13)
    assert all((d.look, d.prompts, d.decided) == (1, SHARD, "pass") for d in decisions)
