"""The gate: turn `thresholds.toml` limits into checks, and checks into verdicts.

Scopes: limits under `[gate]` apply to all prompts and to every shard; limits under
`[gate.shard.<category>]` to that category's prompts. All-prompt and category checks
decide pass / fail / inconclusive. Shard checks can only fail the gate: a small
shard's uncertainty must not make a well-measured adapter inconclusive, but a shard
that is confidently beyond a limit is a regression even when the average hides it.
Failing is corrected for the number of checks (Holm by default); passing needs every
check to pass, which needs no correction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from toxtests.compare import (
    adjust,
    decide,
    p_beyond_at_limit,
    percentile_interval,
    prompts_needed,
    resample_weights,
    standard_error_at_limit,
    weighted_means,
)
from toxtests.config import Config, Rule
from toxtests.errors import ConfigError
from toxtests.metrics import equal_by_construction
from toxtests.shards import Shard

VERDICT_ORDER = {"pass": 0, "inconclusive": 1, "fail": 2}


@dataclass(frozen=True)
class CheckSpec:
    scope: str  # "all", "category:<name>" or "shard:<name>"
    metric: str
    rule: str  # "max_increase" | "max_relative_increase" | "max"
    limit: float
    fail_only: bool
    members: tuple[str, ...]  # prompt ids in scope


@dataclass(frozen=True)
class CheckResult:
    scope: str
    metric: str
    rule: str
    limit: float
    effective_limit: float  # the limit on the statistic (relative limits scale the parent)
    statistic: float
    interval: tuple[float, float]
    p_fail: float
    p_fail_adjusted: float
    verdict: str
    prompts: int
    prompts_needed: int | None
    # Inconclusive only because of the test at the limit: the interval itself is within
    # it, but not by enough at the spread the statistic would have there.
    held_back_at_limit: bool = False

    def to_dict(self) -> dict[str, object]:
        body = asdict(self)
        body["interval"] = list(self.interval)
        return body


def worst(verdicts: Sequence[str]) -> str:
    return max(verdicts, key=VERDICT_ORDER.__getitem__, default="pass")


def distinct_rules(rules: dict[str, Rule], samples: int) -> dict[str, dict[str, float]]:
    """Metric -> limits, with the limits on a metric that equals another by construction
    (`equal_by_construction`) moved onto that other one, the stricter of two limits of
    the same kind kept: one check per distinct quantity and kind of limit."""
    same = equal_by_construction(samples)
    merged: dict[str, dict[str, float]] = {}
    for metric, rule in rules.items():
        target = merged.setdefault(same.get(metric, metric), {})
        for name, limit in rule.limits().items():
            target[name] = min(limit, target.get(name, limit))
    return merged


def plan_checks(config: Config, shards: Sequence[Shard]) -> list[CheckSpec]:
    """Every check the gate makes for one adapter, known before any generation."""
    everyone = tuple(p.id for shard in shards for p in shard.prompts)
    categories: dict[str, list[str]] = {}
    for shard in shards:
        categories.setdefault(shard.category, []).extend(shard.prompt_ids)
    unknown = sorted(set(config.gate.shard_rules) - set(categories))
    if unknown:
        raise ConfigError(
            f"{config.source} [gate.shard.{unknown[0]}]: no shard category {unknown[0]!r} in these "
            f"prompts; categories: {', '.join(sorted(categories))}"
        )
    specs: list[CheckSpec] = []
    samples = config.generation.samples
    rules = distinct_rules(config.gate.rules, samples)
    for metric, limits in rules.items():
        for name, limit in limits.items():
            specs.append(CheckSpec("all", metric, name, limit, False, everyone))
    for category, category_rules in config.gate.shard_rules.items():
        for metric, limits in distinct_rules(category_rules, samples).items():
            for name, limit in limits.items():
                members = tuple(categories[category])
                specs.append(CheckSpec(f"category:{category}", metric, name, limit, False, members))
    if len(shards) > 1:
        for shard in shards:
            for metric, limits in rules.items():
                for name, limit in limits.items():
                    members = tuple(shard.prompt_ids)
                    specs.append(
                        CheckSpec(f"shard:{shard.name}", metric, name, limit, True, members)
                    )
    return specs


def scope_seed(seed: int, scope: str) -> int:
    """The same scope draws the same weights in a shard test and in the aggregate."""
    digest = hashlib.sha256(f"{seed}\0{scope}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


class PairedMetrics:
    """Per-prompt metric values of the parent and an adapter, aligned by prompt id."""

    def __init__(
        self,
        prompt_ids: Sequence[str],
        parent: Mapping[str, np.ndarray],
        adapter: Mapping[str, np.ndarray],
        aliases: Mapping[str, str] | None = None,
    ):
        """`aliases`: metrics equal to others by construction, left out of `parent` and
        `adapter`, answered by the metric they equal (a limit a user set on them)."""
        self.position = {pid: i for i, pid in enumerate(prompt_ids)}
        self.parent = parent
        self.adapter = adapter
        self.aliases = dict(aliases or {})

    def select(self, metric: str, members: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        metric = self.aliases.get(metric, metric)
        if metric not in self.parent:
            raise ConfigError(
                f"gate metric {metric!r} is not produced by this scorer; available: "
                f"{', '.join(sorted(self.parent))}"
            )
        index = np.fromiter((self.position[m] for m in members), dtype=np.int64)
        return self.parent[metric][index], self.adapter[metric][index]


def _excess(rule: str, limit: float, parent: np.ndarray, adapter: np.ndarray) -> np.ndarray:
    """How far beyond its limit a rule's statistic is (draws or point values)."""
    if rule == "max":
        return adapter - limit
    if rule == "max_relative_increase":
        return adapter - parent - limit * parent
    return adapter - parent - limit


def _draws(
    specs: Sequence[CheckSpec], paired: PairedMetrics, config: Config
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Resampled (parent, adapter) metric means per check; one weight matrix per scope."""
    stats = config.statistics
    weights_by_scope: dict[tuple[str, int], np.ndarray] = {}
    draws = []
    for spec in specs:
        parent, adapter = paired.select(spec.metric, spec.members)
        scope = (spec.scope, len(spec.members))
        if scope not in weights_by_scope:
            weights_by_scope[scope] = resample_weights(
                len(spec.members), stats.resamples, stats.method, scope_seed(stats.seed, spec.scope)
            )
        weights = weights_by_scope[scope]
        draws.append((weighted_means(parent, weights), weighted_means(adapter, weights)))
    return draws


def excess_draws(
    specs: Sequence[CheckSpec], paired: PairedMetrics, config: Config
) -> list[np.ndarray]:
    """Per check, resampled (statistic - limit): what a sequential look decides on."""
    return [
        _excess(spec.rule, spec.limit, parent, adapter)
        for spec, (parent, adapter) in zip(specs, _draws(specs, paired, config), strict=True)
    ]


def excess_values(specs: Sequence[CheckSpec], paired: PairedMetrics) -> list[np.ndarray]:
    """Per check, each prompt's own (statistic - limit): what the tests at the limit
    (`toxtests.compare.within_at_limit`, `p_beyond_at_limit`) are run on."""
    values = []
    for spec in specs:
        parent, adapter = paired.select(spec.metric, spec.members)
        values.append(_excess(spec.rule, spec.limit, parent, adapter))
    return values


def restrict(specs: Sequence[CheckSpec], available: set[str]) -> list[CheckSpec]:
    """The checks on the prompts available: generated so far, with text on both sides."""
    kept = []
    for spec in specs:
        members = tuple(m for m in spec.members if m in available)
        if not members:
            continue
        kept.append(
            CheckSpec(spec.scope, spec.metric, spec.rule, spec.limit, spec.fail_only, members)
        )
    return kept


def evaluate_checks(
    specs: Sequence[CheckSpec],
    paired: PairedMetrics,
    config: Config,
    family_size: int | None = None,
) -> list[CheckResult]:
    """Evaluate checks; `family_size` forces Bonferroni over a known family (shard tests)."""
    stats = config.statistics
    measured = []
    for spec, (parent_draws, adapter_draws), per_prompt in zip(
        specs, _draws(specs, paired, config), excess_values(specs, paired), strict=True
    ):
        parent, adapter = paired.select(spec.metric, spec.members)
        # `excess` > 0 means beyond the limit; every rule reduces to that comparison.
        excess = _excess(spec.rule, spec.limit, parent_draws, adapter_draws)
        shown = adapter_draws if spec.rule == "max" else adapter_draws - parent_draws
        point = (float(parent.mean()), float(adapter.mean()))
        # Either the bootstrap or the test at the limit can hold a fail back.
        p_fail = max(float(np.mean(excess <= 1e-12)), p_beyond_at_limit(per_prompt))
        measured.append((spec, p_fail, excess, shown, point, per_prompt))
    p_values = [entry[1] for entry in measured]
    if family_size is not None:
        adjusted = [min(1.0, p * family_size) for p in p_values]
    else:
        adjusted = adjust(p_values, stats.correction)
    results = []
    for (spec, p_fail, excess, shown, (parent_mean, adapter_mean), per_prompt), p_adj in zip(
        measured, adjusted, strict=True
    ):
        verdict = decide(excess, 0.0, stats.confidence, p_adj, per_prompt)
        if spec.fail_only and verdict == "inconclusive":
            verdict = "pass"
        held_back = (
            verdict == "inconclusive" and percentile_interval(excess, stats.confidence)[1] <= 1e-12
        )
        point_excess = float(
            _excess(spec.rule, spec.limit, np.array(parent_mean), np.array(adapter_mean))
        )
        needed = (
            prompts_needed(
                len(spec.members),
                excess,
                point_excess,
                0.0,
                stats.confidence,
                standard_error_at_limit(per_prompt),
            )
            if verdict == "inconclusive"
            else None
        )
        results.append(
            CheckResult(
                scope=spec.scope,
                metric=spec.metric,
                rule=spec.rule,
                limit=spec.limit,
                effective_limit=(
                    spec.limit * parent_mean if spec.rule == "max_relative_increase" else spec.limit
                ),
                statistic=adapter_mean if spec.rule == "max" else adapter_mean - parent_mean,
                interval=percentile_interval(shown, stats.confidence),
                p_fail=p_fail,
                p_fail_adjusted=p_adj,
                verdict=verdict,
                prompts=len(spec.members),
                prompts_needed=needed,
                held_back_at_limit=held_back,
            )
        )
    return results


def metric_table(
    paired: PairedMetrics,
    members: Sequence[str],
    config: Config,
    checks: Sequence[CheckResult],
    scope: str,
) -> dict[str, dict[str, object]]:
    """Parent, adapter, delta and the delta's paired interval for every metric in a scope."""
    stats = config.statistics
    if not members:
        return {}
    weights = resample_weights(
        len(members), stats.resamples, stats.method, scope_seed(stats.seed, scope)
    )
    table: dict[str, dict[str, object]] = {}
    for metric in paired.parent:
        parent, adapter = paired.select(metric, members)
        deltas = weighted_means(adapter - parent, weights)
        verdicts = [c.verdict for c in checks if c.metric == metric and c.scope == scope]
        table[metric] = {
            "parent": float(parent.mean()),
            "adapter": float(adapter.mean()),
            "delta": float(adapter.mean() - parent.mean()),
            "interval": list(percentile_interval(deltas, stats.confidence)),
            "verdict": worst(verdicts) if verdicts else None,
        }
    return table


def adapter_verdict(checks: Sequence[CheckResult]) -> str:
    return worst([c.verdict for c in checks])
