"""The fused output head: the model's own logits, chunk by chunk, or no head at all."""

from __future__ import annotations

import helpers_models
import pytest
import torch

from toxtests.config import GenerationConfig
from toxtests.engines.torch import native
from toxtests.engines.torch.head import OutputHead, output_head
from toxtests.engines.torch.loop import Generator
from toxtests.prompts import Prompt

PROMPTS = [
    Prompt("a", "the weather"),
    Prompt("b", "little more while other house garden music and then some of the water"),
    Prompt("c", "we made"),
    Prompt("d", "she said that they would go home after the river"),
    Prompt("e", "it"),
]


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = helpers_models.build_tiny_gemma3(tmp_path_factory.mktemp("gemma"))
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(directory))


@pytest.fixture(scope="module")
def plain_llama(tiny):  # noqa: ANN001, ANN201
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny.base), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(tiny.base))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 2.5])
def test_chunked_logits_and_probabilities_equal_the_plain_ones(bias: bool, softcap) -> None:  # noqa: ANN001
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(1000, 24, generator=generator)
    offsets = torch.randn(1000, generator=generator) if bias else None
    hidden = torch.randn(7, 24, generator=generator)
    head = OutputHead(weight, offsets, softcap, chunk=96)  # 1000 is no multiple of 96
    assert len(head.chunks) == 11
    expected = torch.nn.functional.linear(hidden, weight, offsets)
    if softcap:
        expected = torch.tanh(expected / softcap) * softcap
        assert expected.abs().max() < softcap  # the cap did bite: random logits reach ~15
    torch.testing.assert_close(head.logits(hidden), expected, rtol=1e-5, atol=1e-5)
    probs = head.probabilities(hidden, 0.7)
    torch.testing.assert_close(probs, torch.softmax(expected / 0.7, -1), rtol=1e-5, atol=1e-6)
    for packed in (False, True):  # the chunks the native sampler reads, in vocabulary order
        chunked = OutputHead(weight, offsets, softcap, chunk=96, use_packed=packed)
        parts = chunked.logit_chunks(hidden)
        assert all(part.is_contiguous() for part in parts)
        torch.testing.assert_close(torch.cat(parts, -1), expected, rtol=1e-5, atol=1e-5)


def test_buffers_are_reused_across_steps_and_released() -> None:
    """A fresh (rows x vocab) block per step costs page faults; the head keeps one."""
    head = OutputHead(torch.randn(500, 8), chunk=128)
    first = head.logits(torch.randn(4, 8)).data_ptr()
    assert head.logits(torch.randn(4, 8)).data_ptr() == first
    assert head.logits(torch.randn(3, 8)).data_ptr() == first  # fewer rows: same block
    head.release()
    assert head._buffer is None


def test_head_is_used_for_a_plain_model_and_matches_its_logits(plain_llama) -> None:  # noqa: ANN001
    model, _ = plain_llama
    found = output_head(model, "cpu")
    assert found is not None
    decoder, head = found
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    with torch.inference_mode():
        hidden = decoder(input_ids=ids).last_hidden_state
        torch.testing.assert_close(head.logits(hidden[0]), model(input_ids=ids).logits[0])


def test_soft_cap_is_applied(tiny_gemma) -> None:  # noqa: ANN001
    model, _ = tiny_gemma
    found = output_head(model, "cpu")
    assert found is not None and found[1].softcap == 3.0


def test_no_head_where_an_adapter_wraps_the_output_layer(tiny_loaded) -> None:  # noqa: ANN001
    """The tiny adapters train lm_head too: the model's own forward must be used."""
    assert output_head(tiny_loaded.model, "cpu") is None


def test_no_head_where_the_probe_logits_differ(tiny, plain_llama) -> None:  # noqa: ANN001
    """A model that post-processes its logits (here a hook doubling them) keeps its own
    path: the probe forward catches what the type checks cannot."""
    model, _ = plain_llama
    handle = model.lm_head.register_forward_hook(lambda module, args, output: output * 2)
    try:
        assert output_head(model, "cpu") is None
    finally:
        handle.remove()
    assert output_head(model, "cpu") is not None
    assert output_head(model, "cuda") is None  # GPUs keep the model's own head


@pytest.mark.parametrize("do_sample", [True, False])
@pytest.mark.parametrize("which", ["llama", "gemma"])
def test_fused_generation_equals_the_models_own_head(
    which: str, do_sample: bool, plain_llama, tiny_gemma, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    model, tokenizer = plain_llama if which == "llama" else tiny_gemma
    settings = GenerationConfig(max_new_tokens=10, samples=2, do_sample=do_sample, top_p=0.8)
    fused = Generator(model, tokenizer, settings, "cpu")
    own = Generator(model, tokenizer, settings, "cpu")
    assert fused.fused is not None
    own.fused = None
    native_calls = []  # a spy: the fused head's sampling goes through the native kernel
    real_sample = native.top_p_sample
    monkeypatch.setattr(
        native, "top_p_sample", lambda *a, **k: native_calls.append(1) or real_sample(*a, **k)
    )
    texts = lambda rows: [g.text for row in rows for g in row]  # noqa: E731
    got = texts(fused.generate(PROMPTS, None))
    used_native = bool(native_calls)
    assert got == texts(own.generate(PROMPTS, None))
    assert sum(bool(t) for t in got) >= 5
    assert used_native == (do_sample and native.load() is not None)
