"""Variants of engines that load the adapters themselves (torch, vLLM in process)."""

from __future__ import annotations

from toxtests.engines.base import PARENT, EngineOptions, Variant
from toxtests.models import adapter_fingerprint, adapter_names, check_adapter_dir


def local_variants(options: EngineOptions) -> list[Variant]:
    """The parent, then one variant per adapter; a mistyped path fails before any load."""
    for spec in options.adapters:
        check_adapter_dir(spec, options.allow_pickle)
    names = adapter_names(list(options.adapters))
    return [Variant(PARENT, None, None, PARENT)] + [
        Variant(name, index, spec, adapter_fingerprint(spec))
        for index, (spec, name) in enumerate(zip(options.adapters, names, strict=True))
    ]
