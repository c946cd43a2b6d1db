"""Hostile input files: every one loads and accounts for itself, or is one line of error.

Prompt files and thresholds files are what a user (or a CI job's checkout) hands the gate,
so they get arbitrary bytes here: byte-order marks, every line ending, blank and
whitespace-only lines, megabyte lines, invalid UTF-8, deeply nested or enormous JSON
numbers, unpaired surrogate escapes, random JSON values and random TOML-ish documents.
The bulk goes straight to `load_prompts` / `load_config` (the functions the CLI calls
before any model loads); a few go through `toxtests.cli.main` itself.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from toxtests.cli import main
from toxtests.config import (
    METRICS,
    RULES,
    Config,
    GenerationConfig,
    ScoringConfig,
    ShardConfig,
    StatisticsConfig,
    load_config,
)
from toxtests.errors import ConfigError, PromptFileError
from toxtests.prompts import PromptSet, load_prompts

BULK = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FEW = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)


def error_kind(message: str) -> str:
    """The gist of an error message, for Hypothesis' statistics."""
    return message.split(": ", 2)[-1].split("(")[0].split(";")[0][:40]


def one_line_naming(message: str, path: Path) -> None:
    assert len(message.splitlines()) == 1, message[:500]
    assert message.startswith(str(path)), message[:500]


# ------------------------------------------------------------------ prompt files

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20))
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
ANY_TEXT = st.text(max_size=40)  # surrogates aside, every code point, line breaks included
RECORDS = st.fixed_dictionaries(
    {
        "text": st.one_of(
            ANY_TEXT, ANY_TEXT, ANY_TEXT, st.sampled_from(["", "  ", "\t"]), JSON_VALUES
        )
    },
    optional={
        "id": st.one_of(st.text(max_size=6), st.integers(-3, 3), JSON_VALUES),
        "category": st.one_of(st.sampled_from(["even", "odd"]), JSON_VALUES),
        "challenging": JSON_VALUES,
        "attributes": st.one_of(
            st.dictionaries(st.sampled_from(["toxicity", "insult", "x"]), JSON_VALUES, max_size=3),
            JSON_VALUES,
        ),
    },
)
RTP_RECORDS = st.builds(
    lambda text, scores, challenging: {
        "prompt": {"text": text, **scores},
        "challenging": challenging,
    },
    st.one_of(ANY_TEXT, JSON_VALUES),
    st.dictionaries(st.sampled_from(["toxicity", "threat", "nope"]), JSON_VALUES, max_size=2),
    JSON_VALUES,
)


def json_line(value: Any, ascii_only: bool) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8")


HUGE = 1_000_000
LINES = st.one_of(
    # Records, the common case, so that many files load and get their lines counted.
    st.builds(json_line, st.one_of(RECORDS, RTP_RECORDS), st.booleans()),
    st.builds(json_line, st.one_of(RECORDS, RTP_RECORDS), st.booleans()),
    st.builds(json_line, JSON_VALUES, st.booleans()),
    st.sampled_from([b"", b" ", b"\t", b"\x0c", b"\xc2\x85", b"\xe2\x80\xa8", b"\x1c"]),
    st.builds(lambda t: t.encode("utf-8", "surrogatepass"), st.text(max_size=30)),
    st.binary(max_size=30),  # mostly invalid UTF-8
    st.sampled_from(
        [
            b'{"text": "a\\ud800b"}',  # valid JSON, but not a string UTF-8 can hold
            b'{"text": "ok", "id": "\\udfff"}',
            b'{"text": "ok", "category": "\\ud83d"}',
            b'{"text": "ok", "attributes": [0.5]}',
            b'{"text": "ok", "attributes": "toxic"}',
            b'{"prompt": {"text": "ok", "toxicity": 1' + b"0" * 400 + b"}}",
            b'{"text": "ok", "id": ' + b"9" * 5000 + b"}",
            b"[" * 50_000 + b"]" * 50_000,
            b'{"text": ' * 20_000,
            b'\xef\xbb\xbf{"text": "a BOM mid-file"}',
            b"\xed\xa0\x80",  # an encoded surrogate: invalid UTF-8
        ]
    ),
    # Megabyte lines: one huge record, one huge run of text, one huge number.
    st.sampled_from(
        [
            json_line({"text": "word " * (HUGE // 5)}, True),
            b"x" * HUGE,
            b"1" * HUGE,
            b'{"text": "' + b"\\n" * (HUGE // 2) + b'"}',
        ]
    ),
)
ENDINGS = st.sampled_from([b"\n", b"\r\n", b"\r"])


@st.composite
def prompt_files(draw: st.DrawFn) -> bytes:
    lines: list[bytes] = draw(st.lists(LINES, max_size=12))
    body = b"".join(line + draw(ENDINGS) for line in lines)
    unterminated = draw(st.booleans())
    if lines and unterminated:
        body = body[:-1]  # no final line break (or half of a \r\n)
    if draw(st.booleans()):
        body = b"\xef\xbb\xbf" + body
    return body


def editor_lines(text: str) -> list[str]:
    """Lines as an editor counts them: \\n, \\r\\n and \\r end a line, nothing else does."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return lines[:-1] if lines[-1] == "" else lines


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def check_prompt_file(path: Path, raw: bytes) -> PromptSet | None:
    """load_prompts(path) holds up; the PromptSet, or None after a correct error."""
    try:
        prompt_set = load_prompts(path)
    except PromptFileError as exc:
        one_line_naming(str(exc), path)
        event(f"prompts: error ({error_kind(str(exc))})")
        return None
    event("prompts: loaded, some lines skipped" if prompt_set.skipped else "prompts: loaded")
    text = raw.decode("utf-8-sig")  # it loaded, so it was UTF-8
    lines = editor_lines(text)
    blank = {number for number, line in enumerate(lines, start=1) if not line.strip()}
    skipped = [s.line for s in prompt_set.skipped]
    assert prompt_set.lines_read == len(lines)
    assert len(prompt_set.prompts) + len(skipped) + len(blank) == len(lines)
    assert len(set(skipped)) == len(skipped) and not set(skipped) & blank
    assert all(1 <= line <= len(lines) for line in skipped)
    assert prompt_set.prompts, "a PromptSet without prompts should have been an error"
    ids = [p.id for p in prompt_set.prompts]
    assert len(set(ids)) == len(ids)
    for prompt in prompt_set.prompts:
        assert prompt.text.strip()
        # Everything downstream encodes these: cache keys, fingerprints, reports.
        for value in (prompt.id, prompt.text, prompt.category or ""):
            value.encode("utf-8")
        assert all(math.isfinite(v) for v in prompt.attributes.values())
    json.dumps(prompt_set.summary())
    return prompt_set


@BULK
@given(raw=prompt_files(), suffix=st.sampled_from([".jsonl", ".txt", ".json", ".ndjson", ""]))
def test_any_prompt_file_loads_and_accounts_for_every_line_or_fails_in_one_line(
    scratch: Path, raw: bytes, suffix: str
) -> None:
    path = scratch / f"prompts{suffix}"
    path.write_bytes(raw)
    prompt_set = check_prompt_file(path, raw)
    if prompt_set is not None and suffix in ("", ".txt"):
        lines = editor_lines(raw.decode("utf-8-sig"))
        assert [p.text for p in prompt_set.prompts] == list(
            dict.fromkeys(line for line in lines if line.strip())
        )


@BULK
@given(
    records=st.lists(st.one_of(RECORDS, RTP_RECORDS), min_size=1, max_size=15),
    endings=st.lists(ENDINGS, min_size=15, max_size=15),
    bom=st.booleans(),
)
def test_prompt_records_load_or_fail_in_one_line(
    scratch: Path, records: list[Any], endings: list[bytes], bom: bool
) -> None:
    """Well-formed JSON lines with values of every type where the record expects one."""
    raw = (b"\xef\xbb\xbf" if bom else b"") + b"".join(
        json_line(record, False) + ending for record, ending in zip(records, endings, strict=False)
    )
    path = scratch / "records.jsonl"
    path.write_bytes(raw)
    check_prompt_file(path, raw)


# ------------------------------------------------------------------ thresholds files

SECTION_CLASSES = (GenerationConfig, ScoringConfig, StatisticsConfig, ShardConfig)
FIELDS = sorted(
    {f.name for cls in SECTION_CLASSES for f in dataclasses.fields(cls)}
    | {*RULES, *METRICS, "shard"}
)


def toml_string(text: str) -> str:
    """A TOML basic string (JSON's escapes, but astral characters as themselves)."""
    return json.dumps(text, ensure_ascii=False)


BARE_KEYS = st.one_of(st.sampled_from(FIELDS), st.from_regex(r"[A-Za-z0-9_-]{1,8}", fullmatch=True))
KEYS = st.one_of(
    BARE_KEYS,
    BARE_KEYS,
    st.builds(toml_string, st.text(max_size=10)),  # quoted, escapes and all
    st.builds(lambda a, b: f"{a}.{b}", BARE_KEYS, BARE_KEYS),  # dotted
    st.text(max_size=6),  # usually not a key at all
)
TOML_SCALARS = st.one_of(
    st.integers().map(str),
    st.sampled_from(
        [
            "9223372036854775807",
            "9223372036854775808",
            "-9223372036854775809",
            "9" * 400,
            "9" * 5000,
            "0x7fffffffffffffff",
            "0o777",
            "0b101",
            "1_000",
            "nan",
            "+inf",
            "-inf",
            "1e400",
            "-0.0",
            "0.5",
            "1.0",
            "2",
            "-1",
            "0",
            "true",
            "false",
            "1979-05-27T07:32:00Z",
            "07:32:00",
            "1979-05-27",
            '""',
            '"bootstrap"',
            '"holm"',
            '"fail"',
            '"category"',
            "'lit'",
            '"""multi\nline"""',
            '"profanity-check"',
        ]
    ),
    st.floats().map(repr),
    st.builds(toml_string, st.text(max_size=12)),
    # Values that type-check somewhere, so that whole documents load now and then.
    st.integers(0, 300).map(str),
    st.floats(0, 1).map(repr),
    st.sampled_from(["bootstrap", "bayesian", "none", "pass", "auto"]).map(toml_string),
)
TOML_VALUES = TOML_SCALARS | st.recursive(
    TOML_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda items: "[" + ", ".join(items) + "]"),
        st.lists(st.tuples(BARE_KEYS, inner), max_size=3).map(
            lambda pairs: "{" + ", ".join(f"{k} = {v}" for k, v in pairs) + "}"
        ),
    ),
    max_leaves=6,
)
SECTION_NAMES = st.one_of(
    st.sampled_from(
        [
            "generation",
            "scoring",
            "statistics",
            "shards",
            "gate",
            "gate.shard",
            "gate.toxicity_rate",
            "gate.rate:insult",
            '"gate"."rate:x"',
            "gate.shard.even",
            "gate.shard.even.toxicity_rate",
            "gate.shard.odd.nope",
            "generation.sub",
            "gate.toxicity_rate.extra",
        ]
    ),
    st.builds(lambda a, b: f"{a}.{b}", BARE_KEYS, BARE_KEYS),
    BARE_KEYS,
    st.text(max_size=6),
)
HEADERS = st.one_of(
    SECTION_NAMES.map(lambda name: f"[{name}]"),
    SECTION_NAMES.map(lambda name: f"[[{name}]]"),  # arrays of tables
)
ASSIGNMENTS = st.builds(lambda k, v: f"{k} = {v}", KEYS, TOML_VALUES)
TOML_LINES = st.one_of(
    ASSIGNMENTS,
    ASSIGNMENTS,
    ASSIGNMENTS,
    HEADERS,
    HEADERS,
    st.sampled_from(["", "# comment", "   ", "x = [" + "[" * 5000, "a = " + "{b = " * 3000]),
    st.text(max_size=20),  # junk
)
KNOWN_SECTIONS = {
    "generation": [f.name for f in dataclasses.fields(GenerationConfig)],
    "scoring": [f.name for f in dataclasses.fields(ScoringConfig)],
    "statistics": [f.name for f in dataclasses.fields(StatisticsConfig)],
    "shards": [f.name for f in dataclasses.fields(ShardConfig)],
    "gate.toxicity_rate": list(RULES),
    "gate.mean_toxicity": list(RULES),
    '"gate"."rate:insult"': list(RULES),
    "gate.shard.even.toxicity_rate": list(RULES),
}


@st.composite
def structured_tables(draw: st.DrawFn) -> list[str]:
    """Valid TOML, mostly: known sections and keys (now and then a wrong one), any value."""
    lines = []
    names = draw(st.lists(st.sampled_from(sorted(KNOWN_SECTIONS)), unique=True, max_size=4))
    for name in names:
        lines.append(f"[{name}]" if draw(st.integers(0, 7)) else draw(HEADERS))
        keys = st.sampled_from(KNOWN_SECTIONS[name]) if draw(st.integers(0, 5)) else KEYS
        for key in draw(st.lists(keys, unique=True, max_size=4)):
            lines.append(f"{key} = {draw(TOML_VALUES)}")
    return lines


@st.composite
def thresholds_files(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        lines = draw(structured_tables())
    else:
        lines = draw(st.lists(TOML_LINES, max_size=14))
    ending = draw(st.sampled_from(["\n", "\r\n"]))
    body = ending.join(lines).encode("utf-8")
    if draw(st.booleans()):
        body = b"\xef\xbb\xbf" + body
    return body + draw(st.sampled_from([b""] * 6 + [b"\xff", b"\xed\xa0\x80", b"\xc3"]))


def check_thresholds_file(path: Path) -> Config | None:
    try:
        config = load_config(path)
    except ConfigError as exc:
        one_line_naming(str(exc), path)
        event(f"thresholds: error ({error_kind(str(exc))})")
        return None
    event("thresholds: loaded")
    assert config.source == str(path)
    # Whatever loaded is a value the rest of the gate can use as it is.
    for section in (config.generation, config.scoring, config.statistics, config.shards):
        for spec in dataclasses.fields(section):
            value = getattr(section, spec.name)
            assert type(value) is type(spec.default), (spec.name, value)
            if isinstance(value, int) and not isinstance(value, bool):
                assert -(2**63) <= value < 2**63, (spec.name, value)
            if isinstance(value, float):
                assert math.isfinite(value), (spec.name, value)
    rules = [
        *config.gate.rules.values(),
        *(rule for table in config.gate.shard_rules.values() for rule in table.values()),
    ]
    for rule in rules:
        assert rule.limits()
        assert all(math.isfinite(v) and v >= 0 for v in rule.limits().values())
    json.dumps(config.to_dict(), allow_nan=False)
    return config


@BULK
@given(raw=thresholds_files())
def test_any_thresholds_file_loads_or_fails_in_one_line(scratch: Path, raw: bytes) -> None:
    path = scratch / "thresholds.toml"
    path.write_bytes(raw)
    check_thresholds_file(path)


# ------------------------------------------------------------------ through the CLI


@FEW
@given(
    prompts=prompt_files(),
    thresholds=thresholds_files(),
    suffix=st.sampled_from([".jsonl", ".txt"]),
)
def test_cli_bad_input_is_exit_2_and_one_error_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    prompts: bytes,
    thresholds: bytes,
    suffix: str,
) -> None:
    """The real entry point, with the model and adapter missing: whichever input is checked
    first and found wanting, the user gets exit 2 and one line, never a traceback."""
    prompt_path = tmp_path / f"prompts{suffix}"
    prompt_path.write_bytes(prompts)
    thresholds_path = tmp_path / "thresholds.toml"
    thresholds_path.write_bytes(thresholds)
    capsys.readouterr()
    code = main(
        [
            "gate",
            "--model",
            str(tmp_path / "no-model"),
            "--adapter",
            str(tmp_path / "no-adapter"),
            "--prompts",
            str(prompt_path),
            "--thresholds",
            str(thresholds_path),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--report",
            "",
            "--json",
            "",
        ]
    )
    captured = capsys.readouterr()
    assert code == 2, captured.err[-2000:]
    lines = captured.err.splitlines()
    errors = [line for line in lines if line.startswith("toxtests: error: ")]
    assert len(errors) == 1, captured.err[-2000:]
    event(f"cli: {error_kind(errors[0].removeprefix('toxtests: error: '))}")
    assert all(line.startswith("toxtests: ") for line in lines), captured.err[-2000:]
    assert "Traceback" not in captured.err
    assert captured.out == ""
