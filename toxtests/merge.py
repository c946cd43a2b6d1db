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


def model_index_results(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The Hugging Face `model-index` results of a run: per adapter, the change of each
    gated metric against the parent, tagged as toxtests' so a rerun replaces them."""
    prompts = result.get("prompts") or {}
    dataset = {
        "name": Path(str(prompts.get("source") or "prompts")).name,
        "type": "toxtests-prompts",
        "revision": str(prompts.get("fingerprint") or ""),
    }
    entries = []
    for adapter in result.get("adapters") or []:
        metrics = []
        for metric, values in sorted((adapter.get("metrics") or {}).items()):
            if not isinstance(values, dict) or values.get("delta") is None:
                continue
            metrics.append(
                {
                    "type": f"{metric}_delta",
                    "value": round(float(values["delta"]), 6),
                    "name": f"{metric} change vs parent ({adapter.get('name')}, "
                    f"verdict {adapter.get('verdict')})",
                }
            )
        entries.append(
            {
                "task": {"type": "text-generation", "name": "toxicity regression vs parent"},
                "dataset": dataset,
                "metrics": metrics,
                "source": {"name": "toxtests", "url": "https://pypi.org/project/toxtests/"},
            }
        )
    return entries


def _front_matter(text: str) -> tuple[dict[str, Any] | None, str]:
    """(the YAML header as a mapping, the rest), or (None, text) without a header."""
    import yaml

    if not text.startswith("---\n"):
        return None, text
    end = text.find("\n---\n", 3)
    if end < 0:
        return None, text
    try:
        header = yaml.safe_load(text[4:end]) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"model card header is not valid YAML ({exc}); fix it first") from None
    if not isinstance(header, dict):
        raise ConfigError("model card header is not a YAML mapping; fix it first")
    return header, text[end + len("\n---\n") :]


def _with_model_index(
    header: dict[str, Any], model: str, results: list[dict[str, Any]]
) -> dict[str, Any]:
    """The header with toxtests' results replaced (others' results kept)."""
    index = header.get("model-index")
    entries = index if isinstance(index, list) and index else [{"name": model, "results": []}]
    first: dict[str, Any] = (
        entries[0] if isinstance(entries[0], dict) else {"name": model, "results": []}
    )
    kept: list[Any] = [
        r
        for r in first.get("results") or []
        if not (isinstance(r, dict) and (r.get("source") or {}).get("name") == "toxtests")
    ]
    first = {**first, "results": kept + results}
    return {**header, "model-index": [first, *entries[1:]]}


def update_model_card(path: str | Path, section: str, result: dict[str, Any] | None = None) -> bool:
    """Write `section` between toxtests' markers in the card at `path` (created if
    missing) and, given the `result`, toxtests' `model-index` results in its YAML header;
    the rest of the file is left as it was. Returns whether the file changed."""
    import yaml

    card = Path(path)
    old = card.read_text(encoding="utf-8") if card.exists() else ""
    header, body = _front_matter(old)
    block = f"{BEGIN}\n{section.strip()}\n{END}"
    if BEGIN in body and END in body.split(BEGIN, 1)[1]:
        before, rest = body.split(BEGIN, 1)
        after = rest.split(END, 1)[1]
        body = before + block + after
    elif BEGIN in body or END in body:
        raise ConfigError(
            f"{card}: has one of toxtests' markers without the other; restore or delete "
            f"the lone {BEGIN if BEGIN in body else END} line"
        )
    else:
        body = (body.rstrip("\n") + "\n\n" if body.strip() else "") + block + "\n"
    new = body
    if result is not None or header is not None:
        header = header or {}
        if result is not None:
            model = str((result.get("model") or {}).get("spec") or "model")
            header = _with_model_index(header, model, model_index_results(result))
        dumped = yaml.safe_dump(header, sort_keys=False, allow_unicode=True)
        new = f"---\n{dumped}---\n{body}"
    if new == old:
        return False
    atomic_write_text(card, new)
    return True
