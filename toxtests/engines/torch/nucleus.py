"""The candidates of each row's top-p nucleus, found in one sparse pass (numba).

`torch.topk(probs, 256)` over Gemma's 262k-token vocabulary costs ~46 ms per step at
128 rows on an Intel Xeon (AVX-512, 2 threads), and the rows whose nucleus is wider
than 256 tokens (a base model on toxic prompts: ~25 of 128, with nuclei up to ~3,500
tokens) cost another ~30 ms of wider top-k. Here each row instead takes the largest
threshold t, from a short ladder, at which the tokens with p >= t hold at least top_p
of the mass, and only those tokens are sorted. The maxima of 64-token blocks (one
vectorised torch reduction) say which blocks can hold a token above the lowest rung:
~11% of them on RealToxicityPrompts, so the kernel reads those alone, collecting their
tokens above the lowest rung, then sums the mass above each rung from what it collected.
~10-12 ms per step for the 113 rows above, against ~27 ms for two full linear passes.

Why it is exact: the tokens with p >= t are the top of the descending sort, so when
they hold at least top_p (plus a margin far above float rounding) the nucleus lies
inside them, and the caller's inverse-CDF draw on them (`toxtests.engines.torch.sampling`) sees the
same prefix of the sorted row, with the same cumulative sums, as a full sort would.
A block whose maximum is below the lowest rung holds no token above any rung, so
skipping it loses nothing. Ties are ordered by token id. A row no rung covers comes
back as not found; the caller handles it with its own top-k.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any

import numpy as np

from toxtests.engines.torch.ladder import BLOCK, LADDER, MARGIN

numba: Any
try:  # numba is a dependency; a broken install keeps the torch path working
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - exercised only without numba
    numba = None

# The kernels, once `_define_kernels` has run.
_collect: Any = None
_pack: Any = None


def _define_kernels() -> None:
    """Define the numba kernels (compiled at their first call, cached on disk)."""
    global _collect, _pack

    @njit(parallel=True, cache=True, nogil=True)
    def _collect(
        probs: np.ndarray,
        block_max: np.ndarray,
        ladder: np.ndarray,
        target: float,
        room: int,
        values: np.ndarray,
        ids: np.ndarray,
        counts: np.ndarray,
        chosen: np.ndarray,
    ) -> None:
        """Per row, the largest rung whose tokens hold `target` of the mass (chosen[r],
        -1 if none) and those tokens, sorted by descending p (ties by id), in the row's
        slice r*room:(r+1)*room of the flat buffers; count -1 for a row without a rung.

        Only blocks whose maximum reaches the lowest rung are read; the tokens of a
        block are written branch-free (the buffer has a block of slack), the count
        advancing only past the ones kept.
        """
        rows, vocab = probs.shape
        blocks = block_max.shape[1]
        block = vocab // blocks if blocks else vocab
        floor = ladder[ladder.shape[0] - 1]
        limit = room - block  # the slack a branch-free block write needs
        for r in prange(rows):
            row = probs[r]
            start = r * room
            k = 0
            overflow = False
            for index in range(blocks + 1):
                if index < blocks:
                    if block_max[r, index] < floor:
                        continue
                    first, last = index * block, (index + 1) * block
                else:  # the tail no block covers
                    first, last = blocks * block, vocab
                if k > limit:
                    overflow = True
                    break
                for i in range(first, last):
                    p = row[i]
                    values[start + k] = p
                    ids[start + k] = i
                    k += 1 if p >= floor else 0
            chosen[r] = -1.0
            counts[r] = -1
            if overflow:
                continue
            for level in range(ladder.shape[0]):
                t = ladder[level]
                mass = 0.0
                for i in range(k):
                    p = values[start + i]
                    if p >= t:
                        mass += p
                if mass >= target:
                    chosen[r] = t
                    break
            t = chosen[r]
            if t < 0:
                continue
            n = 0
            for i in range(k):  # keep the tokens of the chosen rung, in id order
                if values[start + i] >= t:
                    values[start + n] = values[start + i]
                    ids[start + n] = ids[start + i]
                    n += 1
            order = np.argsort(-values[start : start + n], kind="mergesort")  # stable
            values[start : start + n] = values[start : start + n][order]
            ids[start : start + n] = ids[start : start + n][order]
            counts[r] = n

    @njit(parallel=True, cache=True, nogil=True)
    def _pack(
        values: np.ndarray, ids: np.ndarray, offsets: np.ndarray, counts: np.ndarray, width: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The rows' slices side by side, zero-padded to `width`."""
        rows = counts.shape[0]
        packed_values = np.zeros((rows, width), np.float32)
        packed_ids = np.zeros((rows, width), np.int64)
        for r in prange(rows):
            start = offsets[r]
            for j in range(max(counts[r], 0)):
                packed_values[r, j] = values[start + j]
                packed_ids[r, j] = ids[start + j]
        return packed_values, packed_ids


_defined = False
if numba is not None:
    try:
        _define_kernels()
        _defined = True
    except Exception:  # noqa: BLE001 - no cache location, say: the torch path still works
        _defined = False

# numba's fallback "workqueue" threading layer aborts the process on concurrent calls.
_lock = threading.Lock()


def available() -> bool:
    return _defined


def nucleus_candidates(
    probs: np.ndarray, top_p: float, threads: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, ids, found) for float32 probabilities (rows, vocab), C-contiguous.

    values/ids (rows, width): each found row's candidate tokens by descending
    probability, zero-padded; found (rows,) bool: whether the row's nucleus is inside
    them. Rows not found carry nothing and need another method.
    """
    global _defined
    with _lock:
        try:
            return _candidates(probs, top_p, threads)
        except Exception as exc:  # a kernel that cannot compile here: stop using it
            _defined = False
            warnings.warn(
                f"toxtests: the numba top-p kernels failed ({type(exc).__name__}: {exc}); "
                "sampling falls back to torch.topk, exact but slower",
                RuntimeWarning,
                stacklevel=2,
            )
            raise NucleusUnavailable from exc


class NucleusUnavailable(RuntimeError):
    """The kernels cannot run here; the caller takes its own (torch) path."""


def block_maxima(probs: np.ndarray) -> np.ndarray:
    """The maximum of each whole BLOCK of every row (a vectorised torch reduction)."""
    import torch

    rows, vocab = probs.shape
    whole = vocab // BLOCK * BLOCK
    tensor = torch.from_numpy(probs)[:, :whole]
    return tensor.reshape(rows, -1, BLOCK).amax(-1).numpy()


def _run(probs: np.ndarray, top_p: float) -> tuple[np.ndarray, ...]:
    """The kernel's flat buffers: (values, ids, counts, chosen rungs, room per row)."""
    rows, vocab = probs.shape
    # At most 1/t tokens have p >= t (a little slack for a sum a rounding above 1),
    # plus a block of slack for the branch-free writes.
    room = min(vocab, int(1.01 / float(LADDER[-1])) + 1) + BLOCK
    values = np.empty(rows * room, dtype=np.float32)
    ids = np.empty(rows * room, dtype=np.int64)
    counts = np.empty(rows, dtype=np.int64)
    chosen = np.empty(rows, dtype=np.float32)
    _collect(probs, block_maxima(probs), LADDER, top_p + MARGIN, room, values, ids, counts, chosen)
    return values, ids, counts, chosen, np.arange(rows + 1, dtype=np.int64) * room


def _candidates(
    probs: np.ndarray, top_p: float, threads: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if threads:  # torch's thread count, say: not more threads than the cores it uses
        most = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
        numba.set_num_threads(max(1, min(threads, most)))
    values, ids, counts, _, offsets = _run(probs, top_p)
    width = max(1, int(counts.max(initial=0)))
    packed_values, packed_ids = _pack(values, ids, offsets, counts, width)
    return packed_values, packed_ids, counts >= 0


def chosen_rungs(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Each row's rung (-1: none), as `nucleus_candidates` decides it (for tests)."""
    with _lock:
        return _run(probs, top_p)[3]
