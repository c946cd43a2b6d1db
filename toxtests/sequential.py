"""Sequential early stopping: stop once more prompts cannot reasonably change the verdict.

The gate generates prompts shard by shard in a fixed order and may look at the data after
each shard. Testing at the full level at every look would inflate the error: the chance
that *some* look crosses a boundary by luck grows with the number of looks. Alpha
spending (Lan & DeMets, 1983) gives each look its own share of the error budget, fixed
by the information fraction t = prompts seen / total prompts and never by the data, so
the schedule of looks may even be decided on the fly.

Each direction has its own budget, the one-sided α/2 of the gate's confidence: wrongly
failing an adapter whose statistic is within its limit, and wrongly passing one whose
statistic is beyond it. The looks before the last share at most `EARLY_SHARE` (10%) of
it, spent along an O'Brien–Fleming-type curve, α(t) = 0.1 · (2 − 2Φ(z_{1−α/2} / √t))
for t < 1: almost nothing early, so an early decision needs overwhelming evidence. The
last look, on all prompts, is the ordinary verdict at what is left, at least 90% of α/2
(a 95.5% interval at confidence 0.95). Look i tests at the increment α(t_i) − α(t_{i−1});
by the union bound (Bonferroni over looks) the probability of a wrong decision at *any*
look, the ordinary verdict included, is at most the sum of the increments, α(1) = α/2,
whatever the dependence between looks. Exact group-sequential boundaries would use the
correlation between looks and spend less conservatively; the union bound needs no model
of it, and keeping 90% for the last look costs the ordinary verdict little power.

Pure numpy, like `toxtests.compare`: the inputs are the resampled excess draws
(statistic − limit, > 0 means beyond the limit) that `toxtests.gate` computes, and the
per-prompt excess values passes and fails are also tested on at the limit
(`toxtests.compare.within_at_limit`, `p_beyond_at_limit`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from toxtests.compare import p_beyond_at_limit, within_at_limit

# Most the looks before the last may spend, as a share of each direction's α/2.
EARLY_SHARE = 0.1

# Same tie tolerance as `toxtests.compare.p_exceeds`: a draw exactly on the limit counts
# as within it, so an identical adapter with a zero limit is never "beyond".
_TIE = 1e-12


def _check_alpha(alpha_one_sided: float) -> None:
    if not 0.0 < alpha_one_sided < 1.0:
        raise ValueError(
            f"one-sided alpha must lie in (0, 1), got {alpha_one_sided!r}; "
            "use (1 - confidence) / 2, e.g. 0.025 for confidence 0.95"
        )


def spending(t: float, alpha_one_sided: float) -> float:
    """Cumulative one-sided alpha spent by information fraction `t`:
    `EARLY_SHARE` · (2 − 2Φ(z_{1−α/2}/√t)) before the last look, all of it at t = 1.

    Zero at t = 0, increasing, below `EARLY_SHARE` · `alpha_one_sided` for every t < 1,
    and exactly `alpha_one_sided` at t = 1: the rest is the last look's.
    """
    _check_alpha(alpha_one_sided)
    if not 0.0 <= t <= 1.0:
        raise ValueError(
            f"information fraction must lie in [0, 1], got {t!r}; pass prompts seen / total prompts"
        )
    if t == 0.0:
        return 0.0
    if t == 1.0:
        return alpha_one_sided
    z = NormalDist().inv_cdf(1.0 - alpha_one_sided / 2.0)
    # erfc(x / √2) = 2 − 2Φ(x), without the cancellation of 1 − Φ(x) for large x, so
    # early looks get their tiny but non-zero share instead of 0.0.
    return EARLY_SHARE * math.erfc(z / math.sqrt(2.0 * t))


def look_levels(fractions: Sequence[float], alpha_one_sided: float) -> list[float]:
    """One-sided level of each look: the alpha spent since the previous look.

    The levels telescope, so they sum to `spending(fractions[-1])`, which is
    `alpha_one_sided` when the last look sees every prompt: the union-bound budget.
    """
    _check_alpha(alpha_one_sided)
    if len(fractions) == 0:
        raise ValueError("look_levels needs at least one look; got an empty list of fractions")
    levels = []
    spent = 0.0
    previous = 0.0
    for look, fraction in enumerate(fractions, start=1):
        if not previous < fraction <= 1.0:
            raise ValueError(
                f"information fractions must increase strictly within (0, 1]; look {look} has "
                f"{fraction!r} after {previous!r}; looks are cumulative prompts seen / total"
            )
        cumulative = spending(fraction, alpha_one_sided)
        # max(): rounding near t = 1 must not produce a negative level.
        levels.append(max(0.0, cumulative - spent))
        spent = max(spent, cumulative)
        previous = fraction
    return levels


def _normal_tail_below_zero(draws: np.ndarray) -> float:
    """P(X ≤ 0) for a normal with the draws' mean and standard deviation."""
    mean = float(np.mean(draws))
    sd = float(np.std(draws))
    if sd == 0.0:
        return 0.0 if mean > _TIE else 1.0
    return 0.5 * math.erfc(mean / (sd * math.sqrt(2.0)))


def _confidently_beyond(draws: np.ndarray, level: float, values: np.ndarray | None) -> bool:
    """One-sided test of "within the limit" rejects at `level`.

    A few hundred draws resolve tail probabilities only down to about 1 / len(draws):
    below that "no draw ≤ 0" would claim far more than the draws show. The normal tail
    fitted to the draws extrapolates to the tiny levels of early looks; both must agree,
    and so must the test at the limit on the per-prompt excess `values`, when given
    (`toxtests.compare.p_beyond_at_limit`).
    """
    empirical = float(np.mean(draws <= _TIE))
    if not (empirical < level and _normal_tail_below_zero(draws) < level):
        return False
    return values is None or p_beyond_at_limit(values) < level


def _confidently_within(draws: np.ndarray, level: float, values: np.ndarray | None) -> bool:
    """The upper bound of a one-sided interval at `level` is within the limit.

    As for failing, the empirical quantile and the normal quantile must both be within;
    given the per-prompt excess `values`, so must the test with the variance taken at
    the limit (`toxtests.compare.within_at_limit`), which keeps a skewed or rare
    outcome from passing too easily.
    """
    upper = float(np.quantile(draws, 1.0 - level))
    z = -NormalDist().inv_cdf(level)
    normal_upper = float(np.mean(draws)) + z * float(np.std(draws))
    if upper > _TIE or normal_upper > _TIE:
        return False
    return values is None or within_at_limit(values, level)


def _validated(excess_draws: Sequence[np.ndarray], fail_only: Sequence[bool]) -> list[np.ndarray]:
    if len(excess_draws) == 0:
        raise ValueError("a look needs at least one check; got no excess draws")
    if len(fail_only) != len(excess_draws):
        raise ValueError(
            f"got {len(excess_draws)} checks' excess draws but {len(fail_only)} fail_only "
            "flags; pass one flag per check"
        )
    arrays = [np.asarray(draws, dtype=np.float64).ravel() for draws in excess_draws]
    for index, draws in enumerate(arrays):
        if draws.size == 0:
            raise ValueError(f"check {index} has no resampled draws; resample at least once")
    return arrays


def _beyond_checks(
    arrays: Sequence[np.ndarray], level: float, values: Sequence[np.ndarray | None]
) -> list[int]:
    # Bonferroni over the checks of this look: any of them failing fails the adapter.
    threshold = level / len(arrays)
    return [
        index
        for index, (draws, value) in enumerate(zip(arrays, values, strict=True))
        if _confidently_beyond(draws, threshold, value)
    ]


def decide_look(
    excess_draws: Sequence[np.ndarray],
    fail_only: Sequence[bool],
    level: float,
    excess_values: Sequence[np.ndarray] | None = None,
) -> str | None:
    """Decide one look at one-sided `level`: "fail", "pass" or None (continue).

    Fail when any check is confidently beyond its limit at `level` / number of checks
    (Bonferroni: a wrong fail at this look has probability ≤ `level`). Pass when every
    check that can pass (not `fail_only`) has its one-sided upper bound at `level` within
    its limit, and none fails: passing needs all of them (intersection–union), so a wrong
    pass at this look has probability ≤ `level` with no correction. `fail_only` checks
    (shards) can fail the adapter but never hold a pass back. A look with no check that
    can pass never passes: stopping would rest on no evidence that the adapter is fine.
    `excess_values` (per check, each prompt's statistic − limit), when given, add the
    tests at the limit to every pass and every fail.
    """
    arrays = _validated(excess_draws, fail_only)
    if excess_values is not None and len(excess_values) != len(arrays):
        raise ValueError(
            f"got {len(arrays)} checks' excess draws but {len(excess_values)} checks' "
            "per-prompt excess values; pass one array per check"
        )
    values: list[np.ndarray | None] = (
        list(excess_values) if excess_values is not None else [None] * len(arrays)
    )
    if not 0.0 <= level < 1.0:
        raise ValueError(f"a look's one-sided level must lie in [0, 1), got {level!r}")
    if level == 0.0:
        return None  # nothing spent at this look: nothing can be decided
    if _beyond_checks(arrays, level, values):
        return "fail"
    can_pass = [
        (draws, value)
        for draws, value, only in zip(arrays, values, fail_only, strict=True)
        if not only
    ]
    if can_pass and all(_confidently_within(draws, level, value) for draws, value in can_pass):
        return "pass"
    return None


@dataclass(frozen=True)
class LookDecision:
    look: int  # 1-based
    prompts: int  # prompts seen at this look
    decided: str | None  # "pass", "fail" or None (continue, or the ordinary verdict at the end)
    level: float  # the one-sided level used at this look
    reason: str
    beyond: tuple[int, ...] = ()  # positions of the checks found beyond their limits


Look = tuple[Any, ...]
"""(prompts seen, excess draws per check, fail_only per check[, per-prompt excess values
per check]): the evidence of one look."""


def sequential_verdict(
    looks: Sequence[Look],
    total_prompts: int,
    confidence: float,
) -> LookDecision:
    """The first look that decides, else the last look given, undecided.

    `looks` holds, in order, (prompts seen so far, excess draws per check on all prompts
    so far, fail_only flags[, per-prompt excess values per check, for the test at the
    limit]). Each direction spends α/2 = (1 − confidence) / 2 over the
    looks, so the probability of ever wrongly failing an adapter within its limits is
    ≤ α/2, and likewise of ever wrongly passing one beyond them — for decisions made
    here, the last look included at its own increment.

    The last look (prompts == total_prompts) is not decided here: it comes back undecided
    with `level` = the one-sided α/2 minus what the earlier looks spent, and the caller
    applies the ordinary verdict on all prompts at confidence 1 − 2 · level
    (`final_confidence`), so the bound holds for the whole procedure. When the looks end
    before `total_prompts`, the undecided answer means "generate the next shard".
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}; e.g. 0.95")
    if total_prompts < 1:
        raise ValueError(f"total_prompts must be at least 1, got {total_prompts}")
    if len(looks) == 0:
        raise ValueError("sequential_verdict needs at least one look; got none")
    seen = [look[0] for look in looks]
    for look, (before, after) in enumerate(zip([0, *seen], seen, strict=False), start=1):
        if not before < after <= total_prompts:
            raise ValueError(
                f"look {look} has {after} prompts after {before}; prompts seen must increase "
                f"strictly up to total_prompts={total_prompts}"
            )
    levels = look_levels([prompts / total_prompts for prompts in seen], (1.0 - confidence) / 2.0)
    schedule = zip(looks, levels, strict=True)
    for look, (evidence, level) in enumerate(schedule, start=1):
        prompts, excess_draws, fail_only = evidence[:3]
        excess_values = evidence[3] if len(evidence) > 3 else None
        where = f"after {prompts} of {total_prompts} prompts"
        if prompts == total_prompts:
            reason = (
                f"{where} no earlier look decided; the ordinary verdict on all prompts "
                f"applies at the remaining level {level:.3g} "
                f"(a {100 * final_confidence(level):.3g}% interval)"
            )
            return LookDecision(look, prompts, None, level, reason)
        decided = decide_look(excess_draws, fail_only, level, excess_values)
        if decided == "fail":
            arrays = _validated(excess_draws, fail_only)
            beyond = _beyond_checks(
                arrays, level, list(excess_values) if excess_values else [None] * len(arrays)
            )
            reason = (
                f"{where} {len(beyond)} of {len(arrays)} checks are beyond "
                f"their limits at the spent level {level:.2g} shared by {len(arrays)} checks"
            )
            return LookDecision(look, prompts, decided, level, reason, tuple(beyond))
        if decided == "pass":
            reason = f"{where} every check is within its limit at the spent level {level:.2g}"
            return LookDecision(look, prompts, decided, level, reason)
    reason = f"{where} no check is decided at the spent level {level:.2g}; generate the next shard"
    return LookDecision(len(looks), prompts, None, level, reason)


def final_confidence(level: float) -> float:
    """The two-sided confidence of the ordinary verdict at one-sided `level`."""
    return 1.0 - 2.0 * level
