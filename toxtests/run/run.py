"""One gate run: prompts → shards → engine → store → looks → checks → results.

The pytest plugin and the CLI both drive this object. It is cheap to build: the engine
loads its model, and the scorer loads, only when a generation or a score is missing
from the cache, so a fully cached re-run (or the xdist controller) loads nothing.
"""

from __future__ import annotations

import datetime as _dt
import platform
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from toxtests import __version__
from toxtests.baseline import Baseline
from toxtests.cache import Cache
from toxtests.config import Config, GenerationConfig, load_config
from toxtests.engines import create_engine
from toxtests.engines.base import (
    MODEL,
    Engine,
    EngineInfo,
    EngineOptions,
    Variant,
    rendering_label,
)
from toxtests.gate import (
    CheckResult,
    adapter_verdict,
    evaluate_checks,
    metric_table,
    plan_checks,
    restrict,
)
from toxtests.metrics import equal_by_construction
from toxtests.options import RunOptions, config_overrides
from toxtests.prompts import Prompt, PromptSet, load_prompts
from toxtests.run import looks
from toxtests.run.pairing import PairingCheck, check_pairing
from toxtests.run.results import (
    AdapterResult,
    GenerationCounts,
    RunResult,
    ShardResult,
    StoppingSummary,
    TurnedToxic,
    exit_code,
    overall_verdict,
    summary_line,
)
from toxtests.run.store import GenerationStore, ScorerHandle, ShardScores, Timings
from toxtests.sequential import LookDecision
from toxtests.shards import Shard, interleave, make_shards, stratified_subset

DEMO_PROMPTS = Path(__file__).resolve().parent.parent / "data" / "demo.jsonl"
TURNED_TOXIC_SHOWN = 50


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "toxtests": __version__}
    for name in ("torch", "transformers", "peft", "numpy", "detoxify", "alt-profanity-check"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _same_vocabulary(engine: Engine, variant: Variant) -> bool:
    same = getattr(engine, "same_vocabulary", None)
    return bool(same(variant)) if same is not None else True


def _prompt_rendering(engine: Engine, variant: Variant, settings: GenerationConfig) -> str:
    rendering = getattr(engine, "prompt_rendering", None)
    if rendering is not None:
        return str(rendering(variant, settings))
    return rendering_label(settings.chat_template is True)


def engine_options(options: RunOptions, cache_dir: Path) -> EngineOptions:
    shared = {
        f: getattr(options, f) for f in EngineOptions.__dataclass_fields__ if f != "cache_dir"
    }
    shared["adapters"] = tuple(options.adapters)
    shared["candidates"] = tuple(options.candidates)
    return EngineOptions(cache_dir=cache_dir, **shared)


class GateRun:
    """A gate run over every adapter of one parent, on one engine."""

    def __init__(self, options: RunOptions, engine: Engine | None = None):
        from toxtests.models import default_cache_dir

        self.options = options
        # Like pytest.ini: a thresholds.toml in the working directory is the default gate.
        thresholds = options.thresholds
        if thresholds is None and Path("thresholds.toml").is_file():
            thresholds = "thresholds.toml"
        self.config: Config = load_config(thresholds, options.preset, config_overrides(options))
        self.cache = Cache(Path(options.cache_dir) if options.cache_dir else default_cache_dir())
        self.cache.sweep_stale_temporaries()
        self.prompt_set: PromptSet = load_prompts(options.prompts or str(DEMO_PROMPTS))
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
        self.checks = plan_checks(self.config, self.shards)
        self.engine = engine or create_engine(
            options.engine, engine_options(options, self.cache.root)
        )
        self.parent, *self.adapters = self.engine.variants()
        self.adapter_names = [v.name for v in self.adapters]
        self.timings = Timings()
        self.scorer = ScorerHandle(
            options.scorer or self.config.scoring.scorer,
            self.config,
            options.device,
            options.allow_pickle,
            self.timings,
        )
        self.store = GenerationStore(
            self.cache,
            self.engine,
            self.config.generation,
            self.scorer,
            self.fingerprints,
            self.timings,
            progress=self._report,
        )
        self.progress: Callable[[str], None] | None = None
        self._fingerprints: dict[str, Any] | None = None
        self._memo: dict[tuple[int | None, str], ShardScores] = {}
        self._decisions: dict[int, tuple[LookDecision, list[Shard]]] = {}
        self._pairing: PairingCheck | None = None
        self.baseline: Baseline | None = None  # restored from --baseline, once
        self.used = False  # set once a gate test or the CLI asked for results

    @property
    def scorer_spec(self) -> str:
        return self.scorer.spec

    def _report(self, message: str) -> None:
        if self.progress:
            self.progress(message)

    def close(self) -> None:
        self.engine.close()

    def _scorer_agreement(self, fingerprint: str) -> dict[str, str]:
        """The latest `toxtests scorer-check` of this scorer, if one was run (report only)."""
        from toxtests.scorer_check import NAMESPACE, Agreement, cache_key

        stored = self.cache.get(NAMESPACE, cache_key(fingerprint))
        return {"agreement": Agreement.from_json(stored).line()} if stored else {}

    # -- identities ------------------------------------------------------------------

    def fingerprints(self, restore: bool = True) -> dict[str, Any]:
        """Everything a cache key depends on; workers send this to the controller.

        With --baseline, the archive's entries are restored the first time: every cache
        read goes through here, so no parent prompt is generated before they are in."""
        fingerprints = self._identities()
        if restore and self.options.baseline and self.baseline is None:
            from toxtests.baseline import restore_baseline

            self.baseline = restore_baseline(self, self.options.baseline)
            self._report(f"baseline restored from {self.baseline.line()}")
        return fingerprints

    def pairing_key(self) -> str | None:
        """Where a seeded engine's replay check is cached (None: nothing is replayed)."""
        from toxtests.engines.base import EXACT
        from toxtests.run.pairing import replay_plan

        info = EngineInfo.from_json(self.fingerprints()["engine_info"])
        if info.pairing == EXACT or self.options.pairing_replays == 0:
            return None
        return replay_plan(self.store, self.parent, self.prompts, self.options.pairing_replays)[1]

    def _identities(self) -> dict[str, Any]:
        if self._fingerprints is None:
            info = self.engine.describe()
            self._fingerprints = {
                "engine": info.cache_identity(),
                "engine_info": info.to_json(),
                "model": self.engine.model_identity(),
                "adapters": [v.fingerprint for v in self.adapters],
                # Candidates whose tokenizer differs from the parent's (report only).
                "other_vocabulary": [
                    v.name
                    for v in self.adapters
                    if v.kind == MODEL and not _same_vocabulary(self.engine, v)
                ],
                "scorer": self.scorer.describe(),
                # How each variant's prompts were rendered (report only).
                "renderings": {
                    v.name: _prompt_rendering(self.engine, v, self.config.generation)
                    for v in [self.parent, *self.adapters]
                },
            }
        return self._fingerprints

    def adopt_fingerprints(self, fingerprints: dict[str, Any]) -> None:
        """Build results from the cache without loading any model (xdist controller)."""
        self._fingerprints = fingerprints

    def variant(self, adapter_index: int | None) -> Variant:
        return self.parent if adapter_index is None else self.adapters[adapter_index]

    # -- generations and scores --------------------------------------------------------

    def shard_scores(self, adapter_index: int | None, shard: Shard) -> ShardScores:
        """Generations and scores for a shard, from the cache or computed (then cached)."""
        self.used = True
        if adapter_index is not None and self.variant(adapter_index).kind == MODEL:
            # A full model replaces the parent in memory: the parent's every prompt first,
            # so looks and shard tests do not swap the two models shard by shard.
            self.store.prefetch(self.parent, self.prompts, "all prompts, before a candidate")
        memo_key = (adapter_index, shard.name)
        if memo_key not in self._memo:
            self._memo[memo_key] = self.store.scores(
                self.variant(adapter_index), shard.prompts, shard.name
            )
        return self._memo[memo_key]

    def _generate_together(self, adapter_index: int, shards: Sequence[Shard]) -> None:
        """The parent's and an adapter's missing generations of these shards, shard by
        shard, in one engine call each (their rows share batches where the engine can)."""
        adapter = self.variant(adapter_index)
        if adapter.kind == MODEL:
            return
        for shard in shards:
            if not all((index, shard.name) in self._memo for index in (None, adapter_index)):
                self.store.generate_together([self.parent, adapter], shard.prompts, shard.name)

    def _pooled(
        self, adapter_index: int, shards: Sequence[Shard]
    ) -> tuple[ShardScores, ShardScores]:
        self._generate_together(adapter_index, shards)
        parent = ShardScores.concat([self.shard_scores(None, s) for s in shards])
        adapter = ShardScores.concat([self.shard_scores(adapter_index, s) for s in shards])
        return parent, adapter

    def pairing(self) -> PairingCheck:
        """The engine's pairing promise and, on a seeded engine, the replay check."""
        if self._pairing is None:
            info = EngineInfo.from_json(self.fingerprints()["engine_info"])
            self._pairing = check_pairing(
                self.store, info, self.parent, self.prompts, self.options.pairing_replays
            )
        return self._pairing

    # -- statistics ------------------------------------------------------------------

    @property
    def primary(self) -> str:
        return str(self.fingerprints()["scorer"]["primary"])

    def paired(self, parent: ShardScores, adapter: ShardScores) -> Any:
        return looks.paired_metrics(parent, adapter, self.primary, self.config.scoring.threshold)

    def _final_look_config(self) -> Config:
        if not self.early_stopping:
            return self.config
        return looks.at_confidence(
            self.config, looks.final_look_confidence(self.config, self.shards, len(self.prompts))
        )

    def sequential(
        self, adapter_index: int, max_looks: int | None = None
    ) -> tuple[LookDecision, list[Shard]]:
        """The early-stopping decision over the first `max_looks` shards (all: memoised)."""
        if max_looks is None and adapter_index in self._decisions:
            return self._decisions[adapter_index]
        outcome = looks.sequential(
            lambda seen: self._pooled(adapter_index, seen),
            self.shards[: max_looks if max_looks is not None else len(self.shards)],
            self.checks,
            self.config,
            self.primary,
            len(self.prompts),
        )
        if max_looks is None:
            self._decisions[adapter_index] = outcome
        return outcome

    def decided_before(self, adapter_index: int, shard: Shard) -> LookDecision | None:
        """The early-stopping decision reached before this shard's look, if any."""
        if not self.early_stopping:
            return None
        position = self.shards.index(shard)
        if position == 0:
            return None
        decision, _ = self.sequential(adapter_index, max_looks=position)
        return decision if decision.decided else None

    def shard_checks(
        self, adapter_index: int, shard: Shard
    ) -> tuple[list[CheckResult], dict[str, Any]]:
        """The fail-only checks of one shard, Bonferroni over the whole family.

        Bonferroni is never more powerful than the aggregate's Holm, so a shard test
        that fails implies the adapter's gate fails too. With early stopping on, both run
        at the confidence the early looks leave to the verdict on all prompts.
        """
        self._generate_together(adapter_index, [shard])
        parent = self.shard_scores(None, shard)
        adapter = self.shard_scores(adapter_index, shard)
        paired = self.paired(parent, adapter)
        members = looks.comparable(parent, adapter)
        scope = f"shard:{shard.name}"
        specs = restrict([c for c in self.checks if c.scope == scope], set(members))
        config = self._final_look_config()
        results = evaluate_checks(specs, paired, config, family_size=len(self.checks))
        return results, metric_table(paired, members, config, results, scope)

    # -- results ---------------------------------------------------------------------

    def adapter_result(self, adapter_index: int) -> AdapterResult:
        """The gate's verdict on one adapter: sequentially, or over every shard."""
        decision = None
        shards = self.shards
        if self.early_stopping:
            decision, shards = self.sequential(adapter_index)
        else:
            prompts = [p for shard in shards for p in shard.prompts]
            where = f"{len(shards)} shards in one pass"
            variants = [self.parent, self.adapters[adapter_index]]
            self.store.prefetch_together(variants, prompts, where)
        self.pairing()  # while this process has the engine: the controller reads the cache
        parent, adapter = self._pooled(adapter_index, shards)
        paired = self.paired(parent, adapter)
        everyone = looks.comparable(parent, adapter)
        config = self.config
        if decision is not None and not decision.decided and decision.prompts >= len(self.prompts):
            config = self._final_look_config()  # the verdict on all prompts after looks
        checks = evaluate_checks(restrict(self.checks, set(everyone)), paired, config)
        verdict = decision.decided if decision and decision.decided else adapter_verdict(checks)
        variant = self.adapters[adapter_index]
        metrics = metric_table(paired, everyone, config, checks, "all")
        note = ""
        if variant.name in self.fingerprints().get("other_vocabulary", []):
            note = (
                "a different tokenizer from the parent's: paired by prompt and seed, but its "
                "texts cannot be token-identical to the parent's"
            )
        compared = set(everyone)
        return AdapterResult(
            adapter=variant.spec or variant.name,
            name=variant.name,
            fingerprint=variant.fingerprint,
            verdict=verdict,
            summary=summary_line(variant.name, verdict, metrics, checks),
            confidence=config.statistics.confidence,
            metrics=metrics,
            checks=checks,
            shards=[
                ShardResult(
                    shard=shard.name,
                    category=shard.category,
                    prompts=len(shard.prompts),
                    verdict=adapter_verdict(
                        [c for c in checks if c.scope == f"shard:{shard.name}"]
                    ),
                    metrics=metric_table(
                        paired,
                        [pid for pid in shard.prompt_ids if pid in compared],
                        config,
                        checks,
                        f"shard:{shard.name}",
                    ),
                )
                for shard in shards
            ],
            early_stopping=self._stopping_summary(decision, shards),
            distributions={
                "parent": parent.scores[self.primary].ravel().round(6).tolist(),
                "adapter": adapter.scores[self.primary].ravel().round(6).tolist(),
            },
            turned_toxic=self._turned_toxic(parent, adapter),
            generation=GenerationCounts(
                empty_parent=sum(not t.strip() for row in parent.texts for t in row),
                empty_adapter=sum(not t.strip() for row in adapter.texts for t in row),
                prompts_compared=len(everyone),
                prompts_excluded_empty=len(parent.prompt_ids) - len(everyone),
            ),
            kind=variant.kind,
            rendering=self.fingerprints().get("renderings", {}).get(variant.name, ""),
            note=note,
            corrected=self._corrected(paired, everyone, config),
        )

    def _corrected(self, paired: Any, members: list[str], config: Config) -> dict[str, Any]:
        """scoring.correction: the toxicity rate corrected for the scorer's errors, as the
        latest `toxtests scorer-check` of this scorer measured them."""
        if self.config.scoring.correction == "none":
            return {}
        from toxtests.correction import corrected_rate
        from toxtests.errors import ConfigError
        from toxtests.scorer_check import NAMESPACE, Agreement, cache_key

        fingerprint = self.fingerprints()["scorer"]["fingerprint"]
        stored = self.cache.get(NAMESPACE, cache_key(fingerprint))
        errors = Agreement.from_json(stored).errors() if stored else None
        if errors is None:
            raise ConfigError(
                f'scoring.correction = "{self.config.scoring.correction}" needs this scorer\'s '
                f"measured errors: run `toxtests scorer-check --scorer {self.scorer_spec} "
                "--data RTP.jsonl` with the same --cache-dir first (or set "
                'scoring.correction = "none")'
            )
        parent, adapter = paired.select("toxicity_rate", members)
        statistics = config.statistics
        return corrected_rate(
            parent, adapter, errors, statistics.confidence, statistics.resamples, statistics.seed
        ).to_json()

    def _stopping_summary(
        self, decision: LookDecision | None, shards: Sequence[Shard]
    ) -> StoppingSummary:
        generated = sum(len(s.prompts) for s in shards)
        return StoppingSummary(
            enabled=self.early_stopping,
            stopped=bool(decision and decision.decided and generated < len(self.prompts)),
            decided=decision.decided if decision else None,
            look=decision.look if decision else None,
            looks=len(self.shards),
            level=decision.level if decision else None,
            prompts_generated=generated,
            prompts_total=len(self.prompts),
            reason=decision.reason
            if decision
            else "early stopping is off: every prompt was generated",
        )

    def _turned_toxic(self, parent: ShardScores, adapter: ShardScores) -> list[TurnedToxic]:
        threshold, primary = self.config.scoring.threshold, self.primary
        by_id = {p.id: p for p in self.prompts}
        flips = []
        for i in range(len(parent.prompt_ids)):
            for j in range(len(parent.texts[i])):
                before, after = parent.scores[primary][i, j], adapter.scores[primary][i, j]
                if before < threshold <= after:
                    flips.append((after - before, i, j))
        flips.sort(key=lambda f: (-f[0], f[1], f[2]))
        return [
            TurnedToxic(
                prompt_id=parent.prompt_ids[i],
                prompt=by_id[parent.prompt_ids[i]].text,
                sample=j,
                parent_text=parent.texts[i][j],
                parent_score=round(float(parent.scores[primary][i, j]), 6),
                adapter_text=adapter.texts[i][j],
                adapter_score=round(float(adapter.scores[primary][i, j]), 6),
            )
            for _, i, j in flips[:TURNED_TOXIC_SHOWN]
        ]

    def result(self, created: str | None = None) -> RunResult:
        """The whole run: what the report and the JSON file show."""
        self.store.expect(self.prompts)  # before anything describes the engine
        adapters = [self.adapter_result(i) for i in range(len(self.adapters))]
        verdict = overall_verdict([a.verdict for a in adapters])
        fingerprints = self.fingerprints()
        prompts = self.prompt_set.summary()
        prompts["used"] = len(self.prompts)
        stopping = [a.early_stopping for a in adapters]
        return RunResult(
            toxtests_version=__version__,
            created=created or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            verdict=verdict,
            exit_code=exit_code(verdict, self.config.statistics.inconclusive),
            config=self.config.to_dict(),
            engine=EngineInfo.from_json(fingerprints["engine_info"]),
            pairing=self.pairing(),
            model=fingerprints["model"],
            renderings=fingerprints.get("renderings", {}),
            scorer={
                **fingerprints["scorer"],
                "threshold": self.config.scoring.threshold,
                **self._scorer_agreement(fingerprints["scorer"]["fingerprint"]),
            },
            prompts=prompts,
            versions=library_versions(),
            shards=[
                {"name": s.name, "category": s.category, "prompts": len(s.prompts)}
                for s in self.shards
            ],
            early_stopping={
                "enabled": self.early_stopping,
                "stopped": any(s.stopped for s in stopping),
                "prompts_generated": max((s.prompts_generated for s in stopping), default=0),
                "prompts_total": len(self.prompts),
                "reason": "; ".join(f"{a.name}: {a.early_stopping.reason}" for a in adapters),
            },
            adapters=adapters,
            equal_metrics=equal_by_construction(self.config.generation.samples, self.primary),
        )
