"""`toxtests plan`: the prompts it asks for give the power it promises."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toxtests.cli import main
from toxtests.errors import ConfigError
from toxtests.plan import plan


def simulated_power(
    parent: float, increase: float, limit: float, n: int, rho: float, trials: int = 4000
) -> float:
    """How often a normal-approximation interval at 95% reaches the planned verdict, on
    correlated paired Bernoulli outcomes (a shared latent normal per prompt)."""
    from statistics import NormalDist

    rng = np.random.default_rng(0)
    shared = rng.standard_normal((trials, n))
    own = rng.standard_normal((2, trials, n))
    weight = np.sqrt(rho)
    latent = weight * shared + np.sqrt(1 - rho) * own
    cut = NormalDist()
    parent_toxic = latent[0] < cut.inv_cdf(parent)
    adapter_toxic = latent[1] < cut.inv_cdf(parent + increase)
    difference = adapter_toxic.astype(float) - parent_toxic.astype(float)
    mean = difference.mean(axis=1)
    half = 1.96 * difference.std(axis=1, ddof=1) / np.sqrt(n)
    if increase < limit:
        return float(np.mean(mean + half < limit))
    return float(np.mean(mean - half > limit))


@pytest.mark.parametrize(
    ("parent", "increase", "limit", "rho"),
    [(0.1, 0.0, 0.05, 0.0), (0.2, 0.15, 0.05, 0.0), (0.3, 0.0, 0.1, 0.0)],
)
def test_the_planned_prompts_reach_the_promised_power(parent, increase, limit, rho) -> None:  # noqa: ANN001
    planned = plan(parent, increase, limit, confidence=0.95, power=0.8, correlation=rho)
    assert 0.75 <= simulated_power(parent, increase, limit, planned.prompts, rho) <= 0.86
    # A fifth of the prompts falls clearly short of it.
    assert simulated_power(parent, increase, limit, max(planned.prompts // 5, 2), rho) < 0.6


@settings(max_examples=50, deadline=None)
@given(
    parent=st.floats(0.02, 0.5),
    limit=st.floats(0.01, 0.2),
    power=st.floats(0.6, 0.95),
    rho=st.floats(0.0, 0.9),
)
def test_more_power_more_correlation_and_a_wider_gap_move_it_the_right_way(
    parent: float, limit: float, power: float, rho: float
) -> None:
    base = plan(parent, 0.0, limit, power=power, correlation=rho).prompts
    assert plan(parent, 0.0, limit, power=min(power + 0.04, 0.99), correlation=rho).prompts >= base
    assert plan(parent, 0.0, limit * 2, power=power, correlation=rho).prompts <= base
    assert plan(parent, 0.0, limit, power=power, correlation=min(rho + 0.05, 1)).prompts <= base


def test_impossible_plans_are_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError, match="equals the limit"):
        plan(0.1, 0.05, 0.05)
    with pytest.raises(ConfigError, match="is not a rate"):
        plan(0.9, 0.2, 0.05)
    with pytest.raises(ConfigError, match="--power 1.2"):
        plan(0.1, 0.0, 0.05, power=1.2)


def test_the_command_reads_the_limit_from_the_thresholds(tmp_path, capsys) -> None:  # noqa: ANN001
    thresholds = tmp_path / "t.toml"
    thresholds.write_text("[gate.toxicity_rate]\nmax_increase = 0.1\n")
    assert main(["plan", "--parent-rate", "0.1", "--thresholds", str(thresholds)]) == 0
    out = capsys.readouterr().out
    expected = plan(0.1, 0.0, 0.1).prompts
    assert out.startswith(f"{expected} prompts to pass") and "max_increase 0.1" in out
    assert main(["plan", "--parent-rate", "0.1", "--increase", "0.05", "--limit", "0.05"]) == 2
    assert "equals the limit" in capsys.readouterr().err
