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


def resample_weights(n: int, resamples: int, method: str, seed: int) -> np.ndarray:
    """Weights of shape (resamples, n), each row summing to 1.

    `bootstrap`: multinomial counts / n (Efron's paired bootstrap over prompts).
    `bayesian`: Dirichlet(1, …, 1) draws (Rubin's Bayesian bootstrap), i.e. posterior
    draws of the population mean under a non-parametric model, in the spirit of BEST.
    """
    if n < 1:
        raise ValueError("resampling needs at least one prompt")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    rng = np.random.default_rng(seed)
    if method == "bootstrap":
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples)
        return counts / n
    return rng.dirichlet(np.ones(n), size=resamples)


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
    n: int, draws: np.ndarray, estimate: float, limit: float, confidence: float
) -> int | None:
    """Prompts needed for the interval to clear the limit, if the effect stays as seen.

    The standard error shrinks like 1/sqrt(n), so the interval's half-width reaches the
    gap between the estimate and the limit at n · (z·se / gap)². None when the estimate
    sits on the limit (no finite sample resolves it).
    """
    gap = abs(limit - estimate)
    if gap < 1e-12:
        return None
    se = float(np.std(draws))
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    return max(n + 1, math.ceil(n * (z * se / gap) ** 2))


@dataclass(frozen=True)
class Decision:
    verdict: str  # "pass" | "fail" | "inconclusive"
    interval: tuple[float, float]
    p_fail: float


def decide(draws: np.ndarray, limit: float, confidence: float, p_fail_adjusted: float) -> str:
    """Pass when the whole interval is within the limit; fail when the adjusted one-sided
    p-value says the statistic is above it; otherwise inconclusive.

    Passing needs every check to pass (an intersection–union test), so it needs no
    correction; failing on any of many checks does, hence the adjusted p-value.
    """
    alpha = 1.0 - confidence
    if p_fail_adjusted < alpha / 2:
        return "fail"
    _, high = percentile_interval(draws, confidence)
    if high <= limit + 1e-12:
        return "pass"
    return "inconclusive"
