"""Prefill a decode batch in tightly padded groups, then join their KV caches.

Decoding wants wide batches (each step re-reads every weight), prefill wants little
padding (a padded position costs as much as a real one). A shard of RealToxicityPrompts
spans 3 to 43 Gemma tokens, so one left-padded rectangle wastes about 60% of its
prefill; even 128 length-sorted rows waste ~25% in the longest batch. Here the rows
(sorted by length) are cut into groups that minimise padded positions plus a fixed
per-forward overhead, each group is prefilled on its own, and the caches are left-padded
to one width and stacked, so decoding still runs over the whole batch. The joined
cache is allocated with room for the decode steps, which then write one position each
instead of concatenating (`_grow_in_place`).

Only transformers' `DynamicCache` of full or not-yet-truncated sliding-window layers,
and the native decoder's `KVCache`, are joined; anything else (another cache class, a
sliding window already full) makes `join_caches` return None and the caller prefills
the batch as one rectangle.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

# A forward pass costs about as much fixed time as this many padded positions; it
# stops the plan from splitting into many tiny, inefficient groups.
FORWARD_OVERHEAD = 32


def plan_groups(lengths: list[int], overhead: int = FORWARD_OVERHEAD) -> list[tuple[int, int]]:
    """Cut length-sorted rows into contiguous [start, end) groups, at minimum
    cost = sum over groups of (rows x longest length + overhead)."""
    if any(a > b for a, b in zip(lengths, lengths[1:], strict=False)):
        raise ValueError("plan_groups needs lengths sorted in ascending order")
    count = len(lengths)
    best = [0] * (count + 1)  # best[j]: cheapest plan of the first j rows
    cut = [0] * (count + 1)
    for end in range(1, count + 1):
        width = lengths[end - 1]
        best[end], cut[end] = min(
            (best[start] + (end - start) * width + overhead, start) for start in range(end)
        )
    groups, end = [], count
    while end > 0:
        groups.append((cut[end], end))
        end = cut[end]
    return groups[::-1]


def sample_runs(
    sequences: list[list[int]], variants: Sequence[object] | None = None
) -> tuple[list[list[int]], list[int]]:
    """Consecutive rows with the same tokens (a prompt's samples) as (one row of each
    run, the run lengths). With `variants` (each row's model variant), a run also keeps
    to one variant: the parent's and an adapter's rows of one prompt are not one prefill."""
    unique: list[list[int]] = []
    repeats: list[int] = []
    for row, sequence in enumerate(sequences):
        same_variant = variants is None or variants[row] == variants[row - 1]
        if unique and same_variant and (sequence is unique[-1] or sequence == unique[-1]):
            repeats[-1] += 1
        else:
            unique.append(sequence)
            repeats.append(1)
    return unique, repeats


def repeat_rows(cache: Any, index: Any) -> Any:
    """A joinable cache with its rows taken by `index` (repeats allowed), in place."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[index], layer.values[index]
    return cache


def joinable(cache: Any) -> bool:
    """Whether `join_caches` knows this cache's class and every one of its layers."""
    from toxtests.engines.torch.kv_cache import KVCache

    if type(cache) is KVCache:  # the native decoder's (no transformers import)
        return True
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    return type(cache) is DynamicCache and all(
        type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in cache.layers
    )


def join_caches(caches: list[Any], widths: list[int], room: int = 0) -> Any | None:
    """One cache for all groups' rows, each left-padded to the widest group's width,
    with `room` more positions allocated after them for the decode steps.

    Returns the widest group's cache object, rewritten in place; None (and nothing
    touched) where the caches are not ones this knows how to join.
    """
    if not all(joinable(cache) for cache in caches):
        return None
    layers = len(caches[0].layers)
    if any(len(cache.layers) != layers for cache in caches):
        return None
    for cache, width in zip(caches, widths, strict=True):
        for layer in cache.layers:
            # A sliding window that already dropped positions cannot be re-padded.
            if not layer.is_initialized or layer.keys.shape[-2] != width:
                return None
    widest = max(range(len(caches)), key=lambda g: widths[g])
    width = widths[widest]
    joined = caches[widest]
    for index, layer in enumerate(joined.layers):
        parts = [cache.layers[index] for cache in caches]
        rows = sum(part.keys.shape[0] for part in parts)
        _, heads, _, dim = layer.keys.shape
        # Uninitialised: every position is written before it is read, the padding with
        # zeros (masked, but a NaN left there would still poison the attention sums),
        # the room by the decode steps. Zeroing all of it cost ~0.1 s a 225-row batch.
        keys = layer.keys.new_empty(rows, heads, width + room, dim)
        values = layer.values.new_empty(rows, heads, width + room, layer.values.shape[-1])
        row = 0
        for part, part_width in zip(parts, widths, strict=True):
            count = part.keys.shape[0]
            pad = width - part_width
            keys[row : row + count, :, :pad] = 0
            values[row : row + count, :, :pad] = 0
            keys[row : row + count, :, pad:width] = part.keys
            values[row : row + count, :, pad:width] = part.values
            row += count
        layer.keys, layer.values = keys[:, :, :width], values[:, :, :width]
        if room:
            _grow_in_place(layer, keys, values)
    return joined


def _grow_in_place(layer: Any, keys: Any, values: Any) -> None:
    """Make `layer.update` write into the preallocated `keys`/`values` buffers.

    transformers' own update concatenates: a fresh (rows x positions) copy of every
    layer's keys and values at every decode step, ~37 ms a step for Gemma 3 270M at 128
    rows, where this writes one position. Once the buffer is full, or a sliding window
    would start dropping positions, the layer goes back to its class's own update.
    """
    capacity = keys.shape[-2]
    window = getattr(layer, "sliding_window", None)
    if window is not None:
        capacity = min(capacity, window - 1)

    # A weak reference: the layer holds this function, which must not hold the layer
    # (a reference cycle would keep every batch's cache alive until a garbage collection).
    owner = weakref.ref(layer)

    def update(key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> Any:
        layer: Any = owner()  # alive: only the layer itself calls this
        filled = layer.keys.shape[-2]
        end = filled + key_states.shape[-2]
        if end > capacity or layer.keys.data_ptr() != keys.data_ptr():
            del layer.update  # the class's own update from here on
            return layer.update(key_states, value_states, *args, **kwargs)
        keys[:, :, filled:end] = key_states
        values[:, :, filled:end] = value_states
        layer.keys, layer.values = keys[:, :, :end], values[:, :, :end]
        if window is not None:
            layer.cumulative_length += key_states.shape[-2]
        return layer.keys, layer.values

    layer.update = update
