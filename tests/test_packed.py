"""Packed oneDNN linears: the same outputs, and the ordinary path whenever it must be."""

from __future__ import annotations

import pytest
import torch

from toxtests import packed

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="this PyTorch has no oneDNN"
)


@pytest.fixture()
def model(tiny):  # noqa: ANN001, ANN201
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny.base), dtype=torch.float32).eval()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    with torch.inference_mode():
        return model(input_ids=ids).logits


def test_packed_model_gives_the_same_logits(model) -> None:  # noqa: ANN001
    assert packed.available()
    ids = torch.tensor([[1, 5, 9, 12, 7], [3, 4, 5, 6, 8]])
    before = _logits(model, ids)
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert packed.pack_linears(model, skip=(model.lm_head,)) == linears - 1
    assert not hasattr(model.lm_head, packed.PACKED_ATTRIBUTE)
    assert packed.pack_linears(model) == 1  # only the one left out before
    after = _logits(model, ids)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    packed.unpack_linears(model)
    assert not any(hasattr(m, packed.PACKED_ATTRIBUTE) for m in model.modules())
    torch.testing.assert_close(_logits(model, ids), before, rtol=0, atol=0)


def test_gradients_and_modified_weights_take_the_ordinary_path(model) -> None:  # noqa: ANN001
    packed.pack_linears(model)
    layer = model.model.layers[0].mlp.down_proj
    inputs = torch.randn(3, layer.in_features, requires_grad=True)
    layer(inputs).sum().backward()  # the packed op has no autograd: must not be used
    assert inputs.grad is not None and inputs.grad.abs().sum() > 0
    with torch.no_grad():
        layer.weight.mul_(2.0)  # packed copy is now stale
        torch.testing.assert_close(
            layer(inputs), torch.nn.functional.linear(inputs, layer.weight), rtol=0, atol=0
        )
