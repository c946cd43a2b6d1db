"""The pytest plugin end to end with `pytester`, with and without pytest-xdist."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest


def _args(tiny, out: Path, *adapters: Path) -> list[str]:  # noqa: ANN001
    args = [
        "--tox-model",
        str(tiny.base),
        "--tox-prompts",
        str(tiny.prompts),
        "--tox-thresholds",
        str(tiny.thresholds),
        "--tox-cache-dir",
        str(out / "cache"),
        "--tox-report",
        str(out / "report.html"),
        "--tox-json",
        str(out / "results.json"),
        "-p",
        "no:randomly",
        "-p",
        "no:cacheprovider",
    ]
    for adapter in adapters:
        args += ["--tox-adapter", str(adapter)]
    return args


def _numbers(result: dict) -> list:
    return [
        (a["adapter"], a["verdict"], a["metrics"], [c["verdict"] for c in a["checks"]])
        for a in result["adapters"]
    ]


@pytest.mark.parametrize("workers", [None, "2"])
def test_gate_items_verdicts_and_one_report(pytester: pytest.Pytester, tiny, workers) -> None:  # noqa: ANN001
    out = pytester.path / "out"
    extra = ["-n", workers] if workers else []
    result = pytester.runpytest_subprocess(
        *_args(tiny, out, tiny.identity, tiny.toxic), *extra, "-v"
    )
    # Early stopping decides both adapters at the first look: their second shards skip.
    result.assert_outcomes(passed=2, failed=2, skipped=2)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    lines = result.stdout.lines
    assert any("toxtests::test_shard[identity::even-0]" in ln and "PASSED" in ln for ln in lines)
    assert any("toxtests::test_shard[toxic::odd-0]" in ln and "SKIPPED" in ln for ln in lines)
    assert any("toxtests::test_gate[toxic]" in ln and "FAILED" in ln for ln in lines)
    result.stdout.fnmatch_lines(["*identity: PASS*", "*toxic: FAIL*", "*report: *report.html"])
    saved = json.loads((out / "results.json").read_text())
    assert [a["verdict"] for a in saved["adapters"]] == ["pass", "fail"]
    assert (out / "report.html").exists()
    # Progress is visible either way: a worker's lines reach the run's stderr, tagged.
    if workers:
        assert any(
            re.match(r"toxtests \[gw\d\]: parent( \+ \S+)*: \d+/\d+ prompts, .*done in", line)
            for line in result.stderr.lines
        ), result.stderr.lines[-20:]
    else:
        assert re.search(r"toxtests: \w+: \d+/\d+ prompts, .*done in", result.stdout.str())


def test_xdist_gives_the_same_numbers_as_one_process(pytester: pytest.Pytester, tiny) -> None:  # noqa: ANN001
    serial = pytester.path / "serial"
    parallel = pytester.path / "parallel"
    pytester.runpytest_subprocess(*_args(tiny, serial, tiny.identity, tiny.toxic))
    pytester.runpytest_subprocess(*_args(tiny, parallel, tiny.identity, tiny.toxic), "-n", "2")
    one = json.loads((serial / "results.json").read_text())
    two = json.loads((parallel / "results.json").read_text())
    assert _numbers(one) == _numbers(two)

    # Byte-identical apart from the timestamp and the (different) output paths.
    def canonical(path: Path, result: dict) -> str:
        text = path.read_text().replace(result["created"], "<created>")
        return text.replace(str(path.parent), "<out>")

    assert canonical(serial / "results.json", one) == canonical(parallel / "results.json", two)


def test_without_early_stopping_every_shard_runs(pytester: pytest.Pytester, tiny) -> None:  # noqa: ANN001
    out = pytester.path / "out"
    result = pytester.runpytest_subprocess(
        *_args(tiny, out, tiny.identity, tiny.toxic), "--tox-no-early-stopping"
    )
    result.assert_outcomes(passed=3, failed=3)  # toxic: both shards and its gate
    saved = json.loads((out / "results.json").read_text())
    assert (
        saved["early_stopping"]["prompts_generated"]
        == saved["early_stopping"]["prompts_total"]
        == 40
    )


def test_passing_adapter_exits_zero(pytester: pytest.Pytester, tiny) -> None:  # noqa: ANN001
    result = pytester.runpytest_subprocess(*_args(tiny, pytester.path, tiny.identity))
    result.assert_outcomes(passed=2, skipped=1)
    assert result.ret == pytest.ExitCode.OK


def test_keyword_selects_gate_items(pytester: pytest.Pytester, tiny) -> None:  # noqa: ANN001
    result = pytester.runpytest_subprocess(
        *_args(tiny, pytester.path, tiny.identity, tiny.toxic), "-k", "identity and even"
    )
    result.assert_outcomes(passed=1)


def test_bad_thresholds_are_a_usage_error(pytester: pytest.Pytester, tiny) -> None:  # noqa: ANN001
    bad = pytester.path / "bad.toml"
    bad.write_text("[statistics]\nconfidence = 2\n")
    args = _args(tiny, pytester.path, tiny.identity)
    args[args.index("--tox-thresholds") + 1] = str(bad)
    result = pytester.runpytest_subprocess(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*bad.toml: statistics.confidence = 2.0 must be in (0.5, 1)*"])


def test_negative_limit_is_a_usage_error(pytester: pytest.Pytester, tiny) -> None:  # noqa: ANN001
    result = pytester.runpytest_subprocess(
        *_args(tiny, pytester.path, tiny.identity), "--tox-limit", "-3"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--tox-limit: must be >= 0, got -3*"])


def test_fixtures_are_usable_in_user_tests(pytester: pytest.Pytester, tiny) -> None:  # noqa: ANN001
    pytester.makepyfile(
        test_mine="""
        def test_parent_outputs_are_mostly_clean(tox_parent_scores, tox_shards, tox_scorer):
            assert [s.name for s in tox_shards] == sorted(tox_parent_scores)
            rates = [float((s.scores[tox_scorer.primary] >= 0.5).mean())
                     for s in tox_parent_scores.values()]
            assert all(0.0 <= r <= 1.0 for r in rates)
            assert sum(len(s.texts) for s in tox_parent_scores.values()) == 40
        """
    )
    args = _args(tiny, pytester.path)
    result = pytester.runpytest_subprocess(*args, "test_mine.py")
    result.assert_outcomes(passed=1)


def test_missing_adapter_is_a_usage_error(pytester: pytest.Pytester, tiny) -> None:  # noqa: ANN001
    result = pytester.runpytest_subprocess(
        *_args(tiny, pytester.path, pytester.path / "no-such-lora")
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*no-such-lora: adapter path not found*"])


def test_a_failure_message_explains_a_check_held_back_at_the_limit() -> None:
    from toxtests.gate import CheckResult
    from toxtests.plugin import _describe

    def check(held_back: bool) -> CheckResult:
        return CheckResult(
            scope="all",
            metric="toxicity_rate",
            rule="max_increase",
            limit=0.05,
            effective_limit=0.05,
            statistic=0.03,
            interval=(0.0125, 0.0475),
            p_fail=0.99,
            p_fail_adjusted=0.99,
            verdict="inconclusive",
            prompts=400,
            prompts_needed=454,
            held_back_at_limit=held_back,
        )

    held, plain = _describe([check(True)], "x"), _describe([check(False)], "x")
    assert "~454 prompts would resolve it" in held and "~454 prompts would resolve it" in plain
    assert "interval is within the limit, but not by enough" in held
    assert "not by enough" not in plain


def test_a_relative_limit_says_what_it_is_relative_to_even_of_a_zero_parent() -> None:
    from dataclasses import replace

    from toxtests.gate import CheckResult
    from toxtests.plugin import _describe

    relative = CheckResult(
        scope="all", metric="toxicity_rate", rule="max_relative_increase", limit=0.2,
        effective_limit=0.02, statistic=0.05, interval=(0.03, 0.07), p_fail=0.0,
        p_fail_adjusted=0.0, verdict="fail", prompts=400, prompts_needed=None,
    )  # fmt: skip
    assert "vs limit 0.020 (20% of the parent's 0.100)" in _describe([relative], "x")
    zero = _describe([replace(relative, effective_limit=0.0)], "x")
    assert "vs limit 0.000 (of a parent value of 0, so any increase is over it" in zero
    assert "max_increase sets an absolute limit" in zero


def test_junit_xml_carries_each_adapters_deltas_intervals_and_verdicts(
    pytester: pytest.Pytester,
    tiny,  # noqa: ANN001
) -> None:
    import xml.etree.ElementTree as ET

    out = pytester.path / "out"
    junit = pytester.path / "junit.xml"
    pytester.runpytest_subprocess(
        *_args(tiny, out, tiny.identity, tiny.toxic), f"--junitxml={junit}"
    )
    saved = {a["name"]: a for a in json.loads((out / "results.json").read_text())["adapters"]}
    cases = {
        case.get("name"): {p.get("name"): p.get("value") for p in case.iter("property")}
        for case in ET.parse(junit).getroot().iter("testcase")
    }
    for name in ("identity", "toxic"):
        properties = cases[f"test_gate[{name}]"]
        assert properties["verdict"] == saved[name]["verdict"]
        for metric, values in saved[name]["metrics"].items():
            assert float(properties[f"{metric}.delta"]) == pytest.approx(values["delta"])
            assert properties.get(f"{metric}.verdict") == values["verdict"]
            low, high = values["interval"]
            assert properties[f"{metric}.interval"] == f"[{low}, {high}]"
