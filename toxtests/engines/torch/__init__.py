"""The torch engine: toxtests' own transformers decode loop and its speed machinery.

Nothing outside this subpackage imports its modules; the gate reaches it only through
`toxtests.engines.create_engine("torch", ...)`.
"""

from toxtests.engines.torch.engine import TorchEngine

__all__ = ["TorchEngine"]
