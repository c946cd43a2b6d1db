"""The output projection in vocabulary chunks, into a buffer reused from step to step.

On a CPU the last decoder state of each row goes through a (hidden x vocab) projection:
for Gemma 3 that is 262k columns and two thirds of a token's FLOPs. As one matrix
product its (rows x 262k) output overflows every cache and runs at ~85-100 GFLOP/s on
this machine; in 1024-column chunks the same product runs at ~135-145 GFLOP/s with MKL,
and in 4096-column chunks with oneDNN and packed weights (`toxtests.engines.torch.packed`) at ~185.
The logits, then the probabilities over them, live in one buffer reused from step to
step: a fresh (128 x 262k) allocation costs more in page faults (~45 ms) than the
softmax itself (~14 ms).

Where the native top-p kernel runs (`toxtests.engines.torch.native`), sampling reads
the chunks as they come out (`logit_chunks`) and the buffer is never filled.

The head is only used where it is provably the model's own: a plain `nn.Linear` output
layer (not wrapped by an adapter), with Gemma's final-logit soft cap applied when the
config has one, and a probe forward whose logits must match the model's own (the native
decoder's are by construction).
"""

from __future__ import annotations

from typing import Any

import torch

from toxtests.engines.torch import packed

CHUNK = 1024  # MKL: 1024-column chunks measured fastest (135-145 GFLOP/s)
PACKED_CHUNK = 4096  # oneDNN with packed chunks: 4096 measured fastest (~190 GFLOP/s)


class OutputHead:
    """Logits, or token probabilities, from the decoder's last hidden states."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        softcap: float | None = None,
        chunk: int | None = None,
        use_packed: bool | None = None,
    ):
        """`use_packed` (default: where available) runs each chunk through oneDNN with
        its weight packed once (`toxtests.engines.torch.packed`)."""
        self.weight = weight
        self.bias = bias
        self.softcap = softcap
        if use_packed is None:
            use_packed = weight.dtype == torch.float32 and weight.device.type == "cpu"
        use_packed = use_packed and not weight.is_inference() and packed.available()
        chunk = chunk or (PACKED_CHUNK if use_packed else CHUNK)
        vocab = weight.shape[0]
        self.chunks = [(start, min(start + chunk, vocab)) for start in range(0, vocab, chunk)]
        self._packs = [packed.pack(weight[a:b]) for a, b in self.chunks] if use_packed else None
        self._version = weight._version if use_packed else None
        self._buffer: torch.Tensor | None = None

    def _output(self, hidden: torch.Tensor) -> torch.Tensor:
        """A (rows, vocab) buffer reused across steps: a fresh 100+ MB allocation per
        step costs tens of milliseconds in page faults alone on a CPU."""
        rows = hidden.shape[0]
        buffer = self._buffer
        if (
            buffer is None
            or buffer.shape[0] < rows
            or buffer.dtype != hidden.dtype
            or buffer.device != hidden.device
        ):
            buffer = torch.empty(rows, self.vocab, dtype=hidden.dtype, device=hidden.device)
            self._buffer = buffer
        return buffer[:rows]

    def release(self) -> None:
        """Drop the reused buffer (the caller is done generating)."""
        self._buffer = None

    @property
    def vocab(self) -> int:
        return int(self.weight.shape[0])

    def _capped(self, block: torch.Tensor) -> torch.Tensor:
        if self.softcap:
            block.div_(self.softcap).tanh_().mul_(self.softcap)
        return block

    def _packed_chunk(self, hidden: torch.Tensor, index: int) -> torch.Tensor:
        """Chunk `index` of the logits, a fresh contiguous block, through oneDNN."""
        assert self._packs is not None
        start, end = self.chunks[index]
        bias = None if self.bias is None else self.bias[start:end]
        return self._capped(packed.linear(hidden, self._packs[index], bias))

    def _project(self, hidden: torch.Tensor, out: torch.Tensor, index: int) -> None:
        start, end = self.chunks[index]
        block = out[:, start:end]
        if self._packs is not None:
            block.copy_(self._packed_chunk(hidden, index))
            return
        if self.bias is None:
            torch.mm(hidden, self.weight[start:end].t(), out=block)
        else:
            torch.addmm(self.bias[start:end], hidden, self.weight[start:end].t(), out=block)
        self._capped(block)

    def _drop_stale_packs(self) -> None:
        if self._packs is not None and self.weight._version != self._version:
            self._packs = None  # the weight changed since it was packed

    def logit_chunks(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        """The logits as contiguous (rows, chunk) blocks in vocabulary order, without
        the copy into one buffer (~10 ms a step at 225 rows on Gemma): for readers that
        take them chunk by chunk (`toxtests.engines.torch.native`)."""
        self._drop_stale_packs()
        if self._packs is None:
            return [self.logits(hidden)]
        return [self._packed_chunk(hidden, index) for index in range(len(self.chunks))]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(rows, vocab) logits of (rows, hidden) final hidden states."""
        self._drop_stale_packs()
        out = self._output(hidden)
        for index in range(len(self.chunks)):
            self._project(hidden, out, index)
        return out

    def probabilities(self, hidden: torch.Tensor, temperature: float) -> torch.Tensor:
        """(rows, vocab) softmax(logits / temperature), in place of the logits: the
        softmax reads each row before writing it, and writing over lines it has just
        read saves the memory traffic of a second buffer (28 vs 31 ms a step at 225
        rows; the same values, bit for bit)."""
        logits = self.logits(hidden)
        if temperature != 1.0:
            logits.div_(temperature)
        return torch.ops.aten._softmax.out(logits, -1, False, out=logits)


def output_head(model: Any, device: str) -> tuple[Any, OutputHead] | None:
    """(decoder, fused head) for `model` where the head is exactly the model's own.

    None on GPUs (a full-vocabulary softmax is cheap there, the half-precision logits
    are better left to the model), for output layers an adapter wraps, and for any
    model whose probe logits the head does not reproduce (a logit scale, say).
    """
    if not device.startswith("cpu"):
        return None
    layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(layer) is not torch.nn.Linear or layer.weight.dtype != torch.float32:
        return None
    try:
        decoder = model.get_decoder()
    except (AttributeError, ValueError, NotImplementedError):
        return None
    config = getattr(model, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    head = OutputHead(layer.weight, layer.bias, float(softcap) if softcap else None)
    if getattr(model, "toxtests_native", False):
        # The native decoder's logits are this head's by construction (its forward is
        # the decoder, this layer, this soft cap): no probe forward (~0.1-0.2 s a gate).
        return decoder, head
    probe = torch.arange(1, min(5, head.vocab), device=layer.weight.device).unsqueeze(0)
    with torch.inference_mode():
        try:
            expected = model(input_ids=probe).logits[:, -1]
            hidden = decoder(input_ids=probe).last_hidden_state[:, -1]
        except Exception:  # noqa: BLE001 - an unusual model keeps the model's own path
            return None
        got = head.logits(hidden)
    scale = float(expected.abs().max()) or 1.0
    if got.shape != expected.shape or not torch.allclose(
        got, expected, rtol=1e-4, atol=1e-4 * scale
    ):
        return None
    return decoder, head
