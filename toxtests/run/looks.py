"""Early stopping: a look after each shard, at levels fixed in advance by the schedule.

The looks take pooled scores and return decisions; they never generate. Look k depends
only on the first k shards, so every xdist worker and the controller reach the same
decision at the same look.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from toxtests.config import Config
from toxtests.errors import GenerationError
from toxtests.gate import CheckSpec, PairedMetrics, excess_draws, excess_values, restrict
from toxtests.metrics import equal_by_construction, per_prompt_metrics
from toxtests.run.store import ShardScores
from toxtests.sequential import LookDecision, final_confidence, look_levels, sequential_verdict
from toxtests.shards import Shard

Pooled = Callable[[Sequence[Shard]], tuple[ShardScores, ShardScores]]


def paired_metrics(
    parent: ShardScores, adapter: ShardScores, primary: str, threshold: float
) -> PairedMetrics:
    samples = int(parent.scores[primary].shape[1]) if primary in parent.scores else 1
    return PairedMetrics(
        parent.prompt_ids,
        per_prompt_metrics(parent.scores, primary, threshold),
        per_prompt_metrics(adapter.scores, primary, threshold),
        equal_by_construction(samples, primary),
    )


def comparable(parent: ShardScores, adapter: ShardScores) -> list[str]:
    """Prompt ids with text under both models, in order."""
    answered = parent.answered() & adapter.answered()
    if not answered:
        raise GenerationError(
            "no prompt has a non-empty continuation under both the parent and the adapter; "
            "check the tokenizer's EOS token, the chat template and max_new_tokens"
        )
    return [pid for pid in parent.prompt_ids if pid in answered]


def at_confidence(config: Config, confidence: float | None) -> Config:
    if confidence is None:
        return config
    statistics = dataclasses.replace(config.statistics, confidence=confidence)
    return dataclasses.replace(config, statistics=statistics)


def final_look_confidence(config: Config, shards: Sequence[Shard], total: int) -> float | None:
    """The confidence of the verdict on all prompts when no earlier look decides: fixed
    in advance by the shard schedule."""
    if not total:
        return None
    seen, fractions = 0, []
    for shard in shards:
        seen += len(shard.prompts)
        fractions.append(min(1.0, seen / total))
    alpha = (1.0 - config.statistics.confidence) / 2.0
    return final_confidence(look_levels(sorted(set(fractions)), alpha)[-1])


def sequential(
    pooled: Pooled,
    shards: Sequence[Shard],
    checks: Sequence[CheckSpec],
    config: Config,
    primary: str,
    total: int,
) -> tuple[LookDecision, list[Shard]]:
    """Look after each of `shards`; stop at the first look whose spent alpha decides."""
    looks: list[tuple[int, list[np.ndarray], list[bool], list[np.ndarray]]] = []
    seen: list[Shard] = []
    decision: LookDecision | None = None
    for shard in shards:
        seen.append(shard)
        parent, adapter = pooled(seen)
        paired = paired_metrics(parent, adapter, primary, config.scoring.threshold)
        specs = restrict(list(checks), set(comparable(parent, adapter)))
        available = {pid for s in seen for pid in s.prompt_ids}
        looks.append(
            (
                len(available),
                excess_draws(specs, paired, config),
                [c.fail_only for c in specs],
                excess_values(specs, paired),
            )
        )
        decision = sequential_verdict(looks, total, config.statistics.confidence)
        if decision.decided:
            if decision.beyond:
                names = ", ".join(
                    f"{specs[i].metric} {specs[i].rule} ({specs[i].scope})" for i in decision.beyond
                )
                decision = dataclasses.replace(decision, reason=f"{decision.reason}: {names}")
            break
    assert decision is not None, "sequential() needs at least one shard"
    return decision, seen
