"""Generation engines, registered by name; the gate imports only this and `base`.

Each engine lives in its own module and is imported only when chosen, so the torch
engine's kernels, vLLM and the HTTP client load only for the runs that use them.
"""

from __future__ import annotations

from importlib import import_module

from toxtests.engines.base import Engine, EngineOptions
from toxtests.errors import ConfigError

# name -> (module, class, what it is for)
ENGINES: dict[str, tuple[str, str, str]] = {
    "torch": (
        "toxtests.engines.torch",
        "TorchEngine",
        "toxtests' own transformers loop: fastest on a CPU, exact common random numbers",
    ),
    "vllm": (
        "toxtests.engines.vllm",
        "VllmEngine",
        "vLLM in process: multi-LoRA, tensor/data parallel on GPUs",
    ),
    "openai": (
        "toxtests.engines.openai",
        "OpenAIEngine",
        "any OpenAI-compatible /v1/completions server (vLLM, llama.cpp, SGLang, TGI)",
    ),
}


def create_engine(name: str, options: EngineOptions) -> Engine:
    """The engine called `name`, built from `options` (cheap: nothing loads yet)."""
    if name not in ENGINES:
        raise ConfigError(
            f"--engine {name!r} is not an engine; choose one of: {', '.join(ENGINES)}"
        )
    module, cls, _ = ENGINES[name]
    engine: Engine = getattr(import_module(module), cls)(options)
    return engine
