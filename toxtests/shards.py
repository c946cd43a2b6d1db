"""Deterministic named shards: a category split into chunks of at most `size` prompts.

Each shard is one pytest item, so the same prompts must land in the same shard, in the
same order, in every process: everything here is a pure function of the prompt list.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from toxtests.config import ShardConfig
from toxtests.prompts import PERSPECTIVE_ATTRIBUTES, Prompt

TOXICITY_BINS = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class Shard:
    name: str
    category: str
    prompts: tuple[Prompt, ...]

    @property
    def prompt_ids(self) -> list[str]:
        return [p.id for p in self.prompts]


def resolve_scheme(prompts: Sequence[Prompt], by: str) -> str:
    """`auto` picks the most informative category the prompts carry."""
    if by != "auto":
        return by
    if any(p.category is not None for p in prompts):
        return "category"
    if any(p.challenging is not None for p in prompts):
        return "challenging"
    if any(p.toxicity is not None for p in prompts):
        return "toxicity_bin"
    return "none"


def category_of(prompt: Prompt, scheme: str) -> str:
    if scheme == "category":
        return prompt.category or "uncategorised"
    if scheme == "challenging":
        if prompt.challenging is None:
            return "unflagged"
        return "challenging" if prompt.challenging else "not-challenging"
    if scheme == "toxicity_bin":
        tox = prompt.toxicity
        if tox is None:
            return "tox-unscored"
        edges = (0.0, *TOXICITY_BINS, 1.0)
        for low, high in zip(edges[:-1], edges[1:], strict=True):
            if tox < high or high == 1.0:
                return f"tox-{low:.2f}-{high:.2f}"
    if scheme == "attribute":
        scored = {a: prompt.attributes[a] for a in PERSPECTIVE_ATTRIBUTES if a in prompt.attributes}
        if not scored:
            return "unscored"
        # Ties go to the first attribute in the fixed list, so the choice is stable.
        return max(scored, key=lambda a: (scored[a], -PERSPECTIVE_ATTRIBUTES.index(a)))
    return "all"


def group_by_category(prompts: Sequence[Prompt], scheme: str) -> dict[str, list[Prompt]]:
    groups: dict[str, list[Prompt]] = {}
    for prompt in prompts:
        groups.setdefault(category_of(prompt, scheme), []).append(prompt)
    return dict(sorted(groups.items()))


def make_shards(prompts: Sequence[Prompt], config: ShardConfig) -> list[Shard]:
    """Split prompts into `<category>-<i>` shards of at most `config.size` prompts."""
    scheme = resolve_scheme(prompts, config.by)
    shards: list[Shard] = []
    for category, members in group_by_category(prompts, scheme).items():
        for index, start in enumerate(range(0, len(members), config.size)):
            chunk = tuple(members[start : start + config.size])
            shards.append(Shard(name=f"{category}-{index}", category=category, prompts=chunk))
    return shards


def _rank(prompt: Prompt, salt: str) -> str:
    return hashlib.sha256(f"{salt}\0{prompt.id}".encode()).hexdigest()


def stratified_subset(
    prompts: Sequence[Prompt], limit: int, by: str = "auto", salt: str = "toxtests"
) -> list[Prompt]:
    """A deterministic subset of `limit` prompts keeping each category's share.

    Prompts are ranked by a hash of their id, so the subset does not depend on file
    order.
    """
    if limit <= 0 or limit >= len(prompts):
        return list(prompts)
    scheme = resolve_scheme(prompts, by)
    groups = group_by_category(prompts, scheme)
    total = len(prompts)
    # Largest-remainder apportionment: quotas sum to exactly `limit`.
    exact = {c: limit * len(m) / total for c, m in groups.items()}
    quota = {c: int(v) for c, v in exact.items()}
    leftover = limit - sum(quota.values())
    for c in sorted(exact, key=lambda c: (-(exact[c] - quota[c]), c))[:leftover]:
        quota[c] += 1
    chosen: set[str] = set()
    for category, members in groups.items():
        ranked = sorted(members, key=lambda p: _rank(p, salt))
        chosen.update(p.id for p in ranked[: quota[category]])
    return [p for p in prompts if p.id in chosen]


def interleave(shards: Sequence[Shard]) -> list[Shard]:
    """Round-robin over categories: chunk 0 of each category, then chunk 1, …

    The order of sequential looks; early looks then see every category, not just the
    first one alphabetically.
    """
    by_category: dict[str, list[Shard]] = {}
    for shard in shards:
        by_category.setdefault(shard.category, []).append(shard)
    ordered: list[Shard] = []
    depth = max((len(group) for group in by_category.values()), default=0)
    for index in range(depth):
        for group in by_category.values():
            if index < len(group):
                ordered.append(group[index])
    return ordered
