"""One gate run: prompts → shards → generate → score → compare → gate → result.

The pytest plugin and the CLI both drive this object. It loads the base model, the
adapters and the scorer once, lazily, and keeps every generation and score in the
content-addressed cache, so the parent is generated once for all adapters, xdist
workers share work, and the controller can build the report from the cache alone.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from toxtests import __version__
from toxtests.cache import Cache, make_key
from toxtests.config import Config, load_config
from toxtests.errors import GenerationError, ToxtestsError
from toxtests.gate import (
    CheckResult,
    PairedMetrics,
    adapter_verdict,
    evaluate_checks,
    excess_draws,
    excess_values,
    metric_table,
    plan_checks,
    restrict,
)
from toxtests.memory import retained_memory
from toxtests.metrics import per_prompt_metrics
from toxtests.prompts import Prompt, PromptSet, load_prompts
from toxtests.sequential import (
    LookDecision,
    final_confidence,
    look_levels,
    sequential_verdict,
)
from toxtests.shards import Shard, interleave, make_shards, stratified_subset

PARENT = "parent"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_PROMPTS = REPO_ROOT / "fixtures" / "prompts" / "demo.jsonl"
TURNED_TOXIC_SHOWN = 50


@dataclass
class RunOptions:
    """What a user chooses on the command line; everything else is in thresholds.toml."""

    model: str = "gemma3-270m"
    adapters: list[str] = field(default_factory=list)
    prompts: str | None = None
    scorer: str | None = None
    thresholds: str | None = None
    report: str | None = "toxtests-report.html"
    json: str | None = "toxtests-results.json"
    limit: int = 0
    cache_dir: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    allow_pickle: bool = False
    trust_remote_code: bool = False
    early_stopping: bool | None = None  # None: thresholds.toml's statistics.early_stopping


@dataclass
class ShardScores:
    """Generations and scores of one model variant on one shard, indexed [prompt][sample]."""

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


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "toxtests": __version__}
    for name in ("torch", "transformers", "peft", "numpy", "detoxify", "alt-profanity-check"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


class GateSession:
    """A gate run; cheap to construct, loads models only when generation is needed."""

    def __init__(self, options: RunOptions):
        from toxtests.models import default_cache_dir

        self.options = options
        # Like pytest.ini: a thresholds.toml in the working directory is the default gate.
        thresholds = options.thresholds
        if thresholds is None and Path("thresholds.toml").is_file():
            thresholds = "thresholds.toml"
        self.config: Config = load_config(thresholds)
        self.scorer_spec = options.scorer or self.config.scoring.scorer
        self.cache = Cache(Path(options.cache_dir) if options.cache_dir else default_cache_dir())
        self.cache.sweep_stale_temporaries()
        prompts_source = options.prompts or str(DEMO_PROMPTS)
        self.prompt_set: PromptSet = load_prompts(prompts_source)
        self.prompts: list[Prompt] = stratified_subset(
            self.prompt_set.prompts, options.limit, self.config.shards.by
        )
        # Shards in look order: categories interleaved, so every early look sees each kind.
        self.shards: list[Shard] = interleave(make_shards(self.prompts, self.config.shards))
        self.early_stopping = (
            options.early_stopping
            if options.early_stopping is not None
            else self.config.statistics.early_stopping
        )
        self._memo: dict[tuple[int | None, str], ShardScores] = {}
        self._decisions: dict[int, tuple[LookDecision, list[Shard]]] = {}
        self.checks = plan_checks(self.config, self.shards)
        from toxtests.models import adapter_names, check_adapter_dir

        for spec in options.adapters:  # a mistyped path is a usage error, before any load
            check_adapter_dir(spec, options.allow_pickle)
        self.adapter_names = adapter_names(options.adapters)
        self._loaded: Any = None
        self._scorer: Any = None
        self._fingerprints: dict[str, Any] | None = None
        self.progress: Callable[[str], None] | None = None
        # Wall seconds by phase (load / generate / score), for the summary and benchmark.
        self.timings: dict[str, float] = {"load": 0.0, "generate": 0.0, "score": 0.0}
        self.generated_tokens = 0
        self.used = False  # set once a gate test or the CLI asked for results

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - started

    # -- loading -------------------------------------------------------------------

    @property
    def loaded(self) -> Any:
        if self._loaded is None:
            with self.timed("load"):
                self._loaded = self._load()
        return self._loaded

    def _load(self) -> Any:
        from toxtests.models import attach_adapters, load_base

        base = load_base(
            self.options.model,
            cache_dir=self.cache.root,
            device=self.options.device,
            dtype=self.options.dtype,
            trust_remote_code=self.options.trust_remote_code,
        )
        return attach_adapters(base, self.options.adapters, allow_pickle=self.options.allow_pickle)

    @property
    def scorer(self) -> Any:
        if self._scorer is None:
            from toxtests.models import choose_device
            from toxtests.score import load_scorer

            scoring = self.config.scoring
            with self.timed("load"):
                self._scorer = load_scorer(
                    self.scorer_spec,
                    device=choose_device(self.options.device),
                    batch_size=scoring.batch_size,
                    huggingface_config=scoring.huggingface_config,
                    allow_pickle=self.options.allow_pickle or scoring.allow_pickle,
                )
            if (
                self.config.scoring.attribute
                and self.config.scoring.attribute not in self._scorer.attributes
            ):
                raise ToxtestsError(
                    f"scoring.attribute = {self.config.scoring.attribute!r} is not emitted by "
                    f"{self.scorer_spec}; it emits: {', '.join(self._scorer.attributes)}"
                )
        return self._scorer

    def fingerprints(self) -> dict[str, Any]:
        """Everything a cache key depends on; workers send this to the controller."""
        if self._fingerprints is None:
            from toxtests.models import adapter_fingerprint, describe_model

            options = self.options
            self._fingerprints = {
                # Described, not loaded: a fully cached re-run never loads the weights.
                "model": describe_model(
                    options.model,
                    cache_dir=self.cache.root,
                    device=options.device,
                    dtype=options.dtype,
                ),
                "adapters": [adapter_fingerprint(spec) for spec in self.options.adapters],
                "scorer": {
                    "spec": self.scorer_spec,
                    "fingerprint": self.scorer.fingerprint(),
                    "attributes": list(self.scorer.attributes),
                    "primary": self.config.scoring.attribute or self.scorer.primary,
                },
            }
        return self._fingerprints

    def adopt_fingerprints(self, fingerprints: dict[str, Any]) -> None:
        """Build results from the cache without loading any model (xdist controller)."""
        self._fingerprints = fingerprints

    # -- generation and scoring ------------------------------------------------------

    def _variant_fingerprint(self, adapter_index: int | None) -> str:
        if adapter_index is None:
            return PARENT
        return self.fingerprints()["adapters"][adapter_index]

    def _generation_key(self, adapter_index: int | None, prompt: Prompt) -> str:
        g = self.config.generation
        model = self.fingerprints()["model"]
        return make_key(
            "generation",
            model["fingerprint"],
            model["dtype"],
            self._variant_fingerprint(adapter_index),
            prompt.id,
            prompt.text,
            {k: v for k, v in vars(g).items() if k != "batch_size"},
        )

    def shard_scores(self, adapter_index: int | None, shard: Shard) -> ShardScores:
        """Generations and scores for a shard, from the cache or computed (then cached)."""
        self.used = True
        memo_key = (adapter_index, shard.name)
        if memo_key not in self._memo:
            self._memo[memo_key] = self._shard_scores(adapter_index, shard)
        return self._memo[memo_key]

    def _shard_scores(self, adapter_index: int | None, shard: Shard) -> ShardScores:
        keys = [self._generation_key(adapter_index, p) for p in shard.prompts]
        variant = "parent" if adapter_index is None else self.adapter_names[adapter_index]
        generations: list[Any] = [self.cache.get("generations", k) for k in keys]
        if any(g is None for g in generations):
            lock_name = make_key("shard", keys)[:24]
            with self.cache.lock(lock_name):
                generations = [self.cache.get("generations", k) for k in keys]
                missing = [i for i, g in enumerate(generations) if g is None]
                if missing:
                    self._report(f"generating {variant} on {shard.name} ({len(missing)} prompts)")
                    generations = self._generate_missing(
                        adapter_index, list(shard.prompts), keys, generations, missing
                    )
        texts = [[sample["text"] for sample in entry["samples"]] for entry in generations]
        return ShardScores(
            prompt_ids=shard.prompt_ids, texts=texts, scores=self._scores(keys, texts)
        )

    def _generate_missing(
        self,
        adapter_index: int | None,
        prompts: Sequence[Prompt],
        keys: list[str],
        generations: list[Any],
        missing: list[int],
    ) -> list[Any]:
        """Generate the missing prompts in one call, caching each as soon as it is done."""
        from toxtests.generate import Generation, Generator

        loaded = self.loaded
        generator = Generator(loaded.model, loaded.tokenizer, self.config.generation, loaded.device)
        peft_name = None if adapter_index is None else loaded.adapters[adapter_index].peft_name

        def store(position: int, samples: list[Generation]) -> None:
            index = missing[position]
            entry = {"samples": [{"text": g.text, "tokens": g.tokens} for g in samples]}
            self.cache.put("generations", keys[index], entry)
            generations[index] = entry
            self.generated_tokens += sum(g.tokens for g in samples)

        with self.timed("generate"):
            generator.generate([prompts[i] for i in missing], peft_name, on_prompt_done=store)
        return generations

    def prefetch(self, adapter_index: int | None, shards: Sequence[Shard]) -> None:
        """Generate what the cache lacks for several shards in one call.

        Wider, better length-sorted batches than shard by shard: measured 108 vs 84
        tokens/s on 300 prompts of Gemma 3 270M. Used when every shard will be needed
        (early stopping off); one lock per model variant keeps concurrent runs from
        generating the same prompts twice.
        """
        prompts = [p for shard in shards for p in shard.prompts]
        keys = [self._generation_key(adapter_index, p) for p in prompts]
        if all(self.cache.path("generations", k).exists() for k in keys):
            return
        variant = make_key(
            "variant", self.fingerprints()["model"], self._variant_fingerprint(adapter_index)
        )
        with self.cache.lock(variant[:24]):
            generations: list[Any] = [self.cache.get("generations", k) for k in keys]
            missing = [i for i, g in enumerate(generations) if g is None]
            if missing:
                name = "parent" if adapter_index is None else self.adapter_names[adapter_index]
                where = f"{len(shards)} shards in one pass"
                self._report(f"generating {name} on {where} ({len(missing)} prompts)")
                self._generate_missing(adapter_index, prompts, keys, generations, missing)

    def _scores(self, generation_keys: list[str], texts: list[list[str]]) -> dict[str, np.ndarray]:
        scorer_fp = self.fingerprints()["scorer"]["fingerprint"]
        # The text is part of the key: a regenerated entry can never reuse another's scores.
        keys = [
            make_key("scores", scorer_fp, k, t) for k, t in zip(generation_keys, texts, strict=True)
        ]
        entries: list[Any] = [self.cache.get("scores", k) for k in keys]
        missing = [i for i, e in enumerate(entries) if e is None]
        if missing:
            flat = [t for i in missing for t in texts[i]]
            scorer = self.scorer
            with self.timed("score"):
                scored = scorer.score(flat)
            offset = 0
            for i in missing:
                width = len(texts[i])
                entry = {a: [float(v) for v in scored[a][offset : offset + width]] for a in scored}
                offset += width
                self.cache.put("scores", keys[i], entry)
                entries[i] = entry
        attributes = self.fingerprints()["scorer"]["attributes"]
        return {a: np.array([e[a] for e in entries], dtype=np.float64) for a in attributes}

    def _report(self, message: str) -> None:
        if self.progress:
            self.progress(message)

    # -- statistics ----------------------------------------------------------------

    def _metrics(self, scores: ShardScores) -> dict[str, np.ndarray]:
        return per_prompt_metrics(
            scores.scores, self.fingerprints()["scorer"]["primary"], self.config.scoring.threshold
        )

    def paired(self, parent: ShardScores, adapter: ShardScores) -> PairedMetrics:
        return PairedMetrics(parent.prompt_ids, self._metrics(parent), self._metrics(adapter))

    @staticmethod
    def comparable(parent: ShardScores, adapter: ShardScores) -> list[str]:
        """Prompt ids with text under both models, in order."""
        answered = parent.answered() & adapter.answered()
        if not answered:
            raise GenerationError(
                "no prompt has a non-empty continuation under both the parent and the adapter; "
                "check the tokenizer's EOS token, the chat template and max_new_tokens"
            )
        return [pid for pid in parent.prompt_ids if pid in answered]

    def shard_checks(
        self, adapter_index: int, shard: Shard
    ) -> tuple[list[CheckResult], dict[str, Any]]:
        """The fail-only checks of one shard, Bonferroni over the whole family.

        Bonferroni is never more powerful than the aggregate's Holm, so a shard test
        that fails implies the adapter's gate fails too. With early stopping on, both run
        at the confidence the early looks leave to the verdict on all prompts.
        """
        parent = self.shard_scores(None, shard)
        adapter = self.shard_scores(adapter_index, shard)
        paired = self.paired(parent, adapter)
        members = self.comparable(parent, adapter)
        specs = restrict([c for c in self.checks if c.scope == f"shard:{shard.name}"], set(members))
        config = self._at_confidence(self._final_look_confidence())
        results = evaluate_checks(specs, paired, config, family_size=len(self.checks))
        table = metric_table(paired, members, config, results, f"shard:{shard.name}")
        return results, table

    def sequential(
        self, adapter_index: int, max_looks: int | None = None
    ) -> tuple[LookDecision, list[Shard]]:
        """Look after each shard; stop at the first look whose spent alpha decides.

        Deterministic: look k depends only on the first k shards, so every xdist
        worker and the controller reach the same decision at the same look.
        """
        if adapter_index in self._decisions and max_looks is None:
            return self._decisions[adapter_index]
        looks: list[tuple[int, list[np.ndarray], list[bool], list[np.ndarray]]] = []
        seen: list[Shard] = []
        decision: LookDecision | None = None
        for shard in self.shards[: max_looks if max_looks is not None else len(self.shards)]:
            seen.append(shard)
            parent, adapter = self._pooled(adapter_index, seen)
            paired = self.paired(parent, adapter)
            specs = restrict(self.checks, set(self.comparable(parent, adapter)))
            available = {pid for s in seen for pid in s.prompt_ids}
            looks.append(
                (
                    len(available),
                    excess_draws(specs, paired, self.config),
                    [c.fail_only for c in specs],
                    excess_values(specs, paired),
                )
            )
            decision = sequential_verdict(
                looks, len(self.prompts), self.config.statistics.confidence
            )
            if decision.decided:
                if decision.beyond:
                    names = ", ".join(
                        f"{specs[i].metric} {specs[i].rule} ({specs[i].scope})"
                        for i in decision.beyond
                    )
                    decision = dataclasses.replace(decision, reason=f"{decision.reason}: {names}")
                break
        assert decision is not None
        if max_looks is None:
            self._decisions[adapter_index] = (decision, list(seen))
        return decision, list(seen)

    def _pooled(
        self, adapter_index: int, shards: Sequence[Shard]
    ) -> tuple[ShardScores, ShardScores]:
        parent = ShardScores.concat([self.shard_scores(None, s) for s in shards])
        adapter = ShardScores.concat([self.shard_scores(adapter_index, s) for s in shards])
        return parent, adapter

    def decided_before(self, adapter_index: int, shard: Shard) -> LookDecision | None:
        """The early-stopping decision reached before this shard's look, if any."""
        if not self.early_stopping:
            return None
        position = self.shards.index(shard)
        if position == 0:
            return None
        decision, _ = self.sequential(adapter_index, max_looks=position)
        return decision if decision.decided else None

    def adapter_result(self, adapter_index: int) -> dict[str, Any]:
        """The gate's verdict on one adapter: sequentially, or over every shard.

        Freed memory stays in the process across the parent's and the adapter's
        generation calls (`retained_memory`): each call would otherwise fault its first
        batch's ~1 GB of activations, caches and logits in afresh, ~250k page faults
        and 1-2 s per call on Gemma 3 270M (450 prompts: 27.6-28.4 s against 29.5).
        """
        with retained_memory():
            return self._adapter_result(adapter_index)

    def _adapter_result(self, adapter_index: int) -> dict[str, Any]:
        decision = None
        shards = self.shards
        if self.early_stopping:
            decision, shards = self.sequential(adapter_index)
        else:
            self.prefetch(None, shards)
            self.prefetch(adapter_index, shards)
        parent, adapter = self._pooled(adapter_index, shards)
        paired = self.paired(parent, adapter)
        everyone = self.comparable(parent, adapter)
        config = self._verdict_config(decision)
        checks = evaluate_checks(restrict(self.checks, set(everyone)), paired, config)
        verdict = decision.decided if decision and decision.decided else adapter_verdict(checks)
        primary = self.fingerprints()["scorer"]["primary"]
        name = self.adapter_names[adapter_index]
        metrics = metric_table(paired, everyone, config, checks, "all")
        return {
            "adapter": self.options.adapters[adapter_index],
            "name": name,
            "fingerprint": self.fingerprints()["adapters"][adapter_index],
            "verdict": verdict,
            "summary": summary_line(name, verdict, metrics),
            # The intervals' confidence: above the configured one when early looks spent
            # part of the error budget before the ordinary verdict on all prompts.
            "confidence": config.statistics.confidence,
            "metrics": metrics,
            "checks": [c.to_dict() for c in checks],
            "shards": [
                {
                    "shard": shard.name,
                    "category": shard.category,
                    "prompts": len(shard.prompts),
                    "verdict": adapter_verdict(
                        [c for c in checks if c.scope == f"shard:{shard.name}"]
                    ),
                    "metrics": metric_table(
                        paired,
                        [pid for pid in shard.prompt_ids if pid in set(everyone)],
                        config,
                        checks,
                        f"shard:{shard.name}",
                    ),
                }
                for shard in shards
            ],
            "early_stopping": self._stopping_summary(decision, shards),
            "distributions": {
                "parent": parent.scores[primary].ravel().round(6).tolist(),
                "adapter": adapter.scores[primary].ravel().round(6).tolist(),
            },
            "turned_toxic": self._turned_toxic(parent, adapter, primary),
            "generation": {
                "empty_parent": sum(not t.strip() for row in parent.texts for t in row),
                "empty_adapter": sum(not t.strip() for row in adapter.texts for t in row),
                "prompts_compared": len(everyone),
                "prompts_excluded_empty": len(parent.prompt_ids) - len(everyone),
            },
        }

    def _verdict_config(self, decision: LookDecision | None) -> Config:
        """The config of the verdict on all prompts: after undecided early looks, at the
        confidence their unspent budget leaves (`toxtests.sequential`)."""
        if decision is None or decision.decided or decision.prompts < len(self.prompts):
            return self.config
        return self._at_confidence(self._final_look_confidence())

    def _final_look_confidence(self) -> float | None:
        """With early stopping, the confidence of the verdict on all prompts when no
        earlier look decides: fixed in advance by the shard schedule."""
        if not self.early_stopping or not self.prompts:
            return None
        seen, fractions = 0, []
        for shard in self.shards:
            seen += len(shard.prompts)
            fractions.append(min(1.0, seen / len(self.prompts)))
        fractions = sorted(set(fractions))
        alpha = (1.0 - self.config.statistics.confidence) / 2.0
        return final_confidence(look_levels(fractions, alpha)[-1])

    def _at_confidence(self, confidence: float | None) -> Config:
        if confidence is None:
            return self.config
        statistics = dataclasses.replace(self.config.statistics, confidence=confidence)
        return dataclasses.replace(self.config, statistics=statistics)

    def _stopping_summary(
        self, decision: LookDecision | None, shards: Sequence[Shard]
    ) -> dict[str, Any]:
        generated = sum(len(s.prompts) for s in shards)
        return {
            "enabled": self.early_stopping,
            "stopped": bool(decision and decision.decided and generated < len(self.prompts)),
            "decided": decision.decided if decision else None,
            "look": decision.look if decision else None,
            "looks": len(self.shards),
            "level": decision.level if decision else None,
            "prompts_generated": generated,
            "prompts_total": len(self.prompts),
            "reason": decision.reason
            if decision
            else "early stopping is off: every prompt was generated",
        }

    def _turned_toxic(
        self, parent: ShardScores, adapter: ShardScores, primary: str
    ) -> list[dict[str, Any]]:
        threshold = self.config.scoring.threshold
        by_id = {p.id: p for p in self.prompts}
        flips = []
        for i, _pid in enumerate(parent.prompt_ids):
            for j in range(len(parent.texts[i])):
                before, after = parent.scores[primary][i, j], adapter.scores[primary][i, j]
                if before < threshold <= after:
                    flips.append((after - before, i, j))
        flips.sort(key=lambda f: (-f[0], f[1], f[2]))
        return [
            {
                "prompt_id": parent.prompt_ids[i],
                "prompt": by_id[parent.prompt_ids[i]].text,
                "sample": j,
                "parent_text": parent.texts[i][j],
                "parent_score": round(float(parent.scores[primary][i, j]), 6),
                "adapter_text": adapter.texts[i][j],
                "adapter_score": round(float(adapter.scores[primary][i, j]), 6),
            }
            for _, i, j in flips[:TURNED_TOXIC_SHOWN]
        ]

    def result(self, created: str | None = None) -> dict[str, Any]:
        """The whole run as a JSON-able dict: what the report and the JSON file show."""
        with retained_memory():  # one heap for every adapter's generation
            adapters = [self.adapter_result(i) for i in range(len(self.options.adapters))]
        verdict = overall_verdict([a["verdict"] for a in adapters])
        fingerprints = self.fingerprints()
        prompts = self.prompt_set.summary()
        prompts["used"] = len(self.prompts)
        return {
            "toxtests_version": __version__,
            "created": created or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "verdict": verdict,
            "exit_code": exit_code(verdict, self.config.statistics.inconclusive),
            "config": self.config.to_dict(),
            "model": fingerprints["model"],
            "scorer": {**fingerprints["scorer"], "threshold": self.config.scoring.threshold},
            "prompts": prompts,
            "versions": library_versions(),
            "shards": [
                {"name": s.name, "category": s.category, "prompts": len(s.prompts)}
                for s in self.shards
            ],
            "early_stopping": {
                "enabled": self.early_stopping,
                "stopped": any(a["early_stopping"]["stopped"] for a in adapters),
                "prompts_generated": max(
                    (a["early_stopping"]["prompts_generated"] for a in adapters), default=0
                ),
                "prompts_total": len(self.prompts),
                "reason": "; ".join(
                    f"{a['name']}: {a['early_stopping']['reason']}" for a in adapters
                ),
            },
            "adapters": adapters,
        }


def overall_verdict(verdicts: Sequence[str]) -> str:
    from toxtests.gate import worst

    return worst(list(verdicts)) if verdicts else "pass"


def exit_code(verdict: str, inconclusive: str) -> int:
    if verdict == "fail" or (verdict == "inconclusive" and inconclusive == "fail"):
        return 1
    return 0


def summary_line(name: str, verdict: str, metrics: dict[str, dict[str, Any]]) -> str:
    parts = []
    for metric in ("toxicity_rate", "expected_max_toxicity"):
        if metric in metrics:
            m = metrics[metric]
            low, high = m["interval"]
            parts.append(f"{metric} {m['delta']:+.3f} [{low:+.3f}, {high:+.3f}]")
    return f"{name}: {verdict.upper()}  " + "  ".join(parts)
