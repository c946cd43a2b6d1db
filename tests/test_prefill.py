"""Grouped prefill: an optimal cut into groups, and the same text as one rectangle."""

from __future__ import annotations

import itertools

import helpers_models
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from toxtests.config import GenerationConfig
from toxtests.engines.torch.loop import Generator
from toxtests.engines.torch.prefill import join_caches, plan_groups
from toxtests.prompts import Prompt

# Lengths from 1 to 14 words: several groups at a small per-forward overhead.
PROMPTS = [
    Prompt(
        f"p{i}",
        " ".join(["the", "weather", "was", "good", "and", "we", "went", "home"] * 2)[: 6 * i + 3],
    )
    for i in range(1, 12)
] + [Prompt("short", "it"), Prompt("long", " ".join(["water"] * 14))]


def _cost(lengths: list[int], groups: list[tuple[int, int]], overhead: int) -> int:
    return sum((end - start) * lengths[end - 1] + overhead for start, end in groups)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=1, max_size=9).map(sorted), st.integers(0, 100))
def test_plan_is_an_optimal_contiguous_cover(lengths: list[int], overhead: int) -> None:
    groups = plan_groups(lengths, overhead)
    assert groups[0][0] == 0 and groups[-1][1] == len(lengths)
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(groups, groups[1:], strict=False))
    # Brute force over every way of cutting the rows into contiguous groups.
    best = min(
        _cost(lengths, list(zip((0, *cuts), (*cuts, len(lengths)), strict=True)), overhead)
        for size in range(len(lengths))
        for cuts in itertools.combinations(range(1, len(lengths)), size)
    )
    assert _cost(lengths, groups, overhead) == best


def test_plan_splits_two_length_clusters_and_refuses_unsorted_rows() -> None:
    assert plan_groups([3] * 50 + [40] * 50) == [(0, 50), (50, 100)]
    assert plan_groups([10, 11, 12]) == [(0, 3)]  # not worth a second forward pass
    with pytest.raises(ValueError, match="ascending"):
        plan_groups([5, 3])


def _generators(model, tokenizer, fused: bool, **settings):  # noqa: ANN001, ANN202
    config = GenerationConfig(max_new_tokens=8, samples=2, **settings)
    grouped = Generator(model, tokenizer, config, "cpu")
    grouped.prefill_overhead = 0  # as many groups as there are lengths
    rectangle = Generator(model, tokenizer, config, "cpu")
    rectangle.prefill_overhead = 10**9  # one padded rectangle
    if not fused:
        grouped.fused = rectangle.fused = None
    return grouped, rectangle


def _texts(rows) -> list[str]:  # noqa: ANN001
    return [g.text for row in rows for g in row]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("do_sample", [True, False])
def test_grouped_prefill_gives_the_same_text_as_one_rectangle(
    tiny, do_sample: bool, fused: bool
) -> None:  # noqa: ANN001
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny.base), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny.base))
    grouped, rectangle = _generators(model, tokenizer, fused, do_sample=do_sample)
    calls = []
    original = grouped._forward
    grouped._forward = lambda **inputs: (
        calls.append(inputs["input_ids"].shape) or original(**inputs)
    )
    got = _texts(grouped.generate(PROMPTS, None))
    assert got == _texts(rectangle.generate(PROMPTS, None))
    prefills = [shape for shape in calls if shape[1] > 1]
    assert len(prefills) > 3  # really prefilled in groups
    assert sum(rows * width for rows, width in prefills) < 26 * 14  # less than one rectangle
    assert sum(bool(t) for t in got) > 10


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("do_sample", [True, False])
def test_k_samples_share_one_prefill_and_the_text_is_unchanged(
    tiny, tmp_path, family: str, do_sample: bool
) -> None:  # noqa: ANN001
    """Five samples a prompt: each prompt is prefilled once and its cache copied to its
    five rows; the text is the text of five separate prefills (Gemma 3's sliding-window
    layers included, whose window the longest prompts fill: those fall back)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = (
        tiny.base
        if family == "llama"
        else helpers_models.build_tiny_gemma3(tmp_path / "gemma", sliding_window=12)
    )
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    config = GenerationConfig(max_new_tokens=6, samples=5, do_sample=do_sample)
    shared, separate = (Generator(model, tokenizer, config, "cpu") for _ in range(2))
    separate.share_prefill = False
    rows: dict[str, int] = {"shared": 0, "separate": 0}
    for name, generator in (("shared", shared), ("separate", separate)):
        original = generator._forward

        def counting(name=name, original=original, **inputs):  # noqa: ANN001, ANN003, ANN202
            if inputs["input_ids"].shape[1] > 1:
                rows[name] += inputs["input_ids"].shape[0]
            return original(**inputs)

        generator._forward = counting
    got = _texts(shared.generate(PROMPTS, None))
    assert got == _texts(separate.generate(PROMPTS, None))
    assert rows["separate"] >= 5 * len(PROMPTS)
    if family == "llama":
        assert rows["shared"] == len(PROMPTS)  # one prefill row a prompt
    else:
        assert rows["shared"] < rows["separate"]
    if do_sample:  # five different samples, not one text five times
        assert len(set(got[:5])) > 1 or len(set(got)) > len(PROMPTS)


def test_gemma_sliding_window_joins_or_falls_back(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """Gemma 3 mixes sliding-window and full layers. Prompts shorter than the window
    are joined; once a group's prompts fill the window the cache has dropped positions,
    cannot be re-padded, and the batch is prefilled as one rectangle instead: the text
    is the same either way."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = helpers_models.build_tiny_gemma3(tmp_path / "gemma", sliding_window=6)
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    import toxtests.engines.torch.prefill as prefill

    joined: list[bool] = []

    def spy(caches, widths, room=0, original=prefill.join_caches):  # noqa: ANN001, ANN202
        result = original(caches, widths, room)
        joined.append(result is not None)
        return result

    monkeypatch.setattr(prefill, "join_caches", spy)
    for prompts, joins in ((PROMPTS[:3] + PROMPTS[-2:-1], True), (PROMPTS, False)):
        grouped, rectangle = _generators(model, tokenizer, True, do_sample=True)
        joined.clear()
        got = _texts(grouped.generate(prompts, None))
        assert joined and all(joined) is joins
        assert got == _texts(rectangle.generate(prompts, None))


def test_join_refuses_caches_it_does_not_know() -> None:
    from transformers import DynamicCache

    assert join_caches([object(), object()], [3, 4]) is None
    cache = DynamicCache()
    cache.update(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2), 0)
    other = DynamicCache()
    other.update(torch.ones(2, 1, 5, 2), torch.ones(2, 1, 5, 2), 0)
    # Widths that do not match the stored positions: refused, nothing rewritten.
    assert join_caches([cache, other], [3, 4]) is None
    assert other.layers[0].keys.shape == (2, 1, 5, 2)
    joined = join_caches([cache, other], [3, 5])
    keys = joined.layers[0].keys
    assert keys.shape == (3, 1, 5, 2)
    assert keys[0, 0, :2].abs().sum() == 0 and keys[1:].eq(1).all()


def _cache(layer: object, rows: int, width: int, fill: float) -> object:
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.layers = [layer]
    states = torch.full((rows, 1, width, 2), fill)
    cache.update(states, states.clone(), 0)
    return cache


@pytest.mark.parametrize("sliding", [False, True])
def test_joined_cache_grows_in_place_then_like_its_class(sliding: bool) -> None:
    """Decode steps write into the room allocated at the join (no new buffer), and once
    the room, or the sliding window, is used up the layer behaves exactly as its class:
    the returned states, the kept states and the window bookkeeping all match a layer
    that was never joined."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    def layer() -> object:
        return DynamicSlidingWindowLayer(sliding_window=7) if sliding else DynamicLayer()

    first, second = _cache(layer(), 1, 2, 1.0), _cache(layer(), 2, 3, 2.0)
    joined = join_caches([first, second], [2, 3], room=2)
    # The same rows, left-padded, fed to a layer of the same class directly.
    plain = _cache(layer(), 3, 3, 0.0)
    plain.layers[0].keys[0, :, 1:] = 1.0
    plain.layers[0].values[0, :, 1:] = 1.0
    plain.layers[0].keys[1:] = 2.0
    plain.layers[0].values[1:] = 2.0
    start = joined.layers[0].keys.data_ptr()
    for step in range(6):  # room for 2, a window of 6 kept positions, then beyond both
        new = torch.full((3, 1, 1, 2), 10.0 + step)
        got = joined.update(new, new + 0.5, 0)
        expected = plain.update(new, new + 0.5, 0)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        mine, theirs = joined.layers[0], plain.layers[0]
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
        assert joined.get_seq_length() == plain.get_seq_length()
        if sliding:
            assert mine.get_mask_sizes(1) == theirs.get_mask_sizes(1)
        if step < 2:
            assert mine.keys.data_ptr() == start  # written in place, not reallocated
    assert "update" not in vars(joined.layers[0])  # back to the class's own update


def test_a_joined_cache_is_freed_without_a_garbage_collection() -> None:
    """The in-place update must not tie the layer into a reference cycle: every batch
    drops its cache, and its buffers must go at once, not at the next gc run."""
    import gc
    import weakref

    from transformers.cache_utils import DynamicLayer

    gc.disable()
    try:
        joined = join_caches([_cache(DynamicLayer(), 2, 3, 1.0)], [3], room=4)
        joined.update(torch.ones(2, 1, 1, 2), torch.ones(2, 1, 1, 2), 0)
        alive = weakref.ref(joined.layers[0])
        del joined
        assert alive() is None
    finally:
        gc.enable()


def test_joined_padding_is_zero_even_in_uninitialised_memory() -> None:
    """The joined buffers are allocated uninitialised: the padding must be written with
    zeros (a NaN there survives the mask). torch's deterministic mode fills fresh
    tensors with NaN, which makes any position left unwritten visible."""
    import torch.utils.deterministic

    previous = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        assert torch.empty(4).isnan().all()  # the mode this test relies on is on
        from transformers.cache_utils import DynamicLayer

        short, wide = _cache(DynamicLayer(), 2, 2, 1.0), _cache(DynamicLayer(), 1, 5, 2.0)
        joined = join_caches([short, wide], [2, 5], room=3)
        layer = joined.layers[0]
        for states in (layer.keys, layer.values):
            assert states.shape == (3, 1, 5, 2)
            assert not states.isnan().any()
            assert states[:2, :, :3].eq(0).all() and states[2:].gt(0).all()
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.utils.deterministic.fill_uninitialized_memory = fill
