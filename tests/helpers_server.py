"""A real vLLM OpenAI-compatible server for the openai engine's tests, started once.

vLLM's CPU build lives in its own venv (`helpers_engines.vllm_python`), so the server runs
as a subprocess of that venv's Python. The flags are the ones that made it start and not
crash on a 2-core, 24 GiB machine (see shared/notes/engines-measured.md): a CPU memory
share of 0.4, chunked prefill off (seeded requests crash the worker when a prefill is
chunked), a short context, both cores bound, fp32 so texts reproduce.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers_engines import IDENTITY, TOXIC, converted_gemma, free_port, vllm_python

READY_DEADLINE_S = 600.0  # a fresh venv on a busy machine: measured ~4 min


@dataclass(frozen=True)
class Server:
    """A running server: its base URL (`.../v1`), the model directory and its log."""

    url: str
    root: str  # scheme://host:port
    model_dir: Path
    log: Path
    process: subprocess.Popen[bytes]

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def _healthy(root: str) -> bool:
    try:
        with urllib.request.urlopen(f"{root}/health", timeout=2) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate the server's process group, then kill it if it does not exit."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@contextmanager
def vllm_server(dtype: str = "float32", extra: tuple[str, ...] = ()) -> Iterator[Server]:
    """Start `vllm.entrypoints.openai.api_server` serving `identity` and `toxic` adapters."""
    python = vllm_python()
    model_dir = converted_gemma()
    port = free_port()
    root = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp(prefix="toxtests-vllm-")) / "server.log"
    env = {
        **os.environ,
        "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0-1"),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
    }
    command = [
        str(python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir),
        "--dtype", dtype,
        "--enable-lora",
        "--lora-modules", f"identity={IDENTITY}", f"toxic={TOXIC}",
        "--max-lora-rank", "8",
        "--max-loras", "2",
        "--gpu-memory-utilization", "0.4",
        "--no-enable-chunked-prefill",
        "--max-num-batched-tokens", "8192",
        "--max-model-len", "256",
        "--host", "127.0.0.1",
        "--port", str(port),
        *extra,
    ]  # fmt: skip
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    server = Server(f"{root}/v1", root, model_dir, log, process)
    try:
        deadline = time.monotonic() + READY_DEADLINE_S
        while not _healthy(root):
            if process.poll() is not None:
                pytest.fail(
                    f"vLLM server exited with {process.returncode} before /health; "
                    f"log {log}:\n{server.log_tail()}",
                    pytrace=False,
                )
            if time.monotonic() > deadline:
                pytest.fail(
                    f"vLLM server not healthy after {READY_DEADLINE_S:.0f} s; "
                    f"log {log}:\n{server.log_tail()}",
                    pytrace=False,
                )
            time.sleep(1.0)
        yield server
    finally:
        _stop(process)
