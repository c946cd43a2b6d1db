"""The native decode attention: each row's own attention, bit for bit the same in any
batch, at any padding, on any number of threads."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from toxtests.engines.torch import native, native_attention

pytestmark = pytest.mark.skipif(
    native_attention.load() is None, reason="no C compiler: the kernel cannot be built"
)


REFERENCE = Path(__file__).with_name("data") / "decode_attention_reference.c"


@pytest.fixture(scope="module")
def reference_kernel(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """The kernel as first written (`tests/data/decode_attention_reference.c`), built with
    the flags the current one is loaded with: the generation cache's `c-attention`
    entries were made with it, so the current kernel must give its bits exactly."""
    cc = native.compiler()
    assert cc is not None  # the module is skipped without one
    return native_attention.build_kernel(tmp_path_factory.mktemp("reference"), cc, REFERENCE)


def _with_kernel(library: ctypes.CDLL, *args: object, **kwargs: object) -> torch.Tensor:
    current = native_attention.load()
    native_attention._library = library
    try:
        return native_attention.decode_attention(*args, **kwargs)  # type: ignore[arg-type]
    finally:
        native_attention._library = current


@settings(max_examples=80, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    kv_heads=st.sampled_from([1, 2, 3]),
    groups=st.sampled_from([1, 3, 4, 5, 8, 9]),
    dim=st.sampled_from([7, 16, 33, 64, 256]),
    value_dim=st.sampled_from([None, 5, 48, 80]),
    extra=st.integers(0, 9),
    spread=st.sampled_from([0.1, 1.0, 30.0]),
    threads=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_the_kernel_gives_the_bits_of_the_one_the_cache_was_written_with(
    reference_kernel: ctypes.CDLL,
    lengths: list[int],
    kv_heads: int,
    groups: int,
    dim: int,
    value_dim: int | None,
    extra: int,
    spread: float,
    threads: int,
    seed: int,
) -> None:
    """Every shape the side-by-side paths split differently: fewer positions than a block
    and block remainders, head counts below, at and past a group of four, head and value
    sizes with a tail past the last full lane block, large scores (exp near its range)."""
    generator = torch.Generator().manual_seed(seed)
    rows, heads = len(lengths), kv_heads * groups
    width = max(lengths) + extra
    query = torch.randn(rows, heads, 1, dim, generator=generator) * spread
    key = torch.randn(rows, kv_heads, width, dim, generator=generator)
    value = torch.randn(rows, kv_heads, width, value_dim or dim, generator=generator)
    first = np.array([width - n for n in lengths])
    first[0] = width  # a row with no key at all
    got = native_attention.decode_attention(query, key, value, first, 0.3, threads=threads)
    expected = _with_kernel(reference_kernel, query, key, value, first, 0.3, threads=1)
    assert torch.equal(got, expected)


@pytest.fixture(scope="module")
def portable_kernel(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """The current kernel built without -march=native: on x86 a build without AVX2, whose
    16-lane values are one GCC vector where an AVX2 build holds two 8-float halves."""
    cc = native.compiler()
    assert cc is not None
    directory = tmp_path_factory.mktemp("portable")
    flags = native_attention.PORTABLE_FLAGS
    return native_attention.build_kernel(directory, cc, flags=flags)


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    groups=st.sampled_from([1, 4, 5]),
    dim=st.sampled_from([7, 33, 256]),
    value_dim=st.sampled_from([None, 5, 80]),
    seed=st.integers(0, 2**16),
)
def test_the_portable_build_gives_the_same_bits(
    reference_kernel: ctypes.CDLL,
    portable_kernel: ctypes.CDLL,
    lengths: list[int],
    groups: int,
    dim: int,
    value_dim: int | None,
    seed: int,
) -> None:
    """Whatever the CPU, each build's vector layout sums every lane alike: a cache written
    on one machine stays valid on another."""
    generator = torch.Generator().manual_seed(seed)
    rows, heads = len(lengths), 2 * groups
    width = max(lengths) + 3
    query = torch.randn(rows, heads, 1, dim, generator=generator) * 3.0
    key = torch.randn(rows, 2, width, dim, generator=generator)
    value = torch.randn(rows, 2, width, value_dim or dim, generator=generator)
    first = np.array([width - n for n in lengths])
    got = _with_kernel(portable_kernel, query, key, value, first, 0.3, threads=2)
    expected = _with_kernel(reference_kernel, query, key, value, first, 0.3, threads=1)
    assert torch.equal(got, expected)


def test_a_mutated_kernel_is_told_apart(reference_kernel: ctypes.CDLL) -> None:
    """The comparison above can fail: the same attention with its scale rounded the
    other way differs from the reference in the last bits."""
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(3, 4, 1, 64, generator=generator)
    key = torch.randn(3, 1, 20, 64, generator=generator)
    value = torch.randn(3, 1, 20, 64, generator=generator)
    first = np.array([0, 3, 7])
    got = native_attention.decode_attention(query, key, value, first, 0.3)
    nudged = float(np.nextafter(np.float32(0.3), np.float32(1.0)))
    other = _with_kernel(reference_kernel, query, key, value, first, nudged)
    assert not torch.equal(got, other)


def _alone(query, key, value, first, scale):  # noqa: ANN001, ANN202
    """Row by row, each with only its own keys (contiguous, as a batch of one has)."""
    rows = []
    for row, start in enumerate(first):
        rows.append(
            native_attention.decode_attention(
                query[row : row + 1],
                key[row : row + 1, :, start:].contiguous(),
                value[row : row + 1, :, start:].contiguous(),
                np.array([0]),
                scale,
            )
        )
    return torch.cat(rows)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 70), min_size=1, max_size=9),
    kv_heads=st.sampled_from([1, 2]),
    groups=st.sampled_from([1, 3, 4]),
    dim=st.sampled_from([7, 16, 64, 256]),
    extra=st.integers(0, 4),
    threads=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_each_row_is_its_own_attention_alone(
    lengths: list[int],
    kv_heads: int,
    groups: int,
    dim: int,
    extra: int,
    threads: int,
    seed: int,
) -> None:
    generator = torch.Generator().manual_seed(seed)
    rows, heads = len(lengths), kv_heads * groups
    width = max(lengths) + extra
    query = torch.randn(rows, heads, 1, dim, generator=generator)
    key = torch.randn(rows, kv_heads, width, dim, generator=generator)
    value = torch.randn(rows, kv_heads, width, dim, generator=generator)
    first = np.array([width - n for n in lengths])
    out = native_attention.decode_attention(query, key, value, first, 0.3, threads=threads)
    assert torch.equal(out, _alone(query, key, value, first, 0.3))
    for row, start in enumerate(first):
        expected = F.scaled_dot_product_attention(
            query[row : row + 1],
            key[row : row + 1, :, start:].repeat_interleave(groups, dim=1),
            value[row : row + 1, :, start:].repeat_interleave(groups, dim=1),
            scale=0.3,
        )
        assert torch.allclose(out[row : row + 1], expected, atol=1e-5, rtol=1e-4)


def test_a_strided_cache_reads_as_a_contiguous_one() -> None:
    """A sliding-window layer hands over a view of its cache, not a copy."""
    generator = torch.Generator().manual_seed(0)
    full_key = torch.randn(3, 2, 20, 16, generator=generator)
    full_value = torch.randn(3, 2, 20, 16, generator=generator)
    key, value = full_key[:, :, -8:], full_value[:, :, -8:]
    assert not key.is_contiguous()
    query = torch.randn(3, 4, 1, 16, generator=generator)
    first = np.array([0, 2, 5])
    strided = native_attention.decode_attention(query, key, value, first, 0.25)
    copied = native_attention.decode_attention(
        query, key.contiguous(), value.contiguous(), first, 0.25
    )
    assert torch.equal(strided, copied)


def test_a_row_without_keys_gets_zeros() -> None:
    query = torch.randn(2, 2, 1, 8)
    key = value = torch.randn(2, 1, 5, 8)
    out = native_attention.decode_attention(query, key, value, np.array([5, 1]), 0.5)
    assert not out[0].any() and out[1].abs().sum() > 0


def test_bad_input_is_refused_with_the_reason() -> None:
    query = torch.randn(2, 2, 1, 8)
    key = torch.randn(2, 1, 5, 8)
    with pytest.raises(ValueError, match="float32 CPU"):
        native_attention.decode_attention(query.double(), key, key, np.array([0, 0]), 0.5)
    with pytest.raises(ValueError, match="one first position per row"):
        native_attention.decode_attention(query, key, key, np.array([0]), 0.5)


def _masked_reference(query, key, value, first, scale, window):  # noqa: ANN001, ANN202
    """The prefill's attention in float64 from a boolean mask: query position p of row r
    sees keys k with first[r] <= k <= p and p - k < window (when a window is set)."""
    rows, heads, queries, _ = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    positions = torch.arange(length - queries, length).unsqueeze(-1)
    keys = torch.arange(length).unsqueeze(0)
    out = torch.zeros(rows, heads, queries, value.shape[-1], dtype=torch.float64)
    for row in range(rows):
        allowed = (keys <= positions) & (keys >= int(first[row]))
        if window:
            allowed &= positions - keys < window
        k = key[row].double().repeat_interleave(heads // kv_heads, dim=0)
        v = value[row].double().repeat_interleave(heads // kv_heads, dim=0)
        scores = (query[row].double() @ k.transpose(-1, -2) * scale).masked_fill(
            ~allowed, float("-inf")
        )
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # no key: zeros
        out[row] = weights @ v
    return out


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=5),
    lag=st.integers(0, 6),
    window=st.sampled_from([0, 1, 3, 8, 100]),
    kv_heads=st.sampled_from([1, 2]),
    groups=st.sampled_from([1, 3, 4, 5]),
    dim=st.sampled_from([7, 16, 64]),
    seed=st.integers(0, 2**16),
)
def test_a_prefill_is_each_of_its_positions_as_a_decoding_step(
    lengths: list[int],
    lag: int,
    window: int,
    kv_heads: int,
    groups: int,
    dim: int,
    seed: int,
) -> None:
    """Every query position of a left-padded prefill (after `lag` keys already cached)
    gets the bits `decode_attention` gives it over its own keys, the same bits alone as
    in the batch, and the masked softmax's values; padding positions get zeros."""
    generator = torch.Generator().manual_seed(seed)
    rows, heads = len(lengths), kv_heads * groups
    queries = max(lengths)
    length = queries + lag
    query = torch.randn(rows, heads, queries, dim, generator=generator)
    key = torch.randn(rows, kv_heads, length, dim, generator=generator)
    value = torch.randn(rows, kv_heads, length, dim + 3, generator=generator)
    first = np.array([queries - n for n in lengths])  # left padding before n real tokens
    out = native_attention.prefill_attention(query, key, value, first, 0.3, window)

    for i in range(queries):
        end = length - queries + i + 1
        step_first = np.maximum(first, end - window) if window else first
        step = native_attention.decode_attention(
            query[:, :, i : i + 1], key[:, :, :end], value[:, :, :end], step_first, 0.3
        )
        assert torch.equal(out[:, :, i : i + 1], step)
    for row in range(rows):
        alone = native_attention.prefill_attention(
            query[row : row + 1], key[row : row + 1], value[row : row + 1], first[row:row + 1],
            0.3, window,
        )  # fmt: skip
        assert torch.equal(alone, out[row : row + 1])
    expected = _masked_reference(query, key, value, first, 0.3, window)
    assert torch.allclose(out.double(), expected, atol=1e-5, rtol=1e-4)
    padding = [(row, i) for row in range(rows) for i in range(queries) if i + lag < first[row]]
    assert all(not out[row, :, i].any() for row, i in padding)


def test_a_prefill_with_more_queries_than_keys_is_refused() -> None:
    query = torch.randn(1, 2, 6, 8)
    key = torch.randn(1, 1, 5, 8)
    with pytest.raises(ValueError, match="6 queries but only 5 key positions"):
        native_attention.prefill_attention(query, key, key, np.array([0]), 0.5)
