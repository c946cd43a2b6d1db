"""Variants of engines that load the adapters themselves (torch, vLLM in process)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toxtests.config import GenerationConfig
from toxtests.engines.base import (
    MODEL,
    PARENT,
    EngineOptions,
    Variant,
    rendering_label,
    uses_chat_template,
)
from toxtests.models import (
    adapter_fingerprint,
    adapter_names,
    check_adapter_dir,
    check_adapter_fits,
    describe_model,
    load_tokenizer,
    split_revision,
)


def model_reference(options: EngineOptions, candidate: str | None) -> tuple[str, str | None]:
    """(model spec, revision) of the base (None: `--model` pinned by `--revision`) or of
    a candidate, which pins itself as ID@REVISION."""
    if candidate is None:
        return options.model, options.revision
    return split_revision(candidate)


def local_variants(options: EngineOptions) -> list[Variant]:
    """The parent, then one variant per adapter, then one per full-model candidate; a
    mistyped path fails before any load."""
    for spec in options.adapters:
        check_adapter_dir(spec, options.allow_pickle)
    _check_adapters_fit(options)
    names = adapter_names([*options.adapters, *options.candidates])
    variants = [Variant(PARENT, None, None, PARENT)]
    for index, spec in enumerate(options.adapters):
        variants.append(Variant(names[index], index, spec, adapter_fingerprint(spec)))
    for offset, spec in enumerate(options.candidates):
        index = len(options.adapters) + offset
        # Described, not loaded: its weights' fingerprint keys its generations.
        model, revision = split_revision(spec)
        identity = describe_model(
            model, cache_dir=options.cache_dir, dtype=options.dtype, revision=revision
        )
        fingerprint = f"model:{identity['fingerprint']}"
        variants.append(Variant(names[index], index, spec, fingerprint, MODEL))
    return variants


def _check_adapters_fit(options: EngineOptions) -> None:
    """A local adapter made for another base fails here, before the parent is generated
    (the torch engine would find out on loading, vLLM only at the adapter's first batch).

    Only a base that is a transformers directory already: listing variants must not
    convert a GGUF model or reach the Hub; those are checked when they load."""
    base = Path(options.model).expanduser()
    if not base.is_dir():
        return
    for spec in options.adapters:
        path = Path(spec).expanduser()
        if path.is_dir():
            check_adapter_fits(spec, path, options.model, base)


class LocalTokenizers:
    """The tokenizers of the base and of each candidate, read once without their weights:
    what the report needs to say how variants pair and how their prompts were rendered."""

    def __init__(self, options: EngineOptions):
        self.options = options
        self._by_candidate: dict[str | None, Any] = {}

    def remember(self, candidate: str | None, tokenizer: Any) -> None:
        """A tokenizer already loaded with its model (None: the base's)."""
        self._by_candidate.setdefault(candidate, tokenizer)

    def of(self, candidate: str | None) -> Any:
        if candidate not in self._by_candidate:
            spec, revision = model_reference(self.options, candidate)
            self._by_candidate[candidate] = load_tokenizer(spec, self.options.cache_dir, revision)
        return self._by_candidate[candidate]

    def same_vocabulary(self, variant: Variant) -> bool:
        """Whether a candidate's tokenizer is the base's: then common random numbers pair
        token for token; otherwise the texts can still be paired by prompt and seed."""
        if variant.kind != MODEL or variant.spec is None:
            return True
        return bool(self.of(None).get_vocab() == self.of(variant.spec).get_vocab())

    def prompt_rendering(self, variant: Variant, settings: GenerationConfig) -> str:
        """How this variant's prompts are rendered ("auto" asks its own tokenizer)."""
        if settings.chat_template != "auto":
            return rendering_label(bool(settings.chat_template))
        spec = variant.spec if variant.kind == MODEL else None
        return rendering_label(uses_chat_template(self.of(spec), "auto"))
