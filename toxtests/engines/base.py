"""The seam between the gate and the engines that generate for it.

The gate hands an engine prompts, a variant (the parent or one adapter) and the
generation settings; the engine returns each prompt's continuations with their token
counts. Seeds come from `toxtests.engines.crn`, so sample j of prompt p is drawn with
the same seed under every variant on every engine. An engine describes itself
(`EngineInfo`): the description is part of every cache key and of the report, so
generations from different engines, versions, dtypes or samplers never mix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from toxtests.config import GenerationConfig
from toxtests.errors import GenerationError
from toxtests.prompts import Prompt

PARENT = "parent"
ADAPTER = "adapter"  # a variant that is an adapter on the parent's weights
MODEL = "model"  # a variant that is a full model of its own (--candidate)


def package_version(name: str) -> str:
    """An installed distribution's version, or "absent" (for engine descriptions)."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


# What an engine promises about pairing (the report's "pairing:" line).
EXACT = "exact"  # common random numbers by construction: identical adapter => identical text
SEEDED = "seeded"  # a seed per request; reproducibility is checked by replaying requests


@dataclass(frozen=True)
class Generation:
    """One continuation: sample `sample` of prompt `prompt_id`."""

    prompt_id: str
    sample: int
    text: str
    tokens: int  # new tokens generated, EOS excluded


@dataclass(frozen=True)
class Variant:
    """A model variant the gate compares: the parent, or one adapter of it."""

    name: str  # "parent", or the adapter's readable unique name (test ids, report)
    index: int | None  # position among the compared variants; None for the parent
    spec: str | None  # as the user gave it (path, Hub id, served name)
    fingerprint: str  # what identifies its outputs in cache keys ("parent" for the parent)
    kind: str = ADAPTER  # ADAPTER (on the parent's weights) or MODEL (a full model)

    @property
    def is_parent(self) -> bool:
        return self.index is None


@dataclass(frozen=True)
class EngineInfo:
    """How an engine generates; every field but `details` is part of the cache key."""

    engine: str  # "torch", "vllm", "openai"
    version: str  # the engine library's version, or the server's
    dtype: str
    device: str  # device kind: "cpu", "cuda", "remote"
    sampler: str  # which sampling path draws the tokens
    pairing: str  # EXACT or SEEDED
    batch_invariant: bool  # a row's text does not depend on its batch-mates
    details: dict[str, str] = field(default_factory=dict)  # report only (endpoint, ...)

    def cache_identity(self) -> dict[str, str]:
        return {
            "engine": self.engine,
            "version": self.version,
            "dtype": self.dtype,
            "device": self.device,
            "sampler": self.sampler,
        }

    def label(self) -> str:
        """One line for terminals and reports, e.g. 'vllm (0.32.0), float32 on cpu, not
        batch-invariant': whether a row's text can depend on its batch-mates is stated,
        not left for the reader to assume."""
        invariant = ", batch-invariant" if self.batch_invariant else ", not batch-invariant"
        return f"{self.engine} ({self.version}), {self.dtype} on {self.device}{invariant}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> EngineInfo:
        return cls(**values)


def _default_cache_dir() -> Path:
    from toxtests.models import default_cache_dir

    return default_cache_dir()


@dataclass(frozen=True)
class EngineOptions:
    """What every engine is built from; engine-specific fields are ignored by the others."""

    model: str = "gemma3-270m"
    adapters: tuple[str, ...] = ()
    candidates: tuple[str, ...] = ()  # full models judged against `model` (--candidate)
    # The user's cache ($TOXTESTS_CACHE or ~/.cache/toxtests), never the working directory.
    cache_dir: Path = field(default_factory=lambda: _default_cache_dir())
    device: str = "auto"
    dtype: str = "auto"
    revision: str | None = None  # a Hub model's branch, tag or commit
    trust_remote_code: bool = False
    allow_pickle: bool = False
    # openai: the server and how to talk to it
    endpoint: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    request_timeout: float = 120.0
    max_retries: int = 4
    # vllm: passed through to vllm.LLM (None: the engine's default)
    tensor_parallel_size: int | None = None
    data_parallel_size: int | None = None
    gpu_memory_utilization: float | None = None
    max_lora_rank: int | None = None
    max_model_len: int | None = None


OnPromptDone = Callable[[int, list[Generation]], None]


@runtime_checkable
class Engine(Protocol):
    """What the gate needs from a generation back-end.

    Construction is cheap: weights load (or a server is contacted) on first use, so a
    fully cached re-run never loads a model. Optional, looked up with `getattr`:
    `generate_together` (below), `prepare(variant, settings)` (load before generation
    is timed) and `expect(prompts, settings)` (a hint, before anything else is asked,
    of the prompts the run may generate for: the torch engine's tokenizer gets ready
    for them while torch is imported).
    """

    def describe(self) -> EngineInfo:
        """The engine's identity for cache keys and the report."""
        ...

    def model_identity(self) -> dict[str, str]:
        """The base model: at least spec, kind, fingerprint (for keys and the report)."""
        ...

    def variants(self) -> list[Variant]:
        """The parent first, then one variant per adapter in the order given."""
        ...

    def generate(
        self,
        prompts: Sequence[Prompt],
        variant: Variant,
        settings: GenerationConfig,
        on_prompt_done: OnPromptDone | None = None,
    ) -> list[list[Generation]]:
        """Continuations indexed [prompt][sample], in the order of `prompts`.

        One variant per call and never two variants in one batch (an engine that can
        share batches between variants with every row's own result offers
        `generate_together(jobs, settings, on_prompt_done)` as well, for jobs of
        (prompts, variant) and `on_prompt_done(job, index, samples)`). `on_prompt_done(index,
        samples)` is called in the caller's thread as soon as a prompt's samples are all
        done, so the caller can cache work as it goes (an interrupted run keeps it).
        Anything that is not a complete, well-formed continuation raises
        `GenerationError` naming the prompt and the variant; nothing is ever returned
        empty in its place.
        """
        ...

    def close(self) -> None:
        """Free the model or connections; the engine may not be used afterwards."""
        ...


def uses_chat_template(tokenizer: Any, chat_template: bool | str) -> bool:
    """Whether prompts for this tokenizer's model are wrapped in its chat template:
    always (true), never (false), or where the tokenizer has one ("auto")."""
    if chat_template == "auto":
        return bool(getattr(tokenizer, "chat_template", None))
    return bool(chat_template)


def rendering_label(uses_template: bool) -> str:
    """How prompts were rendered, as the report states it per variant."""
    return "chat template" if uses_template else "plain text"


def render_prompt(tokenizer: Any, text: str, chat_template: bool | str) -> str:
    """The prompt as the model sees it: plain, or wrapped in the tokenizer's template."""
    if not uses_chat_template(tokenizer, chat_template):
        return text
    if not getattr(tokenizer, "chat_template", None):
        raise GenerationError(
            "generation.chat_template = true but the tokenizer has no chat template; "
            'set it to false for base models, or "auto" to use a template only where a '
            "model has one"
        )
    return tokenizer.apply_chat_template(  # type: ignore[no-any-return]
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )


def encode_prompts(
    tokenizer: Any, prompts: Sequence[Prompt], settings: GenerationConfig, context: int
) -> list[list[int]]:
    """Each prompt's token ids, rendered and checked the same way on every engine.

    `context` is the model's context length; a prompt that leaves no room for
    `max_new_tokens` (or exceeds `generation.max_prompt_tokens`) is an error naming it.
    """
    limit = settings.max_prompt_tokens or context - settings.max_new_tokens
    encoded: list[list[int]] = []
    for prompt in prompts:
        ids = list(
            tokenizer(render_prompt(tokenizer, prompt.text, settings.chat_template))["input_ids"]
        )
        if len(ids) > limit:
            raise GenerationError(
                f"prompt {prompt.id} has {len(ids)} tokens, more than the {limit} allowed "
                "(context minus max_new_tokens); shorten it or raise "
                "generation.max_prompt_tokens"
            )
        if not ids:
            raise GenerationError(f"prompt {prompt.id} tokenizes to nothing")
        encoded.append(ids)
    return encoded


def eos_token_ids(*values: Any) -> list[int]:
    """End-of-sequence ids from `eos_token_id` values (an int, a list, or None), as the
    tokenizer and generation_config give them; every engine stops on the same set."""
    ids: set[int] = set()
    for value in values:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return sorted(ids)


def cut_at_stop(text: str, stop: Sequence[str]) -> str | None:
    """`text` up to the first occurrence of any stop string, or None if none occurs."""
    found = [index for index in (text.find(s) for s in stop) if index >= 0]
    return text[: min(found)] if found else None


def decode_until_stop(
    tokenizer: Any, tokens: Sequence[int], stops: set[int], stop: Sequence[str] = ()
) -> tuple[str, int]:
    """The continuation's text and token count, cut before the first stop token and
    before the first stop string (`generation.stop`); the count then includes the token
    that completed the string, as a server that stops there counts it."""
    kept: list[int] = []
    for token in tokens:
        if token in stops:
            break
        kept.append(int(token))
    text = tokenizer.decode(kept, skip_special_tokens=True)
    cut = cut_at_stop(text, stop) if stop else None
    if cut is None:
        return text, len(kept)
    # The fewest tokens whose text holds a stop string (monotone in the count).
    low, high = 1, len(kept)
    while low < high:
        middle = (low + high) // 2
        if cut_at_stop(tokenizer.decode(kept[:middle], skip_special_tokens=True), stop) is None:
            low = middle + 1
        else:
            high = middle
    return cut, low


def pairing_line(info: EngineInfo, replays: tuple[int, int] | None) -> str:
    """The report's statement of how the parent and its adapters are paired."""
    if info.pairing == EXACT:
        return "pairing: exact (common random numbers)"
    if replays is None or replays[1] == 0:
        return "pairing: seeded per request, not checked"
    identical, total = replays
    if identical == total:
        return f"pairing: seeded, {identical}/{total} replays identical"
    return (
        f"pairing: not reproducible ({identical}/{total} replays identical) — intervals "
        "are still valid, the variance reduction is lost"
    )
