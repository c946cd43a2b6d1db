"""Generations and scores in the content-addressed cache: keys, locks, resume.

The store is handed the engine, the scorer and the key parts; it never calls the run.
A prompt's generations are cached the moment its samples are done, so an interrupted
run resumes with only the missing prompts; xdist workers and concurrent runs share the
cache under one lock per shard (or per variant when prefetching).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from toxtests.cache import Cache, make_key
from toxtests.config import Config, GenerationConfig
from toxtests.engines.base import Engine, Generation, Variant
from toxtests.errors import GenerationError, ToxtestsError
from toxtests.progress import Ticker
from toxtests.prompts import Prompt

# Texts per scoring call when progress is shown: a few seconds of a neural scorer.
SCORE_CHUNK_TEXTS = 512


@dataclass
class Timings:
    """Wall seconds by phase (load / generate / score) and tokens generated."""

    seconds: dict[str, float] = field(
        default_factory=lambda: {"load": 0.0, "generate": 0.0, "score": 0.0}
    )
    generated_tokens: int = 0

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - started


@dataclass
class ShardScores:
    """Generations and scores of one model variant on some prompts, [prompt][sample]."""

    prompt_ids: list[str]
    texts: list[list[str]]
    scores: dict[str, np.ndarray]  # attribute -> (prompts, samples)

    def answered(self) -> set[str]:
        """Prompts whose every sample has text: an empty continuation is no evidence
        of safety, so it is never scored as "non-toxic" (the report counts them)."""
        return {
            pid
            for pid, row in zip(self.prompt_ids, self.texts, strict=True)
            if all(t.strip() for t in row)
        }

    @staticmethod
    def concat(parts: Sequence[ShardScores]) -> ShardScores:
        return ShardScores(
            prompt_ids=[pid for part in parts for pid in part.prompt_ids],
            texts=[row for part in parts for row in part.texts],
            scores={
                attr: np.concatenate([part.scores[attr] for part in parts])
                for attr in parts[0].scores
            },
        )


class ScorerHandle:
    """The configured scorer, loaded on first use (a fully cached run never loads it)."""

    def __init__(
        self, spec: str, config: Config, device: str, allow_pickle: bool, timings: Timings
    ):
        self.spec = spec
        self._config = config
        self._device = device
        self._allow_pickle = allow_pickle
        self._timings = timings
        self._scorer: Any = None
        self._preloading: threading.Thread | None = None

    @property
    def scorer(self) -> Any:
        if self._scorer is None:
            from toxtests.models import choose_device
            from toxtests.score import load_scorer

            scoring = self._config.scoring
            with self._timings.timed("load"):
                self._scorer = load_scorer(
                    self.spec,
                    device=choose_device(self._device),
                    batch_size=scoring.batch_size,
                    huggingface_config=scoring.huggingface_config,
                    allow_pickle=self._allow_pickle or scoring.allow_pickle,
                )
            if scoring.attribute and scoring.attribute not in self._scorer.attributes:
                raise ToxtestsError(
                    f"scoring.attribute = {scoring.attribute!r} is not emitted by "
                    f"{self.spec}; it emits: {', '.join(self._scorer.attributes)}"
                )
        return self._scorer

    def preload(self) -> None:
        """Start the scorer's slow imports on a thread, once: called as generation starts,
        so they overlap it (the decode loop spends its time in torch, off the GIL)."""
        warm_up = getattr(self.scorer, "warm_up", None)
        if warm_up is not None and self._preloading is None:
            self._preloading = threading.Thread(
                target=_quietly, args=(warm_up,), name="toxtests-scorer", daemon=True
            )
            self._preloading.start()

    def describe(self) -> dict[str, Any]:
        scorer = self.scorer
        return {
            "spec": self.spec,
            "fingerprint": scorer.fingerprint(),
            "attributes": list(scorer.attributes),
            "primary": self._config.scoring.attribute or scorer.primary,
        }


@dataclass
class _Job:
    """One variant's missing prompts (indices into the prompts) and where they go."""

    variant: Variant
    keys: list[str]
    generations: list[Any]
    missing: list[int]


class GenerationStore:
    """Cached generations and scores of every variant, generated by one engine."""

    def __init__(
        self,
        cache: Cache,
        engine: Engine,
        settings: GenerationConfig,
        scorer: ScorerHandle,
        fingerprints: Callable[[], dict[str, Any]],
        timings: Timings,
        progress: Callable[[str], None] = lambda message: None,
    ):
        self.cache = cache
        self.engine = engine
        self.settings = settings
        self.scorer = scorer
        self._fingerprints = fingerprints
        self.timings = timings
        self.progress = progress
        # Builds a progress ticker for one generation call (label, prompts) or a scoring
        # pass (label, texts, items=, rate=); None: quiet.
        self.ticker: Callable[..., Ticker] | None = None

    def generation_key(self, variant: Variant, prompt: Prompt) -> str:
        """Everything that changes the text: engine, model, variant, prompt, settings."""
        fingerprints = self._fingerprints()
        model = fingerprints["model"]
        return make_key(
            "generation",
            fingerprints["engine"],
            model["fingerprint"],
            model["dtype"],
            variant.fingerprint,
            prompt.id,
            prompt.text,
            {k: v for k, v in vars(self.settings).items() if k != "batch_size"},
        )

    def score_key(self, generation_key: str, texts: list[str]) -> str:
        """The scorer and the texts: a regenerated entry can never reuse another's scores."""
        scorer_fp = self._fingerprints()["scorer"]["fingerprint"]
        return make_key("scores", scorer_fp, generation_key, texts)

    def cached(self, variant: Variant, prompt: Prompt) -> Any:
        return self.cache.get("generations", self.generation_key(variant, prompt))

    def scores(self, variant: Variant, prompts: Sequence[Prompt], lock: str) -> ShardScores:
        """Generations (cached or made now, under `lock`) and their scores."""
        self.expect(prompts)
        keys = [self.generation_key(variant, p) for p in prompts]
        generations: list[Any] = [self.cache.get("generations", k) for k in keys]
        if any(g is None for g in generations):
            with self.cache.lock(make_key(lock, keys)[:24]):
                generations = [self.cache.get("generations", k) for k in keys]
                missing = [i for i, g in enumerate(generations) if g is None]
                if missing:
                    self.progress(f"generating {variant.name} on {lock} ({len(missing)} prompts)")
                    self._generate_jobs(prompts, [_Job(variant, keys, generations, missing)])
        texts = [[sample["text"] for sample in entry["samples"]] for entry in generations]
        return ShardScores(
            prompt_ids=[p.id for p in prompts], texts=texts, scores=self._scores(keys, texts)
        )

    def prefetch(self, variant: Variant, prompts: Sequence[Prompt], where: str) -> None:
        """Generate what the cache lacks for many prompts in one engine call.

        Wider, better length-sorted batches than shard by shard: measured 108 vs 84
        tokens/s on 300 prompts of Gemma 3 270M. One lock per variant keeps concurrent
        runs from generating the same prompts twice.
        """
        self.prefetch_together([variant], prompts, where)

    def prefetch_together(
        self, variants: Sequence[Variant], prompts: Sequence[Prompt], where: str
    ) -> None:
        """`prefetch` for several variants, in one engine call where the engine offers
        `generate_together`: the parent and an adapter of a 128-prompt gate then decode
        256 rows at a time. Every variant's lock is held, taken in one order, so two
        runs never wait on each other."""
        self.expect(prompts)
        pending = self._pending(variants, prompts)
        if not pending:
            return
        fingerprints = self._fingerprints()
        locks = sorted(
            {
                make_key(
                    "variant", fingerprints["engine"], fingerprints["model"], variant.fingerprint
                )[:24]
                for variant, _ in pending
            }
        )
        self._generate_locked(locks, pending, prompts, where)

    def generate_together(
        self, variants: Sequence[Variant], prompts: Sequence[Prompt], lock: str
    ) -> None:
        """What the cache lacks of one shard for several variants, in one engine call
        where the engine can, under each variant's lock on the shard (the locks `scores`
        takes, in one order): a worker generating the parent's shard with one adapter
        makes a worker wanting it with another wait and read it, not generate it again."""
        self.expect(prompts)
        pending = self._pending(variants, prompts)
        if pending:
            locks = sorted({make_key(lock, keys)[:24] for _, keys in pending})
            self._generate_locked(locks, pending, prompts, lock)

    def expect(self, prompts: Sequence[Prompt]) -> None:
        """Tell an engine that can use the hint (`TorchEngine.expect`) which prompts it
        may be asked to generate for, before anything describes it for their keys: that
        imports torch (~1 s), time its tokenizer can spend on them. Called by the run
        for all its prompts first, and by each generating call for its own."""
        expect = getattr(self.engine, "expect", None)
        if expect is not None:
            expect(prompts, self.settings)

    def _pending(
        self, variants: Sequence[Variant], prompts: Sequence[Prompt]
    ) -> list[tuple[Variant, list[str]]]:
        """(variant, generation keys) of the variants with a prompt not cached yet."""
        keyed = [(v, [self.generation_key(v, p) for p in prompts]) for v in variants]
        return [
            (variant, keys)
            for variant, keys in keyed
            if not all(self.cache.path("generations", k).exists() for k in keys)
        ]

    def _generate_locked(
        self,
        locks: list[str],
        pending: list[tuple[Variant, list[str]]],
        prompts: Sequence[Prompt],
        where: str,
    ) -> None:
        with contextlib.ExitStack() as held:
            for lock in locks:
                held.enter_context(self.cache.lock(lock))
            jobs = []
            for variant, keys in pending:  # again, now that no one else is generating them
                generations: list[Any] = [self.cache.get("generations", k) for k in keys]
                missing = [i for i, g in enumerate(generations) if g is None]
                if missing:
                    self.progress(f"generating {variant.name} on {where} ({len(missing)} prompts)")
                    jobs.append(_Job(variant, keys, generations, missing))
            if jobs:
                self._generate_jobs(prompts, jobs)

    def _generate_jobs(self, prompts: Sequence[Prompt], jobs: list[_Job]) -> None:
        """Each job's missing prompts, in one engine call where the engine generates
        several variants at once; each prompt cached as soon as its samples are done."""
        label = " + ".join(job.variant.name for job in jobs)
        ticker = self.ticker(label, sum(len(j.missing) for j in jobs)) if self.ticker else None
        done = [0, 0]  # prompts, tokens

        def store(number: int, position: int, samples: list[Generation]) -> None:
            job = jobs[number]
            index = job.missing[position]
            if len(samples) != self.settings.samples:
                raise GenerationError(
                    f"{job.variant.name}, prompt {prompts[index].id}: the engine returned "
                    f"{len(samples)} samples, expected {self.settings.samples}"
                )
            entry = {"samples": [{"text": g.text, "tokens": g.tokens} for g in samples]}
            self.cache.put("generations", job.keys[index], entry)
            job.generations[index] = entry
            self.timings.generated_tokens += sum(g.tokens for g in samples)
            done[0] += 1
            done[1] += sum(g.tokens for g in samples)
            if ticker is not None:
                ticker.update(done[0], done[1])

        self.scorer.preload()
        prepare = getattr(self.engine, "prepare", None)  # loads the model (optional)
        if prepare is not None:
            with self.timings.timed("load"):
                prepare(jobs[0].variant, self.settings)
        together = getattr(self.engine, "generate_together", None)
        with self.timings.timed("generate"):
            if len(jobs) > 1 and together is not None:
                together(
                    [([prompts[i] for i in job.missing], job.variant) for job in jobs],
                    self.settings,
                    on_prompt_done=store,
                )
            else:
                for number, job in enumerate(jobs):
                    self.engine.generate(
                        [prompts[i] for i in job.missing],
                        job.variant,
                        self.settings,
                        on_prompt_done=functools.partial(store, number),
                    )
        if ticker is not None:
            ticker.finish()
        for job in jobs:
            left = [prompts[i].id for i in job.missing if job.generations[i] is None]
            if left:
                raise GenerationError(
                    f"{job.variant.name}: the engine finished without continuations for "
                    f"{len(left)} prompts (first: {left[0]})"
                )

    def _scores(self, generation_keys: list[str], texts: list[list[str]]) -> dict[str, np.ndarray]:
        keys = [self.score_key(k, t) for k, t in zip(generation_keys, texts, strict=True)]
        entries: list[Any] = [self.cache.get("scores", k) for k in keys]
        missing = [i for i, e in enumerate(entries) if e is None]
        if missing:
            flat = [t for i in missing for t in texts[i]]
            scorer = self.scorer.scorer
            with self.timings.timed("score"):
                scored = self._score_in_chunks(scorer, flat)
            offset = 0
            for i in missing:
                width = len(texts[i])
                entry = {a: [float(v) for v in scored[a][offset : offset + width]] for a in scored}
                offset += width
                self.cache.put("scores", keys[i], entry)
                entries[i] = entry
        attributes = self._fingerprints()["scorer"]["attributes"]
        return {a: np.array([e[a] for e in entries], dtype=np.float64) for a in attributes}

    def _score_in_chunks(self, scorer: Any, texts: list[str]) -> dict[str, np.ndarray]:
        """All texts scored, in chunks of whole scorer batches (the same batches, so the
        same scores, as one call) so a long pass can show its progress."""
        chunk = scorer.batch_size * max(1, SCORE_CHUNK_TEXTS // scorer.batch_size)
        if len(texts) <= chunk or self.ticker is None:
            return dict(scorer.score(texts))
        ticker = self.ticker("scoring", len(texts), items="texts", rate="texts")
        parts: list[dict[str, np.ndarray]] = []
        for start in range(0, len(texts), chunk):
            parts.append(scorer.score(texts[start : start + chunk]))
            done = min(start + chunk, len(texts))
            ticker.update(done, done)
        ticker.finish()
        return {a: np.concatenate([part[a] for part in parts]) for a in parts[0]}


def _quietly(task: Any) -> None:
    # A failure is raised again, with its message, where it matters (see preload).
    with contextlib.suppress(Exception):
        task()
