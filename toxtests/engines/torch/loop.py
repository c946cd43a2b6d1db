"""The torch engine's decode loop: batched, left-padded, length-bucketed, with common
random numbers.

Sample j of prompt p draws its tokens from uniforms seeded by (seed, p, j) alone, so
the parent and every adapter see the same random numbers: an adapter that changes
nothing produces the same text, and a paired comparison sees only its real effect.
The continuation is cut at the token level (new token ids decoded on their own), never
by character count of a re-decoded string.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np

from toxtests.config import GenerationConfig
from toxtests.engines.base import Generation, decode_until_stop, encode_prompts, eos_token_ids
from toxtests.engines.crn import sample_uniforms
from toxtests.engines.torch.attention import (
    LAYOUT_KEYWORD,
    RowLayout,
    batch_invariant,
    row_attention_applies,
    row_attention_on,
)
from toxtests.engines.torch.memory import retained_memory
from toxtests.engines.torch.prefill import FORWARD_OVERHEAD
from toxtests.errors import GenerationError
from toxtests.prompts import Prompt


def native(model: Any) -> bool:
    """Whether `model` is toxtests' own decoder (`toxtests.engines.torch.gemma3`): row
    attention built in, LoRA adapters switched by name, no transformers hooks."""
    return bool(getattr(model, "toxtests_native", False))


def _dtype_name(model: Any) -> str:
    parameter = next(iter(model.parameters()), None)
    return str(parameter.dtype).removeprefix("torch.") if parameter is not None else ""


def context_length(model: Any) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "max_position_embeddings", 0) or 1 << 30)


# The widest CPU batch: each decode step re-reads every weight (the output head's 671 MB
# on Gemma 3 270M), so wide batches pay, up to where a step's (rows x vocab) logits and
# the KV cache cost more in memory traffic than the shared reads save. On Gemma 3 270M,
# 450-row batches beat 225-row ones and wider ones did not beat 450 (README, *Speed*).
CPU_MAX_ROWS = 512


def _repeat_index(counts: list[int], device: Any) -> Any:
    """Row i of the result is row j of the input for counts[j] consecutive i."""
    import torch

    return torch.repeat_interleave(
        torch.arange(len(counts), device=device), torch.tensor(counts, device=device)
    )


@functools.cache
def cache_keyword() -> str:
    """What a model's forward calls its KV cache: `cache` from transformers 5.2x, where
    `past_key_values` still works but logs a deprecation line, else `past_key_values`."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = getattr(CausalLMOutputWithPast, "__dataclass_fields__", {})
    return "cache" if "cache" in fields else "past_key_values"


@contextmanager
def quiet_library_warnings() -> Iterator[None]:
    """transformers' deprecation notices about its own cache keywords, printed once per
    call (so once per shard), say nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*past_key_values.*deprecated")
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated")
        yield


def available_memory() -> int:
    """Bytes the system can still give (MemAvailable), or 0 where it cannot tell."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def auto_batch_size(model: Any, device: str) -> int:
    """A batch size from free memory: large batches amortise the weights' reads."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(max(8, min(256, free // (512 << 20))))
    # A row holds a (vocab,) float32 buffer at each step (logits, then probabilities in
    # place), the chunk being projected and the nucleus scratch: three vocabularies of
    # floats; keep them within an eighth of the free memory. With its KV cache, prefill
    # activations and the heap kept between steps a row takes about twice that (peak RSS
    # at 450 rows against 225 on Gemma 3 270M), so a batch stays within about a quarter
    # of what is free.
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    per_row = 3 * 4 * max(vocab, 32_000)
    free = available_memory()
    if not free:
        return 128
    return int(max(8, min(CPU_MAX_ROWS, free // (8 * per_row))))


def balanced_batches(count: int, largest: int) -> list[tuple[int, int]]:
    """[start, end) of as few batches as `largest` allows, of sizes differing by at most
    one: 900 rows at 128 are 8 batches of 112-113, not 7 of 128 and a last one of 4
    that re-reads every weight 20 times for 80 tokens (~3% of a gate on Gemma 3 270M)."""
    batches = -(-count // largest)
    bounds = [count * index // batches for index in range(batches + 1)] if batches else [0]
    return list(zip(bounds, bounds[1:], strict=False))


def mixing_pays(job_rows: list[int], largest: int) -> bool:
    """Whether variants sharing batches makes fewer (so wider) batches than one variant
    at a time: 128 prompts of the parent and an adapter are one batch of 256 rows instead
    of two of 128. Where each variant already fills its batches (900 prompts: batches of
    225 either way), sharing only splits each LoRA product between the variants' weights:
    no wider, and measured slower on Gemma 3 270M."""
    shared = len(balanced_batches(sum(job_rows), largest))
    return shared < sum(len(balanced_batches(rows, largest)) for rows in job_rows if rows)


class NonFiniteLogits(Exception):
    """Rows of a batch whose next-token state holds NaN or inf (raised inside a batch)."""

    def __init__(self, rows: list[int], step: int):
        super().__init__(rows, step)
        self.rows, self.step = rows, step


def check_finite(last: Any, step: int) -> None:
    """Stop at the first NaN or inf: sampling from it would draw a silently wrong token
    (or trip a device assert), and fp16 overflow or a broken adapter produce exactly that."""
    import torch

    bad = ~torch.isfinite(last).all(dim=-1)
    if bool(bad.any()):
        raise NonFiniteLogits(bad.nonzero().flatten().tolist(), step)


def non_finite_error(prompt_ids: list[str], step: int, adapter: str | None) -> GenerationError:
    ids = sorted(set(prompt_ids))
    shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
    return GenerationError(
        f"NaN or infinite logits at new token {step + 1} for prompt {shown} under "
        f"{adapter or 'the parent'}: in float16 this is usually an overflow (try --dtype "
        f"bfloat16 or float32); otherwise the {'adapter' if adapter else 'model'}'s "
        "weights are broken"
    )


class Generator:
    """Generates continuations for prompts under the parent or one adapter."""

    def __init__(self, model: Any, tokenizer: Any, settings: GenerationConfig, device: str):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.device = device
        self.batch_size = settings.batch_size or auto_batch_size(model, device)
        # What the forward calls its KV cache (transformers' name changed in 5.2x).
        self.cache_keyword = "cache" if native(model) else cache_keyword()
        from toxtests.engines.torch.head import output_head  # torch: only once a model is loaded
        from toxtests.engines.torch.packed import fuse_gated_mlps, pack_linears

        # (decoder, fused output head) where the head provably equals the model's own.
        self.fused = output_head(model, device)
        if device.startswith("cpu"):
            # The fused head has its own packed chunks: the output layer is left alone.
            output_layer = model.get_output_embeddings() if self.fused else None
            pack_linears(model, skip=(output_layer,) if output_layer is not None else ())
            fuse_gated_mlps(model)
        self.prefill_overhead = FORWARD_OVERHEAD
        # One prefill per prompt for its k samples (off: every row prefilled, to compare).
        self.share_prefill = True
        # The tokenizer's first use: it may still be loading in its process (`load.
        # PendingTokenizer`) while the weights above were packed.
        self.eos_ids = self._eos_ids()
        # Each row's own arithmetic whatever its batch-mates (`attention`): on the CPU in
        # float32, where the packed linear layers are row-invariant too.
        # The native decoder is row-invariant by construction (tested bit for bit): no
        # probe prefills for it (~0.13 s a gate).
        self.row_attention = row_attention_applies(model, device) and (
            native(model) or self._rows_invariant()
        )
        if not self.row_attention and batch_invariant(device, _dtype_name(model)):
            warnings.warn(
                "this model's attention does not go through transformers' attention "
                "interface (or uses a logit soft cap), so its text can depend on the batch "
                "size: pin generation.batch_size to compare runs",
                RuntimeWarning,
                stacklevel=2,
            )

    def _eos_ids(self) -> list[int]:
        config = getattr(self.model, "generation_config", None)
        return eos_token_ids(
            getattr(self.tokenizer, "eos_token_id", None), getattr(config, "eos_token_id", None)
        )

    def _attention(self) -> Any:
        if native(self.model) or not self.row_attention:  # the native decoder has it built in
            return nullcontext()
        return row_attention_on(self.model)

    def _rows_invariant(self) -> bool:
        """Whether a probe row gets the same bits alone and beside a longer one: the
        model's attention really goes through `row_attention` (a model with its own
        attention code would not), and nothing else mixes the rows."""
        import torch

        vocab = int(getattr(self.model.config, "vocab_size", 0) or 0)
        if vocab < 8:
            return False
        short, long = [3, 5, 7], [4, 6, 2, 5, 7, 3, 1]
        short, long = [t % vocab for t in short], [t % vocab for t in long]
        self.row_attention = True
        try:
            with torch.inference_mode(), self._attention():
                together, _, _, _, _ = self._prefill([short, long])
                alone, _, _, _, _ = self._prefill([short])
        except Exception:  # noqa: BLE001 - a model this cannot drive keeps its own attention
            return False
        finally:
            self.row_attention = False
        return bool(torch.equal(together[0], alone[0]))

    def _adapter_context(self, adapter: str | None) -> Any:
        """The parent is the base with adapters disabled; an adapter is switched in."""
        model = self.model
        if not hasattr(model, "disable_adapter"):
            if adapter is not None:
                raise GenerationError(f"adapter {adapter!r} requested but no adapter is loaded")
            return nullcontext()
        if adapter is None:
            return model.disable_adapter()
        model.set_adapter(adapter)
        if self.device.startswith("cpu") and not native(model):
            from toxtests.engines.torch.packed import merge_adapter_layers

            merge_adapter_layers(model, adapter)  # W + BA packed, the model's W untouched
        return nullcontext()

    def generate(
        self,
        prompts: Sequence[Prompt],
        adapter: str | None,
        on_prompt_done: Callable[[int, list[Generation]], None] | None = None,
        label: str | None = None,
    ) -> list[list[Generation]]:
        """Continuations indexed [prompt][sample], in the order of `prompts`.

        `label` names the variant in errors (the user's adapter name, not PEFT's).

        `on_prompt_done(index, samples)` is called as soon as a prompt's last sample is
        generated, so a caller can store work as it goes (an interrupted run keeps it).
        """
        done = None
        if on_prompt_done is not None:
            done = lambda job, index, samples: on_prompt_done(index, samples)  # noqa: E731
        return self._generate_jobs([(prompts, adapter)], done, [label], mixed=False)[0]

    def generate_together(
        self,
        jobs: Sequence[tuple[Sequence[Prompt], str | None]],
        on_prompt_done: Callable[[int, int, list[Generation]], None] | None = None,
        labels: Sequence[str | None] | None = None,
    ) -> list[list[list[Generation]]]:
        """Continuations of several variants, [job][prompt][sample], for jobs of (prompts,
        adapter or None for the parent); `on_prompt_done(job, index, samples)`.

        Where `mixable` allows and it makes batches wider (`mixing_pays`), rows of every
        job share the batches: a 128-prompt gate decodes its parent and adapter rows 256
        at a time instead of 128 twice, and each decode step reads the weights (the
        output head's 671 MB on Gemma 3 270M) once for both. Each row's text is the one
        `generate` gives it: its LoRA layers run on its own variant's weight and nothing
        else mixes rows. Otherwise one job after another.
        """
        names = list(labels) if labels is not None else [None] * len(jobs)
        job_rows = [len(prompts) * self.settings.samples for prompts, _ in jobs]
        if mixing_pays(job_rows, self.batch_size) and self._can_mix([a for _, a in jobs]):
            return self._generate_jobs(jobs, on_prompt_done, names, mixed=True)
        results = []
        for job, ((prompts, adapter), label) in enumerate(zip(jobs, names, strict=True)):
            done = None if on_prompt_done is None else functools.partial(on_prompt_done, job)
            results.append(self.generate(prompts, adapter, done, label))
        return results

    def _can_mix(self, adapters: list[str | None]) -> bool:
        """Whether the parent's and these adapters' rows can share a batch with every
        row's own bits: on the CPU with row-invariant arithmetic, and every adapter a
        plain LoRA whose layers all have merged copies (`packed.mixable`)."""
        if not (self.device.startswith("cpu") and self.row_attention):
            return False
        if not hasattr(self.model, "disable_adapter"):
            return False
        if native(self.model):  # every adapter merged and routable (`lora`)
            return True
        from toxtests.engines.torch.packed import merge_adapter_layers, mixable

        named = sorted({adapter for adapter in adapters if adapter is not None})
        for adapter in named:
            merge_adapter_layers(self.model, adapter)
        return mixable(self.model, named)

    def _generate_jobs(
        self,
        jobs: Sequence[tuple[Sequence[Prompt], str | None]],
        on_prompt_done: Callable[[int, int, list[Generation]], None] | None,
        labels: Sequence[str | None],
        mixed: bool,
    ) -> list[list[list[Generation]]]:
        """Every job's rows in length-sorted batches: one job (`mixed` False) under its
        adapter context, or several routed row by row (`packed.routed_rows`)."""
        import torch

        settings = self.settings
        limit = context_length(self.model)
        encoded = [encode_prompts(self.tokenizer, prompts, settings, limit) for prompts, _ in jobs]
        # A tokenizer in its own process keeps itself for the next run meanwhile, at the
        # lowest priority, while this loop decodes (`tokenizer_process.keep_tokenizer`).
        keep = getattr(self.tokenizer, "keep_after_encoding", None)
        if callable(keep):
            keep()
        rows = [
            (job, i, j)
            for job, (prompts, _) in enumerate(jobs)
            for i in range(len(prompts))
            for j in range(settings.samples)
        ]
        # Length bucketing: similar lengths share a batch, so little compute goes to padding.
        rows.sort(key=lambda row: (len(encoded[row[0]][row[1]]), row))
        results: list[list[list[Generation | None]]] = [
            [[None] * settings.samples for _ in prompts] for prompts, _ in jobs
        ]
        context = nullcontext() if mixed else self._adapter_context(jobs[0][1])
        with (
            torch.inference_mode(),
            retained_memory(),
            context,
            self._attention(),
            quiet_library_warnings(),
        ):
            for start, end in balanced_batches(len(rows), self.batch_size):
                batch = rows[start:end]
                try:
                    texts, counts = self._generate_batch(
                        [encoded[job][i] for job, i, _ in batch],
                        [
                            sample_uniforms(
                                settings.seed, jobs[job][0][i].id, j, settings.max_new_tokens
                            )
                            for job, i, j in batch
                        ],
                        [jobs[job][1] for job, _, _ in batch] if mixed else None,
                    )
                except NonFiniteLogits as fault:
                    job = batch[fault.rows[0]][0]
                    ids = [jobs[job][0][batch[r][1]].id for r in fault.rows if batch[r][0] == job]
                    raise non_finite_error(ids, fault.step, labels[job] or jobs[job][1]) from None
                for (job, i, j), text, count in zip(batch, texts, counts, strict=True):
                    results[job][i][j] = Generation(jobs[job][0][i].id, j, text, count)
                    row = results[job][i]
                    if on_prompt_done and all(g is not None for g in row):
                        on_prompt_done(job, i, [g for g in row if g is not None])
        if self.fused is not None:
            self.fused[1].release()
        return [[[g for g in row if g is not None] for row in job] for job in results]

    def _generate_batch(
        self,
        sequences: list[list[int]],
        uniforms: list[np.ndarray],
        variants: list[str | None] | None = None,
    ) -> tuple[list[str], list[int]]:
        """Generate for rows sorted by prompt length (as `generate` hands them over);
        with `variants`, each row under its own (adapter name, None for the parent)."""
        import torch

        settings = self.settings
        pad_id = self.tokenizer.pad_token_id
        draws = torch.tensor(np.stack(uniforms), dtype=torch.float32, device=self.device)
        eos = torch.tensor(self.eos_ids or [-1], device=self.device)
        last, cache, attention, positions, shared = self._prefill(sequences, variants)
        routes = self._routes(variants)
        layout = self._layout(sequences, attention.shape[1])
        finished = torch.zeros(len(sequences), dtype=torch.bool, device=self.device)
        generated: list[torch.Tensor] = []
        tokens = last  # replaced by each step's tokens before it is read
        for step in range(settings.max_new_tokens):
            if step:
                positions = positions + 1
                attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=-1)
                layout = layout.advanced() if layout is not None else None
                last, cache = self._forward(
                    input_ids=tokens.unsqueeze(-1),
                    attention_mask=attention,
                    position_ids=positions,
                    **{self.cache_keyword: cache},
                    layout=layout,
                    routes=routes,
                )
            spread = shared if step == 0 else None
            check_finite(last if spread is None else last[spread], step)
            tokens = self._next_tokens(last, draws[:, step], spread)
            tokens = torch.where(finished, torch.full_like(tokens, pad_id), tokens)
            generated.append(tokens)
            finished |= torch.isin(tokens, eos)
            if bool(finished.all()):
                break
        new_tokens = torch.stack(generated, dim=1).tolist()
        eos_set = set(self.eos_ids)
        stop = self.settings.stop
        decoded = [decode_until_stop(self.tokenizer, row, eos_set, stop) for row in new_tokens]
        texts, counts = [text for text, _ in decoded], [count for _, count in decoded]
        return texts, counts

    def _padded(self, sequences: list[list[int]]) -> tuple[Any, Any, Any]:
        """Left-padded input ids, attention mask and position ids of one rectangle."""
        import torch

        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.tokenizer.pad_token_id)
        attention = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            input_ids[row, width - len(seq) :] = torch.tensor(seq)
            attention[row, width - len(seq) :] = 1
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        return input_ids, attention, (attention.cumsum(-1) - 1).clamp(min=0)

    def _prefill(
        self, sequences: list[list[int]], variants: list[str | None] | None = None
    ) -> tuple[Any, Any, Any, Any, Any]:
        """The last prompt position's state, the KV cache, the attention mask and that
        position's index, for rows sorted by length; prefilled group by group where the
        caches can be joined (`toxtests.engines.torch.prefill`). The state comes one row
        a prompt when its samples share a prefill, with the index that spreads it over
        the rows (else None).

        The k samples of one prompt are adjacent rows with the same tokens: each prompt
        is prefilled once and its cache copied to its k rows (RealToxicityPrompts' 25
        samples would otherwise pay 25 prefills). The copies are the rows a prefill of
        every row would give wherever rows do not depend on their batch."""
        import torch
        import torch.nn.functional as F

        from toxtests.engines.torch.prefill import (
            join_caches,
            joinable,
            plan_groups,
            repeat_rows,
            sample_runs,
        )

        unique, repeats = sample_runs(sequences, variants)
        if len(unique) == len(sequences) or not self.share_prefill:
            unique, repeats = sequences, [1] * len(sequences)
        firsts = np.cumsum([0, *repeats[:-1]])
        unique_variants = None if variants is None else [variants[row] for row in firsts]
        groups = plan_groups([len(s) for s in unique], self.prefill_overhead)
        lasts, caches, masks = [], [], []
        for start, end in groups:
            input_ids, attention, positions = self._padded(unique[start:end])
            last, cache = self._forward(
                input_ids=input_ids,
                attention_mask=attention,
                position_ids=positions,
                layout=self._layout(unique[start:end], attention.shape[1]),
                routes=self._routes(unique_variants and unique_variants[start:end]),
            )
            if len(groups) > 1 and not joinable(cache):
                break  # not a cache this can join: one rectangle instead
            counts = repeats[start:end]
            if any(count > 1 for count in counts):
                if not joinable(cache):
                    break  # not a cache whose rows this can copy: every row prefilled
                index = _repeat_index(counts, self.device)
                attention, cache = attention[index], repeat_rows(cache, index)
            lasts.append(last)  # one row a prompt: the first token's head runs once too
            caches.append(cache)
            masks.append(attention)
        widths = [mask.shape[1] for mask in masks]
        room = self.settings.max_new_tokens
        joined = join_caches(caches, widths, room) if len(caches) == len(groups) else None
        if joined is None:
            input_ids, attention, positions = self._padded(sequences)
            last, cache = self._forward(
                input_ids=input_ids,
                attention_mask=attention,
                position_ids=positions,
                layout=self._layout(sequences, attention.shape[1]),
                routes=self._routes(variants),
            )
            if joinable(cache):  # one group: its cache, with room for the decode steps
                cache = join_caches([cache], [attention.shape[1]], room) or cache
            return last, cache, attention, positions[:, -1:], None
        width = max(widths)
        attention = torch.cat([F.pad(mask, (width - mask.shape[1], 0)) for mask in masks])
        lengths = torch.tensor([len(s) for s in sequences], device=self.device)
        shared = _repeat_index(repeats, self.device) if len(unique) < len(sequences) else None
        return torch.cat(lasts), joined, attention, lengths.unsqueeze(-1) - 1, shared

    def _layout(self, sequences: list[list[int]], width: int) -> RowLayout | None:
        if not self.row_attention:
            return None
        return RowLayout.left_padded([len(s) for s in sequences], width)

    def _routes(self, variants: list[str | None] | None) -> list[tuple[Any, str | None]] | None:
        """(row index, variant) for each variant among `variants` (None: no routing)."""
        if not variants:
            return None
        import torch

        rows: dict[str | None, list[int]] = {}
        for row, variant in enumerate(variants):
            rows.setdefault(variant, []).append(row)
        return [(torch.tensor(index, device=self.device), v) for v, index in rows.items()]

    def _forward(
        self,
        layout: RowLayout | None = None,
        routes: list[tuple[Any, str | None]] | None = None,
        **inputs: Any,
    ) -> tuple[Any, Any]:
        """The last position's hidden state (fused head) or logits, and the KV cache;
        with `routes`, each row's LoRA layers run on its own variant's weight."""
        if layout is not None:
            inputs[LAYOUT_KEYWORD] = layout
        routing: Any = nullcontext()
        if routes is not None:
            from toxtests.engines.torch.packed import routed_rows

            routing = routed_rows(routes)
        with routing:
            if self.fused is None:
                out = self.model(**inputs, use_cache=True, logits_to_keep=1)
                return out.logits[:, -1, :], getattr(out, self.cache_keyword)
            out = self.fused[0](**inputs, use_cache=True)
        return out.last_hidden_state[:, -1, :], getattr(out, self.cache_keyword)

    def _next_tokens(self, last: Any, uniforms: Any, spread: Any = None) -> Any:
        """The next token of every row from its last state, by its own uniform; with
        `spread`, `last` holds one row a prompt and `spread` picks each row's: the head
        runs once a prompt and each sample draws from the same logits."""
        from toxtests.engines.torch.sampling import (
            native_sampling_applies,
            sample_logit_chunks,
            sample_probabilities,
            sample_tokens,
        )

        settings = self.settings
        if self.fused is None:
            last = last if spread is None else last[spread]  # already logits
            if not settings.do_sample:
                return last.argmax(dim=-1)
            return sample_tokens(
                last,
                uniforms,
                temperature=settings.temperature,
                top_k=settings.top_k,
                top_p=settings.top_p,
            )
        head = self.fused[1]
        if not settings.do_sample:
            tokens = head.logits(last).argmax(dim=-1)
            return tokens if spread is None else tokens[spread]
        if settings.top_k == 0 and settings.top_p < 1.0 and native_sampling_applies(last):
            chunks = head.logit_chunks(last)
            if spread is not None:
                chunks = [chunk.index_select(0, spread) for chunk in chunks]
            return sample_logit_chunks(chunks, uniforms, settings.temperature, settings.top_p)
        probs = head.probabilities(last, settings.temperature)
        probs = probs if spread is None else probs[spread]
        return sample_probabilities(probs, uniforms, top_k=settings.top_k, top_p=settings.top_p)
