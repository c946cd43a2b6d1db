"""The top-p rungs that the C kernel (`native`) and the numba kernel (`nucleus`) share.

Kept apart from both so that the C path reads them without importing numba (~0.5 s of
a gate's start-up, all of it holding the GIL).
"""

from __future__ import annotations

import numpy as np

# Thresholds tried, largest first: a rung holds at most 1/t tokens, so the sort stays
# small. 2^-8 covers peaked rows, 2^-15 the flat ones seen on RealToxicityPrompts.
LADDER = np.array([2.0**-8, 2.0**-10, 2.0**-12, 2.0**-15], dtype=np.float32)
# The rung's mass (float64 sums) must exceed top_p by this much: float32 rounding of
# the caller's cumulative sums is ~1e-7, so the nucleus cannot reach past the rung.
MARGIN = 1e-4
# Tokens per block whose maximum decides whether the kernel reads it: 64 measured
# fastest (block maxima ~3.5 ms at 113 x 262k; smaller blocks cost more to reduce,
# larger ones make the kernel read more).
BLOCK = 64
