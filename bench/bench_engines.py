"""Benchmark: the same gate through each engine, tokens/s side by side, in one run.

    python bench/bench_engines.py                 # 256 challenging prompts, every engine
    python bench/bench_engines.py --limit 900     # the default workload (vLLM: ~15 min)
    python bench/bench_engines.py --engines torch,vllm

Workload: Gemma 3 270M (the packaged model, converted), parent + the identity adapter,
the challenging RealToxicityPrompts in ../shared/data/rtp/toxic.jsonl, 20 new tokens,
top-p 0.9, one sample, early stopping off, a cold cache for generations. `torch` runs
in this Python; `vllm` (in process) and `openai` (against vLLM's OpenAI-compatible
server on 127.0.0.1) run from the vLLM venv (.venv-vllm, or $TOXTESTS_VLLM_PYTHON),
each engine in its own process so none shares memory or threads with another.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PROMPTS = REPO.parent / "shared" / "data" / "rtp" / "toxic.jsonl"
IDENTITY = REPO / "toxtests" / "data" / "adapters" / "identity"
TOXIC = REPO / "toxtests" / "data" / "adapters" / "toxic"


def vllm_python() -> Path:
    configured = os.environ.get("TOXTESTS_VLLM_PYTHON")
    return Path(configured) if configured else REPO / ".venv-vllm" / "bin" / "python"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def child(args: argparse.Namespace) -> None:
    """Run one gate on one engine in this process and print its figures as JSON."""
    from toxtests.options import RunOptions
    from toxtests.run import GateRun

    workdir = Path(args.workdir)
    options = RunOptions(
        model=args.model,
        adapters=[args.adapter],
        prompts=str(workdir / "prompts.jsonl"),
        thresholds=str(workdir / "thresholds.toml"),
        cache_dir=str(workdir / f"cache-{args.engine}"),
        report="",
        json="",
        early_stopping=False,
        engine=args.engine,
        endpoint=args.endpoint,
        concurrency=args.concurrency,
    )
    started = time.perf_counter()
    run = GateRun(options)
    result = run.result()
    wall = time.perf_counter() - started
    seconds = run.timings.seconds
    engine = result.engine
    run.close()
    print(
        "FIGURES "
        + json.dumps(
            {
                "engine": engine.label(),
                "pairing": result.pairing.line,
                "wall": wall,
                "load": seconds["load"],
                "generate": seconds["generate"],
                "tokens": run.timings.generated_tokens,
                "verdicts": [a.verdict for a in result.adapters],
                "identity_deltas": [m["delta"] for m in result.adapters[0].metrics.values()],
            }
        ),
        flush=True,
    )


def start_server(python: Path, model: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    import urllib.request

    cores = sorted(os.sched_getaffinity(0))
    env = {
        **os.environ,
        "VLLM_CPU_OMP_THREADS_BIND": f"{cores[0]}-{cores[-1]}",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_NO_USAGE_STATS": "1",
    }
    command = [
        str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model,
        "--dtype", "float32", "--enable-lora", "--lora-modules", f"identity={IDENTITY}",
        f"toxic={TOXIC}", "--max-lora-rank", "8", "--gpu-memory-utilization", "0.4",
        "--no-enable-chunked-prefill", "--max-num-batched-tokens", "8192",
        "--max-model-len", "2048", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"vLLM server exited; see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return process
        except OSError:
            time.sleep(1)
    process.kill()
    raise SystemExit(f"vLLM server not ready after 300 s; see {log}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=256)
    parser.add_argument("--prompts", default=str(DEFAULT_PROMPTS))
    parser.add_argument("--engines", default="torch,vllm,openai")
    parser.add_argument("--concurrency", type=int, default=16, help="openai: in flight")
    parser.add_argument("--json", default="", help="also write the figures here")
    # Internal: one engine's gate in a child process.
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--adapter", default=str(IDENTITY), help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from toxtests.models import default_cache_dir, resolve_model
    from toxtests.prompts import load_prompts
    from toxtests.shards import stratified_subset

    model, _, _ = resolve_model("gemma3-270m", default_cache_dir())  # converts once
    loaded = load_prompts(args.prompts).prompts
    prompts = stratified_subset(loaded, args.limit) if args.limit else loaded
    workdir = Path(tempfile.mkdtemp(prefix="toxtests-bench-engines-"))
    (workdir / "prompts.jsonl").write_text(
        "".join(json.dumps({"id": p.id, "text": p.text}) + "\n" for p in prompts)
    )
    (workdir / "thresholds.toml").write_text(
        "[generation]\nmax_new_tokens = 20\ntop_p = 0.9\nsamples = 1\n"
    )
    print(
        f"workload: Gemma 3 270M, parent + identity adapter, {len(prompts)} prompts, 20 new "
        f"tokens, top-p 0.9, fp32, early stopping off; {cpu_name()}, "
        f"{len(os.sched_getaffinity(0))} cores, {time.strftime('%Y-%m-%d')}",
        flush=True,
    )
    figures = {}
    for engine in args.engines.split(","):
        python = Path(sys.executable) if engine == "torch" else vllm_python()
        if not python.exists():
            print(f"{engine}: skipped, no vLLM venv at {python}")
            continue
        command = [
            str(python), __file__, "--child", "--engine", engine, "--workdir", str(workdir),
            "--model", model, "--concurrency", str(args.concurrency),
        ]  # fmt: skip
        server = None
        if engine == "openai":
            port = 8000 + os.getpid() % 1000
            started = time.perf_counter()
            server = start_server(python, model, port, workdir / "server.log")
            print(f"openai: vLLM server ready in {time.perf_counter() - started:.0f} s")
            command += ["--endpoint", f"http://127.0.0.1:{port}/v1", "--adapter", "identity"]
        try:
            done = subprocess.run(command, capture_output=True, text=True)
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=60)
        line = next((x for x in done.stdout.splitlines() if x.startswith("FIGURES ")), None)
        if done.returncode != 0 or line is None:
            print(f"{engine}: failed (exit {done.returncode})\n{done.stderr[-3000:]}")
            continue
        run = json.loads(line.removeprefix("FIGURES "))
        run["tokens_per_s"] = run["tokens"] / run["generate"] if run["generate"] else 0.0
        figures[engine] = run
        print(
            f"{engine}: {run['engine']}; wall {run['wall']:.1f} s = load {run['load']:.1f} + "
            f"generate {run['generate']:.1f} + rest; {run['tokens']} tokens, "
            f"{run['tokens_per_s']:.1f} tokens/s; identity deltas {run['identity_deltas']}; "
            f"{run['pairing']}",
            flush=True,
        )
    if "torch" in figures:
        base = figures["torch"]["tokens_per_s"]
        for engine, run in figures.items():
            print(f"{engine}: {run['tokens_per_s'] / base:.2f}x the torch engine's tokens/s")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
