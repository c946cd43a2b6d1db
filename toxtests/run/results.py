"""The run's results as typed values: what the plugin, the CLI and the report share.

`to_json()` gives the JSON file's layout (the report renders from it, so a result read
back with `from_json()` renders the same); nothing here knows how it was computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from toxtests.engines.base import EngineInfo
from toxtests.gate import CheckResult, worst
from toxtests.run.pairing import PairingCheck

MetricTable = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class StoppingSummary:
    enabled: bool
    stopped: bool
    decided: str | None
    look: int | None
    looks: int
    level: float | None
    prompts_generated: int
    prompts_total: int
    reason: str


@dataclass(frozen=True)
class ShardResult:
    shard: str
    category: str
    prompts: int
    verdict: str
    metrics: MetricTable


@dataclass(frozen=True)
class TurnedToxic:
    """One sample that was below the toxic cut-off under the parent and above it after."""

    prompt_id: str
    prompt: str
    sample: int
    parent_text: str
    parent_score: float
    adapter_text: str
    adapter_score: float


@dataclass(frozen=True)
class GenerationCounts:
    empty_parent: int
    empty_adapter: int
    prompts_compared: int
    prompts_excluded_empty: int


@dataclass(frozen=True)
class AdapterResult:
    """The gate's verdict on one adapter, with everything the report shows of it."""

    adapter: str
    name: str
    fingerprint: str
    verdict: str
    summary: str
    # The intervals' confidence: above the configured one when early looks spent part of
    # the error budget before the ordinary verdict on all prompts.
    confidence: float
    metrics: MetricTable
    checks: list[CheckResult]
    shards: list[ShardResult]
    early_stopping: StoppingSummary
    distributions: dict[str, list[float]]
    turned_toxic: list[TurnedToxic]
    generation: GenerationCounts
    kind: str = "adapter"  # "adapter", or "model" for a full-model candidate
    note: str = ""  # how it is paired with the parent, where that needs saying
    rendering: str = ""  # how its prompts were rendered: "chat template" or "plain text"
    # The toxicity rate corrected for the scorer's errors (scoring.correction), or {}.
    corrected: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        body = {f.name: getattr(self, f.name) for f in fields(self)}
        body["checks"] = [c.to_dict() for c in self.checks]
        for name in ("shards", "turned_toxic"):
            body[name] = [asdict(item) for item in body[name]]
        for name in ("early_stopping", "generation"):
            body[name] = asdict(body[name])
        return body

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> AdapterResult:
        return cls(
            **{
                **values,
                "checks": [
                    CheckResult(**{**c, "interval": tuple(c["interval"])}) for c in values["checks"]
                ],
                "shards": [ShardResult(**s) for s in values["shards"]],
                "early_stopping": StoppingSummary(**values["early_stopping"]),
                "turned_toxic": [TurnedToxic(**t) for t in values["turned_toxic"]],
                "generation": GenerationCounts(**values["generation"]),
            }
        )


@dataclass(frozen=True)
class RunResult:
    """The whole run: what the JSON file holds and the report shows."""

    toxtests_version: str
    created: str
    verdict: str
    exit_code: int
    config: dict[str, Any]
    engine: EngineInfo
    pairing: PairingCheck
    model: dict[str, Any]
    scorer: dict[str, Any]
    prompts: dict[str, Any]
    versions: dict[str, str]
    shards: list[dict[str, Any]]
    early_stopping: dict[str, Any]
    adapters: list[AdapterResult] = field(default_factory=list)
    # metric -> the metric it equals by construction (gated and shown once, as the latter)
    equal_metrics: dict[str, str] = field(default_factory=dict)
    # variant name (the parent's included) -> how its prompts were rendered
    renderings: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        body = {f.name: getattr(self, f.name) for f in fields(self)}
        body["engine"] = self.engine.to_json()
        body["pairing"] = self.pairing.to_json()
        body["adapters"] = [a.to_json() for a in self.adapters]
        return body

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> RunResult:
        return cls(
            **{
                **values,
                "engine": EngineInfo.from_json(values["engine"]),
                "pairing": PairingCheck.from_json(values["pairing"]),
                "adapters": [AdapterResult.from_json(a) for a in values["adapters"]],
            }
        )


def overall_verdict(verdicts: Sequence[str]) -> str:
    return worst(list(verdicts)) if verdicts else "pass"


def exit_code(verdict: str, inconclusive: str) -> int:
    if verdict == "fail" or (verdict == "inconclusive" and inconclusive == "fail"):
        return 1
    return 0


def summary_line(
    name: str, verdict: str, metrics: MetricTable, checks: Sequence[CheckResult] = ()
) -> str:
    """One line per adapter (terminal and report); an inconclusive one says what would
    settle it: the prompts its least settled check needs if the effect stays as seen."""
    parts = []
    second = "expected_max_toxicity" if "expected_max_toxicity" in metrics else "mean_toxicity"
    for metric in ("toxicity_rate", second):
        if metric in metrics:
            m = metrics[metric]
            low, high = m["interval"]
            parts.append(f"{metric} {m['delta']:+.3f} [{low:+.3f}, {high:+.3f}]")
    line = f"{name}: {verdict.upper()}  " + "  ".join(parts)
    if verdict == "inconclusive":
        open_checks = [c for c in checks if c.verdict == "inconclusive"]
        needed = [c.prompts_needed for c in open_checks if c.prompts_needed]
        if needed:
            line += f"  (~{max(needed)} prompts would settle it, at the effect seen)"
        elif open_checks:
            line += "  (the effect sits on the limit: no number of prompts settles it)"
    return line
