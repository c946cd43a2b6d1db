"""The torch engine behind the generation seam: one base in memory, adapters switched in.

Exact common random numbers: sample j of prompt p draws every token from the same
uniforms under the parent and each adapter, so an adapter that changes nothing gives
the same text by construction and the pairing needs no replay check.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

from toxtests.config import GenerationConfig
from toxtests.engines.base import (
    EXACT,
    MODEL,
    EngineInfo,
    EngineOptions,
    Generation,
    OnPromptDone,
    Variant,
    package_version,
)
from toxtests.engines.local import LocalTokenizers, local_variants, model_reference
from toxtests.models import choose_device, choose_dtype, describe_model
from toxtests.prompts import Prompt

if TYPE_CHECKING:
    from toxtests.engines.torch.tokenizer_process import Expected

# The generation format: bumped whenever the loop's arithmetic changes the text it
# produces, so a cache written by an earlier version is never read as this one's.
# v3: attention over each row's own positions (batch-invariant on the CPU).
# v4: a decode step's attention in one native call where a C compiler is at hand.
# v5: a single-row linear computed beside a zero row (oneDNN rounds one row otherwise).
# v6: a prefill's attention in the native call too (each query position as a decode step).
SAMPLER = "toxtests-crn-v6"


def sampling_path(device: str) -> str:
    """Which kernels draw and attend on `device`: the C top-p kernel and the numba path
    agree to rounding, not bit for bit (1 draw in ~9,000 differed), and so do the C and
    torch decode attentions, so no two of them share a key."""
    if not device.startswith("cpu"):
        return "torch"
    from toxtests.engines.torch import native, native_attention

    top_p = "native" if native.load() is not None else "numba"
    attention = "c-attention" if native_attention.load() is not None else "torch-attention"
    return f"{top_p}/{attention}"


def _batch_invariant(device: str, dtype: str) -> bool:
    from toxtests.engines.torch.attention import batch_invariant

    return batch_invariant(device, dtype)


class TorchEngine:
    """Generates with `toxtests.engines.torch.loop.Generator` on the loaded base."""

    def __init__(self, options: EngineOptions):
        self.options = options
        self._variants = local_variants(options)
        self._loaded: Any = None
        self._resident_spec: str | None = None
        self._heap_kept = False
        self._tokenizers = LocalTokenizers(options)
        self._generators: dict[GenerationConfig, Any] = {}
        self._identity: dict[str, str] | None = None
        self._resources = ExitStack()
        # The native decoder where it applies (`load.load_base`), until someone asks for
        # the model object itself (`loaded`), which is then transformers' and PEFT's.
        self._native = True
        self._early_tokenizer: Any = None
        self._tokenizer_started = False
        self._expected = False  # `expect` passed its hint on

    def _prestart_tokenizer(self, expected: Expected | None = None) -> None:
        """Start the base's tokenizer loading in its own process before torch is
        imported here (`load.prestart_tokenizer`): for a gate that generates it is ready
        when the model is, ~1 s sooner; a fully cached run closes it unused. `expected`:
        the prompts it will encode (`expect`)."""
        if self._tokenizer_started:
            return
        self._tokenizer_started = True
        from toxtests.engines.torch.load import prestart_tokenizer
        from toxtests.errors import ToxtestsError

        options = self.options
        if options.revision:  # a pinned Hub model resolves its commit while loading
            return
        try:
            self._early_tokenizer = prestart_tokenizer(
                options.model,
                cache_dir=options.cache_dir,
                trust_remote_code=options.trust_remote_code,
                expected=expected,
            )
        except (ToxtestsError, OSError):
            self._early_tokenizer = None  # load_base reports the problem, if it is one

    def describe(self) -> EngineInfo:
        self._prestart_tokenizer()  # before choose_device imports torch
        device = choose_device(self.options.device)
        dtype = choose_dtype(device, self.options.dtype)
        return EngineInfo(
            engine="torch",
            version=", ".join(
                f"{name} {package_version(name)}" for name in ("torch", "transformers", "peft")
            ),
            dtype=dtype,
            device=device.split(":")[0],
            sampler=f"{SAMPLER}/{sampling_path(device)}",
            pairing=EXACT,
            batch_invariant=_batch_invariant(device, dtype),
        )

    def model_identity(self) -> dict[str, str]:
        self._prestart_tokenizer()  # before describe_model imports torch
        if self._identity is None:
            # Described, not loaded: a fully cached re-run never loads the weights.
            self._identity = describe_model(
                self.options.model,
                cache_dir=self.options.cache_dir,
                device=self.options.device,
                dtype=self.options.dtype,
                revision=self.options.revision,
            )
        return self._identity

    def variants(self) -> list[Variant]:
        return list(self._variants)

    @property
    def loaded(self) -> Any:
        """The base with every adapter attached (`toxtests.engines.torch.load.LoadedModel`):
        a transformers model with PEFT adapters, for tests that use the model itself. The
        native decoder, where it was resident, gives way to it (the same text either way)."""
        if self._native:
            self._native = False
            if self._loaded is not None and getattr(self._loaded.model, "toxtests_native", False):
                self._drop()
        return self._resident(None)

    def _take_early_tokenizer(self) -> Any:
        started, self._early_tokenizer = self._early_tokenizer, None
        return started

    def _drop(self) -> None:
        """Free the resident model before another loads (one in memory at a time)."""
        self._generators.clear()
        self._loaded = None
        import gc

        gc.collect()

    def _resident(self, candidate: str | None) -> Any:
        """The base with its adapters (`candidate` None) or a full candidate model: one
        of them in memory at a time, so a CPU holds one model's weights, not two."""
        from toxtests.engines.torch.load import attach_adapters, load_base, native_adapters
        from toxtests.engines.torch.memory import retained_memory

        if self._loaded is not None and self._resident_spec == candidate:
            return self._loaded
        if self._loaded is not None:  # the other model goes before this one loads
            self._drop()
        options = self.options
        spec, revision = model_reference(options, candidate)
        adapters = list(options.adapters) if candidate is None else []
        model = load_base(
            spec,
            cache_dir=options.cache_dir,
            device=options.device,
            dtype=options.dtype,
            trust_remote_code=options.trust_remote_code,
            revision=revision,
            native=self._native and native_adapters(adapters),
            started_tokenizer=self._take_early_tokenizer() if candidate is None else None,
        )
        if candidate is None:
            model = attach_adapters(model, adapters, allow_pickle=options.allow_pickle)
        self._loaded, self._resident_spec = model, candidate
        self._tokenizers.remember(candidate, model.tokenizer)
        if not self._heap_kept:
            # One heap for every generation call of this engine: each call would otherwise
            # fault its first batch's ~1 GB of activations, caches and logits in afresh
            # (~250k page faults, 1-2 s a call on Gemma 3 270M). Given back on close().
            self._resources.enter_context(retained_memory())
            self._heap_kept = True
        return self._loaded

    def generator(self, settings: GenerationConfig, candidate: str | None = None) -> Any:
        """The decode loop for these settings on the resident model: probes and weight
        packing happen once per model."""
        early = self._early_tokenizer  # the base's tokenizer, maybe loading (taken below)
        with self._cores_shared(early):
            loaded = self._resident(candidate)
            if settings not in self._generators:
                from toxtests.engines.torch.loop import Generator

                if getattr(early, "kept", False):
                    # Kept by an earlier run, it is about done loading (~0.5 s from the
                    # start, then ~1.2 s more for prompts it did not keep, `expect`; the
                    # weights were mapped at ~1.3 s): the packing below then has every
                    # core to itself.
                    with contextlib.suppress(Exception):  # raised again at its first use
                        early.wait_ready()
                self._generators[settings] = Generator(
                    loaded.model, loaded.tokenizer, settings, loaded.device
                )
        return self._generators[settings]

    @contextmanager
    def _cores_shared(self, early: Any) -> Iterator[None]:
        """One torch thread while the base's tokenizer (`early`) may still be loading in
        its own process for seconds: torch's threads wait for each other at every
        parallel region, and one of two sharing a core with the tokenizer made the
        adapters' merge take 1.3 s instead of 0.2 (Gemma 3 270M, 2 cores). A kept
        tokenizer (`tokenizer_process.KeptTokenizer`) is waited for instead."""
        if early is None or getattr(early, "kept", False):
            yield
            return
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def expect(self, prompts: Sequence[Prompt], settings: GenerationConfig) -> None:
        """A hint that these prompts are about to be generated for: the base's tokenizer,
        starting in its own process before torch is imported here, gets ready to encode
        them meanwhile (`TokenizerProcess.expect`). Only the first hint is passed on: by
        the second the tokenizer has what it needs, or is in use."""
        if self._expected:
            return
        self._expected = True
        expected: Expected = ([prompt.text for prompt in prompts], settings.chat_template)
        if not self._tokenizer_started:
            self._prestart_tokenizer(expected)  # told as it starts
        elif self._early_tokenizer is not None:
            self._early_tokenizer.expect(*expected)

    def prepare(self, variant: Variant, settings: GenerationConfig) -> None:
        """Load the model `variant` runs on and its decode loop, so the gate can time
        that apart from generation."""
        self.generator(settings, variant.spec if variant.kind == MODEL else None)

    def generate(
        self,
        prompts: Sequence[Prompt],
        variant: Variant,
        settings: GenerationConfig,
        on_prompt_done: OnPromptDone | None = None,
    ) -> list[list[Generation]]:
        if variant.kind == MODEL:
            generator = self.generator(settings, variant.spec)
            return generator.generate(  # type: ignore[no-any-return]
                prompts, None, on_prompt_done=on_prompt_done, label=variant.name
            )
        generator = self.generator(settings)
        adapters = self._resident(None).adapters
        peft_name = None if variant.index is None else adapters[variant.index].peft_name
        return generator.generate(  # type: ignore[no-any-return]
            prompts, peft_name, on_prompt_done=on_prompt_done, label=variant.name
        )

    def generate_together(
        self,
        jobs: Sequence[tuple[Sequence[Prompt], Variant]],
        settings: GenerationConfig,
        on_prompt_done: Callable[[int, int, list[Generation]], None] | None = None,
    ) -> list[list[list[Generation]]]:
        """Several variants' continuations, [job][prompt][sample]: the parent's and the
        adapters' rows share batches where every row keeps its own bits (`Generator.
        generate_together`); a full candidate model goes one job at a time."""
        if any(variant.kind == MODEL for _, variant in jobs):
            results = []
            for job, (prompts, variant) in enumerate(jobs):
                done = None if on_prompt_done is None else functools.partial(on_prompt_done, job)
                results.append(self.generate(prompts, variant, settings, done))
            return results
        generator = self.generator(settings)
        adapters = self._resident(None).adapters
        return generator.generate_together(  # type: ignore[no-any-return]
            [
                (prompts, None if variant.index is None else adapters[variant.index].peft_name)
                for prompts, variant in jobs
            ],
            on_prompt_done=on_prompt_done,
            labels=[variant.name for _, variant in jobs],
        )

    def same_vocabulary(self, variant: Variant) -> bool:
        return self._tokenizers.same_vocabulary(variant)

    def prompt_rendering(self, variant: Variant, settings: GenerationConfig) -> str:
        return self._tokenizers.prompt_rendering(variant, settings)

    def close(self) -> None:
        if self._early_tokenizer is not None:
            self._take_early_tokenizer().close()
        self._generators.clear()
        self._loaded = None
        self._resources.close()
