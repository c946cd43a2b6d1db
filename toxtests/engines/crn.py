"""Common random numbers: what sample j of prompt p is drawn with, on every engine.

Both functions depend on (seed, prompt id, sample index) alone: never on the variant,
the batch or the engine's worker, so the parent and each adapter see the same draws.
"""

from __future__ import annotations

import hashlib

import numpy as np

# vLLM and OpenAI-compatible servers take a signed 64-bit seed; some clip larger ones.
SEED_BITS = 63


def _digest(seed: int, prompt_id: str, sample: int) -> bytes:
    return hashlib.sha256(f"{seed}\0{prompt_id}\0{sample}".encode()).digest()


def request_seed(seed: int, prompt_id: str, sample: int) -> int:
    """The per-request seed a seeded engine (vLLM, a server) is given."""
    return int.from_bytes(_digest(seed, prompt_id, sample)[:8], "little") >> (64 - SEED_BITS)


def sample_uniforms(seed: int, prompt_id: str, sample: int, steps: int) -> np.ndarray:
    """The torch engine's uniforms of one (prompt, sample), one per decode step."""
    rng = np.random.default_rng(int.from_bytes(_digest(seed, prompt_id, sample)[:8], "little"))
    return rng.random(steps)
