"""The pairing self-check: replay some parent requests alone and compare the text.

A seeded engine promises that a request's text depends on its seed and model only.
Servers and GPU kernels can break that (batch-dependent arithmetic, or an adapter's
weights leaking into a base row that shared its batch: measured on vLLM's CPU build),
which would shrink every delta towards 0. So the run re-sends a few parent prompts one
at a time and counts how many come back identical to what the gate used.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from toxtests.cache import make_key
from toxtests.engines.base import EXACT, EngineInfo, Variant, pairing_line
from toxtests.prompts import Prompt
from toxtests.run.store import GenerationStore


@dataclass(frozen=True)
class PairingCheck:
    """What the engine promises about pairing, and what the replays found."""

    pairing: str  # the engine's promise: "exact" or "seeded"
    replayed: int  # rows re-generated alone
    identical: int  # of those, rows whose text equalled the gate's
    line: str  # the report's "pairing: ..." sentence
    mismatched: list[str] = field(default_factory=list)  # prompt ids that differed

    @property
    def reproducible(self) -> bool:
        return self.pairing == EXACT or self.identical == self.replayed

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> PairingCheck:
        return cls(**values)


def replay_choice(prompts: Sequence[Prompt], count: int) -> list[Prompt]:
    """A fixed, spread-out subset: the same prompts on every worker and every rerun."""
    ranked = sorted(prompts, key=lambda p: hashlib.sha256(p.id.encode()).hexdigest())
    return ranked[:count]


def replay_plan(
    store: GenerationStore, parent: Variant, prompts: Sequence[Prompt], count: int
) -> tuple[list[Prompt], str]:
    """The parent prompts a replay check re-generates (among those cached), and the key
    its outcome is cached under."""
    chosen = [p for p in replay_choice(prompts, len(prompts)) if store.cached(parent, p)][:count]
    return chosen, make_key("replay", [store.generation_key(parent, p) for p in chosen])


def check_pairing(
    store: GenerationStore, info: EngineInfo, parent: Variant, prompts: Sequence[Prompt], count: int
) -> PairingCheck:
    """Replay `count` parent prompts one request at a time (cached by what was replayed)."""
    if info.pairing == EXACT or count == 0:
        return PairingCheck(info.pairing, 0, 0, pairing_line(info, None))
    chosen, key = replay_plan(store, parent, prompts, count)
    found = store.cache.get("pairing", key)
    if found is None:
        identical, replayed, mismatched = 0, 0, []
        with store.timings.timed("generate"):
            for prompt in chosen:
                stored = [s["text"] for s in store.cached(parent, prompt)["samples"]]
                # Alone: a batch mix the gate's run never had.
                again = [g.text for g in store.engine.generate([prompt], parent, store.settings)[0]]
                same = sum(a == b for a, b in zip(stored, again, strict=True))
                identical, replayed = identical + same, replayed + len(stored)
                if same < len(stored):
                    mismatched.append(prompt.id)
        found = {"replayed": replayed, "identical": identical, "mismatched": mismatched}
        store.cache.put("pairing", key, found)
    replays = (int(found["identical"]), int(found["replayed"]))
    return PairingCheck(
        info.pairing,
        replays[1],
        replays[0],
        pairing_line(info, replays),
        list(found["mismatched"]),
    )
