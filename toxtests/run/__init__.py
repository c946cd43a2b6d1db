"""The run: the store of generations and scores, the looks, and the typed results."""

from toxtests.run.run import GateRun

__all__ = ["GateRun"]
