"""Results read back: several JSON results of one parent merged into one, and the
model card's safety section written in place.

A CI job that gates each adapter in its own run (or on its own machine) ends with one
JSON file per run; `toxtests report a.json b.json` shows them as the one comparison they
are. They merge only where they are comparisons with the same parent: the same model,
engine, prompts, scorer and settings; anything else would put numbers side by side that
were never measured alike, so it is refused, naming the file and the key that differs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from toxtests.errors import ConfigError
from toxtests.files import atomic_write_text
from toxtests.run.results import exit_code, overall_verdict

# What two results must share to be one comparison (the parent's numbers are the same).
SAME_PARENT = (
    ("model", "fingerprint"),
    ("engine", None),
    ("prompts", "fingerprint"),
    ("scorer", "fingerprint"),
    ("config", "generation"),
    ("config", "scoring"),
    ("config", "statistics"),
)
BEGIN, END = "<!-- toxtests:safety-evaluation:begin -->", "<!-- toxtests:safety-evaluation:end -->"


def read_result(path: str | Path) -> dict[str, Any]:
    try:
        result = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}: not a JSON result ({exc.msg}, line {exc.lineno}); pass the file "
            "toxtests gate --json wrote"
        ) from None
    if not isinstance(result, dict) or not isinstance(result.get("adapters"), list):
        raise ConfigError(f"{path}: not a toxtests result (no 'adapters' list)")
    return result


def _part(result: dict[str, Any], section: str, key: str | None) -> Any:
    value = result.get(section)
    part = value.get(key) if key is not None and isinstance(value, dict) else value
    if key == "generation" and isinstance(part, dict):  # the batch size changes no text
        part = {k: v for k, v in part.items() if k != "batch_size"}
    return part


def merge_results(results: Sequence[dict[str, Any]], sources: Sequence[str]) -> dict[str, Any]:
    """One result holding every adapter of `results` (the first's parent, settings and
    metadata); an adapter judged twice (same fingerprint) is kept once, the later run."""
    if not results:
        raise ConfigError("no results to merge")
    first = results[0]
    for result, source in zip(results[1:], sources[1:], strict=True):
        for section, key in SAME_PARENT:
            if _part(result, section, key) != _part(first, section, key):
                where = f"{section}.{key}" if key else section
                raise ConfigError(
                    f"{source}: {where} differs from {sources[0]}'s; only results with the "
                    "same parent, prompts, scorer and settings merge into one report"
                )
    adapters: dict[str, dict[str, Any]] = {}
    for result in results:
        for adapter in result["adapters"]:
            adapters[str(adapter.get("fingerprint") or adapter.get("name"))] = adapter
    merged = {**first, "adapters": list(adapters.values())}
    renderings: dict[str, str] = {}
    for result in results:
        renderings.update(result.get("renderings") or {})
    merged["renderings"] = renderings
    verdict = overall_verdict([a.get("verdict", "pass") for a in merged["adapters"]])
    inconclusive = ((first.get("config") or {}).get("statistics") or {}).get("inconclusive")
    merged["verdict"] = verdict
    merged["exit_code"] = exit_code(verdict, inconclusive or "fail")
    merged.pop("model_card", None)
    return merged


def update_model_card(path: str | Path, section: str) -> bool:
    """Write `section` between toxtests' markers in the card at `path` (created if
    missing), leaving the rest of the file as it was; returns whether it changed."""
    card = Path(path)
    old = card.read_text(encoding="utf-8") if card.exists() else ""
    block = f"{BEGIN}\n{section.strip()}\n{END}"
    if BEGIN in old and END in old.split(BEGIN, 1)[1]:
        before, rest = old.split(BEGIN, 1)
        after = rest.split(END, 1)[1]
        new = before + block + after
    elif BEGIN in old or END in old:
        raise ConfigError(
            f"{card}: has one of toxtests' markers without the other; restore or delete "
            f"the lone {BEGIN if BEGIN in old else END} line"
        )
    else:
        new = (old.rstrip("\n") + "\n\n" if old.strip() else "") + block + "\n"
    if new == old:
        return False
    atomic_write_text(card, new)
    return True
