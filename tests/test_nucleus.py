"""The threshold ladder that finds top-p nucleus candidates without a top-k."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from toxtests.engines.torch import nucleus
from toxtests.engines.torch.sampling import _nucleus_pick, sample_probabilities

pytestmark = pytest.mark.skipif(not nucleus.available(), reason="numba is not installed")

VOCAB = 40_000


def _rows(generator: torch.Generator) -> torch.Tensor:
    """Probabilities of rows that land on every rung of the ladder, and below it."""
    scales = [10.0, 6.0, 5.0, 4.0, 3.5, 3.0, 2.0, 0.0]  # peaked ... uniform
    logits = torch.cat([torch.randn(8, VOCAB, generator=generator) * scale for scale in scales])
    return torch.softmax(logits, dim=-1).contiguous()


def _nucleus_size(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    ordered, _ = torch.sort(probs, dim=-1, descending=True)
    return ((ordered.cumsum(-1) - ordered) < top_p).sum(-1)


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.95])
def test_candidates_hold_the_whole_nucleus_in_descending_order(top_p: float) -> None:
    probs = _rows(torch.Generator().manual_seed(0))
    values, ids, found = nucleus.nucleus_candidates(probs.numpy(), top_p)
    sizes = _nucleus_size(probs, top_p)
    assert found.any() and not found.all()  # the uniform rows are beyond the ladder
    for row in np.flatnonzero(found):
        count = int((values[row] > 0).sum())
        assert count >= int(sizes[row])  # the nucleus is inside the candidates
        kept = torch.from_numpy(ids[row, :count])
        assert torch.equal(probs[row, kept], torch.from_numpy(values[row, :count]))
        assert (np.diff(values[row, :count]) <= 0).all()
        # Every token left out is below every candidate.
        outside = torch.ones(VOCAB, dtype=torch.bool)
        outside[kept] = False
        assert float(probs[row, outside].max()) <= float(values[row, count - 1])
    # Flat rows are found too, on a lower rung with more candidates.
    assert values.shape[1] > 256


def test_the_test_rows_use_every_rung() -> None:
    probs = _rows(torch.Generator().manual_seed(0))
    chosen = nucleus.chosen_rungs(probs.numpy(), 0.9)
    assert set(nucleus.LADDER.tolist()) <= set(chosen.tolist())
    assert -1.0 in chosen.tolist()


def test_rows_beyond_the_ladder_are_reported_not_guessed() -> None:
    uniform = torch.full((3, VOCAB), 1.0 / VOCAB)
    _, _, found = nucleus.nucleus_candidates(uniform.numpy(), 0.9)
    assert not found.any()  # 1/40000 < the lowest rung: the caller must take over


def test_ties_are_ordered_by_token_id() -> None:
    probs = torch.full((1, VOCAB), 1e-9)
    probs[0, [7, 3, 900, 12]] = 0.25
    values, ids, found = nucleus.nucleus_candidates(probs.numpy(), 0.6)
    assert found.all()
    assert ids[0, :4].tolist() == [3, 7, 12, 900]


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.99])
def test_ladder_draws_equal_the_full_sort_on_every_row(top_p: float) -> None:
    generator = torch.Generator().manual_seed(1)
    probs = _rows(generator)
    uniforms = torch.rand(probs.shape[0], generator=generator)
    got = sample_probabilities(probs, uniforms, top_p=top_p)
    ordered, order = torch.sort(probs, dim=-1, descending=True)
    assert torch.equal(got, _nucleus_pick(ordered, order, uniforms, top_p))


def test_concurrent_callers_get_the_same_candidates() -> None:
    """Generators in several threads may sample at once; numba's fallback threading
    layer would abort the process on concurrent parallel calls, so they are serialised."""
    from concurrent.futures import ThreadPoolExecutor

    probs = _rows(torch.Generator().manual_seed(2)).numpy()
    expected = nucleus.nucleus_candidates(probs, 0.9)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: nucleus.nucleus_candidates(probs, 0.9), range(8)))
    for values, ids, found in results:
        assert np.array_equal(values, expected[0]) and np.array_equal(ids, expected[1])
        assert np.array_equal(found, expected[2])


def test_a_kernel_that_fails_here_falls_back_to_the_exact_top_k(monkeypatch) -> None:  # noqa: ANN001
    """A kernel numba cannot compile on some machine must not stop a gate: one warning,
    then the torch path, with the same draws."""

    def broken(*args: object) -> None:
        raise RuntimeError("no LLVM target for this CPU")

    generator = torch.Generator().manual_seed(3)
    probs = _rows(generator)
    uniforms = torch.rand(probs.shape[0], generator=generator)
    expected = sample_probabilities(probs, uniforms, top_p=0.9, use_ladder=False)
    monkeypatch.setattr(nucleus, "_collect", broken)
    monkeypatch.setattr(nucleus, "_defined", True)
    with pytest.warns(RuntimeWarning, match="falls back to torch.topk"):
        got = sample_probabilities(probs, uniforms, top_p=0.9)
    assert torch.equal(got, expected)
    assert not nucleus.available()  # not tried again
