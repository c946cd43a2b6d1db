"""Exact top-k / top-p sampling by inverse CDF, without sorting the whole vocabulary.

Each row draws its token from one uniform number it was given, so the same uniform under
the parent and an adapter picks the same token whenever their distributions agree
(common random numbers). The nucleus is looked for among a few top tokens: if they
already hold at least `top_p` of the mass, the nucleus lies inside them and the result is
identical to a full sort. On a CPU those tokens are the ones above a threshold: read
straight from the output head's logit chunks by a native kernel (`toxtests.engines.torch.native`)
where it builds, else from softmaxed probabilities by numba (`toxtests.engines.torch.nucleus`);
elsewhere, and for rows no threshold covers, a partial top-k, widened for the rows that
need it, and a full sort as the last resort.
"""

from __future__ import annotations

import torch

PARTIAL_K = 256


def _nucleus_pick(
    sorted_probs: torch.Tensor, sorted_ids: torch.Tensor, uniforms: torch.Tensor, top_p: float
) -> torch.Tensor:
    """Inverse-CDF draw within the nucleus of descending-sorted probabilities."""
    cumulative = sorted_probs.cumsum(dim=-1)
    # A token is in the nucleus when the mass before it is still below top_p; the
    # first token always is (HF's TopPLogitsWarper keeps the same set).
    keep = (cumulative - sorted_probs) < top_p
    kept = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
    cdf = kept.cumsum(dim=-1)
    targets = (uniforms * cdf[:, -1]).unsqueeze(-1)
    index = torch.searchsorted(cdf, targets, right=True).clamp_(max=sorted_probs.shape[-1] - 1)
    # Never land on a token outside the nucleus because of rounding at the end.
    last_kept = keep.sum(dim=-1, keepdim=True) - 1
    index = torch.minimum(index, last_kept)
    return sorted_ids.gather(-1, index).squeeze(-1)


def sample_tokens(
    logits: torch.Tensor,
    uniforms: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    partial_k: int = PARTIAL_K,
    use_ladder: bool = True,
) -> torch.Tensor:
    """One token per row of `logits` (rows, vocab), each from its own uniform in [0, 1)."""
    scaled = logits.float()
    if temperature != 1.0:
        scaled = scaled / temperature
    if top_k > 0:
        values, ids = torch.topk(scaled, min(top_k, scaled.shape[-1]), dim=-1)
        return _nucleus_pick(torch.softmax(values, dim=-1), ids, uniforms, top_p)
    return sample_probabilities(
        torch.softmax(scaled, dim=-1),
        uniforms,
        top_p=top_p,
        partial_k=partial_k,
        use_ladder=use_ladder,
    )


def sample_probabilities(
    probs: torch.Tensor,
    uniforms: torch.Tensor,
    *,
    top_k: int = 0,
    top_p: float = 1.0,
    partial_k: int = PARTIAL_K,
    use_ladder: bool = True,
) -> torch.Tensor:
    """`sample_tokens` on probabilities (rows, vocab) already softmaxed.

    The fused output head (`toxtests.engines.torch.head`) produces these in a reused buffer. On a
    CPU the nucleus candidates come from `toxtests.engines.torch.nucleus` (two linear passes, no
    top-k); the rows it leaves, and every row elsewhere, take the widening top-k.
    """
    vocab = probs.shape[-1]
    if top_k > 0:
        values, ids = torch.topk(probs, min(top_k, vocab), dim=-1)
        return _nucleus_pick(values / values.sum(-1, keepdim=True), ids, uniforms, top_p)
    if top_p >= 1.0:
        cdf = probs.cumsum(dim=-1)
        targets = (uniforms * cdf[:, -1]).unsqueeze(-1)
        return torch.searchsorted(cdf, targets, right=True).clamp_(max=vocab - 1).squeeze(-1)
    tokens = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    pending = torch.arange(probs.shape[0], device=probs.device)
    ladder = None
    if use_ladder and _ladder_applies(probs):
        from toxtests.engines.torch import nucleus

        try:
            ladder = nucleus.nucleus_candidates(
                probs.numpy(), top_p, threads=torch.get_num_threads()
            )
        except nucleus.NucleusUnavailable:
            ladder = None  # warned once; every row takes the top-k below
    if ladder is not None:
        candidates, candidate_ids, found_mask = ladder
        found = torch.from_numpy(found_mask)
        found_rows = found.nonzero().squeeze(-1)
        if found_rows.numel():
            tokens[found_rows] = _nucleus_pick(
                torch.from_numpy(candidates)[found_rows],
                torch.from_numpy(candidate_ids)[found_rows],
                uniforms[found_rows],
                top_p,
            )
        pending = pending[~found]
    k = partial_k
    # Widen the partial top-k for the rows whose nucleus it did not hold: most rows
    # finish at the first size, a few flat ones at the next, a full sort is rare.
    while pending.numel():
        full_sort = k >= vocab // 4
        # Copy rows out only when some are done; index_select copies whole rows, cheaper
        # than advanced indexing (probs[pending]) on a (128 x 262k) block.
        rows = probs if pending.numel() == probs.shape[0] else probs.index_select(0, pending)
        if full_sort:
            top, ids = torch.sort(rows, dim=-1, descending=True)
        else:
            top, ids = torch.topk(rows, k, dim=-1)
        done = torch.ones_like(pending, dtype=torch.bool) if full_sort else top.sum(-1) >= top_p
        if bool(done.any()):
            picked = done.nonzero().squeeze(-1)
            tokens[pending[picked]] = _nucleus_pick(
                top[picked], ids[picked], uniforms[pending[picked]], top_p
            )
        pending = pending[~done]
        k *= 16
    return tokens


def native_sampling_applies(hidden: torch.Tensor) -> bool:
    """Whether `sample_logit_chunks` runs natively for states on `hidden`'s device."""
    from toxtests.engines.torch import native

    return hidden.device.type == "cpu" and native.load() is not None


def sample_logit_chunks(
    chunks: list[torch.Tensor], uniforms: torch.Tensor, temperature: float, top_p: float
) -> torch.Tensor:
    """`sample_tokens(logits, top_p=top_p)` for logits held as column chunks (the output
    head's), read once by the native kernel (`toxtests.engines.torch.native`). The rows no rung
    covers are put together from the chunks and take the torch path."""
    from toxtests.engines.torch import native

    drawn = torch.from_numpy(
        native.top_p_sample(
            chunks, 1.0 / temperature, top_p, uniforms.numpy(), threads=torch.get_num_threads()
        )
    )
    pending = (drawn < 0).nonzero().squeeze(-1)
    if pending.numel():
        # The kernel already tried the ladder's rungs on these rows, and the numba
        # ladder has the same rungs; its first call costs ~0.4 s a process (numba's
        # import, threading layer and cached-kernel load) for the 1-3 rows a 20-step
        # batch leaves here. The widening top-k is exact too.
        logits = torch.cat([chunk.index_select(0, pending) for chunk in chunks], dim=-1)
        drawn[pending] = sample_tokens(
            logits, uniforms[pending], temperature=temperature, top_p=top_p, use_ladder=False
        )
    return drawn


def _ladder_applies(probs: torch.Tensor) -> bool:
    from toxtests.engines.torch import nucleus

    return (
        nucleus.available()
        and probs.device.type == "cpu"
        and probs.dtype == torch.float32
        and probs.is_contiguous()
        and probs.shape[-1] >= 4 * PARTIAL_K  # small vocabularies: top-k is cheap
    )


def reference_sample(
    logits: torch.Tensor, uniforms: torch.Tensor, *, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """The obvious full-sort version, kept for tests and the benchmark."""
    scaled = logits.float() / temperature
    if top_k > 0:
        values, ids = torch.sort(scaled, dim=-1, descending=True)
        values, ids = values[:, :top_k], ids[:, :top_k]
        return _nucleus_pick(torch.softmax(values, dim=-1), ids, uniforms, top_p)
    values, ids = torch.sort(torch.softmax(scaled, dim=-1), dim=-1, descending=True)
    return _nucleus_pick(values, ids, uniforms, top_p)
