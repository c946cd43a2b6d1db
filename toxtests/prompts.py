"""Prompt sources: RealToxicityPrompts JSONL, plain JSONL, text files, the Hub dataset.

Every prompt gets a stable id (the given one, or a hash of its text), so caches and
reports line up across runs. Nothing is dropped silently: each skipped line is kept
in `PromptSet.skipped` with the reason, and the report shows them.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toxtests.errors import PromptFileError

PERSPECTIVE_ATTRIBUTES = (
    "toxicity",
    "severe_toxicity",
    "profanity",
    "sexually_explicit",
    "identity_attack",
    "flirtation",
    "threat",
    "insult",
)
HUB_SUBSETS = ("rtp:challenging", "rtp:all", "rtp:nontoxic")
# Line breaks as editors count them. str.splitlines() also breaks at U+2028, U+0085,
# form feeds etc., which json.dumps(ensure_ascii=False) leaves inside a record.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _split_lines(text: str) -> list[str]:
    lines = _LINE_BREAK.split(text)
    if lines[-1] == "":  # the final line break ends the last line; it starts none
        lines.pop()
    return lines


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    challenging: bool | None = None
    category: str | None = None
    # Perspective scores of the prompt itself, when the source has them.
    attributes: dict[str, float] = field(default_factory=dict, hash=False, compare=False)

    @property
    def toxicity(self) -> float | None:
        return self.attributes.get("toxicity")


@dataclass(frozen=True)
class SkippedLine:
    line: int
    reason: str


@dataclass
class PromptSet:
    source: str
    prompts: list[Prompt]
    lines_read: int
    skipped: list[SkippedLine] = field(default_factory=list)

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for prompt in self.prompts:
            digest.update(prompt.id.encode() + b"\0" + prompt.text.encode() + b"\0")
        return digest.hexdigest()[:16]

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "lines_read": self.lines_read,
            "prompts": len(self.prompts),
            "skipped": [{"line": s.line, "reason": s.reason} for s in self.skipped],
            "fingerprint": self.fingerprint(),
        }


def text_id(text: str) -> str:
    """Content-hash id: the same text always gets the same id."""
    return "p" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


# A 1 MB record must not become a 1 MB error line.
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlist = _SHORT.maxdict = 4
_SHORT.maxlevel = 2


def _utf8_string(value: str, what: str, where: str) -> str:
    """`value`, unless it holds an unpaired surrogate: JSON's "\\ud800" decodes to a str
    that cannot be written back as UTF-8 (cache keys, fingerprints, reports all encode it)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PromptFileError(
            f"{where}: {what} holds an unpaired surrogate escape "
            f"({_SHORT.repr(exc.object[exc.start : exc.end])}); "
            "write the character itself or a complete surrogate pair"
        ) from None
    return value


def _finite_score(value: Any) -> float | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        score = float(value)  # a JSON integer of 400 digits overflows a float
    except OverflowError:
        return None
    return score if math.isfinite(score) else None


def _float_attributes(table: dict[str, Any]) -> dict[str, float]:
    scores = {key: _finite_score(value) for key, value in table.items()}
    return {
        key: score
        for key, score in scores.items()
        if key in PERSPECTIVE_ATTRIBUTES and score is not None
    }


def _record_to_prompt(record: Any, where: str) -> Prompt | str:
    """A Prompt, or the reason the record holds none."""
    if not isinstance(record, dict):
        raise PromptFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if isinstance(record.get("prompt"), dict):  # RealToxicityPrompts format
        inner = record["prompt"]
        text = inner.get("text")
        attributes = _float_attributes(inner)
    elif "text" in record:
        text = record["text"]
        table = record.get("attributes")
        if table is not None and not isinstance(table, dict):
            raise PromptFileError(
                f"{where}: attributes must be an object of scores, got {type(table).__name__}"
            )
        attributes = _float_attributes(table or {})
    else:
        raise PromptFileError(
            f'{where}: no prompt text; expected {{"text": ...}} or '
            'RealToxicityPrompts\' {"prompt": {"text": ...}}'
        )
    if not isinstance(text, str):
        raise PromptFileError(f"{where}: prompt text must be a string, got {_SHORT.repr(text)}")
    _utf8_string(text, "prompt text", where)
    if not text.strip():
        return "empty prompt text"
    given_id = record.get("id")
    if given_id is not None and not isinstance(given_id, (str, int)):
        raise PromptFileError(
            f"{where}: id must be a string or integer, got {_SHORT.repr(given_id)}"
        )
    challenging = record.get("challenging")
    category = record.get("category")
    return Prompt(
        id=_utf8_string(str(given_id), "id", where) if given_id is not None else text_id(text),
        text=text,
        challenging=bool(challenging) if isinstance(challenging, bool) else None,
        category=_utf8_string(str(category), "category", where) if category is not None else None,
        attributes=attributes,
    )


def _decode(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PromptFileError(f"{path}: prompt file not found; check the path") from None
    except IsADirectoryError:
        raise PromptFileError(f"{path}: is a directory; pass a .jsonl or .txt file") from None
    except OSError as exc:
        raise PromptFileError(f"{path}: cannot read prompt file ({exc.strerror})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        # The utf-8-sig codec reports positions in the bytes after the BOM.
        before = exc.object[: exc.start]
        line = len(_LINE_BREAK.split(before.decode("utf-8")))
        offset = len(raw) - len(exc.object) + exc.start
        raise PromptFileError(
            f"{path}:{line}: not valid UTF-8 (byte {offset}); re-save the file as UTF-8"
        ) from None


def parse_prompts(text: str, source: str, fmt: str) -> PromptSet:
    """Parse prompt text in `fmt` ("jsonl" or "text"); errors name source and line."""
    prompts: list[Prompt] = []
    skipped: list[SkippedLine] = []
    first_line_of: dict[str, int] = {}
    lines = _split_lines(text)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        if fmt == "jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PromptFileError(
                    f"{where}: malformed JSON ({exc.msg} at column {exc.colno}); "
                    "each line must be one JSON object"
                ) from None
            # Valid JSON that Python still refuses: numbers past int's digit limit, nesting
            # deeper than the recursion limit. Neither can be a prompt record.
            except ValueError:
                raise PromptFileError(
                    f"{where}: unreadable JSON (a number too long to convert); "
                    "each line must be one JSON object"
                ) from None
            except RecursionError:
                raise PromptFileError(
                    f"{where}: unreadable JSON (nested too deeply); "
                    "each line must be one JSON object"
                ) from None
            parsed = _record_to_prompt(record, where)
        else:
            parsed = Prompt(id=text_id(line), text=line)
        if isinstance(parsed, str):
            skipped.append(SkippedLine(number, parsed))
            continue
        if parsed.id in first_line_of:
            skipped.append(SkippedLine(number, f"duplicate of line {first_line_of[parsed.id]}"))
            continue
        first_line_of[parsed.id] = number
        prompts.append(parsed)
    if not prompts:
        detail = f" ({len(skipped)} lines skipped: {skipped[0].reason})" if skipped else ""
        raise PromptFileError(f"{source}: holds no prompts{detail}; add at least one prompt")
    return PromptSet(source=source, prompts=prompts, lines_read=len(lines), skipped=skipped)


def load_hub_prompts(name: str) -> PromptSet:  # pragma: no cover - needs the network
    """`rtp:challenging` etc. from the Hub dataset allenai/real-toxicity-prompts."""
    try:
        import datasets
    except ImportError:
        raise PromptFileError(
            f"{name}: needs the 'datasets' package (pip install datasets) and a network; "
            "or pass a local JSONL file"
        ) from None
    try:
        rows = datasets.load_dataset("allenai/real-toxicity-prompts", split="train")
    except Exception as exc:
        raise PromptFileError(
            f"{name}: cannot load allenai/real-toxicity-prompts ({exc})"
        ) from None
    wanted = name.split(":", 1)[1]
    lines = []
    for row in rows:
        if wanted == "challenging" and not row["challenging"]:
            continue
        if wanted == "nontoxic" and (row["prompt"].get("toxicity") or 0) >= 0.5:
            continue
        lines.append(json.dumps(row))
    return parse_prompts("\n".join(lines), name, "jsonl")


def load_prompts(source: str | Path) -> PromptSet:
    """Read prompts from a file (format from the suffix) or a `rtp:` Hub subset."""
    name = str(source)
    if name.startswith("rtp:"):
        if name not in HUB_SUBSETS:
            raise PromptFileError(f"{name}: unknown Hub subset; valid: {', '.join(HUB_SUBSETS)}")
        return load_hub_prompts(name)
    path = Path(source)
    fmt = "jsonl" if path.suffix.lower() in (".jsonl", ".json", ".ndjson") else "text"
    return parse_prompts(_decode(path), str(path), fmt)
