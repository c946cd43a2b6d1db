"""toxtests: did this LoRA/PEFT adapter make the model more toxic than its parent?

The library runs one direction: prompts → shards → generate → score → compare → gate →
report. `GateSession` drives a run; the pytest plugin and the `toxtests` CLI are thin
layers over it.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
