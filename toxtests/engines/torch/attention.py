"""Attention that gives each row the same arithmetic whatever its batch-mates.

A left-padded batch hands every row's attention the batch's width: SDPA then reduces
over that width (masked positions included) in blocks that depend on it, so a prompt's
hidden states change in their last bits with the padding, which is to say with the
batch it happened to land in (measured on Gemma 3 270M: 22 of 24 prompts' last states
changed between alone and in a batch; sampling then turns some of those bits into
other tokens). Here each run of rows that share a start position attends only to its
real positions, exactly as it would alone: the kernel sees the row's own length and
nothing else. A decode step goes through `native_attention` (the whole batch in one
call, each row in a fixed order) where a C compiler is at hand, through torch run by
run otherwise; the two round differently, so the cache key names the path. The linear
layers are already row-invariant on the CPU (oneDNN's packed products give each row the
same bits for any number of rows, and any thread count).

The layout travels with the forward call as the keyword `toxtests_layout` (transformers
passes unknown keywords through to the attention function); without one the function is
plain SDPA, so the model behaves as usual outside the decode loop.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from toxtests.engines.torch import native_attention

NAME = "toxtests_rows"
LAYOUT_KEYWORD = "toxtests_layout"


@dataclass(frozen=True)
class RowLayout:
    """Where each row's real positions start in a left-padded batch.

    `starts[b]`: the first real position of row b, counted in the full sequence the
    batch has seen (prompt rectangle plus decode steps); `width`: that sequence's
    length after this forward's tokens. A sliding-window cache that dropped its oldest
    positions is recognised by holding fewer than `width` of them.
    """

    starts: tuple[int, ...]
    width: int

    @classmethod
    def left_padded(cls, lengths: Sequence[int], width: int) -> RowLayout:
        return cls(tuple(width - length for length in lengths), width)

    def advanced(self, steps: int = 1) -> RowLayout:
        return RowLayout(self.starts, self.width + steps)

    def runs(self) -> list[tuple[int, int, int]]:
        """(first row, end row, start) of each run of consecutive rows with one start."""
        runs: list[tuple[int, int, int]] = []
        for row, start in enumerate(self.starts):
            if runs and runs[-1][2] == start:
                runs[-1] = (runs[-1][0], row + 1, start)
            else:
                runs.append((row, row + 1, start))
        return runs


def row_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: (batch, heads, q, dim) in, the
    output as (batch, q, heads, dim) out."""
    layout: RowLayout | None = kwargs.pop(LAYOUT_KEYWORD, None)
    if layout is None or dropout or kwargs.get("softcap") is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(  # type: ignore[no-any-return]
            module, query, key, value, attention_mask, dropout, scaling, **kwargs
        )
    batch, heads, q_len, dim = query.shape
    kv_len = key.shape[2]
    groups = heads // key.shape[1]
    dropped = layout.width - kv_len  # positions a sliding window no longer holds
    if query.dtype == torch.float32 and native_attention.load() is not None:
        # The whole step, or the whole prefill, in one native call: each row over its own
        # keys, in a fixed order.
        scale = scaling if scaling is not None else dim**-0.5
        if q_len == 1:
            firsts = _first_keys(layout.starts, dropped, sliding_window or 0, kv_len)
            # On the calling thread: torch's OpenMP workers keep spinning after each
            # product, and a second Python thread competing with them for the cores made
            # generation slower, not faster (Gemma 3 270M, 2 cores: 66-69 against 75-76
            # tokens/s).
            step = native_attention.decode_attention(query, key, value, firsts, scale, threads=1)
        else:
            firsts = _first_keys(layout.starts, dropped, 0, kv_len)
            step = native_attention.prefill_attention(
                query, key, value, firsts, scale, sliding_window or 0
            )
        return step.transpose(1, 2).contiguous(), None
    # Padded query positions (prefill) get 0; a decode step has none.
    out = query.new_zeros(batch, heads, q_len, value.shape[-1]) if q_len > 1 else None
    parts: list[torch.Tensor] = []
    runs = layout.runs()
    if q_len > 1:
        # Prefill row by row: the math kernel's products gave a row other bits in a call
        # of two rows than alone (found by hypothesis: two rows of 5, head size 64). Once
        # a batch, so it costs little; decode steps keep their runs.
        runs = [(row, row + 1, start) for first, end, start in runs for row in range(first, end)]
    for first, end, start in runs:
        real_from = max(start - dropped, 0)  # the row's first real key still held
        queries_from = max(real_from - (kv_len - q_len), 0)
        keys_from = real_from
        if sliding_window and q_len == 1:  # a decode step sees the last `window` keys
            keys_from = max(keys_from, kv_len - sliding_window)
        rows_q = query[first:end, :, queries_from:]
        rows_k, rows_v = key[first:end, :, keys_from:], value[first:end, :, keys_from:]
        part = _attend(rows_q, rows_k, rows_v, groups, scaling, sliding_window)
        if out is None:
            parts.append(part)
        else:
            out[first:end, :, queries_from:] = part
    if out is None:
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
    return out.transpose(1, 2).contiguous(), None


@lru_cache(maxsize=256)
def _first_keys(starts: tuple[int, ...], dropped: int, window: int, kv_len: int) -> np.ndarray:
    """Each row's first key for a decode step: its first real one still held, and no
    earlier than the window reaches (the layers of one step share the answer)."""
    first = np.maximum(np.asarray(starts, dtype=np.int64) - dropped, 0)
    if window:
        first = np.maximum(first, kv_len - window)
    first.setflags(write=False)  # shared by the cache
    return first


def _attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    groups: int,
    scaling: float | None,
    window: int | None,
) -> torch.Tensor:
    """Attention of rows that share one layout, no padding left in q or k.

    SDPA's math kernel (products, softmax, products): it gives a row the same bits in a
    call of any number of rows. Its fused CPU kernel does not for small heads (measured:
    head size 16 or 32, 12-23 of 34 rows differed between alone and batched)."""
    rows, heads, q_len, dim = query.shape
    k_len = key.shape[2]
    if q_len == 1:  # a decode step: a group's heads are its queries, and no mask
        return _decode(query, key, value, groups, scaling)
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    lag = k_len - q_len  # keys before the first query (a cache prefilled earlier)
    if not lag and (not window or q_len <= window):
        return _math(query, key, value, None, True, scaling)
    q_pos = torch.arange(q_len, device=query.device).unsqueeze(-1) + lag
    k_pos = torch.arange(k_len, device=query.device).unsqueeze(0)
    allowed = k_pos <= q_pos
    if window:
        allowed &= q_pos - k_pos < window
    # The math kernel adds a mask: a boolean one must become 0 / -inf first.
    mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
    return _math(query, key, value, mask.masked_fill_(~allowed, float("-inf")), False, scaling)


def _decode(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, groups: int, scaling: float | None
) -> torch.Tensor:
    """One decode step: products, softmax, products, as SDPA's math kernel, without its
    per-call overhead (about 40% less per layer; the README has the figures)."""
    rows, heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    scale = scaling if scaling is not None else dim**-0.5
    queries = query.reshape(rows * kv_heads, groups, dim)
    keys = key.reshape(rows * kv_heads, length, dim)
    values = value.reshape(rows * kv_heads, length, value.shape[-1])
    weights = torch.softmax(torch.bmm(queries, keys.transpose(1, 2)).mul_(scale), dim=-1)
    return torch.bmm(weights, values).reshape(rows, heads, 1, value.shape[-1])


def _math(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    scaling: float | None,
) -> torch.Tensor:
    out, _ = torch.ops.aten._scaled_dot_product_attention_math(
        query, key, value, attn_mask=mask, is_causal=causal, scale=scaling
    )
    return out  # type: ignore[no-any-return]


def register() -> None:
    """Make `NAME` an attention implementation transformers can dispatch to (with the
    SDPA mask builder, for calls that carry no layout)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, row_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def _configs(model: Any) -> Iterator[Any]:
    seen: set[int] = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if hasattr(config, "_attn_implementation") and id(config) not in seen:
            seen.add(id(config))
            yield config


@contextmanager
def row_attention_on(model: Any) -> Iterator[None]:
    """Dispatch `model`'s attention to `row_attention` for the duration."""
    register()
    configs = list(_configs(model))
    before = [config._attn_implementation for config in configs]
    for config in configs:
        config._attn_implementation = NAME
    try:
        yield
    finally:
        for config, implementation in zip(configs, before, strict=True):
            config._attn_implementation = implementation


def row_attention_applies(model: Any, device: str) -> bool:
    """Where rows can be made invariant: float32 on the CPU with oneDNN's packed linears
    (MKL's products differ for one to three rows), and attention without a logit soft
    cap (which SDPA cannot apply)."""
    from toxtests.engines.torch import packed

    config = getattr(model, "config", None)
    parameter = next(iter(model.parameters()), None)
    return (
        device.startswith("cpu")
        and parameter is not None
        and parameter.dtype == torch.float32
        and not getattr(config, "attn_logit_softcapping", None)
        and packed.available()
    )


def batch_invariant(device: str, dtype: str) -> bool:
    """Whether a row's text cannot depend on its batch: float32 on the CPU, where the
    linear layers run through oneDNN's row-invariant packed products and attention
    through `row_attention`. GPU kernels choose their reductions by shape, so there it
    is not promised."""
    if not device.startswith("cpu") or dtype != "float32":
        return False
    from toxtests.engines.torch import packed

    return packed.available()
