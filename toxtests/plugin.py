"""The pytest plugin: one test per (adapter, shard), one gate test per adapter.

Thin over `toxtests.session.GateSession`. Imports nothing heavy at load time: torch,
transformers and peft load inside the session when a gate test first needs them.
Under pytest-xdist the workers share the cache; each sends its fingerprints back and
the controller writes one merged report from the cache.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

import pytest

from toxtests.errors import ToxtestsError

session_key = pytest.StashKey["Any"]()
fingerprints_key = pytest.StashKey[dict]()
result_key = pytest.StashKey[dict]()


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("toxtests", "toxicity regression gate for LoRA/PEFT adapters")
    group.addoption(
        "--tox-model",
        default="gemma3-270m",
        help="Base model: gemma3-270m (embedded, default), smollm2-135m, a .gguf "
        "file, a transformers directory or a Hub id.",
    )
    group.addoption(
        "--tox-adapter",
        action="append",
        default=[],
        help="PEFT adapter to judge against its parent (repeatable). The gate "
        "tests are collected only when at least one is given.",
    )
    group.addoption(
        "--tox-prompts",
        default=None,
        help="Prompts: RealToxicityPrompts JSONL, plain JSONL (id, text), a text "
        "file, or rtp:challenging (Hub). Default: the demo prompts in fixtures/.",
    )
    group.addoption(
        "--tox-scorer",
        default=None,
        help="Scorer, overriding thresholds.toml: profanity-check, "
        "detoxify:<variant|path.ckpt>, hf:<id or path>.",
    )
    group.addoption(
        "--tox-thresholds",
        default=None,
        help="The gate's thresholds.toml (default: built-in limits).",
    )
    group.addoption(
        "--tox-report",
        default="toxtests-report.html",
        help="HTML report path (default: toxtests-report.html; '' for none).",
    )
    group.addoption(
        "--tox-json",
        default="toxtests-results.json",
        help="JSON results path (default: toxtests-results.json; '' for none).",
    )
    group.addoption(
        "--tox-limit",
        type=_non_negative_int,
        default=0,
        help="Use a deterministic stratified subset of N prompts (default: 0 = all).",
    )
    group.addoption(
        "--tox-cache-dir",
        default=None,
        help="Cache of converted models, generations and scores "
        "(default: $TOXTESTS_CACHE or ~/.cache/toxtests).",
    )
    group.addoption(
        "--tox-device",
        default="auto",
        help="Device for generation and scoring (default: auto = cuda if available).",
    )
    group.addoption(
        "--tox-allow-pickle",
        action="store_true",
        default=False,
        help="Allow pickle-based checkpoints with unverified hashes (default: off).",
    )
    group.addoption(
        "--tox-no-early-stopping",
        action="store_true",
        default=False,
        help="Generate every prompt even once the verdict is settled (default: "
        "stop early, as statistics.early_stopping says).",
    )
    group.addoption(
        "--tox-trust-remote-code",
        action="store_true",
        default=False,
        help="Allow model repositories to run their own code (default: off).",
    )


def options_from_config(config: pytest.Config) -> Any:
    from toxtests.session import RunOptions

    get = config.getoption
    return RunOptions(
        model=get("tox_model"),
        adapters=list(get("tox_adapter")),
        prompts=get("tox_prompts"),
        scorer=get("tox_scorer"),
        thresholds=get("tox_thresholds"),
        report=get("tox_report") or None,
        json=get("tox_json") or None,
        limit=get("tox_limit"),
        cache_dir=get("tox_cache_dir"),
        device=get("tox_device"),
        allow_pickle=get("tox_allow_pickle"),
        trust_remote_code=get("tox_trust_remote_code"),
        early_stopping=False if get("tox_no_early_stopping") else None,
    )


def pytest_configure(config: pytest.Config) -> None:
    if not config.getoption("tox_adapter", default=None):
        return
    from toxtests.session import GateSession

    try:
        config.stash[session_key] = GateSession(options_from_config(config))
    except ToxtestsError as exc:
        raise pytest.UsageError(str(exc)) from None
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(XdistHooks(), "toxtests-xdist")


class GateFailure(Exception):
    """A gate verdict, reported as a short table instead of a traceback."""


class GateItem(pytest.Item):
    def __init__(self, *, adapter_index: int, shard: Any = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.adapter_index = adapter_index
        self.shard = shard

    def runtest(self) -> None:
        gate = self.config.stash[session_key]
        if self.shard is not None:
            decided = gate.decided_before(self.adapter_index, self.shard)
            if decided is not None:
                pytest.skip(f"early stop ({decided.decided}): {decided.reason}")
            checks, table = gate.shard_checks(self.adapter_index, self.shard)
            self.user_properties.append(("metrics", table))
            failed = [c for c in checks if c.verdict == "fail"]
            if failed:
                raise GateFailure(_describe(failed, "regression in this shard"))
            return
        result = gate.adapter_result(self.adapter_index)
        self.user_properties.append(("verdict", result["verdict"]))
        verdict = result["verdict"]
        inconclusive_fails = gate.config.statistics.inconclusive == "fail"
        if verdict == "fail" or (verdict == "inconclusive" and inconclusive_fails):
            from toxtests.gate import CheckResult

            bad = [
                CheckResult(**{**c, "interval": tuple(c["interval"])})
                for c in result["checks"]
                if c["verdict"] != "pass"
            ]
            raise GateFailure(f"{result['summary']}\n" + _describe(bad, f"gate verdict: {verdict}"))

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, (GateFailure, ToxtestsError)):
            return str(excinfo.value)
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[str, int | None, str]:
        return "toxtests", None, self.name


def _describe(checks: list[Any], headline: str) -> str:
    lines = [headline]
    for c in checks:
        low, high = c.interval
        needed = f", ~{c.prompts_needed} prompts would resolve it" if c.prompts_needed else ""
        if getattr(c, "held_back_at_limit", False):
            needed += (
                "; the interval is within the limit, but not by enough at the spread the "
                "statistic would have on the limit"
            )
        lines.append(
            f"  {c.verdict.upper():12} {c.scope} {c.metric} {c.rule}: {c.statistic:+.3f} "
            f"[{low:+.3f}, {high:+.3f}] vs limit {c.effective_limit:.3f} "
            f"(adjusted p={c.p_fail_adjusted:.3g}){needed}"
        )
    return "\n".join(lines)


class GateCollector(pytest.Collector):
    def collect(self) -> Iterator[pytest.Item]:
        gate = self.config.stash[session_key]
        for index, name in enumerate(gate.adapter_names):
            for shard in gate.shards:
                yield GateItem.from_parent(
                    self, name=f"test_shard[{name}::{shard.name}]", adapter_index=index, shard=shard
                )
        for index, name in enumerate(gate.adapter_names):
            yield GateItem.from_parent(self, name=f"test_gate[{name}]", adapter_index=index)


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    if session_key not in config.stash:
        return
    collector = GateCollector.from_parent(session, name="toxtests", nodeid="toxtests")
    items.extend(collector.collect())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    if session_key not in config.stash:
        return
    gate = config.stash[session_key]
    if hasattr(config, "workerinput"):
        if gate.used:
            config.workeroutput["toxtests_fingerprints"] = gate.fingerprints()  # type: ignore[attr-defined]
        return
    ran_here = gate.used
    if fingerprints_key in config.stash:
        gate.adopt_fingerprints(config.stash[fingerprints_key])
    elif not ran_here:
        return
    from toxtests.report import write_report

    try:
        result = gate.result()
        write_report(result, gate.options.report, gate.options.json)
    except ToxtestsError as exc:
        config.stash[result_key] = {"error": str(exc)}
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        return
    config.stash[result_key] = result
    if result["exit_code"] and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    result = config.stash.get(result_key, None)
    if result is None:
        return
    terminalreporter.section("toxtests")
    if "error" in result:
        terminalreporter.write_line(f"toxtests: report not written: {result['error']}", red=True)
        return
    for adapter in result["adapters"]:
        terminalreporter.write_line(adapter["summary"])
    gate = config.stash[session_key]
    for label, path in (("report", gate.options.report), ("json", gate.options.json)):
        if path:
            terminalreporter.write_line(f"{label}: {path}")


class XdistHooks:
    """Registered only when pytest-xdist is installed."""

    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        output = getattr(node, "workeroutput", None) or {}
        fingerprints = output.get("toxtests_fingerprints")
        if fingerprints:
            node.config.stash[fingerprints_key] = fingerprints


# -- fixtures users can use in their own tests ---------------------------------------


@pytest.fixture(scope="session")
def tox_session(request: pytest.FixtureRequest) -> Any:
    """The run's GateSession (built from the --tox-* options)."""
    config = request.config
    if session_key not in config.stash:
        from toxtests.session import GateSession

        try:
            config.stash[session_key] = GateSession(options_from_config(config))
        except ToxtestsError as exc:
            pytest.fail(str(exc), pytrace=False)
    return config.stash[session_key]


@pytest.fixture(scope="session")
def tox_model(tox_session: Any) -> Any:
    """The base model with every adapter attached (LoadedModel)."""
    return tox_session.loaded


@pytest.fixture(scope="session")
def tox_scorer(tox_session: Any) -> Any:
    """The configured scorer: `tox_scorer.score(texts)` -> attribute -> scores."""
    return tox_session.scorer


@pytest.fixture(scope="session")
def tox_shards(tox_session: Any) -> list[Any]:
    """The prompt shards, in their fixed order."""
    return tox_session.shards


@pytest.fixture(scope="session")
def tox_parent_scores(tox_session: Any) -> dict[str, Any]:
    """Shard name -> the parent's generations and scores (cached)."""
    return {shard.name: tox_session.shard_scores(None, shard) for shard in tox_session.shards}
