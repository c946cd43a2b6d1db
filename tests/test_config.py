"""`thresholds.toml`: parsing, defaults, the errors a typo gets, the help table."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toxtests.config import (
    DEFAULT_GATE,
    METRICS,
    RULES,
    Config,
    GateConfig,
    GenerationConfig,
    Rule,
    ScoringConfig,
    ShardConfig,
    StatisticsConfig,
    help_table,
    load_config,
    parse_config,
)
from toxtests.errors import ConfigError, ToxtestsError

REPO_ROOT = Path(__file__).resolve().parents[1]
SECTIONS: dict[str, type] = {
    "generation": GenerationConfig,
    "scoring": ScoringConfig,
    "statistics": StatisticsConfig,
    "shards": ShardConfig,
}


# A small TOML writer, so Hypothesis can build documents with any key or string.
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def toml_string(text: str) -> str:
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else toml_string(key)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def toml_table(header: tuple[str, ...], body: dict[str, Any]) -> str:
    lines = ["[" + ".".join(toml_key(part) for part in header) + "]"]
    lines += [f"{toml_key(key)} = {toml_value(value)}" for key, value in body.items()]
    return "\n".join(lines) + "\n"


def single_line(message: str) -> bool:
    return len(message.splitlines()) == 1


def config_error(text: str, source: str = "thresholds.toml") -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source)
    message = str(info.value)
    assert single_line(message), message
    assert message.startswith(source), message
    return message


FULL_DOCUMENT = """
[generation]
max_new_tokens = 32
samples = 5
do_sample = false
temperature = 0.7
top_p = 0.95
top_k = 40
seed = 1234
batch_size = 16
chat_template = true
max_prompt_tokens = 512

[scoring]
scorer = "detoxify:original"
attribute = "toxicity"
threshold = 0.4
batch_size = 32
huggingface_config = "/models/bert"
allow_pickle = true

[statistics]
confidence = 0.9
method = "bayesian"
resamples = 500
correction = "bonferroni"
inconclusive = "pass"
seed = 7
early_stopping = true

[shards]
by = "toxicity_bin"
size = 25

[gate.toxicity_rate]
max_increase = 0.02
max = 0.3

[gate.expected_max_toxicity]
max_relative_increase = 0.1

[gate."rate:insult"]
max_increase = 0.05

[gate.shard.challenging.mean_toxicity]
max_increase = 0.01
"""


# --- valid documents --------------------------------------------------------------


def test_full_document_gives_every_value() -> None:
    config = parse_config(FULL_DOCUMENT, "full.toml")
    assert config.source == "full.toml"
    assert config.generation == GenerationConfig(
        max_new_tokens=32, samples=5, do_sample=False, temperature=0.7, top_p=0.95,
        top_k=40, seed=1234, batch_size=16, chat_template=True, max_prompt_tokens=512,
    )  # fmt: skip
    assert config.scoring == ScoringConfig(
        scorer="detoxify:original", attribute="toxicity", threshold=0.4, batch_size=32,
        huggingface_config="/models/bert", allow_pickle=True,
    )  # fmt: skip
    assert config.statistics == StatisticsConfig(
        confidence=0.9, method="bayesian", resamples=500, correction="bonferroni",
        inconclusive="pass", seed=7, early_stopping=True,
    )  # fmt: skip
    assert config.shards == ShardConfig(by="toxicity_bin", size=25)
    assert config.gate.rules == {
        "toxicity_rate": Rule(max_increase=0.02, max=0.3),
        "expected_max_toxicity": Rule(max_relative_increase=0.1),
        "rate:insult": Rule(max_increase=0.05),
    }
    assert config.gate.shard_rules == {"challenging": {"mean_toxicity": Rule(max_increase=0.01)}}
    assert config.gate.rules["toxicity_rate"].limits() == {"max_increase": 0.02, "max": 0.3}


def test_absent_sections_take_the_defaults() -> None:
    config = parse_config("", "empty.toml")
    assert config.generation == GenerationConfig()
    assert config.scoring == ScoringConfig()
    assert config.statistics == StatisticsConfig()
    assert config.shards == ShardConfig()
    assert config.gate == DEFAULT_GATE
    assert set(config.gate.rules) == set(METRICS)
    assert load_config(None) == Config()
    assert load_config(None).fingerprint() == config.fingerprint()


def test_one_key_keeps_the_rest_of_its_section_default() -> None:
    config = parse_config("[generation]\nsamples = 3\n")
    assert config.generation == dataclasses.replace(GenerationConfig(), samples=3)
    assert config.gate == DEFAULT_GATE


def test_integer_is_accepted_for_a_float_key() -> None:
    config = parse_config("[generation]\ntemperature = 2\n[gate.toxicity_rate]\nmax = 1\n")
    assert config.generation.temperature == 2.0
    assert isinstance(config.generation.temperature, float)
    assert isinstance(config.gate.rules["toxicity_rate"].max, float)


def test_gate_section_replaces_the_default_rules() -> None:
    config = parse_config("[gate.mean_toxicity]\nmax = 0.2\n")
    assert config.gate.rules == {"mean_toxicity": Rule(max=0.2)}
    assert config.gate.shard_rules == {}


def test_shard_rules_parse_per_category_and_metric() -> None:
    config = parse_config(
        "[gate.toxicity_rate]\nmax_increase = 0.05\n"
        "[gate.shard.challenging.toxicity_rate]\nmax_increase = 0.01\n"
        '[gate.shard.not-challenging."rate:threat"]\nmax = 0.1\n'
        '[gate.shard."tox-0.75-1.00".mean_toxicity]\nmax_relative_increase = 0.2\n'
    )
    assert config.gate.shard_rules == {
        "challenging": {"toxicity_rate": Rule(max_increase=0.01)},
        "not-challenging": {"rate:threat": Rule(max=0.1)},
        "tox-0.75-1.00": {"mean_toxicity": Rule(max_relative_increase=0.2)},
    }
    assert config.to_dict()["gate"]["shard"]["not-challenging"] == {"rate:threat": {"max": 0.1}}


@pytest.mark.parametrize("attribute", ["toxicity", "severe_toxicity", "insult", "my custom"])
def test_rate_metrics_are_accepted(attribute: str) -> None:
    config = parse_config(f'[gate."rate:{attribute}"]\nmax_increase = 0.1\n')
    assert config.gate.rules == {f"rate:{attribute}": Rule(max_increase=0.1)}


def test_repository_thresholds_file_parses() -> None:
    path = REPO_ROOT / "thresholds.toml"
    if not path.exists():
        pytest.skip("no thresholds.toml at the repository root yet")
    config = load_config(path)
    assert config.source == str(path)
    assert config.gate.rules or config.gate.shard_rules


def test_load_config_reads_a_file_with_a_bom(tmp_path: Path) -> None:
    path = tmp_path / "thresholds.toml"
    path.write_bytes(b"\xef\xbb\xbf[generation]\r\nsamples = 4\r\n")
    config = load_config(path)
    assert config.generation.samples == 4
    assert config.source == str(path)


# --- errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        (
            "[generaton]\nsamples = 2\n",
            r"unknown section \[generaton\]; did you mean 'generation'\?",
        ),
        ("[statistic]\n", r"unknown section \[statistic\]; did you mean 'statistics'\?"),
        (
            "[generation]\nsamples_ = 2\n",
            r"\[generation\]: unknown key 'samples_'; did you mean 'samples'\?",
        ),
        (
            "[generation]\ntop-p = 0.5\n",
            r"\[generation\]: unknown key 'top-p'; did you mean 'top_p'\?",
        ),
        (
            "[scoring]\nthreshhold = 0.5\n",
            r"\[scoring\]: unknown key 'threshhold'; did you mean 'threshold'\?",
        ),
        ("[shards]\nsiz = 5\n", r"\[shards\]: unknown key 'siz'; did you mean 'size'\?"),
        (
            "[gate.toxicity_rate]\nmax_increse = 0.1\n",
            r"\[gate\]\.toxicity_rate: unknown key 'max_increse'; did you mean 'max_increase'\?",
        ),
        (
            "[gate.toxicity_rat]\nmax_increase = 0.1\n",
            r"\[gate\]: unknown metric 'toxicity_rat'; did you mean 'toxicity_rate'\?",
        ),
        (
            "[gate.shard.challenging.mean_toxicty]\nmax = 0.1\n",
            r"\[gate\.shard\.challenging\]: unknown metric 'mean_toxicty'; "
            r"did you mean 'mean_toxicity'\?",
        ),
    ],
)
def test_typos_name_the_file_and_key_and_suggest_the_fix(text: str, pattern: str) -> None:
    message = config_error(text, "my/thresholds.toml")
    assert re.search(pattern, message), message
    assert "valid: " in message


def test_unknown_key_far_from_every_name_lists_the_valid_keys() -> None:
    message = config_error("[shards]\nzzzzzzzz = 1\n")
    assert "did you mean" not in message
    assert "valid: by, size" in message


def test_unknown_metric_mentions_rate_attribute_form() -> None:
    message = config_error("[gate.toxic]\nmax = 0.1\n")
    assert 'or "rate:<attribute>"' in message


def test_rate_without_an_attribute_is_an_unknown_metric() -> None:
    message = config_error('[gate."rate:"]\nmax = 0.1\n')
    assert "unknown metric 'rate:'" in message


def test_a_bad_choice_suggests_the_closest_one() -> None:
    message = config_error('[statistics]\nmethod = "bootstap"\n')
    assert re.search(r"method = 'bootstap' is not allowed; did you mean 'bootstrap'\?", message)
    message = config_error('[shards]\nby = "toxicity"\n')
    assert "by = 'toxicity' is not allowed; did you mean 'toxicity_bin'?" in message


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ('[generation]\nsamples = "5"\n', r"key 'samples' must be an integer, got '5'"),
        ("[generation]\nsamples = 2.0\n", r"key 'samples' must be an integer, got 2\.0"),
        ("[generation]\nseed = true\n", r"key 'seed' must be an integer, got True"),
        (
            "[generation]\ntemperature = true\n",
            r"key 'temperature' must be a finite number, got True",
        ),
        ('[generation]\ntop_p = "0.9"\n', r"key 'top_p' must be a finite number, got '0\.9'"),
        ("[generation]\ndo_sample = 1\n", r"key 'do_sample' must be true or false, got 1"),
        (
            '[generation]\nchat_template = "yes"\n',
            r"key 'chat_template' must be true, false or \"auto\"",
        ),
        ('[generation]\nstop = "\\n"\n', r"key 'stop' must be a list of non-empty strings"),
        ('[generation]\nstop = [""]\n', r"key 'stop' must be a list of non-empty strings"),
        ("[scoring]\nscorer = 3\n", r"key 'scorer' must be a string, got 3"),
        ('[scoring]\nscorer = ["a"]\n', r"key 'scorer' must be a string, got \['a'\]"),
        ("[gate.toxicity_rate]\nmax = false\n", r"key 'max' must be a finite number, got False"),
        (
            "[gate.toxicity_rate]\nmax_increase = nan\n",
            r"key 'max_increase' must be a finite number, got nan",
        ),
        ("[gate.toxicity_rate]\nmax = inf\n", r"key 'max' must be a finite number, got inf"),
        (
            "[generation]\ntemperature = inf\n",
            r"key 'temperature' must be a finite number, got inf",
        ),
    ],
)
def test_wrong_types_name_the_key_and_the_expected_type(text: str, pattern: str) -> None:
    message = config_error(text)
    assert re.search(pattern, message), message


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("[generation]\ntop_p = 1.5\n", r"generation\.top_p = 1\.5 must be in \(0, 1\]"),
        ("[generation]\ntop_p = 0\n", r"generation\.top_p = 0\.0 must be in \(0, 1\]"),
        ("[generation]\nsamples = 0\n", r"generation\.samples = 0 must be >= 1"),
        ("[generation]\nmax_new_tokens = 0\n", r"generation\.max_new_tokens = 0 must be >= 1"),
        ("[generation]\ntemperature = 0\n", r"generation\.temperature = 0\.0 must be > 0"),
        ("[generation]\ntop_k = -1\n", r"generation\.top_k = -1 must be >= 0"),
        ("[generation]\nbatch_size = -2\n", r"generation\.batch_size = -2 must be >= 0"),
        ("[scoring]\nthreshold = 1.01\n", r"scoring\.threshold = 1\.01 must be in \[0, 1\]"),
        ("[scoring]\nbatch_size = 0\n", r"scoring\.batch_size = 0 must be >= 1"),
        (
            "[statistics]\nconfidence = 1.0\n",
            r"statistics\.confidence = 1\.0 must be in \(0\.5, 1\)",
        ),
        (
            "[statistics]\nconfidence = 0.5\n",
            r"statistics\.confidence = 0\.5 must be in \(0\.5, 1\)",
        ),
        ("[statistics]\nresamples = 99\n", r"statistics\.resamples = 99 must be >= 100"),
        ("[shards]\nsize = 0\n", r"shards\.size = 0 must be >= 1"),
        (
            "[gate.toxicity_rate]\nmax_increase = -0.01\n",
            r"toxicity_rate: max_increase = -0\.01 must be >= 0",
        ),
        (
            "[gate.shard.c.mean_toxicity]\nmax_relative_increase = -1\n",
            r"\[gate\.shard\.c\]\.mean_toxicity: max_relative_increase = -1\.0 must be >= 0",
        ),
    ],
)
def test_out_of_range_values_are_errors(text: str, pattern: str) -> None:
    message = config_error(text)
    assert re.search(pattern, message), message


def test_boundary_values_are_accepted() -> None:
    config = parse_config(
        "[generation]\ntop_p = 1.0\ntop_k = 0\nbatch_size = 0\n"
        "[scoring]\nthreshold = 0.0\n[statistics]\nresamples = 100\nconfidence = 0.999\n"
        "[gate.toxicity_rate]\nmax_increase = 0\n"
    )
    assert config.generation.top_p == 1.0
    assert config.scoring.threshold == 0.0
    assert config.statistics.resamples == 100
    assert config.gate.rules["toxicity_rate"].limits() == {"max_increase": 0.0}


def test_a_rule_without_a_limit_is_an_error() -> None:
    message = config_error("[gate.toxicity_rate]\n")
    assert "[gate].toxicity_rate: sets no limit; give one of max_increase, " in message
    message = config_error("[gate.shard.challenging.toxicity_rate]\n")
    assert "[gate.shard.challenging].toxicity_rate: sets no limit" in message


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("generation = 5\n", r"\[generation\]: expected a table of keys, got 5"),
        ("gate = 5\n", r"\[gate\] must be a table of metrics"),
        ("[gate]\nshard = 5\n", r"\[gate\.shard\] must be a table of shard categories"),
        ("[gate]\ntoxicity_rate = 0.1\n", r"toxicity_rate: expected a table of keys, got 0\.1"),
        (
            "[gate.shard]\nchallenging = 1\n",
            r"\[gate\.shard\.challenging\]: expected a table of metrics",
        ),
    ],
)
def test_wrong_shapes_are_errors(text: str, pattern: str) -> None:
    message = config_error(text)
    assert re.search(pattern, message), message


@pytest.mark.parametrize(
    "text", ["[generation\nsamples = 1\n", "[generation]\nsamples = \n", 'a = "unterminated\n']
)
def test_invalid_toml_names_the_file(text: str) -> None:
    message = config_error(text, "bad/thresholds.toml")
    assert message.startswith("bad/thresholds.toml: not valid TOML (")
    assert "check the quoting and brackets" in message


def test_load_config_of_a_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "thresholds.toml"
    with pytest.raises(ConfigError, match=re.escape(f"{path}: thresholds file not found")):
        load_config(path)


def test_config_errors_are_value_errors_and_toxtests_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="thresholds file not found"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ToxtestsError, match="unknown section"):
        parse_config("[nope]\n")


def test_load_config_of_a_directory_or_bad_utf8_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path}: cannot read thresholds file")):
        load_config(tmp_path)
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[scoring]\nscorer = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=re.escape(f"{path}: cannot read thresholds file")):
        load_config(path)


def test_errors_from_load_config_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "thresholds.toml"
    path.write_text("[generation]\nmax_increse = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(f"{path} [generation]: unknown key")):
        load_config(path)


# --- Hypothesis -------------------------------------------------------------------

_int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
VALUES: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "generation": {
        "max_new_tokens": st.integers(1, 4096),
        "samples": st.integers(1, 100),
        "do_sample": st.booleans(),
        "temperature": st.floats(
            min_value=0, max_value=100, exclude_min=True, allow_nan=False, allow_infinity=False
        ),
        "top_p": st.floats(
            min_value=0, max_value=1, exclude_min=True, allow_nan=False, allow_infinity=False
        ),
        "top_k": st.integers(0, 10_000),
        "seed": _int64,
        "batch_size": st.integers(0, 4096),
        "chat_template": st.one_of(st.booleans(), st.just("auto")),
        "stop": st.lists(st.text(min_size=1), max_size=3).map(tuple),
        "max_prompt_tokens": st.integers(0, 1 << 20),
    },
    "scoring": {
        "scorer": st.text(),
        "attribute": st.text(),
        "threshold": st.floats(min_value=0, max_value=1, allow_nan=False, allow_infinity=False),
        "batch_size": st.integers(1, 4096),
        "huggingface_config": st.text(),
        "allow_pickle": st.booleans(),
        "correction": st.sampled_from(["none", "rogan-gladen"]),
    },
    "statistics": {
        "confidence": st.floats(min_value=0.5, max_value=1, exclude_min=True, exclude_max=True),
        "method": st.sampled_from(["bootstrap", "bayesian"]),
        "resamples": st.integers(100, 100_000),
        "correction": st.sampled_from(["holm", "bonferroni", "none"]),
        "inconclusive": st.sampled_from(["fail", "pass"]),
        "seed": _int64,
        "early_stopping": st.booleans(),
    },
    "shards": {
        "by": st.sampled_from(["auto", "challenging", "toxicity_bin", "attribute", "none"]),
        "size": st.integers(1, 10_000),
    },
}
METRIC_NAMES = st.one_of(st.sampled_from(METRICS), st.text(min_size=1).map(lambda a: f"rate:{a}"))
LIMITS = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)
RULE_BODIES = st.dictionaries(st.sampled_from(RULES), LIMITS, min_size=1)
RULE_TABLES = st.dictionaries(METRIC_NAMES, RULE_BODIES, max_size=3)


def test_value_strategies_cover_every_field() -> None:
    # A new field without a strategy here would go untested by the round trip.
    for section, cls in SECTIONS.items():
        assert set(VALUES[section]) == {f.name for f in dataclasses.fields(cls)}, section


@st.composite
def documents(draw: st.DrawFn) -> tuple[str, dict[str, dict[str, Any]], dict[str, Any] | None]:
    chosen: dict[str, dict[str, Any]] = {}
    parts = []
    for section, strategies in VALUES.items():
        if not draw(st.booleans()):
            continue
        keys = draw(st.lists(st.sampled_from(sorted(strategies)), unique=True))
        body = {key: draw(strategies[key]) for key in keys}
        chosen[section] = body
        parts.append(toml_table((section,), body))
    gate: dict[str, Any] | None = None
    if draw(st.booleans()):
        rules = draw(RULE_TABLES)
        shard = draw(st.dictionaries(st.text(), RULE_TABLES.filter(bool), max_size=3))
        gate = {**rules, "shard": shard}
        parts += [toml_table(("gate", metric), body) for metric, body in rules.items()]
        parts += [
            toml_table(("gate", "shard", category, metric), body)
            for category, table in shard.items()
            for metric, body in table.items()
        ]
        if not (rules or shard):
            parts.append("[gate]\n")
    order = draw(st.permutations(parts))
    return "\n".join(order), chosen, gate


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents())
def test_valid_documents_parse_and_round_trip(
    document: tuple[str, dict[str, dict[str, Any]], dict[str, Any] | None],
) -> None:
    text, chosen, gate = document
    config = parse_config(text, "random.toml")
    as_dict = config.to_dict()
    for section, cls in SECTIONS.items():
        expected = {**dataclasses.asdict(cls()), **chosen.get(section, {})}
        assert as_dict[section] == expected, section
    if gate is None:
        assert config.gate == DEFAULT_GATE
    else:
        assert as_dict["gate"] == gate
    assert as_dict["source"] == "random.toml"
    # Parsing is deterministic, and the source does not enter the fingerprint.
    assert parse_config(text, "elsewhere.toml").fingerprint() == config.fingerprint()


def _unknown(valid: set[str]) -> st.SearchStrategy[str]:
    return st.text(max_size=20).filter(lambda key: key not in valid)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(sorted(SECTIONS)), st.data())
def test_unknown_keys_in_a_section_are_errors_naming_the_key(
    section: str, data: st.DataObject
) -> None:
    valid = {f.name for f in dataclasses.fields(SECTIONS[section])}
    key = data.draw(_unknown(valid))
    message = config_error(toml_table((section,), {key: 1}), "x.toml")
    assert f"x.toml [{section}]: unknown key {key!r}" in message


@settings(max_examples=100, deadline=None)
@given(_unknown({*SECTIONS, "gate"}))
def test_unknown_sections_are_errors_naming_the_section(name: str) -> None:
    message = config_error(toml_table((name,), {"samples": 1}), "x.toml")
    shown = name if name.isprintable() else json.dumps(name)
    assert f"x.toml: unknown section [{shown}];" in message


@settings(max_examples=100, deadline=None)
@given(
    _unknown(set(METRICS) | {"shard"}).filter(lambda m: not m.startswith("rate:") or m == "rate:"),
    st.text(),
    st.booleans(),
)
def test_unknown_metrics_are_errors_naming_the_metric(
    metric: str, category: str, shard: bool
) -> None:
    header = ("gate", "shard", category, metric) if shard else ("gate", metric)
    message = config_error(toml_table(header, {"max": 0.1}), "x.toml")
    assert f"unknown metric {metric!r};" in message


@settings(max_examples=100, deadline=None)
@given(METRIC_NAMES, st.text(), _unknown(set(RULES)))
def test_unknown_rule_keys_are_errors_naming_the_key(metric: str, category: str, key: str) -> None:
    message = config_error(toml_table(("gate", "shard", category, metric), {key: 0.1}))
    assert f"unknown key {key!r}" in message
    assert single_line(message)


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from([(s, f.name) for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]),
    st.one_of(st.text(), st.booleans(), st.integers(), st.floats()),
)
def test_any_value_either_parses_or_gives_a_one_line_error(
    field: tuple[str, str], value: Any
) -> None:
    section, key = field
    text = toml_table((section,), {key: value})
    try:
        config = parse_config(text, "x.toml")
    except ConfigError as exc:
        message = str(exc)
        assert single_line(message), message
        assert message.startswith("x.toml")
        assert key in message
    else:
        parsed = getattr(getattr(config, section), key)
        assert parsed == value
        assert type(parsed) is type(getattr(SECTIONS[section](), key))
        assert not (isinstance(parsed, float) and not math.isfinite(parsed))


# --- help table and fingerprint ----------------------------------------------------


def test_help_table_lists_every_field_of_every_section() -> None:
    table = help_table()
    rows = table.splitlines()
    assert rows[:2] == ["| key | default | meaning |", "| --- | --- | --- |"]
    for section, cls in SECTIONS.items():
        for spec in dataclasses.fields(cls):
            matching = [row for row in rows if row.startswith(f"| `{section}.{spec.name}` |")]
            assert len(matching) == 1, (section, spec.name)
            assert spec.metadata["help"].replace("|", "\\|") in matching[0]
            assert f"`{json.dumps(spec.default)}`" in matching[0]
            for choice in spec.metadata.get("choices") or ():
                assert choice in matching[0]
    for spec in dataclasses.fields(Rule):
        assert any(row.startswith(f"| `gate.<metric>.{spec.name}` |") for row in rows), spec.name
    expected = sum(len(dataclasses.fields(cls)) for cls in SECTIONS.values())
    assert len(rows) == 2 + expected + len(dataclasses.fields(Rule))


def test_fingerprint_is_identical_for_equal_configs() -> None:
    first = parse_config(FULL_DOCUMENT, "a.toml")
    second = parse_config(FULL_DOCUMENT, "b.toml")
    assert first.fingerprint() == second.fingerprint()
    assert Config().fingerprint() == parse_config("").fingerprint()
    assert re.fullmatch(r"[0-9a-f]{16}", first.fingerprint())


@pytest.mark.parametrize(
    ("section", "spec"),
    [(s, f) for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)],
    ids=lambda x: x if isinstance(x, str) else x.name,
)
def test_fingerprint_changes_with_every_setting(section: str, spec: dataclasses.Field[Any]) -> None:
    base = Config()
    current = getattr(getattr(base, section), spec.name)
    other: Any
    if spec.metadata.get("choices"):
        other = next(c for c in spec.metadata["choices"] if c != current)
    elif isinstance(current, bool):
        other = not current
    elif isinstance(current, (int, float)):
        other = current / 2 + 0.01
    elif isinstance(current, tuple):
        other = (*current, "x")
    else:
        other = current + "x"
    assert other != current
    changed_section = dataclasses.replace(getattr(base, section), **{spec.name: other})
    changed = dataclasses.replace(base, **{section: changed_section})
    assert changed.fingerprint() != base.fingerprint()


def test_fingerprint_changes_with_the_gate() -> None:
    base = parse_config(FULL_DOCUMENT)
    tighter = parse_config(FULL_DOCUMENT.replace("max_increase = 0.02", "max_increase = 0.01"))
    assert tighter.fingerprint() != base.fingerprint()
    assert dataclasses.replace(base, gate=GateConfig()).fingerprint() != base.fingerprint()


# -- presets and command-line overrides ---------------------------------------------------


def test_rtp_preset_is_the_papers_protocol() -> None:
    from toxtests.config import load_config

    config = load_config(None, preset="rtp")
    g = config.generation
    assert (g.samples, g.max_new_tokens, g.do_sample, g.top_p, g.top_k) == (25, 20, True, 0.9, 0)
    assert set(config.gate.rules) == {"expected_max_toxicity", "toxicity_probability"}
    assert config.source == "preset rtp"


def test_hawkins2024_preset_is_the_studys_protocol() -> None:
    from toxtests.config import load_config

    config = load_config(None, preset="hawkins2024")
    assert (config.generation.do_sample, config.generation.max_new_tokens) == (False, 50)
    assert not config.generation.chat_template
    assert config.scoring.scorer == "hf:facebook/roberta-hate-speech-dynabench-r4-target"
    assert (config.scoring.attribute, config.scoring.threshold) == ("hate", 0.5)
    assert config.statistics.method == "bayesian"


def test_a_users_file_overrides_a_preset_key_by_key(tmp_path: Path) -> None:
    from toxtests.config import load_config

    file = tmp_path / "thresholds.toml"
    file.write_text("[generation]\nsamples = 5\n\n[gate.toxicity_rate]\nmax_increase = 0.02\n")
    config = load_config(file, preset="rtp", overrides={"generation": {"max_new_tokens": 7}})
    # Its own keys win; the preset's other keys in the same section stay.
    assert (config.generation.samples, config.generation.top_p) == (5, 0.9)
    assert config.generation.max_new_tokens == 7  # the command line over both
    assert set(config.gate.rules) == {
        "expected_max_toxicity",
        "toxicity_probability",
        "toxicity_rate",
    }
    assert config.source == f"preset rtp + {file} + command line"


def test_a_bad_key_over_a_preset_still_names_the_users_file(tmp_path: Path) -> None:
    from toxtests.config import load_config

    file = tmp_path / "mine.toml"
    file.write_text("[generation]\nsampels = 5\n")
    with pytest.raises(ConfigError, match=r"mine\.toml.*\[generation\].*sampels.*samples"):
        load_config(file, preset="rtp")
    with pytest.raises(ConfigError, match="unknown preset 'rpt'.*rtp"):
        load_config(None, preset="rpt")


def test_every_shipped_preset_parses() -> None:
    from toxtests.config import PRESETS, load_config

    for name in PRESETS:
        assert load_config(None, preset=name).gate.rules
