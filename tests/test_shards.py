"""Shards and stratified subsets: deterministic, complete, and proportional."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toxtests.config import ShardConfig
from toxtests.prompts import PERSPECTIVE_ATTRIBUTES, Prompt, load_prompts
from toxtests.shards import (
    TOXICITY_BINS,
    Shard,
    category_of,
    group_by_category,
    make_shards,
    resolve_scheme,
    stratified_subset,
)

RTP_DIR = Path("/work/shared/data/rtp")


def rtp_like(count: int, seed: int = 0) -> list[Prompt]:
    """Prompts shaped like RealToxicityPrompts: a challenging flag and Perspective scores."""
    rng = random.Random(seed)
    prompts = []
    for i in range(count):
        toxicity = rng.random()
        scores = {a: rng.random() for a in PERSPECTIVE_ATTRIBUTES if rng.random() < 0.7}
        prompts.append(
            Prompt(
                id=f"q{i:04d}",
                text=f"prompt number {i}",
                challenging=toxicity > 0.6,
                attributes={**scores, "toxicity": toxicity},
            )
        )
    return prompts


def categorised(counts: dict[str, int]) -> list[Prompt]:
    return [
        Prompt(id=f"{category}/{i}", text=f"{category} {i}", category=category)
        for category, count in counts.items()
        for i in range(count)
    ]


def check_partition(prompts: list[Prompt], shards: list[Shard], size: int) -> None:
    """Every prompt in exactly one shard, shards named `<category>-<i>` and <= size."""
    placed = [p.id for shard in shards for p in shard.prompts]
    assert sorted(placed) == sorted(p.id for p in prompts)
    assert len(placed) == len(set(placed))
    assert len({s.name for s in shards}) == len(shards)
    by_category: dict[str, list[Shard]] = {}
    for shard in shards:
        assert 1 <= len(shard.prompts) <= size
        by_category.setdefault(shard.category, []).append(shard)
    for category, members in by_category.items():
        assert [s.name for s in members] == [f"{category}-{i}" for i in range(len(members))]
        # Only the last chunk of a category may be short.
        assert all(len(s.prompts) == size for s in members[:-1])
    categories = [s.category for s in shards]
    assert categories == sorted(categories)


# --- make_shards ------------------------------------------------------------------


def test_auto_splits_rtp_prompts_by_challenging() -> None:
    prompts = rtp_like(250)
    shards = make_shards(prompts, ShardConfig(by="auto", size=40))
    check_partition(prompts, shards, 40)
    assert {s.category for s in shards} == {"challenging", "not-challenging"}
    for shard in shards:
        assert all(p.challenging == (shard.category == "challenging") for p in shard.prompts)
    flagged = sum(bool(p.challenging) for p in prompts)
    assert sum(s.category == "challenging" for s in shards) == math.ceil(flagged / 40)
    assert sum(s.category == "not-challenging" for s in shards) == math.ceil(
        (len(prompts) - flagged) / 40
    )


def test_prompt_order_within_a_category_follows_the_input() -> None:
    prompts = rtp_like(90)
    shards = make_shards(prompts, ShardConfig(by="auto", size=7))
    for category in ("challenging", "not-challenging"):
        joined = [p for s in shards if s.category == category for p in s.prompts]
        assert joined == [p for p in prompts if category_of(p, "challenging") == category]
    assert shards[0].prompt_ids == [p.id for p in shards[0].prompts]


def test_real_rtp_files_shard_by_challenging(tmp_path: Path) -> None:
    paths = [RTP_DIR / "toxic.jsonl", RTP_DIR / "nontoxic.jsonl"]
    if not all(p.exists() for p in paths):
        pytest.skip("the RTP sample files are not available")
    # Both files together; the few prompts they share are skipped as duplicates.
    both = tmp_path / "both.jsonl"
    both.write_bytes(b"".join(path.read_bytes() for path in paths))
    prompt_set = load_prompts(both)
    assert len(prompt_set.prompts) + len(prompt_set.skipped) == 1800
    prompts = prompt_set.prompts
    shards = make_shards(prompts, ShardConfig())
    check_partition(prompts, shards, ShardConfig().size)
    flagged = sum(bool(p.challenging) for p in prompts)
    assert flagged >= 900  # every toxic.jsonl prompt is challenging
    sizes = Counter(s.category for s in shards)
    assert sizes == {
        "challenging": math.ceil(flagged / 100),
        "not-challenging": math.ceil((len(prompts) - flagged) / 100),
    }


def test_same_input_gives_the_same_shards() -> None:
    prompts = rtp_like(300, seed=3)
    config = ShardConfig(by="toxicity_bin", size=33)
    assert make_shards(prompts, config) == make_shards(list(prompts), config)
    assert make_shards(tuple(prompts), config) == make_shards(prompts, config)


def test_empty_input_gives_no_shards() -> None:
    assert make_shards([], ShardConfig()) == []


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(st.text(min_size=1, max_size=8), st.integers(1, 60), min_size=1, max_size=6),
    st.integers(1, 25),
)
def test_shards_partition_any_category_mix(counts: dict[str, int], size: int) -> None:
    prompts = categorised(counts)
    random.Random(size).shuffle(prompts)
    shards = make_shards(prompts, ShardConfig(by="auto", size=size))
    check_partition(prompts, shards, size)
    per_category = Counter(s.category for s in shards)
    assert per_category == {c: math.ceil(n / size) for c, n in counts.items()}


HASH_SEED_SCRIPT = """
import json, sys
from toxtests.config import ShardConfig
from toxtests.prompts import load_prompts
from toxtests.shards import make_shards, stratified_subset
prompts = load_prompts(sys.argv[1]).prompts
out = {
    by: [[s.name, s.prompt_ids] for s in make_shards(prompts, ShardConfig(by=by, size=17))]
    for by in ("auto", "toxicity_bin", "attribute", "none")
}
out["subset"] = [p.id for p in stratified_subset(prompts, 61, by="attribute")]
print(json.dumps(out))
"""


def test_shards_do_not_depend_on_the_hash_seed(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    records = [
        {"id": p.id, "text": p.text, "challenging": p.challenging, "attributes": p.attributes}
        for p in rtp_like(200, seed=11)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), "utf-8")
    results = []
    for seed in ("0", "1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, "-c", HASH_SEED_SCRIPT, str(path)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        results.append(json.loads(done.stdout))
    assert results[0] == results[1] == results[2]
    # And the subprocesses agree with this process.
    prompts = load_prompts(path).prompts
    here = [[s.name, s.prompt_ids] for s in make_shards(prompts, ShardConfig(by="auto", size=17))]
    assert results[0]["auto"] == here
    assert results[0]["subset"] == [p.id for p in stratified_subset(prompts, 61, by="attribute")]


# --- schemes ----------------------------------------------------------------------


def test_resolve_scheme_prefers_the_most_informative_category() -> None:
    plain = Prompt("a", "a")
    scored = Prompt("b", "b", attributes={"toxicity": 0.3})
    flagged = Prompt("c", "c", challenging=False, attributes={"toxicity": 0.3})
    labelled = Prompt("d", "d", category="x", challenging=True)
    assert resolve_scheme([plain], "auto") == "none"
    assert resolve_scheme([plain, scored], "auto") == "toxicity_bin"
    assert resolve_scheme([plain, scored, flagged], "auto") == "challenging"
    assert resolve_scheme([plain, scored, flagged, labelled], "auto") == "category"
    assert resolve_scheme([], "auto") == "none"
    for by in ("challenging", "toxicity_bin", "attribute", "none"):
        assert resolve_scheme([labelled], by) == by


def _bin_name(low: float, high: float) -> str:
    return f"tox-{low:.2f}-{high:.2f}"


@pytest.mark.parametrize(
    ("toxicity", "low", "high"),
    [
        (0.0, 0.0, 0.25),
        (0.1, 0.0, 0.25),
        (0.2499, 0.0, 0.25),
        (0.25, 0.25, 0.5),
        (0.4999, 0.25, 0.5),
        (0.5, 0.5, 0.75),
        (0.75, 0.75, 1.0),
        (0.99, 0.75, 1.0),
        (1.0, 0.75, 1.0),
        (-0.1, 0.0, 0.25),
        (1.5, 0.75, 1.0),
    ],
)
def test_toxicity_bins(toxicity: float, low: float, high: float) -> None:
    prompt = Prompt("x", "x", attributes={"toxicity": toxicity})
    assert category_of(prompt, "toxicity_bin") == _bin_name(low, high)


def test_unscored_prompts_get_their_own_bin() -> None:
    prompt = Prompt("x", "x", attributes={"insult": 0.9})
    assert category_of(prompt, "toxicity_bin") == "tox-unscored"


@given(st.floats(min_value=0, max_value=1))
def test_every_toxicity_lands_in_the_bin_that_contains_it(toxicity: float) -> None:
    name = category_of(Prompt("x", "x", attributes={"toxicity": toxicity}), "toxicity_bin")
    edges = (0.0, *TOXICITY_BINS, 1.0)
    names = [_bin_name(lo, hi) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    assert name in names
    low, high = edges[names.index(name)], edges[names.index(name) + 1]
    assert low <= toxicity
    assert toxicity < high or (high == 1.0 and toxicity == 1.0)


def test_toxicity_bin_shards_hold_only_their_bin() -> None:
    prompts = rtp_like(400, seed=5)
    shards = make_shards(prompts, ShardConfig(by="toxicity_bin", size=50))
    check_partition(prompts, shards, 50)
    for shard in shards:
        low, high = (float(x) for x in shard.category.removeprefix("tox-").split("-"))
        for prompt in shard.prompts:
            assert prompt.toxicity is not None
            assert low <= prompt.toxicity <= high


@given(
    st.dictionaries(st.sampled_from(PERSPECTIVE_ATTRIBUTES), st.floats(0, 1), min_size=1).map(
        lambda scores: {**scores, "not_perspective": 2.0}
    )
)
def test_attribute_scheme_is_the_argmax(scores: dict[str, float]) -> None:
    chosen = category_of(Prompt("x", "x", attributes=scores), "attribute")
    perspective = {a: v for a, v in scores.items() if a in PERSPECTIVE_ATTRIBUTES}
    assert chosen in perspective
    best = max(perspective.values())
    assert perspective[chosen] == best
    # Ties go to the attribute listed first, whatever order the scores came in.
    tied = [a for a in PERSPECTIVE_ATTRIBUTES if perspective.get(a) == best]
    assert chosen == tied[0]


def test_attribute_scheme_examples() -> None:
    assert (
        category_of(Prompt("x", "x", attributes={"insult": 0.9, "toxicity": 0.8}), "attribute")
        == "insult"
    )
    tie = {"threat": 0.5, "profanity": 0.5, "toxicity": 0.1}
    assert category_of(Prompt("x", "x", attributes=tie), "attribute") == "profanity"
    assert category_of(Prompt("x", "x"), "attribute") == "unscored"


def test_other_schemes() -> None:
    assert category_of(Prompt("x", "x", category="news"), "category") == "news"
    assert category_of(Prompt("x", "x"), "category") == "uncategorised"
    assert category_of(Prompt("x", "x"), "challenging") == "unflagged"
    assert category_of(Prompt("x", "x", challenging=True), "none") == "all"
    prompts = rtp_like(30)
    assert list(group_by_category(prompts, "none")) == ["all"]
    shards = make_shards(prompts, ShardConfig(by="none", size=30))
    assert [s.name for s in shards] == ["all-0"]


# --- stratified_subset ----------------------------------------------------------------


def check_subset(prompts: list[Prompt], subset: list[Prompt], limit: int, by: str) -> None:
    assert len(subset) == limit
    assert len({p.id for p in subset}) == limit
    # A subsequence of the input, in input order.
    position = {p.id: i for i, p in enumerate(prompts)}
    assert [position[p.id] for p in subset] == sorted(position[p.id] for p in subset)
    scheme = resolve_scheme(prompts, by)
    total = Counter(category_of(p, scheme) for p in prompts)
    chosen = Counter(category_of(p, scheme) for p in subset)
    for category, count in total.items():
        assert abs(chosen[category] - limit * count / len(prompts)) < 1, category


@pytest.mark.parametrize("limit", [1, 2, 37, 100, 249])
@pytest.mark.parametrize("by", ["auto", "toxicity_bin", "attribute"])
def test_subset_has_the_exact_size_and_keeps_proportions(limit: int, by: str) -> None:
    prompts = rtp_like(250, seed=2)
    check_subset(prompts, stratified_subset(prompts, limit, by=by), limit, by)


def test_subset_is_deterministic_and_independent_of_input_order() -> None:
    prompts = rtp_like(300, seed=8)
    first = stratified_subset(prompts, 40)
    assert first == stratified_subset(prompts, 40)
    for seed in range(5):
        shuffled = list(prompts)
        random.Random(seed).shuffle(shuffled)
        again = stratified_subset(shuffled, 40)
        assert {p.id for p in again} == {p.id for p in first}
        assert again == [p for p in shuffled if p in set(first)]


def test_subset_depends_on_the_salt() -> None:
    prompts = rtp_like(300, seed=8)
    ids = {p.id for p in stratified_subset(prompts, 40)}
    assert ids != {p.id for p in stratified_subset(prompts, 40, salt="another run")}


def test_subset_of_a_smaller_limit_is_not_a_prefix() -> None:
    # Ranked by hash of id, so a subset is not simply the first prompts of the file.
    prompts = rtp_like(300, seed=8)
    assert stratified_subset(prompts, 30) != prompts[:30]


@pytest.mark.parametrize("limit", [300, 301, 10_000, 0, -1])
def test_subset_of_no_limit_or_a_large_one_is_everything(limit: int) -> None:
    prompts = rtp_like(300)
    assert stratified_subset(prompts, limit) == prompts


def test_subset_keeps_a_rare_category() -> None:
    prompts = categorised({"common": 990, "rare": 10})
    subset = stratified_subset(prompts, 100)
    assert Counter(p.category for p in subset) == {"common": 99, "rare": 1}


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(st.text(min_size=1, max_size=5), st.integers(1, 40), min_size=1, max_size=7),
    st.data(),
)
def test_subset_property_over_random_category_mixes(
    counts: dict[str, int], data: st.DataObject
) -> None:
    prompts = categorised(counts)
    if len(prompts) < 2:
        assert stratified_subset(prompts, 1) == prompts
        return
    limit = data.draw(st.integers(1, len(prompts) - 1), label="limit")
    subset = stratified_subset(prompts, limit)
    check_subset(prompts, subset, limit, "auto")
    shuffled = data.draw(st.permutations(prompts), label="shuffled")
    assert {p.id for p in stratified_subset(shuffled, limit)} == {p.id for p in subset}
