"""The KV cache of the native decoder (`toxtests.engines.torch.gemma3`).

Per layer, the keys and values of every position seen so far, (rows, kv heads,
positions, head size). A sliding-window layer keeps all of them too: the attention
kernel reads only the window (`attention.row_attention` gets the window), so the bits
are those of a cache that drops the old positions, and the cache never stops being one
`prefill.join_caches` can join.
"""

from __future__ import annotations

from typing import Any

import torch


class KVLayer:
    """One layer's keys and values; `update` appends the new positions and returns all.

    `sliding_window` is None: nothing is ever dropped (see the module docstring), which
    is what `prefill._grow_in_place` reads to size its buffer."""

    sliding_window = None

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    @property
    def is_initialized(self) -> bool:
        return self.keys is not None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is None or self.values is None:
            self.keys, self.values = key_states, value_states
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        return self.keys, self.values


class KVCache:
    """Every layer's `KVLayer`, as the decode loop and `prefill` use a cache."""

    def __init__(self, layers: int) -> None:
        self.layers = [KVLayer() for _ in range(layers)]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layers[layer].update(key_states, value_states)

    def get_seq_length(self) -> int:
        keys = self.layers[0].keys if self.layers else None
        return 0 if keys is None else int(keys.shape[-2])
