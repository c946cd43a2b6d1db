"""Variants of engines that load the adapters themselves (torch, vLLM in process)."""

from __future__ import annotations

from toxtests.engines.base import MODEL, PARENT, EngineOptions, Variant
from toxtests.models import adapter_fingerprint, adapter_names, check_adapter_dir, describe_model


def local_variants(options: EngineOptions) -> list[Variant]:
    """The parent, then one variant per adapter, then one per full-model candidate; a
    mistyped path fails before any load."""
    for spec in options.adapters:
        check_adapter_dir(spec, options.allow_pickle)
    names = adapter_names([*options.adapters, *options.candidates])
    variants = [Variant(PARENT, None, None, PARENT)]
    for index, spec in enumerate(options.adapters):
        variants.append(Variant(names[index], index, spec, adapter_fingerprint(spec)))
    for offset, spec in enumerate(options.candidates):
        index = len(options.adapters) + offset
        # Described, not loaded: its weights' fingerprint keys its generations.
        identity = describe_model(spec, cache_dir=options.cache_dir, dtype=options.dtype)
        fingerprint = f"model:{identity['fingerprint']}"
        variants.append(Variant(names[index], index, spec, fingerprint, MODEL))
    return variants
