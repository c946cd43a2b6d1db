"""Paired statistics over prompts: resampled means, intervals, p-values, corrections.

Pure numpy. Every metric is a mean of per-prompt values, so one matrix of resampling
weights (prompts × draws) gives the joint distribution of the parent's and the adapter's
metric: the pairing is kept because both use the same prompts in every draw. With the
same seed the same weights are drawn, so a worse adapter can never get better bounds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

METHODS = ("bootstrap", "bayesian")

# A value exactly on the limit counts as within it (see `p_exceeds`).
_TIE = 1e-12


# Weight matrices drawn already, by (n, resamples, method, seed): every look of early
# stopping, every check of a scope and its metric table draw the same matrix (2000 x 900
# draws take ~20 ms), and a pytest session's shard items repeat the looks before them.
_drawn: dict[tuple[int, int, str, int], np.ndarray] = {}
_DRAWN_LIMIT = 64 << 20  # bytes kept; a larger matrix is drawn afresh each time


def resample_weights(n: int, resamples: int, method: str, seed: int) -> np.ndarray:
    """Weights of shape (resamples, n), each row summing to 1 (read-only: shared).

    `bootstrap`: multinomial counts / n (Efron's paired bootstrap over prompts).
    `bayesian`: Dirichlet(1, …, 1) draws (Rubin's Bayesian bootstrap), i.e. posterior
    draws of the population mean under a non-parametric model, in the spirit of BEST.
    """
    if n < 1:
        raise ValueError("resampling needs at least one prompt")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    key = (n, resamples, method, seed)
    if key in _drawn:
        return _drawn[key]
    rng = np.random.default_rng(seed)
    if method == "bootstrap":
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples)
        weights = counts / n
    else:
        weights = rng.dirichlet(np.ones(n), size=resamples)
    weights.setflags(write=False)
    kept = sum(w.nbytes for w in _drawn.values())
    while _drawn and kept + weights.nbytes > _DRAWN_LIMIT:
        kept -= _drawn.pop(next(iter(_drawn))).nbytes  # the oldest first
    if weights.nbytes <= _DRAWN_LIMIT:
        _drawn[key] = weights
    return weights


def weighted_means(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Resampled means of per-prompt `values` (n,) under `weights` (draws, n)."""
    return weights @ np.asarray(values, dtype=np.float64)


def percentile_interval(draws: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    low, high = np.quantile(draws, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def p_exceeds(draws: np.ndarray, limit: float) -> float:
    """One-sided p-value against "the statistic is within the limit" (H0: θ <= limit).

    Small means the statistic is confidently above the limit. The tolerance keeps an
    exact tie (e.g. every draw 0.0 and a limit of 0.0) on the "within" side.
    """
    return float(np.mean(draws <= limit + 1e-12))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (step-down, monotone, capped at 1)."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def bonferroni(p_values: Sequence[float]) -> list[float]:
    m = len(p_values)
    return [min(1.0, m * p) for p in p_values]


def adjust(p_values: Sequence[float], correction: str) -> list[float]:
    if correction == "holm":
        return holm(p_values)
    if correction == "bonferroni":
        return bonferroni(p_values)
    return list(p_values)


def prompts_needed(
    n: int,
    draws: np.ndarray,
    estimate: float,
    limit: float,
    confidence: float,
    se_at_limit: float = 0.0,
) -> int | None:
    """Prompts needed for the interval to clear the limit, if the effect stays as seen.

    The standard error shrinks like 1/sqrt(n), so the interval's half-width reaches the
    gap between the estimate and the limit at n · (z·se / gap)², with se the larger of
    the draws' spread and `se_at_limit` (the spread a pass must also beat). None when
    the estimate sits on the limit (no finite sample resolves it).
    """
    gap = abs(limit - estimate)
    if gap < 1e-12:
        return None
    se = max(float(np.std(draws)), se_at_limit)
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    return max(n + 1, math.ceil(n * (z * se / gap) ** 2))


def tilted_second_moment(values: np.ndarray) -> float:
    """E[x²] under the exponential tilt of the values' empirical distribution whose mean
    is 0 (weights ∝ exp(λ·x)): the spread the mean would have if it sat on the limit.

    Needs values on both sides of 0 (the tilt does not exist otherwise); the caller
    handles the one-sided cases.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0 or float(x.min()) >= 0.0 or float(x.max()) <= 0.0:
        raise ValueError(
            "the tilt to mean 0 needs values on both sides of 0; got "
            + (f"values in [{x.min():.3g}, {x.max():.3g}]" if x.size else "no values")
        )

    def tilted(lam: float) -> tuple[float, float]:
        logits = lam * x
        weights = np.exp(logits - logits.max())
        weights /= weights.sum()
        return float(weights @ x), float(weights @ (x * x))

    # The tilted mean rises with λ (its derivative is the tilted variance): bracket the
    # root, then bisect; 200 halvings reach float precision from any bracket.
    mean, second = tilted(0.0)
    if abs(mean) <= _TIE:
        return second  # already on the limit
    if mean < 0:
        low, high = 0.0, 1.0
        while tilted(high)[0] < 0:
            low, high = high, 2.0 * high
    else:
        low, high = -1.0, 0.0
        while tilted(low)[0] > 0:
            low, high = 2.0 * low, low
    for _ in range(200):
        middle = 0.5 * (low + high)
        if tilted(middle)[0] < 0:
            low = middle
        else:
            high = middle
        if high - low <= 1e-12 * max(1.0, abs(high)):
            break
    return tilted(0.5 * (low + high))[1]


def within_at_limit(excess: np.ndarray, level: float) -> bool:
    """One-sided test that the mean of per-prompt `excess` values (statistic − limit,
    > 0 beyond the limit) is below 0, at `level`, with the variance taken at the limit.

    Why: for a rare binary outcome, or any skewed one, the percentile bootstrap's upper
    bound is too low exactly when the observed rate is low (the spread shrinks with the
    rate), so an adapter sitting on its limit passes ~3.3% of the time for a nominal
    2.5%. Estimating the spread under the hypothesis being rejected (the empirical
    distribution exponentially tilted to put its mean on the limit, as a score test
    does) removes that bias; a pass needs this test as well as the interval.
    """
    x = np.asarray(excess, dtype=np.float64).ravel()
    if x.size == 0:
        return False
    if float(x.max()) <= _TIE:
        return True  # no prompt is beyond the limit: no reweighting of them can be
    mean = float(x.mean())
    if mean >= -_TIE:
        return False
    return mean <= NormalDist().inv_cdf(level) * standard_error_at_limit(x)


def p_beyond_at_limit(excess: np.ndarray) -> float:
    """One-sided p-value of "within the limit" (mean excess <= 0) with the variance taken
    at the limit: the mirror of `within_at_limit`, for failing.

    The bootstrap's own p-value (`p_exceeds`) fails too many adapters on their limit when
    the per-prompt values are skewed towards "better" (a few prompts much less toxic,
    many a little more): ~3.6% for a nominal 2.5% in simulation. A fail uses the larger
    of the two p-values, so either can only hold a fail back. Unlike the bootstrap's, this
    p-value is not monotone in each prompt's value (raising one value can raise the
    spread at the limit more than the mean, as in any studentized test); the verdicts
    stay monotone in a property test (`tests/test_gate.py`).
    """
    x = np.asarray(excess, dtype=np.float64).ravel()
    if x.size == 0 or float(x.max()) <= _TIE:
        return 1.0
    mean = float(x.mean())
    if float(x.min()) >= -_TIE:
        return 0.0 if mean > _TIE else 1.0  # every prompt on or beyond the limit
    return 0.5 * math.erfc(mean / (standard_error_at_limit(x) * math.sqrt(2.0)))


def standard_error_at_limit(excess: np.ndarray) -> float:
    """The mean's standard error if it sat on the limit (see `within_at_limit`); 0 when
    no reweighting of the values reaches it."""
    x = np.asarray(excess, dtype=np.float64).ravel()
    if x.size == 0 or float(x.max()) <= _TIE or float(x.min()) >= -_TIE:
        return 0.0
    return math.sqrt(tilted_second_moment(x) / x.size)


@dataclass(frozen=True)
class Decision:
    verdict: str  # "pass" | "fail" | "inconclusive"
    interval: tuple[float, float]
    p_fail: float


def decide(
    draws: np.ndarray,
    limit: float,
    confidence: float,
    p_fail_adjusted: float,
    values: np.ndarray | None = None,
) -> str:
    """Pass when the whole interval is within the limit (and, given the per-prompt
    `values` of the statistic, the test with the variance at the limit agrees:
    `within_at_limit`); fail when the adjusted one-sided p-value says the statistic is
    above it; otherwise inconclusive.

    Passing needs every check to pass (an intersection–union test), so it needs no
    correction; failing on any of many checks does, hence the adjusted p-value.
    """
    alpha = 1.0 - confidence
    if p_fail_adjusted < alpha / 2:
        return "fail"
    _, high = percentile_interval(draws, confidence)
    if high <= limit + _TIE and (
        values is None or within_at_limit(np.asarray(values, dtype=np.float64) - limit, alpha / 2)
    ):
        return "pass"
    return "inconclusive"
