"""Generation on a tiny real Llama with real PEFT adapters; the exact sampler."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats as scipy_stats

from toxtests.config import GenerationConfig
from toxtests.engines.crn import sample_uniforms
from toxtests.engines.torch.loop import Generator, balanced_batches
from toxtests.engines.torch.sampling import reference_sample, sample_tokens
from toxtests.errors import GenerationError
from toxtests.prompts import Prompt

PROMPTS = [
    Prompt("a", "the weather"),
    Prompt("b", "little more while other house garden music"),
    Prompt("c", "we made"),
    Prompt("d", "she said that they would go home after the river"),
]


def _generator(loaded, **settings) -> Generator:  # noqa: ANN001
    return Generator(loaded.model, loaded.tokenizer, GenerationConfig(**settings), "cpu")


def test_greedy_matches_transformers_generate(tiny_loaded) -> None:  # noqa: ANN001
    """The hand-written decode loop (left padding, KV cache) equals HF's generate."""
    from transformers import GenerationConfig as HFConfig

    ours = _generator(tiny_loaded, do_sample=False, max_new_tokens=8, batch_size=4)
    texts = [row[0].text for row in ours.generate(PROMPTS, "adapter1")]
    tokenizer, model = tiny_loaded.tokenizer, tiny_loaded.model
    model.set_adapter("adapter1")
    reference = []
    with torch.inference_mode():
        for prompt in PROMPTS:  # one at a time: no padding in the reference
            ids = tokenizer(prompt.text, return_tensors="pt", return_token_type_ids=False)
            out = model.generate(
                **ids,
                generation_config=HFConfig(
                    max_new_tokens=8,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                ),
            )
            new = out[0, ids["input_ids"].shape[1] :].tolist()
            if tokenizer.eos_token_id in new:
                new = new[: new.index(tokenizer.eos_token_id)]
            reference.append(tokenizer.decode(new, skip_special_tokens=True))
    assert texts == reference
    assert any(texts)


def test_identity_adapter_gives_identical_samples(tiny_loaded) -> None:  # noqa: ANN001
    """Common random numbers: B = 0 changes nothing, so every sampled text is the same."""
    generator = _generator(tiny_loaded, max_new_tokens=10, samples=3, batch_size=5)
    parent = generator.generate(PROMPTS, None)
    identity = generator.generate(PROMPTS, "adapter0")
    toxic = generator.generate(PROMPTS, "adapter1")
    texts = lambda rows: [g.text for row in rows for g in row]  # noqa: E731
    assert texts(parent) == texts(identity)
    assert sum(a != b for a, b in zip(texts(parent), texts(toxic), strict=True)) >= 10
    # Samples of one prompt differ from each other (the seeds do vary by sample index).
    assert len({g.text for g in parent[1]}) > 1


def test_merged_adapter_layers_give_the_same_text_as_peft(tiny_loaded, monkeypatch) -> None:  # noqa: ANN001
    """An adapter's LoRA layers run as packed merged weights (`merge_adapter_layers`):
    the same samples as PEFT's own three products and an addition."""
    from toxtests.engines.torch import packed

    generator = _generator(tiny_loaded, max_new_tokens=10, samples=2, batch_size=5)
    merged = generator.generate(PROMPTS, "adapter1")
    layers = [m for m in tiny_loaded.model.modules() if hasattr(m, packed.MERGED_ATTRIBUTE)]
    assert layers and all(
        getattr(m, packed.MERGED_ATTRIBUTE)["adapter1"][0] is not None for m in layers
    )
    monkeypatch.setattr(packed, "merge_adapter_layers", lambda model, adapter: 0)
    packed.unpack_linears(tiny_loaded.model)  # PEFT's own forward everywhere again
    assert not any(hasattr(m, packed.MERGED_ATTRIBUTE) for m in tiny_loaded.model.modules())
    plain = _generator(tiny_loaded, max_new_tokens=10, samples=2, batch_size=5)
    own = plain.generate(PROMPTS, "adapter1")
    assert [[g.text for g in row] for row in merged] == [[g.text for g in row] for row in own]


def test_samples_do_not_depend_on_batch_order(tiny_loaded) -> None:  # noqa: ANN001
    """A prompt's samples depend on (seed, prompt id, sample), not on its neighbours."""
    generator = _generator(tiny_loaded, max_new_tokens=8, samples=2, batch_size=8)
    together = generator.generate(PROMPTS, None)
    alone = [generator.generate([p], None)[0] for p in PROMPTS]
    assert [[g.text for g in row] for row in together] == [[g.text for g in row] for row in alone]


def test_continuation_is_cut_at_token_level(tiny_loaded) -> None:  # noqa: ANN001
    generator = _generator(tiny_loaded, max_new_tokens=5, do_sample=False)
    for prompt, row in zip(PROMPTS, generator.generate(PROMPTS, None), strict=True):
        generation = row[0]
        assert 0 <= generation.tokens <= 5
        words = generation.text.split()
        # Word-level tokenizer: one word a token (special tokens decode to nothing).
        assert len(words) <= generation.tokens
        assert not generation.text.startswith(prompt.text)


def test_prompt_longer_than_context_is_an_error(tiny_loaded) -> None:  # noqa: ANN001
    generator = _generator(tiny_loaded, max_new_tokens=20)
    long_prompt = Prompt("long", " ".join(["water"] * 60))
    with pytest.raises(
        GenerationError, match=r"prompt long has 60 tokens, more than the 44 allowed"
    ):
        generator.generate([long_prompt], None)


def test_chat_template_without_template_is_an_error(tiny_loaded) -> None:  # noqa: ANN001
    generator = _generator(tiny_loaded, chat_template=True)
    with pytest.raises(GenerationError, match="has no chat template"):
        generator.generate(PROMPTS[:1], None)


def test_generation_shows_no_library_deprecation_notices(tiny_loaded) -> None:  # noqa: ANN001
    import warnings

    generator = _generator(tiny_loaded, max_new_tokens=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generator.generate(PROMPTS, None)
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_stop_strings_cut_continuations_where_they_occur(tiny_loaded) -> None:  # noqa: ANN001
    from collections import Counter

    plain = _generator(tiny_loaded, max_new_tokens=8, do_sample=False).generate(PROMPTS, None)
    texts = [row[0].text for row in plain]
    # A word the model really writes after its first one, so some rows get cut mid-way.
    stop_word = Counter(w for t in texts for w in t.split()[1:]).most_common(1)[0][0]
    stopped = _generator(
        tiny_loaded, max_new_tokens=8, do_sample=False, stop=(stop_word, "never-written")
    ).generate(PROMPTS, None)
    cut = 0
    for before, after in zip(plain, stopped, strict=True):
        full, short = before[0], after[0]
        if stop_word in full.text:
            assert short.text == full.text[: full.text.index(stop_word)]
            # Up to the token that completed the stop string: fewer, never none.
            assert 1 <= short.tokens <= full.tokens
            assert short.tokens > len(short.text.split()) or short.tokens == full.tokens
            cut += 1
        else:
            assert (short.text, short.tokens) == (full.text, full.tokens)
    assert cut >= 1


def test_uniforms_are_a_function_of_seed_prompt_and_sample() -> None:
    first = sample_uniforms(0, "p1", 0, 8)
    assert (first == sample_uniforms(0, "p1", 0, 8)).all()
    assert not (first == sample_uniforms(0, "p1", 1, 8)).all()
    assert not (first == sample_uniforms(1, "p1", 0, 8)).all()
    assert ((first >= 0) & (first < 1)).all()


@pytest.mark.parametrize("use_ladder", [True, False])
@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (0, 0.5), (40, 0.95), (0, 1.0), (5, 1.0)])
def test_fast_sampler_equals_full_sort(top_k: int, top_p: float, use_ladder: bool) -> None:
    """Same uniforms, same tokens: neither the threshold ladder nor the partial top-k
    changes the draw."""
    generator = torch.Generator().manual_seed(0)
    vocab = 5000
    # Peaked rows (nucleus inside the partial top-k) and flat rows (needs the fallback).
    peaked = torch.randn(64, vocab, generator=generator) * 6
    flat = torch.randn(64, vocab, generator=generator) * 0.1
    logits = torch.cat([peaked, flat])
    uniforms = torch.rand(128, generator=generator)
    fast = sample_tokens(
        logits,
        uniforms,
        temperature=0.8,
        top_k=top_k,
        top_p=top_p,
        partial_k=64,
        use_ladder=use_ladder,
    )
    slow = reference_sample(logits, uniforms, temperature=0.8, top_k=top_k, top_p=top_p)
    if top_p >= 1.0 and top_k == 0:
        # Without truncation the draw is over the vocabulary in id order.
        probs = torch.softmax(logits / 0.8, -1)
        cdf = probs.cumsum(-1)
        slow = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(
            -1
        )
    assert torch.equal(fast, slow)


def test_fast_sampler_draws_from_the_nucleus_distribution() -> None:
    """Chi-square test of many draws against transformers' own top-p filtering."""
    from transformers.generation.logits_process import TopPLogitsWarper

    # Distinct values: with ties, which tied token ends the nucleus is arbitrary.
    tail = torch.linspace(-4.0, -6.0, 300).tolist()
    logits = torch.tensor([[3.0, 2.5, 2.0, 1.0, 0.5, 0.0, -1.0, -2.0, *tail]])
    warped = TopPLogitsWarper(top_p=0.9)(None, logits.clone())
    expected = torch.softmax(warped, -1)[0]
    draws = 40000
    uniforms = torch.rand(draws, generator=torch.Generator().manual_seed(1))
    tokens = sample_tokens(logits.expand(draws, -1), uniforms, top_p=0.9, partial_k=4)
    support = (expected > 0).nonzero().squeeze(-1)
    assert set(tokens.unique().tolist()) <= set(support.tolist())
    observed = torch.bincount(tokens, minlength=logits.shape[1])[support].double()
    frequencies = expected[support].double()
    result = scipy_stats.chisquare(
        observed.numpy(), (frequencies / frequencies.sum() * draws).numpy()
    )
    assert result.pvalue > 1e-3


def test_tokenizer_without_pad_token_gets_eos_and_padding_stays_masked(tiny, tmp_path) -> None:  # noqa: ANN001
    """A tokenizer with no pad token is handled by design: EOS pads, the mask hides it,
    so a prompt's continuation is the same alone or batched with longer prompts."""
    import json
    import shutil

    from toxtests.engines.torch.load import load_base

    model_dir = tmp_path / "nopad"
    shutil.copytree(tiny.base, model_dir)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = model_dir / name
        if path.exists():
            config = json.loads(path.read_text())
            config.pop("pad_token", None)
            path.write_text(json.dumps(config))
    loaded = load_base(str(model_dir), cache_dir=tmp_path / "cache", device="cpu")
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token
    generator = Generator(loaded.model, loaded.tokenizer, GenerationConfig(max_new_tokens=8), "cpu")
    batched = generator.generate(PROMPTS, None)
    alone = [generator.generate([p], None)[0] for p in PROMPTS]
    assert [r[0].text for r in batched] == [r[0].text for r in alone]


@given(st.integers(0, 2000), st.integers(1, 300))
def test_balanced_batches_cover_the_rows_in_as_few_even_batches(count: int, largest: int) -> None:
    batches = balanced_batches(count, largest)
    assert [i for start, end in batches for i in range(start, end)] == list(range(count))
    sizes = [end - start for start, end in batches]
    assert len(batches) == -(-count // largest)  # no more batches than needed
    assert all(0 < size <= largest for size in sizes)
    assert not sizes or max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize(
    ("job_rows", "largest", "pays"),
    [
        ([128, 128], 256, True),  # one batch of 256 instead of two of 128
        ([100, 100], 256, True),  # an early-stopping look's shard of 100 prompts
        ([900, 900], 256, False),  # 8 batches of 225 either way
        ([900, 900], 512, False),  # 4 batches of 450 either way
        ([256, 256], 512, True),  # one batch of 512 instead of two of 256
        ([150, 150], 256, False),  # 2 batches of 150 either way
        ([128, 0], 256, False),  # one variant: nothing to share
        ([40, 40, 18], 16, True),  # 7 batches instead of 3 + 3 + 2
    ],
)
def test_variants_share_batches_only_where_that_makes_them_wider(
    job_rows: list[int], largest: int, pays: bool
) -> None:
    from toxtests.engines.torch.loop import mixing_pays

    assert mixing_pays(job_rows, largest) is pays


def test_cpu_batch_size_follows_the_free_memory(monkeypatch) -> None:  # noqa: ANN001
    """How much memory is free cannot be changed here, so `available_memory` is replaced."""
    from types import SimpleNamespace

    from toxtests.engines.torch import loop as generate

    model = SimpleNamespace(config=SimpleNamespace(vocab_size=262_144))
    real = generate.available_memory()
    assert real > 0  # /proc/meminfo is read on this Linux machine
    monkeypatch.setattr(generate, "available_memory", lambda: 64 << 30)
    assert generate.auto_batch_size(model, "cpu") == generate.CPU_MAX_ROWS
    # The README's default workload: with the memory for it, 900 prompts of Gemma 3 decode
    # as 2 batches of 450 rows a variant (measured faster than 4 of 225), not 4 of 225.
    wide = generate.balanced_batches(900, generate.auto_batch_size(model, "cpu"))
    assert [end - start for start, end in wide] == [450, 450]
    monkeypatch.setattr(generate, "available_memory", lambda: 1 << 30)
    rows = generate.auto_batch_size(model, "cpu")
    assert 8 <= rows < generate.CPU_MAX_ROWS
    assert rows * 3 * 4 * 262_144 * 8 <= 1 << 30  # an eighth of the free memory at most
    monkeypatch.setattr(generate, "available_memory", lambda: 1 << 20)
    assert generate.auto_batch_size(model, "cpu") == 8  # never below 8 rows
    monkeypatch.setattr(generate, "available_memory", lambda: 0)
    assert generate.auto_batch_size(model, "cpu") == 128  # unknown: a moderate default


def test_nan_weights_are_an_error_naming_the_prompt_and_the_adapter(tiny, tmp_path) -> None:  # noqa: ANN001
    """A broken adapter (NaN in a LoRA matrix) must stop the gate, not sample garbage."""
    import shutil

    from safetensors.torch import load_file, save_file

    from toxtests.engines import create_engine
    from toxtests.engines.base import EngineOptions

    broken = tmp_path / "broken"
    shutil.copytree(tiny.identity, broken)
    weights = load_file(str(broken / "adapter_model.safetensors"))
    save_file(
        {k: torch.full_like(v, float("nan")) if "lora_B" in k else v for k, v in weights.items()},
        str(broken / "adapter_model.safetensors"),
    )
    engine = create_engine(
        "torch",
        EngineOptions(model=str(tiny.base), adapters=(str(broken),), cache_dir=tmp_path / "c"),
    )
    parent, adapter = engine.variants()
    settings = GenerationConfig(max_new_tokens=4)
    assert len(engine.generate(PROMPTS, parent, settings)) == len(PROMPTS)  # the parent is fine
    with pytest.raises(GenerationError) as caught:
        engine.generate(PROMPTS, adapter, settings)
    message = str(caught.value)
    assert "NaN or infinite logits at new token 1" in message
    assert "under broken" in message and PROMPTS[0].id in message
    engine.close()
