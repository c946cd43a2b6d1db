"""Packed oneDNN linears: the same outputs, and the ordinary path whenever it must be."""

from __future__ import annotations

import helpers_models
import pytest
import torch

from toxtests.engines.torch import packed

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


def _mlp_outputs(model, inputs: torch.Tensor) -> list[torch.Tensor]:  # noqa: ANN001
    with torch.inference_mode():
        return [layer.mlp(inputs) for layer in model.model.layers]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_fused_mlps_give_the_same_outputs(family: str, tmp_path) -> None:  # noqa: ANN001
    """SiLU (Llama) and tanh-GELU (Gemma) MLPs, fused into two oneDNN products."""
    from transformers import AutoModelForCausalLM

    build = (
        helpers_models.build_tiny_llama if family == "llama" else helpers_models.build_tiny_gemma3
    )
    model = AutoModelForCausalLM.from_pretrained(str(build(tmp_path / family))).eval()
    inputs = torch.randn(4, 3, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[1, 5, 9, 12, 7], [3, 4, 5, 6, 8]])
    before, logits = _mlp_outputs(model, inputs), _logits(model, ids)
    packed.pack_linears(model)
    assert packed.fuse_gated_mlps(model) == len(model.model.layers)
    assert packed.fuse_gated_mlps(model) == 0  # already fused
    for got, expected in zip(_mlp_outputs(model, inputs), before, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_logits(model, ids), logits, rtol=1e-4, atol=1e-4)
    packed.unpack_linears(model)
    assert not any("forward" in vars(m) for m in model.modules())
    for got, expected in zip(_mlp_outputs(model, inputs), before, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_an_unknown_activation_is_not_fused(model) -> None:  # noqa: ANN001
    for layer in model.model.layers:
        layer.mlp.act_fn = torch.nn.ReLU()  # not in the table: its own forward stays
    packed.pack_linears(model)
    assert packed.fuse_gated_mlps(model) == 0


def test_a_fused_mlp_takes_its_own_forward_when_it_must(model) -> None:  # noqa: ANN001
    """An adapter wrapping a projection after fusing, a changed weight, gradients: the
    module's own forward, exactly."""
    from peft import LoraConfig, get_peft_model

    packed.pack_linears(model)
    assert packed.fuse_gated_mlps(model) == 2
    mlp = model.model.layers[0].mlp
    inputs = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(2))

    def own() -> torch.Tensor:
        return type(mlp).forward(mlp, inputs)

    with torch.no_grad():
        mlp.up_proj.weight.mul_(1.5)  # the packed copy is stale now
        torch.testing.assert_close(mlp(inputs), own(), rtol=0, atol=0)
    with torch.enable_grad():
        inputs.requires_grad_(True)
        mlp(inputs).sum().backward()
        assert inputs.grad is not None and inputs.grad.abs().sum() > 0
        inputs.requires_grad_(False)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=["gate_proj"], init_lora_weights=False)
    )
    mlp = peft_model.base_model.model.model.layers[1].mlp
    assert type(mlp.gate_proj) is not torch.nn.Linear
    with torch.no_grad():
        got = mlp(inputs)
        with peft_model.disable_adapter():
            parent = mlp(inputs)
        torch.testing.assert_close(got, own(), rtol=0, atol=0)
    assert not torch.allclose(got, parent)  # the adapter's effect is there


def _lora_model(model):  # noqa: ANN001, ANN202
    """Two non-trivial LoRA adapters (PEFT's random B, not zeros) on the tiny Llama."""
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "v_proj", "o_proj", "gate_proj"]
    torch.manual_seed(5)
    config = LoraConfig(r=4, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(model, config, adapter_name="first")
    second = LoraConfig(r=2, target_modules=targets, init_lora_weights=False)
    peft_model.add_adapter("second", second)
    return peft_model.eval()


def test_merged_lora_layers_give_the_adapters_own_logits(model) -> None:  # noqa: ANN001
    peft_model = _lora_model(model)
    ids = torch.tensor([[1, 5, 9, 12, 7], [3, 4, 5, 6, 8]])
    expected = {}
    for name in ("first", "second"):
        peft_model.set_adapter(name)
        expected[name] = _logits(peft_model, ids)
    with peft_model.disable_adapter():
        parent = _logits(peft_model, ids)
    assert not torch.allclose(expected["first"], parent, atol=1e-3)  # the adapters do something
    packed.pack_linears(peft_model)
    layers = 4 * len(model.model.layers)
    assert packed.merge_adapter_layers(peft_model, "first") == layers
    assert packed.merge_adapter_layers(peft_model, "first") == layers  # kept, not rebuilt
    peft_model.set_adapter("first")
    torch.testing.assert_close(_logits(peft_model, ids), expected["first"], rtol=1e-4, atol=1e-5)
    peft_model.set_adapter("second")  # not merged for it yet: PEFT's own path
    torch.testing.assert_close(_logits(peft_model, ids), expected["second"], rtol=1e-4, atol=1e-5)
    assert packed.merge_adapter_layers(peft_model, "second") == layers
    torch.testing.assert_close(_logits(peft_model, ids), expected["second"], rtol=1e-4, atol=1e-5)
    with peft_model.disable_adapter():  # the parent runs on the untouched weights
        torch.testing.assert_close(_logits(peft_model, ids), parent, rtol=1e-4, atol=1e-5)
    packed.unpack_linears(peft_model)
    assert not any("forward" in vars(m) for m in peft_model.modules())


def test_a_merged_lora_layer_takes_peft_forward_when_it_must(model) -> None:  # noqa: ANN001
    """A changed LoRA weight, gradients, two active adapters: PEFT's forward, exactly."""
    peft_model = _lora_model(model)
    packed.pack_linears(peft_model)
    packed.merge_adapter_layers(peft_model, "first")
    peft_model.set_adapter("first")
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    inputs = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(6))

    def own() -> torch.Tensor:
        return type(layer).forward(layer, inputs)

    with torch.no_grad():
        merged = layer(inputs)
        torch.testing.assert_close(merged, own(), rtol=1e-4, atol=1e-5)
        layer.lora_B["first"].weight.mul_(3.0)  # the merged copy is stale now
        torch.testing.assert_close(layer(inputs), own(), rtol=0, atol=0)
        assert not torch.allclose(layer(inputs), merged, atol=1e-4)
    assert packed.merge_adapter_layers(peft_model, "first") == 4 * len(model.model.layers)
    with torch.no_grad():
        torch.testing.assert_close(layer(inputs), own(), rtol=1e-4, atol=1e-5)
    with torch.enable_grad():
        layer(inputs).sum().backward()
    assert layer.lora_A["first"].weight.grad is not None  # the merged copy has no autograd
    layer.set_adapter(["first", "second"])  # two active adapters: not one merged weight
    with torch.no_grad():
        torch.testing.assert_close(layer(inputs), own(), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(2048, 640), (640, 2048), (1024, 640), (640, 1024), (256, 640)])
def test_a_packed_row_is_the_same_alone_and_in_any_batch(shape: tuple[int, int]) -> None:
    """Gemma 3 270M's projection shapes: each row of a product is bit-identical whatever
    the number of rows beside it, one row alone included (oneDNN has a kernel of its own
    for a single row of 640 x 2048 on an AMD EPYC that rounds otherwise)."""
    import torch

    from toxtests.engines.torch import packed

    if not packed.available():
        pytest.skip("this PyTorch has no oneDNN packed linears")
    generator = torch.Generator().manual_seed(sum(shape))
    weight = torch.randn(*shape, generator=generator)
    bias = torch.randn(shape[0], generator=generator)
    inputs = torch.randn(260, shape[1], generator=generator)
    weights = packed.pack(weight)
    with torch.inference_mode():
        everything = packed.linear(inputs, weights, bias)
        for rows in (1, 2, 3, 7, 16, 33, 128, 259):
            assert torch.equal(packed.linear(inputs[:rows], weights, bias), everything[:rows]), rows
        alone = packed.linear(inputs[:1].reshape(1, 1, -1), weights, bias)
        assert alone.shape == (1, 1, shape[0]) and torch.equal(alone[0], everything[:1])
