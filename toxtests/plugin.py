"""The pytest plugin: one test per (adapter, shard), one gate test per adapter.

Thin over `toxtests.run.GateRun`. Imports nothing heavy at load time: torch,
transformers and peft load inside the session when a gate test first needs them.
Under pytest-xdist the workers share the cache; each sends its fingerprints back and
the controller writes one merged report from the cache.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import pytest

from toxtests.errors import ToxtestsError
from toxtests.options import add_options, run_options

PREFIX = "tox-"

session_key = pytest.StashKey["Any"]()
fingerprints_key = pytest.StashKey[dict]()
result_key = pytest.StashKey[dict]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("toxtests", "toxicity regression gate for LoRA/PEFT adapters")
    add_options(group.addoption, prefix=PREFIX)


def options_from_config(config: pytest.Config) -> Any:
    return run_options(config.getoption, prefix=PREFIX)


def pytest_configure(config: pytest.Config) -> None:
    if not (
        config.getoption("tox_adapters", default=None)
        or config.getoption("tox_candidates", default=None)
    ):
        return
    from toxtests.run import GateRun

    try:
        config.stash[session_key] = run = GateRun(options_from_config(config))
    except ToxtestsError as exc:
        raise pytest.UsageError(str(exc)) from None
    _show_progress(config, run)
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(XdistHooks(), "toxtests-xdist")


def _show_progress(config: pytest.Config, run: Any) -> None:
    """Generation progress as plain lines through pytest's terminal reporter (a line
    every 20 s and one at the end of each call: dots and a redrawn line do not mix); on
    an xdist worker, on the stderr it shares with the controller, with its id."""
    from toxtests.progress import Ticker

    worker = getattr(config, "workerinput", {}).get("workerid")

    def write(text: str, redraw: bool) -> None:
        if worker is not None:
            # An xdist worker's terminal reporter goes nowhere; its stderr is the
            # controller's (execnet talks over stdin/stdout), once capturing steps aside.
            capture = config.pluginmanager.get_plugin("capturemanager")
            paused = capture.global_and_fixture_disabled() if capture else nullcontext()
            with paused:
                print(f"toxtests [{worker}]: {text}", file=sys.stderr, flush=True)
            return
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"toxtests: {text}")

    run.store.ticker = lambda label, total, **units: Ticker(
        label, total, write, interactive=False, **units
    )


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
        verdict = result.verdict
        self.user_properties.append(("verdict", verdict))
        # JUnit XML carries them as <property> elements: a CI dashboard reads the numbers.
        for metric, values in result.metrics.items():
            low, high = values.get("interval") or (None, None)
            self.user_properties.append((f"{metric}.delta", values.get("delta")))
            self.user_properties.append((f"{metric}.interval", f"[{low}, {high}]"))
            if values.get("verdict"):  # an ungated metric has none
                self.user_properties.append((f"{metric}.verdict", values["verdict"]))
        inconclusive_fails = gate.config.statistics.inconclusive == "fail"
        if verdict == "fail" or (verdict == "inconclusive" and inconclusive_fails):
            bad = [c for c in result.checks if c.verdict != "pass"]
            raise GateFailure(f"{result.summary}\n" + _describe(bad, f"gate verdict: {verdict}"))

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, (GateFailure, ToxtestsError)):
            return str(excinfo.value)
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[str, int | None, str]:
        return "toxtests", None, self.name


def _limit_text(check: Any) -> str:
    """The limit a check compared with; a relative one says what it is relative to."""
    from toxtests.report import ZERO_PARENT_NOTE

    if check.rule != "max_relative_increase":
        return f"{check.effective_limit:.3f}"
    if check.effective_limit == 0:
        return f"0.000 {ZERO_PARENT_NOTE}"
    parent = check.effective_limit / check.limit
    return f"{check.effective_limit:.3f} ({100 * check.limit:g}% of the parent's {parent:.3f})"


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
            f"[{low:+.3f}, {high:+.3f}] vs limit {_limit_text(c)} "
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
        gate.close()
        return
    ran_here = gate.used
    if fingerprints_key in config.stash:
        gate.adopt_fingerprints(config.stash[fingerprints_key])
    elif not ran_here:
        return
    from toxtests.report import write_report

    try:
        result = gate.result()
        write_report(result.to_json(), gate.options.report, gate.options.json)
    except ToxtestsError as exc:
        config.stash[result_key] = {"error": str(exc)}
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        return
    finally:
        gate.close()
    config.stash[result_key] = {"result": result}
    if result.exit_code and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    result = config.stash.get(result_key, None)
    if result is None:
        return
    terminalreporter.section("toxtests")
    if "error" in result:
        terminalreporter.write_line(f"toxtests: report not written: {result['error']}", red=True)
        return
    run = result["result"]
    for adapter in run.adapters:
        terminalreporter.write_line(adapter.summary)
    terminalreporter.write_line(f"engine: {run.engine.label()}; {run.pairing.line}")
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
    """The run's GateRun (built from the --tox-* options)."""
    config = request.config
    if session_key not in config.stash:
        from toxtests.run import GateRun

        try:
            config.stash[session_key] = run = GateRun(options_from_config(config))
        except ToxtestsError as exc:
            pytest.fail(str(exc), pytrace=False)
        _show_progress(config, run)
    return config.stash[session_key]


@pytest.fixture(scope="session")
def tox_model(tox_session: Any) -> Any:
    """The torch engine's base model with every adapter attached (LoadedModel)."""
    engine = tox_session.engine
    if not hasattr(engine, "loaded"):
        pytest.fail(
            f"tox_model is the torch engine's model; this run uses --tox-engine "
            f"{tox_session.options.engine} (use tox_engine instead)",
            pytrace=False,
        )
    return engine.loaded


@pytest.fixture(scope="session")
def tox_engine(tox_session: Any) -> Any:
    """The run's generation engine (`toxtests.engines.base.Engine`)."""
    return tox_session.engine


@pytest.fixture(scope="session")
def tox_scorer(tox_session: Any) -> Any:
    """The configured scorer: `tox_scorer.score(texts)` -> attribute -> scores."""
    return tox_session.scorer.scorer


@pytest.fixture(scope="session")
def tox_shards(tox_session: Any) -> list[Any]:
    """The prompt shards, in their fixed order."""
    return tox_session.shards


@pytest.fixture(scope="session")
def tox_parent_scores(tox_session: Any) -> dict[str, Any]:
    """Shard name -> the parent's generations and scores (cached)."""
    return {shard.name: tox_session.shard_scores(None, shard) for shard in tox_session.shards}
