"""The store generates a gate's variants together where the engine can, and caches the
same entries as one variant at a time (the real torch engine on the tiny model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from toxtests.cache import Cache
from toxtests.config import Config, GenerationConfig
from toxtests.engines import create_engine
from toxtests.engines.base import EngineOptions
from toxtests.prompts import Prompt
from toxtests.run.store import GenerationStore, ScorerHandle, Timings

PROMPTS = [Prompt(f"p{i}", text) for i, text in enumerate(
    ["the weather", "we made", "little more while other house garden music",
     "she said that they would go home after the river", "a long way", "for the water"]
)]  # fmt: skip
SETTINGS = GenerationConfig(max_new_tokens=6, samples=2)


class OneVariantAtATime:
    """The engine protocol without `generate_together`, as the vLLM and OpenAI engines
    offer it: the store must then call `generate` once per variant."""

    def __init__(self, engine: Any):
        self._engine = engine
        self.calls = 0

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self._engine.generate(*args, **kwargs)


def _store(engine: Any, cache: Path, timings: Timings) -> GenerationStore:
    info = engine.describe() if hasattr(engine, "describe") else engine._engine.describe()
    fingerprints = {
        "engine": info.cache_identity(),
        "model": {"fingerprint": "tiny", "dtype": "float32"},
    }
    scorer = ScorerHandle("profanity-check", Config(), "cpu", False, timings)
    fingerprints["scorer"] = scorer.describe()
    return GenerationStore(Cache(cache), engine, SETTINGS, scorer, lambda: fingerprints, timings)


def _entries(store: GenerationStore, variants: list[Any]) -> list[Any]:
    return [store.cached(v, p) for v in variants for p in PROMPTS]


@pytest.fixture(scope="module")
def engine(tiny, tmp_path_factory: pytest.TempPathFactory) -> Any:  # noqa: ANN001
    options = EngineOptions(
        model=str(tiny.base),
        adapters=(str(tiny.identity), str(tiny.toxic)),
        cache_dir=tmp_path_factory.mktemp("engine-cache"),
        device="cpu",
    )
    made = create_engine("torch", options)
    yield made
    made.close()


def test_variants_generated_together_are_the_entries_made_one_at_a_time(
    engine: Any, tmp_path: Path
) -> None:
    """The parent half cached, the toxic adapter not at all: one engine call generates
    the parent's missing half and the adapter's every prompt, and the cache then holds
    exactly what generating each variant on its own writes."""
    parent, _, toxic = engine.variants()
    calls: list[list[tuple[int, str]]] = []
    together = engine.generate_together

    def spy(jobs: Any, settings: Any, on_prompt_done: Any = None) -> Any:
        calls.append([(len(prompts), variant.name) for prompts, variant in jobs])
        return together(jobs, settings, on_prompt_done)

    engine.generate_together = spy
    try:
        timings = Timings()
        store = _store(engine, tmp_path / "together", timings)
        store.prefetch(parent, PROMPTS[:3], "the first half")
        store.prefetch_together([parent, toxic], PROMPTS, "every prompt")
        store.prefetch_together([parent, toxic], PROMPTS, "again")  # all cached: no call
    finally:
        del engine.generate_together
    assert calls == [[(3, "parent"), (6, "toxic")]]
    assert timings.generated_tokens > 0

    alone = OneVariantAtATime(engine)
    reference = _store(alone, tmp_path / "alone", Timings())
    reference.prefetch_together([parent, toxic], PROMPTS, "every prompt")
    assert alone.calls == 2
    made = _entries(store, [parent, toxic])
    assert made == _entries(reference, [parent, toxic])
    assert all(entry is not None for entry in made)
    parent_texts = [s["text"] for e in made[: len(PROMPTS)] for s in e["samples"]]
    toxic_texts = [s["text"] for e in made[len(PROMPTS) :] for s in e["samples"]]
    assert parent_texts != toxic_texts  # the adapter's rows really ran on its weights


def test_a_shard_of_two_variants_is_generated_once_under_their_own_locks(
    engine: Any, tmp_path: Path
) -> None:
    """`generate_together` takes per-variant shard locks, as `scores` does, so the
    parent's shard generated beside one adapter is read, not generated again, beside
    another; and `scores` then finds everything cached."""
    parent, identity, toxic = engine.variants()
    store = _store(engine, tmp_path / "cache", Timings())
    messages: list[str] = []
    store.progress = messages.append
    store.generate_together([parent, identity], PROMPTS, "shard-a")
    store.generate_together([parent, toxic], PROMPTS, "shard-a")
    assert messages == [
        "generating parent on shard-a (6 prompts)",
        "generating identity on shard-a (6 prompts)",
        "generating toxic on shard-a (6 prompts)",
    ]
    store.scores(parent, PROMPTS, "shard-a")  # cached: read, not generated
    store.scores(toxic, PROMPTS, "shard-a")
    assert len(messages) == 3
    # One lock a variant (not one for the pair), named as `scores` names them.
    assert len(list((tmp_path / "cache" / "locks").glob("*.lock"))) == 3
