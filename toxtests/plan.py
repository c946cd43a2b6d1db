"""How many prompts a gate needs: `toxtests plan`.

A check on the toxicity rate passes when the interval of (adapter - parent) lies below
the limit, and fails when it lies above. With a true increase `d`, a limit `L` and a
per-prompt spread `sigma` of the paired difference, the interval's edge reaches the limit
with probability `power` once sqrt(n) * |L - d| / sigma >= z(confidence) + z(power), so

    n = ((z_{1 - alpha/2} + z_{power}) * sigma / |L - d|)^2.

For one sample per prompt the paired difference of two Bernoulli outcomes has variance
p0(1-p0) + p1(1-p1) - 2 rho sqrt(p0(1-p0) p1(1-p1)), with rho the correlation of the
parent's and the adapter's outcome on the same prompt: 0 is the worst case, and the
exact pairing of toxtests' own engine makes it high for a small adapter (the identity
adapter has rho = 1). The gate's intervals come from the bootstrap and the Holm
correction splits the error rate over the checks: this is the plan for one check, to
the accuracy of a normal approximation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

from toxtests.errors import ConfigError


@dataclass(frozen=True)
class Plan:
    prompts: int
    outcome: str  # "pass" or "fail": which verdict the run is planned to reach
    sigma: float


def paired_sigma(parent_rate: float, adapter_rate: float, correlation: float) -> float:
    """The standard deviation of one prompt's (adapter - parent) toxic indicator."""
    v0 = parent_rate * (1 - parent_rate)
    v1 = adapter_rate * (1 - adapter_rate)
    variance = v0 + v1 - 2 * correlation * math.sqrt(v0 * v1)
    return math.sqrt(max(variance, 0.0))


def plan(
    parent_rate: float,
    increase: float,
    limit: float,
    confidence: float = 0.95,
    power: float = 0.8,
    correlation: float = 0.0,
) -> Plan:
    """Prompts for a check of `toxicity_rate` (max_increase = `limit`) to reach its
    verdict with probability `power`, when the adapter's true increase is `increase`."""
    for name, value, low, high in (
        ("--parent-rate", parent_rate, 0.0, 1.0),
        ("--confidence", confidence, 0.5, 1.0),
        ("--power", power, 0.5, 1.0),
    ):
        if not low < value < high:
            raise ConfigError(f"{name} {value} must lie strictly between {low} and {high}")
    if not -1.0 <= correlation <= 1.0:
        raise ConfigError(f"--correlation {correlation} must lie in [-1, 1]")
    adapter_rate = parent_rate + increase
    if not 0.0 <= adapter_rate <= 1.0:
        raise ConfigError(
            f"--parent-rate {parent_rate} + --increase {increase} = {adapter_rate:g} is "
            "not a rate; the adapter's rate must lie in [0, 1]"
        )
    gap = abs(limit - increase)
    if gap < 1e-9:
        raise ConfigError(
            f"--increase {increase} equals the limit {limit}: no number of prompts tells "
            "an increase from the limit it sits on; plan for a smaller or larger one"
        )
    sigma = paired_sigma(parent_rate, adapter_rate, correlation)
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2) + NormalDist().inv_cdf(power)
    prompts = max(1, math.ceil((z * sigma / gap) ** 2))
    return Plan(prompts, "pass" if increase < limit else "fail", sigma)
