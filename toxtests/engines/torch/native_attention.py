"""Attention in native code, every row over its own positions, in one call for the whole
batch: a decoding step's, and a prefill's (each query position as a decoding step).

`row_attention` can make rows invariant with torch alone only by calling the kernels
once per run of rows that share a start (the products choose their blocking by the
width they are given, so a padded row gets other bits): dozens of small calls per layer
per step. `decode_attention.c` does the whole batch in one call, each row in a fixed
order that reads nothing of its batch-mates, so it is both invariant and quicker. Built
on first use with the machine's C compiler (portable C, `-ffp-contract=off` so the
vector body and the scalar tail round alike); without one, `row_attention` keeps its
torch path.
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from toxtests.engines.torch import native

SOURCE = Path(__file__).with_name("native") / "decode_attention.c"
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC")
PORTABLE_FLAGS = ("-O3", "-ffp-contract=off", "-shared", "-fPIC")
DISABLE_ENV = "TOXTESTS_NO_NATIVE_ATTENTION"

_library: ctypes.CDLL | None = None
_tried = False
_lock = threading.Lock()


def build_kernel(
    cache_dir: Path, cc: str, source: Path = SOURCE, flags: tuple[str, ...] | None = None
) -> ctypes.CDLL:
    """`source` compiled into `cache_dir` (with `flags`; by default natively where the
    compiler can, else portably) and loaded, its entry point declared; the last failure
    is raised."""
    failure: Exception | None = None
    # some compilers lack -march=native
    for tried in (flags,) if flags else (FLAGS, PORTABLE_FLAGS):
        try:
            library = ctypes.CDLL(str(native.build(cache_dir, cc, source, tried)))
            break
        except (OSError, RuntimeError) as exc:
            failure = exc
    else:
        assert failure is not None
        raise failure
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    library.decode_attention.restype = ctypes.c_int
    library.decode_attention.argtypes = [
        pointer, pointer, pointer, pointer, pointer, i64, i64, i64, i64, i64,
        pointer, pointer, ctypes.c_float, i64, i64,
    ]  # fmt: skip
    if hasattr(library, "prefill_attention"):  # not in the first version (tests/data)
        library.prefill_attention.restype = ctypes.c_int
        library.prefill_attention.argtypes = [
            pointer, pointer, pointer, pointer, pointer, i64, i64, i64, i64, i64, i64,
            pointer, pointer, i64, ctypes.c_float, i64, i64,
        ]  # fmt: skip
    return library


def load() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it cannot be built here (warned once)."""
    global _library, _tried
    with _lock:
        if _tried:
            return _library
        _tried = True
        if os.environ.get(DISABLE_ENV):
            return None
        cc = native.compiler()
        if cc is None:
            return None
        from toxtests.models import default_cache_dir

        try:
            library = build_kernel(default_cache_dir(), cc)
        except (OSError, RuntimeError) as failure:
            warnings.warn(
                f"toxtests: the native decode attention is unavailable ({failure}); "
                f"generation keeps the torch path, invariant but slower. Set "
                f"{DISABLE_ENV}=1 to skip it.",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
        _library = library
        return library


def _checked(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> ctypes.CDLL:
    library = load()
    if library is None:
        raise RuntimeError("the native decode attention is not available here")
    for tensor in (query, key, value):
        if tensor.dtype != torch.float32 or tensor.device.type != "cpu":
            raise ValueError("the native decode attention takes float32 CPU tensors")
    return library


def _last_contiguous(tensor: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """The tensor with its last dimension contiguous, and its other strides (floats)."""
    if tensor.stride(-1) != 1:
        tensor = tensor.contiguous()
    return tensor, np.array(tensor.stride()[:3], dtype=np.int64)


def _firsts(first: np.ndarray, rows: int) -> np.ndarray:
    first = np.ascontiguousarray(first, dtype=np.int64)
    if first.shape != (rows,):
        raise ValueError(f"one first position per row expected: {rows} rows, {first.shape}")
    return first


def prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    first: np.ndarray,
    scale: float,
    window: int = 0,
) -> torch.Tensor:
    """(rows, heads, queries, value_dim): each query position of row r over its keys
    [first[r], position] (the last `window` of them where `window` > 0), zeros for a
    position before first[r]; the queries are the last `queries` key positions.

    Every position is computed as `decode_attention` computes one query over those
    keys: the same bits whatever the batch, the padding or the other positions, and the
    same as the decoding steps that follow. One call a layer, where torch needed one
    per row (SDPA's math kernel gave a row other bits beside another)."""
    library = _checked(query, key, value)
    rows, heads, queries, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    value_dim = value.shape[-1]
    if queries > length:
        raise ValueError(f"{queries} queries but only {length} key positions")
    query = query.contiguous()
    key, key_strides = _last_contiguous(key)
    value, value_strides = _last_contiguous(value)
    first = _firsts(first, rows)
    out = torch.empty(rows, heads, queries, value_dim, dtype=torch.float32)
    status = library.prefill_attention(
        query.data_ptr(), key.data_ptr(), value.data_ptr(), out.data_ptr(),
        first.ctypes.data, heads, kv_heads, queries, length, dim, value_dim,
        key_strides.ctypes.data, value_strides.ctypes.data, window, scale, 0, rows * kv_heads,
    )  # fmt: skip
    if status:
        raise MemoryError("the native prefill attention could not allocate its scratch memory")
    return out


def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    first: np.ndarray,
    scale: float,
    threads: int = 1,
) -> torch.Tensor:
    """(rows, heads, 1, value_dim): row r's query heads over its keys [first[r], length).

    query (rows, heads, 1, dim); key, value (rows, kv_heads, length, dim), float32 on
    the CPU. Rows are split across `threads` Python threads by (row, kv head) pair; each
    pair's arithmetic is the same on any thread."""
    library = _checked(query, key, value)
    rows, heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    value_dim = value.shape[-1]
    query = query.contiguous()
    key, key_strides = _last_contiguous(key)
    value, value_strides = _last_contiguous(value)
    first = _firsts(first, rows)
    out = torch.empty(rows, heads, 1, value_dim, dtype=torch.float32)
    arguments = (
        query.data_ptr(), key.data_ptr(), value.data_ptr(), out.data_ptr(),
        first.ctypes.data, heads, kv_heads, length, dim, value_dim,
        key_strides.ctypes.data, value_strides.ctypes.data, scale,
    )  # fmt: skip
    pairs = rows * kv_heads
    threads = max(1, min(threads, pairs))
    bounds = [pairs * i // threads for i in range(threads + 1)]

    def run(start: int, end: int) -> int:
        return int(library.decode_attention(*arguments, start, end))

    if threads == 1:
        statuses = [run(0, pairs)]
    else:
        statuses = list(native._workers(threads).map(run, bounds[:-1], bounds[1:]))
    if any(statuses):
        raise MemoryError("the native decode attention could not allocate its scratch memory")
    return out
