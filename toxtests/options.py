"""One table of options: it builds the CLI's flags (`--model`) and the pytest plugin's
(`--tox-model`), so the two can never drift apart.

Values are checked by argparse `type=` callables, so a bad value is a usage error
before anything loads, in both front ends.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from toxtests.config import PRESETS
from toxtests.engines import ENGINES
from toxtests.errors import ConfigError
from toxtests.models import DEFAULT_MODEL


@dataclass
class RunOptions:
    """What a user chooses on the command line; everything else is in thresholds.toml."""

    model: str = DEFAULT_MODEL
    adapters: list[str] = field(default_factory=list)
    candidates: list[str] = field(default_factory=list)
    prompts: str | None = None
    scorer: str | None = None
    thresholds: str | None = None
    preset: str | None = None
    samples: int | None = None
    max_new_tokens: int | None = None
    greedy: bool = False
    report: str | None = "toxtests-report.html"
    json: str | None = "toxtests-results.json"
    limit: int = 0
    cache_dir: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    revision: str | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False
    early_stopping: bool | None = None  # None: thresholds.toml's statistics.early_stopping
    engine: str = "torch"
    endpoint: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    request_timeout: float = 120.0
    max_retries: int = 4
    pairing_replays: int = 16
    tensor_parallel_size: int | None = None
    data_parallel_size: int | None = None
    gpu_memory_utilization: float | None = None
    max_lora_rank: int | None = None
    max_model_len: int | None = None
    baseline: str | None = None


def _whole(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _fraction(text: str) -> float:
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {value}")
    return value


def _endpoint(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(
            f"expected a base URL like http://127.0.0.1:8000/v1, got {text!r}"
        )
    return text.rstrip("/")


@dataclass(frozen=True)
class Option:
    """One user option: `--<flag>` on the CLI, `--tox-<flag>` under pytest."""

    dest: str  # the RunOptions field
    flag: str
    help: str
    kwargs: dict[str, Any] = field(default_factory=dict)


OPTIONS: tuple[Option, ...] = (
    Option(
        "model",
        "model",
        "Base model: gemma3-270m (embedded, default), smollm2-135m, a .gguf file, a "
        "transformers directory or a Hub id; with --engine openai, the served model "
        "(default: the server's only base model).",
        {"default": DEFAULT_MODEL},
    ),
    Option(
        "adapters",
        "adapter",
        "PEFT adapter directory or Hub id to judge against its parent (repeatable); "
        "demo:identity and demo:toxic are shipped; with --engine openai a served name, "
        "or PATH=SERVED_NAME.",
        {"action": "append", "default": []},
    ),
    Option(
        "candidates",
        "candidate",
        "A full model (transformers directory, .gguf file, or Hub id pinned as "
        "ORG/NAME@REVISION) to judge against --model like an adapter: a fine-tune, a "
        "merged LoRA (repeatable).",
        {"action": "append", "default": []},
    ),
    Option(
        "prompts",
        "prompts",
        "Prompts: RealToxicityPrompts JSONL, plain JSONL (id, text), a text file, or "
        "rtp:challenging (Hub). Default: the demo prompts.",
    ),
    Option(
        "scorer",
        "scorer",
        "Scorer, overriding thresholds.toml: profanity-check, detoxify:<variant|path.ckpt>, "
        "hf:<id or path>.",
    ),
    Option(
        "thresholds",
        "thresholds",
        "The gate's thresholds.toml (default: ./thresholds.toml when present, else the "
        "built-in limits).",
    ),
    Option(
        "preset",
        "preset",
        "A protocol by name, under thresholds.toml's keys: rtp (25 samples of 20 tokens, "
        "top-p 0.9, expected max toxicity and toxicity probability gated) or hawkins2024 "
        "(greedy, 50 tokens, RoBERTa hate-speech scorer, Bayesian interval).",
        {"choices": PRESETS},
    ),
    Option(
        "samples",
        "samples",
        "Continuations per prompt, overriding generation.samples.",
        {"type": _whole(1)},
    ),
    Option(
        "max_new_tokens",
        "max-new-tokens",
        "Tokens generated per continuation, overriding generation.max_new_tokens.",
        {"type": _whole(1)},
    ),
    Option(
        "greedy",
        "greedy",
        "Decode greedily (generation.do_sample = false).",
        {"action": "store_true", "default": False},
    ),
    Option(
        "report",
        "report",
        "HTML report path (default: toxtests-report.html; '' for none).",
        {"default": "toxtests-report.html"},
    ),
    Option(
        "json",
        "json",
        "JSON results path (default: toxtests-results.json; '' for none).",
        {"default": "toxtests-results.json"},
    ),
    Option(
        "limit",
        "limit",
        "Deterministic stratified subset of N prompts (default: 0 = all).",
        {"type": _whole(0), "default": 0},
    ),
    Option(
        "cache_dir",
        "cache-dir",
        "Cache of converted models, generations and scores "
        "(default: $TOXTESTS_CACHE or ~/.cache/toxtests).",
    ),
    Option(
        "device",
        "device",
        "Device for generation and scoring: cpu, cuda, cuda:1 (default: auto).",
        {"default": "auto"},
    ),
    Option(
        "dtype",
        "dtype",
        "Weights' dtype: float32, bfloat16, float16 (default: auto = fp32 on a CPU, bf16 "
        "or fp16 on a GPU).",
        {"default": "auto", "choices": ("auto", "float32", "bfloat16", "float16")},
    ),
    Option(
        "revision",
        "revision",
        "A Hub --model's branch, tag or commit (default: main); its resolved commit is "
        "part of every cache key.",
    ),
    Option(
        "allow_pickle",
        "allow-pickle",
        "Allow pickle-based checkpoints with unverified hashes (default: off).",
        {"action": "store_true", "default": False},
    ),
    Option(
        "trust_remote_code",
        "trust-remote-code",
        "Allow model repositories to run their own code (default: off).",
        {"action": "store_true", "default": False},
    ),
    Option(
        "early_stopping",
        "no-early-stopping",
        "Generate every prompt even once the verdict is settled (default: stop early, as "
        "statistics.early_stopping says).",
        {"action": "store_const", "const": False, "default": None},
    ),
    Option(
        "engine",
        "engine",
        "What generates: "
        + "; ".join(f"{name} = {about}" for name, (_, _, about) in ENGINES.items())
        + " (default: torch).",
        {"default": "torch", "choices": tuple(ENGINES)},
    ),
    Option(
        "endpoint",
        "endpoint",
        "--engine openai: the server's base URL, e.g. http://127.0.0.1:8000/v1.",
        {"type": _endpoint},
    ),
    Option(
        "api_key_env",
        "api-key-env",
        "--engine openai: environment variable holding the API key (default: "
        "OPENAI_API_KEY; never printed).",
        {"default": "OPENAI_API_KEY"},
    ),
    Option(
        "concurrency",
        "concurrency",
        "--engine openai: requests in flight at once (default: 8).",
        {"type": _whole(1), "default": 8},
    ),
    Option(
        "request_timeout",
        "request-timeout",
        "--engine openai: seconds to wait for one response (default: 120).",
        {"type": _positive_float, "default": 120.0},
    ),
    Option(
        "max_retries",
        "max-retries",
        "--engine openai: retries of a request on 429, 5xx, timeouts and dropped "
        "connections, with backoff (default: 4).",
        {"type": _whole(0), "default": 4},
    ),
    Option(
        "pairing_replays",
        "pairing-replays",
        "Seeded engines: parent prompts re-generated alone to check that pairing holds "
        "(default: 16; 0 skips the check).",
        {"type": _whole(0), "default": 16},
    ),
    Option(
        "tensor_parallel_size",
        "tensor-parallel-size",
        "--engine vllm: GPUs each model is split over (default: 1).",
        {"type": _whole(1)},
    ),
    Option(
        "data_parallel_size",
        "data-parallel-size",
        "--engine vllm: model replicas generating side by side (default: 1).",
        {"type": _whole(1)},
    ),
    Option(
        "gpu_memory_utilization",
        "gpu-memory-utilization",
        "--engine vllm: share of device memory vLLM may take (on a CPU: of RAM).",
        {"type": _fraction},
    ),
    Option(
        "max_lora_rank",
        "max-lora-rank",
        "--engine vllm: largest LoRA rank (default: the adapters' largest).",
        {"type": _whole(1)},
    ),
    Option(
        "baseline",
        "baseline",
        "The parent's generations and scores from `toxtests baseline` (an archive, or a "
        "directory of them): restored into the cache so only the adapters are generated; "
        "refused, naming what differs, when model, prompts, settings or scorer differ.",
    ),
    Option(
        "max_model_len",
        "max-model-len",
        "--engine vllm: context length vLLM reserves (default: fits the prompts).",
        {"type": _whole(1)},
    ),
)

assert {o.dest for o in OPTIONS} == {f.name for f in fields(RunOptions)}, "table != RunOptions"


def add_options(add: Callable[..., Any], prefix: str, skip: frozenset[str] = frozenset()) -> None:
    """Register every option (but those in `skip`) through `add` (argparse's or pytest's
    `addoption`)."""
    for option in OPTIONS:
        if option.dest in skip:
            continue
        add(
            f"--{prefix}{option.flag}", dest=dest(option, prefix), help=option.help, **option.kwargs
        )


def dest(option: Option, prefix: str) -> str:
    return prefix.replace("-", "_") + option.dest


def config_overrides(options: RunOptions) -> dict[str, Any]:
    """The thresholds keys the command line sets ({} when it sets none)."""
    generation: dict[str, Any] = {}
    if options.samples is not None:
        generation["samples"] = options.samples
    if options.max_new_tokens is not None:
        generation["max_new_tokens"] = options.max_new_tokens
    if options.greedy:
        generation["do_sample"] = False
    return {"generation": generation} if generation else {}


DEMO_ADAPTERS = Path(__file__).resolve().parent / "data" / "adapters"


def demo_adapter(spec: str) -> str:
    """`demo:identity` and `demo:toxic`: the two LoRA adapters of Gemma 3 270M shipped in
    the package (one identical to its parent, one trained to be toxic); other specs as
    given."""
    if not spec.startswith("demo:"):
        return spec
    path = DEMO_ADAPTERS / spec.removeprefix("demo:")
    if not path.is_dir():
        shipped = ", ".join(f"demo:{p.name}" for p in sorted(DEMO_ADAPTERS.iterdir()))
        raise ConfigError(f"--adapter {spec}: no such demo adapter; shipped: {shipped}")
    return str(path)


def run_options(get: Callable[[str], Any], prefix: str) -> RunOptions:
    """RunOptions from parsed values (`get(dest)`); '' for a path means none."""
    values = {option.dest: get(dest(option, prefix)) for option in OPTIONS}
    values["adapters"] = [demo_adapter(spec) for spec in values["adapters"] or []]
    values["candidates"] = list(values["candidates"] or [])
    for path in ("report", "json"):
        values[path] = values[path] or None
    return RunOptions(**values)
