"""The gate: planning checks from limits, and turning paired metrics into verdicts."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from toxtests.config import Config, GateConfig, Rule, StatisticsConfig
from toxtests.errors import ConfigError
from toxtests.gate import (
    VERDICT_ORDER,
    CheckResult,
    CheckSpec,
    PairedMetrics,
    adapter_verdict,
    evaluate_checks,
    metric_table,
    plan_checks,
    worst,
)
from toxtests.prompts import Prompt
from toxtests.shards import Shard


def make_shards(layout: Sequence[tuple[str, int]]) -> list[Shard]:
    """Shards `<category>-<i>` with the given sizes; prompt ids p0, p1, … across all."""
    shards: list[Shard] = []
    counter = 0
    seen: dict[str, int] = {}
    for category, size in layout:
        prompts = tuple(
            Prompt(id=f"p{counter + i}", text=f"prompt {counter + i}") for i in range(size)
        )
        counter += size
        index = seen.get(category, 0)
        seen[category] = index + 1
        shards.append(Shard(name=f"{category}-{index}", category=category, prompts=prompts))
    return shards


def make_config(
    rules: Mapping[str, Rule],
    shard_rules: Mapping[str, Mapping[str, Rule]] | None = None,
    **statistics: object,
) -> Config:
    stats = {"resamples": 1000, **statistics}
    return Config(
        gate=GateConfig(
            rules=dict(rules),
            shard_rules={c: dict(r) for c, r in (shard_rules or {}).items()},
        ),
        statistics=StatisticsConfig(**stats),  # type: ignore[arg-type]
        source="test.toml",
    )


def paired_of(
    shards: Sequence[Shard], parent: Mapping[str, np.ndarray], adapter: Mapping[str, np.ndarray]
) -> PairedMetrics:
    ids = [p.id for s in shards for p in s.prompts]
    return PairedMetrics(ids, dict(parent), dict(adapter))


def binary(n: int, ones: int, start: int = 0) -> np.ndarray:
    values = np.zeros(n)
    values[start : start + ones] = 1.0
    return values


def run_gate(
    config: Config,
    shards: Sequence[Shard],
    parent: Mapping[str, np.ndarray],
    adapter: Mapping[str, np.ndarray],
) -> list[CheckResult]:
    return evaluate_checks(plan_checks(config, shards), paired_of(shards, parent, adapter), config)


def only(
    results: Sequence[CheckResult], scope: str = "all", rule: str | None = None
) -> CheckResult:
    found = [r for r in results if r.scope == scope and (rule is None or r.rule == rule)]
    assert len(found) == 1, found
    return found[0]


# -- the verdicts ------------------------------------------------------------------------


def test_identical_adapter_passes_with_zero_delta() -> None:
    shards = make_shards([("challenging", 30), ("not-challenging", 25)])
    rng = np.random.default_rng(7)
    parent = {
        "toxicity_rate": (rng.random(55) < 0.3).astype(float),
        "mean_toxicity": rng.random(55),
    }
    config = make_config(
        {
            "toxicity_rate": Rule(max_increase=0.0, max_relative_increase=0.0),
            "mean_toxicity": Rule(max_increase=0.05),
        },
        {"challenging": {"mean_toxicity": Rule(max_relative_increase=0.1)}},
    )
    results = run_gate(config, shards, parent, {k: v.copy() for k, v in parent.items()})
    # all: 3 checks, category: 1, two shards × 3 rules each.
    assert len(results) == 3 + 1 + 6
    for check in results:
        assert check.verdict == "pass", check
        assert check.statistic == 0.0
        assert check.interval == (0.0, 0.0)
        assert check.p_fail == 1.0
        assert check.prompts_needed is None
    assert adapter_verdict(results) == "pass"


def test_clearly_worse_adapter_fails() -> None:
    shards = make_shards([("all", 200)])
    parent = {"toxicity_rate": binary(200, 20)}  # rate 0.1
    adapter = {"toxicity_rate": binary(200, 120)}  # rate 0.6, every parent-toxic prompt still toxic
    config = make_config({"toxicity_rate": Rule(max_increase=0.05)})
    (check,) = run_gate(config, shards, parent, adapter)
    assert check.verdict == "fail"
    assert check.statistic == pytest.approx(0.5)
    # No resample comes within 0.45 of a 0.5 difference, and at the limit the mean sits
    # ~30 standard errors above it.
    assert check.p_fail < 1e-100
    low, high = check.interval
    # Paired differences are Bernoulli(0.5) over 200 prompts: se = 0.5 / sqrt(200) ≈ 0.035.
    assert 0.5 - 3 * 0.035 < low < 0.5 < high < 0.5 + 3 * 0.035
    assert check.prompts_needed is None
    assert adapter_verdict([check]) == "fail"


def test_slightly_worse_adapter_on_few_prompts_is_inconclusive() -> None:
    shards = make_shards([("all", 20)])
    parent = {"toxicity_rate": np.zeros(20)}
    adapter = {"toxicity_rate": binary(20, 2)}  # +0.1 against a 0.05 limit
    config = make_config({"toxicity_rate": Rule(max_increase=0.05)}, resamples=4000)
    (check,) = run_gate(config, shards, parent, adapter)
    assert check.verdict == "inconclusive"
    assert check.statistic == pytest.approx(0.1)
    # P(at most one of the two toxic prompts drawn) = P(Bin(20, 0.1) <= 1) ≈ 0.392.
    assert check.p_fail == pytest.approx(0.392, abs=0.03)
    assert check.interval[0] <= 0.05 < check.interval[1]
    # 20·(1.96·se/gap)^2 with se = sqrt(0.1·0.9/20) ≈ 0.0671 and gap 0.05: ≈ 138.
    assert check.prompts_needed is not None and check.prompts_needed > 20
    assert 120 <= check.prompts_needed <= 160


def test_a_rare_outcome_passes_only_when_the_spread_at_the_limit_clears_it() -> None:
    """12 toxic of 400 (+0.03 against a 0.05 limit): the percentile interval is within
    the limit, but at the limit (5% toxic) the mean's standard error is
    sqrt(0.05 * 0.95 / 400) = 0.0109, and 0.03 is only 1.84 of them below it: not a
    pass. The prompts that would resolve it follow that spread: 400 * (1.96 * 0.0109 /
    0.02)^2 = 454. 8 of 400 passes."""
    shards = make_shards([("all", 400)])
    parent = {"toxicity_rate": np.zeros(400)}
    config = make_config({"toxicity_rate": Rule(max_increase=0.05)}, resamples=4000)
    (rare,) = run_gate(config, shards, parent, {"toxicity_rate": binary(400, 12)})
    assert rare.interval[1] <= 0.05
    assert rare.verdict == "inconclusive"
    assert rare.held_back_at_limit and rare.to_dict()["held_back_at_limit"] is True
    assert rare.prompts_needed == pytest.approx(
        400 * (1.96 * math.sqrt(0.0475 / 400) / 0.02) ** 2, abs=2
    )
    (rarer,) = run_gate(config, shards, parent, {"toxicity_rate": binary(400, 8)})
    assert rarer.verdict == "pass" and not rarer.held_back_at_limit
    (straddling,) = run_gate(config, shards, parent, {"toxicity_rate": binary(400, 24)})
    assert straddling.verdict == "inconclusive" and not straddling.held_back_at_limit


def test_inconclusive_shard_checks_count_as_pass() -> None:
    shards = make_shards([("all", 10), ("all", 10)])
    parent = {"toxicity_rate": np.zeros(20)}
    adapter = {"toxicity_rate": np.tile(binary(10, 1), 2)}  # one new toxic prompt per shard
    config = make_config({"toxicity_rate": Rule(max_increase=0.05)})
    specs = plan_checks(config, shards)
    results = evaluate_checks(specs, paired_of(shards, parent, adapter), config)
    assert only(results, "all").verdict == "inconclusive"
    for name in ("all-0", "all-1"):
        check = only(results, f"shard:{name}")
        assert check.verdict == "pass"
        assert check.prompts_needed is None
        # The same check without fail_only would be inconclusive.
        spec = next(s for s in specs if s.scope == f"shard:{name}")
        (strict,) = evaluate_checks(
            [replace(spec, fail_only=False)], paired_of(shards, parent, adapter), config
        )
        assert strict.verdict == "inconclusive"
        assert strict.interval == check.interval
    assert adapter_verdict(results) == "inconclusive"


def test_shard_checks_can_still_fail() -> None:
    # The average hides a shard that is confidently worse.
    shards = make_shards([("all", 100), ("all", 100), ("all", 100)])
    parent = {"toxicity_rate": np.zeros(300)}
    adapter = {"toxicity_rate": np.concatenate([binary(100, 40), np.zeros(200)])}
    config = make_config({"toxicity_rate": Rule(max_increase=0.2)})
    results = run_gate(config, shards, parent, adapter)
    assert only(results, "all").statistic == pytest.approx(40 / 300)
    assert only(results, "shard:all-0").verdict == "fail"
    assert only(results, "shard:all-1").verdict == "pass"
    assert adapter_verdict(results) == "fail"


def test_ceiling_rule() -> None:
    shards = make_shards([("all", 400)])
    parent = {"toxicity_rate": binary(400, 80)}  # 0.2
    config = make_config({"toxicity_rate": Rule(max=0.5)})
    # 0.25 against a 0.5 ceiling: se = sqrt(0.25·0.75/400) ≈ 0.022, far below.
    (low_check,) = run_gate(config, shards, parent, {"toxicity_rate": binary(400, 100)})
    assert low_check.verdict == "pass"
    assert low_check.statistic == pytest.approx(0.25)
    assert low_check.effective_limit == 0.5
    assert low_check.interval[0] < 0.25 < low_check.interval[1] < 0.5
    # 0.6 against 0.5: 4.1 standard errors (se ≈ 0.0245) above the ceiling.
    (high_check,) = run_gate(config, shards, parent, {"toxicity_rate": binary(400, 240)})
    assert high_check.verdict == "fail"
    assert high_check.statistic == pytest.approx(0.6)
    assert 0.5 < high_check.interval[0] < 0.6 < high_check.interval[1]


def test_relative_increase_rule() -> None:
    shards = make_shards([("all", 400)])
    parent = {"toxicity_rate": binary(400, 80)}  # 0.2
    config = make_config({"toxicity_rate": Rule(max_relative_increase=0.5)})
    # Allowed: 0.5 · 0.2 = 0.1. Seen: 0.25 - 0.2 = 0.05. Per-prompt excess a - 1.5 p has
    # mean -0.05 and sd sqrt(0.1 - 0.0025) ≈ 0.312, so se ≈ 0.0156: confidently within.
    (within,) = run_gate(config, shards, parent, {"toxicity_rate": binary(400, 100)})
    assert within.verdict == "pass"
    assert within.effective_limit == pytest.approx(0.1)
    assert within.statistic == pytest.approx(0.05)
    assert within.interval[1] < 0.1
    # 0.6: a difference of 0.4 against an allowed 0.1.
    (beyond,) = run_gate(config, shards, parent, {"toxicity_rate": binary(400, 240)})
    assert beyond.verdict == "fail"
    assert beyond.statistic == pytest.approx(0.4)
    assert beyond.interval[0] > 0.1


def test_relative_rule_on_a_clean_parent_allows_nothing() -> None:
    shards = make_shards([("all", 200)])
    parent = {"toxicity_rate": np.zeros(200)}
    config = make_config({"toxicity_rate": Rule(max_relative_increase=1.0)})
    (same,) = run_gate(config, shards, parent, {"toxicity_rate": np.zeros(200)})
    assert same.verdict == "pass" and same.effective_limit == 0.0
    (worse,) = run_gate(config, shards, parent, {"toxicity_rate": binary(200, 30)})
    assert worse.verdict == "fail"


# -- planning ----------------------------------------------------------------------------


def test_plan_checks_counts_and_members() -> None:
    shards = make_shards([("challenging", 5), ("challenging", 5), ("not-challenging", 4)])
    config = make_config(
        {
            "toxicity_rate": Rule(max_increase=0.05, max=0.3),
            "mean_toxicity": Rule(max_increase=0.02),
        },
        {"challenging": {"toxicity_rate": Rule(max=0.4)}},
    )
    specs = plan_checks(config, shards)
    by_scope: dict[str, list[CheckSpec]] = {}
    for spec in specs:
        by_scope.setdefault(spec.scope, []).append(spec)
    assert {scope: len(s) for scope, s in by_scope.items()} == {
        "all": 3,
        "category:challenging": 1,
        "shard:challenging-0": 3,
        "shard:challenging-1": 3,
        "shard:not-challenging-0": 3,
    }
    assert len(specs) == 13
    all_ids = tuple(f"p{i}" for i in range(14))
    assert all(s.members == all_ids for s in by_scope["all"])
    (category,) = by_scope["category:challenging"]
    assert category.members == all_ids[:10]
    assert (category.metric, category.rule, category.limit) == ("toxicity_rate", "max", 0.4)
    assert by_scope["shard:not-challenging-0"][0].members == all_ids[10:]
    assert {(s.metric, s.rule, s.limit) for s in by_scope["all"]} == {
        ("toxicity_rate", "max_increase", 0.05),
        ("toxicity_rate", "max", 0.3),
        ("mean_toxicity", "max_increase", 0.02),
    }
    for spec in specs:
        assert spec.fail_only == spec.scope.startswith("shard:")


@pytest.mark.parametrize("samples", [1, 3])
def test_one_check_per_distinct_quantity(samples: int) -> None:
    """At one sample per prompt expected max toxicity is the mean and toxicity
    probability the rate: their limits join those of the metric they equal (the stricter
    of two of a kind kept), so each quantity costs one share of the correction."""
    from dataclasses import replace

    from toxtests.config import GenerationConfig

    shards = make_shards([("challenging", 6)])
    config = make_config(
        {
            "toxicity_rate": Rule(max_increase=0.05),
            "toxicity_probability": Rule(max_increase=0.03, max=0.5),
            "expected_max_toxicity": Rule(max_increase=0.05),
            "mean_toxicity": Rule(max_increase=0.04),
        }
    )
    config = replace(config, generation=GenerationConfig(samples=samples))
    planned = {(s.metric, s.rule, s.limit) for s in plan_checks(config, shards)}
    if samples == 1:
        assert planned == {
            ("toxicity_rate", "max_increase", 0.03),
            ("toxicity_rate", "max", 0.5),
            ("mean_toxicity", "max_increase", 0.04),
        }
    else:
        assert len(planned) == 5 and ("expected_max_toxicity", "max_increase", 0.05) in planned


def test_plan_checks_single_shard_has_no_shard_scope() -> None:
    shards = make_shards([("challenging", 8)])
    config = make_config(
        {"toxicity_rate": Rule(max_increase=0.05)},
        {"challenging": {"toxicity_rate": Rule(max=0.3)}},
    )
    specs = plan_checks(config, shards)
    assert [s.scope for s in specs] == ["all", "category:challenging"]
    assert not any(s.fail_only for s in specs)


def test_plan_checks_unknown_shard_category() -> None:
    shards = make_shards([("challenging", 3), ("not-challenging", 3)])
    config = make_config(
        {"toxicity_rate": Rule(max_increase=0.05)}, {"toxic": {"toxicity_rate": Rule(max=0.3)}}
    )
    with pytest.raises(
        ConfigError,
        match=r"test.toml \[gate.shard.toxic\]: no shard category 'toxic' in these prompts; "
        r"categories: challenging, not-challenging",
    ):
        plan_checks(config, shards)
    with pytest.raises(ValueError):  # ConfigError is also a ValueError
        plan_checks(config, shards)


def test_unknown_metric_names_the_available_ones() -> None:
    shards = make_shards([("all", 4)])
    config = make_config({"rate:insult": Rule(max_increase=0.05)})
    metrics = {"toxicity_rate": np.zeros(4), "mean_toxicity": np.zeros(4)}
    with pytest.raises(
        ConfigError, match="'rate:insult' is not produced.*available: mean_toxicity, toxicity_rate"
    ):
        run_gate(config, shards, metrics, metrics)


# -- multiple testing --------------------------------------------------------------------


@settings(deadline=None, max_examples=25)
@given(
    sizes=st.lists(st.integers(8, 40), min_size=2, max_size=6),
    effects=st.lists(st.floats(0.0, 0.5), min_size=6, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_shard_bonferroni_fail_implies_holm_fail(
    sizes: list[int], effects: list[float], seed: int
) -> None:
    """A shard test (its own checks, Bonferroni over the whole family) that fails implies
    the aggregate (Holm over every check) fails that check too."""
    shards = make_shards([("all", n) for n in sizes])
    rng = np.random.default_rng(seed)
    parent_rate = np.concatenate([(rng.random(n) < 0.1).astype(float) for n in sizes])
    adapter_rate = np.concatenate(
        [
            (rng.random(n) < 0.1 + effect).astype(float)
            for n, effect in zip(sizes, effects[: len(sizes)], strict=True)
        ]
    )
    parent_mean = rng.random(sum(sizes)) * 0.5
    adapter_mean = np.clip(parent_mean + rng.normal(0.05, 0.1, sum(sizes)), 0, 1)
    parent = {"toxicity_rate": parent_rate, "mean_toxicity": parent_mean}
    adapter = {"toxicity_rate": adapter_rate, "mean_toxicity": adapter_mean}
    config = make_config(
        {
            "toxicity_rate": Rule(max_increase=0.05, max=0.3),
            "mean_toxicity": Rule(max_increase=0.02),
        },
        resamples=300,
    )
    specs = plan_checks(config, shards)
    paired = paired_of(shards, parent, adapter)
    holm_results = evaluate_checks(specs, paired, config)
    bonferroni_all = evaluate_checks(specs, paired, config, family_size=len(specs))
    for h, b in zip(holm_results, bonferroni_all, strict=True):
        assert h.p_fail == b.p_fail
        assert h.p_fail_adjusted <= b.p_fail_adjusted
        assert b.p_fail_adjusted == min(1.0, b.p_fail * len(specs))
        if b.verdict == "fail":
            assert h.verdict == "fail"
    # What the shard tests actually do: each shard's checks alone, same family size.
    by_key = {(c.scope, c.metric, c.rule): c for c in holm_results}
    for shard in shards:
        own = [s for s in specs if s.scope == f"shard:{shard.name}"]
        for check in evaluate_checks(own, paired, config, family_size=len(specs)):
            aggregate = by_key[(check.scope, check.metric, check.rule)]
            assert check.p_fail == aggregate.p_fail  # same scope, same weights
            assert check.interval == aggregate.interval
            if check.verdict == "fail":
                assert aggregate.verdict == "fail"


def test_holm_fails_where_bonferroni_does_not() -> None:
    # Two equal regressions of +1/6 against a 0.05 limit on 60-prompt shards: each shard's
    # p-value is about P(Bin(60, 1/6) <= 3) ≈ 0.007, which Holm (×2 at most, after the
    # all-prompts check at p = 0) keeps below 0.025 and a family of 10 000 does not.
    shards = make_shards([("all", 60), ("all", 60)])
    parent = {"toxicity_rate": np.zeros(120)}
    adapter = {"toxicity_rate": np.tile(binary(60, 10), 2)}
    config = make_config({"toxicity_rate": Rule(max_increase=0.05)}, resamples=2000)
    specs = plan_checks(config, shards)
    paired = paired_of(shards, parent, adapter)
    holm_results = evaluate_checks(specs, paired, config)
    assert [c.verdict for c in holm_results] == ["fail", "fail", "fail"]
    shard_p = [c.p_fail for c in holm_results if c.scope.startswith("shard:")]
    assert all(0.0 < p < 0.025 / 2 for p in shard_p)
    huge_family = evaluate_checks(specs, paired, config, family_size=10_000)
    assert [c.verdict for c in huge_family if c.scope.startswith("shard:")] == ["pass", "pass"]


# -- monotonicity and determinism --------------------------------------------------------


unit_values = st.floats(0.0, 1.0)


@settings(deadline=None, max_examples=100)
@given(
    data=st.integers(6, 30).flatmap(
        lambda n: st.tuples(
            arrays(np.float64, (4, n), elements=unit_values),
            arrays(np.float64, (2, n), elements=st.floats(0.0, 0.3)),
        )
    ),
    method=st.sampled_from(["bootstrap", "bayesian"]),
)
def test_worse_adapter_never_gets_a_better_verdict(
    data: tuple[np.ndarray, np.ndarray], method: str
) -> None:
    values, increments = data
    n = values.shape[1]
    shards = make_shards([("a", n // 2), ("b", n - n // 2)])
    parent = {"toxicity_rate": values[0], "mean_toxicity": values[1]}
    adapter = {"toxicity_rate": values[2], "mean_toxicity": values[3]}
    worse = {
        "toxicity_rate": np.clip(values[2] + increments[0], 0.0, 1.0),
        "mean_toxicity": np.clip(values[3] + increments[1], 0.0, 1.0),
    }
    config = make_config(
        {
            "toxicity_rate": Rule(max_increase=0.05, max_relative_increase=0.3, max=0.6),
            "mean_toxicity": Rule(max_increase=0.1),
        },
        {"a": {"mean_toxicity": Rule(max=0.5)}},
        resamples=200,
        method=method,
    )
    before = run_gate(config, shards, parent, adapter)
    after = run_gate(config, shards, parent, worse)
    assert VERDICT_ORDER[adapter_verdict(after)] >= VERDICT_ORDER[adapter_verdict(before)]
    # Check by check too: same weights, so every draw of the statistic can only rise.
    # (p_fail itself need not fall: it includes the test at the limit, a studentized
    # test, where raising one prompt's value can raise the spread more than the mean.
    # 3,000 examples of this test found no verdict that got better.)
    for b, a in zip(before, after, strict=True):
        assert VERDICT_ORDER[a.verdict] >= VERDICT_ORDER[b.verdict], (b, a)
        assert a.interval[1] >= b.interval[1] - 1e-12
        assert a.interval[0] >= b.interval[0] - 1e-12


def test_same_inputs_same_results_and_seed_changes_draws_not_clear_verdicts() -> None:
    shards = make_shards([("x", 50), ("y", 50)])
    rng = np.random.default_rng(3)
    parent = {"toxicity_rate": (rng.random(100) < 0.2).astype(float)}
    clearly_worse = {"toxicity_rate": np.maximum(parent["toxicity_rate"], rng.random(100) < 0.6)}
    borderline = {"toxicity_rate": np.maximum(parent["toxicity_rate"], rng.random(100) < 0.05)}
    config = make_config({"toxicity_rate": Rule(max_increase=0.05)})
    other_seed = replace(config, statistics=replace(config.statistics, seed=1))
    for adapter in (clearly_worse, borderline):
        first = run_gate(config, shards, parent, adapter)
        assert run_gate(config, shards, parent, adapter) == first
        assert [c.to_dict() for c in run_gate(config, shards, parent, adapter)] == [
            c.to_dict() for c in first
        ]
    # Another seed draws other weights: the borderline intervals move…
    first = run_gate(config, shards, parent, borderline)
    moved = run_gate(other_seed, shards, parent, borderline)
    assert [c.interval for c in first] != [c.interval for c in moved]
    assert [c.statistic for c in first] == [c.statistic for c in moved]  # point values do not
    # …but a clear-cut adapter gets the same verdicts whatever the seed.
    assert [c.verdict for c in run_gate(config, shards, parent, clearly_worse)] == ["fail"] * 3
    for seed in (1, 2, 3):
        seeded = replace(config, statistics=replace(config.statistics, seed=seed))
        assert [c.verdict for c in run_gate(seeded, shards, parent, clearly_worse)] == ["fail"] * 3


def test_worst_and_adapter_verdict() -> None:
    assert worst([]) == "pass"
    assert worst(["pass", "inconclusive", "pass"]) == "inconclusive"
    assert worst(["inconclusive", "fail", "pass"]) == "fail"
    assert adapter_verdict([]) == "pass"


def test_check_result_to_dict_is_json_ready() -> None:
    shards = make_shards([("all", 10)])
    parent = {"toxicity_rate": np.zeros(10)}
    config = make_config({"toxicity_rate": Rule(max_increase=0.05)})
    (check,) = run_gate(config, shards, parent, parent)
    body = check.to_dict()
    assert body["interval"] == [0.0, 0.0]
    assert body["verdict"] == "pass" and body["scope"] == "all" and body["prompts"] == 10


# -- the metric table --------------------------------------------------------------------


def test_metric_table_plain_means_and_verdicts() -> None:
    shards = make_shards([("x", 4), ("y", 4)])
    parent = {
        "toxicity_rate": np.array([0, 0, 1, 1, 0, 0, 0, 0], dtype=float),
        "mean_toxicity": np.array([0.1, 0.2, 0.3, 0.4, 0.0, 0.0, 0.0, 0.0]),
    }
    adapter = {
        "toxicity_rate": np.array([1, 0, 1, 1, 0, 0, 0, 1], dtype=float),
        "mean_toxicity": np.array([0.1, 0.2, 0.3, 0.4, 0.0, 0.0, 0.0, 0.0]),
    }
    config = make_config({"toxicity_rate": Rule(max_increase=0.05)})
    paired = paired_of(shards, parent, adapter)
    checks = evaluate_checks(plan_checks(config, shards), paired, config)
    everyone = [f"p{i}" for i in range(8)]
    table = metric_table(paired, everyone, config, checks, "all")
    assert set(table) == {"toxicity_rate", "mean_toxicity"}
    rate = table["toxicity_rate"]
    assert rate["parent"] == pytest.approx(2 / 8)
    assert rate["adapter"] == pytest.approx(4 / 8)
    assert rate["delta"] == pytest.approx(2 / 8)
    interval = rate["interval"]
    assert isinstance(interval, list)
    low, high = interval
    assert 0.0 <= low <= 0.25 <= high <= 1.0
    assert rate["verdict"] == only(checks, "all").verdict
    mean = table["mean_toxicity"]
    assert mean["parent"] == pytest.approx(0.125)
    assert mean["adapter"] == pytest.approx(0.125)
    assert mean["delta"] == 0.0
    assert mean["interval"] == [0.0, 0.0]
    assert mean["verdict"] is None  # no rule on this metric
    # A shard's table covers only that shard's prompts and checks.
    shard_table = metric_table(paired, everyone[:4], config, checks, "shard:x-0")
    assert shard_table["toxicity_rate"]["parent"] == pytest.approx(0.5)
    assert shard_table["toxicity_rate"]["adapter"] == pytest.approx(0.75)
    assert shard_table["toxicity_rate"]["verdict"] == only(checks, "shard:x-0").verdict
    # The table's interval of the difference is the check's interval (same scope, same draws).
    assert tuple(rate["interval"]) == only(checks, "all").interval  # type: ignore[arg-type]


def test_an_inconclusive_summary_says_how_many_prompts_would_settle_it() -> None:
    from toxtests.run.results import summary_line

    def check(verdict: str, needed: int | None) -> CheckResult:
        return CheckResult(
            scope="all", metric="toxicity_rate", rule="max_increase", limit=0.05,
            effective_limit=0.05, statistic=0.04, interval=(-0.01, 0.09), p_fail=0.2,
            p_fail_adjusted=0.2, verdict=verdict, prompts=100, prompts_needed=needed,
        )  # fmt: skip

    metrics = {"toxicity_rate": {"delta": 0.04, "interval": [-0.01, 0.09]}}
    line = summary_line(
        "a",
        "inconclusive",
        metrics,
        [check("pass", None), check("inconclusive", 430), check("inconclusive", 900)],
    )  # noqa: E501
    assert line.endswith("(~900 prompts would settle it, at the effect seen)")
    assert "settle" not in summary_line("a", "pass", metrics, [check("pass", None)])
