"""The native top-p tail (`toxtests.engines.torch.native`): the same nucleus and the same
draws as an exact float64 reference, whatever the chunking, the same bits from every
build (AVX-512, AVX2, portable C), and a clean way out where it cannot build."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from toxtests.engines.torch import native, nucleus
from toxtests.engines.torch.sampling import _nucleus_pick, sample_logit_chunks, sample_tokens

pytestmark = pytest.mark.skipif(
    native.load() is None,
    reason="the native kernel needs a C compiler and a CPU it builds for (AVX2 on x86)",
)

VOCAB = 40_000


def _logits(generator: torch.Generator) -> torch.Tensor:
    """Rows from peaked to uniform: every rung of the ladder, and rows beyond it."""
    scales = [10.0, 6.0, 5.0, 4.0, 3.5, 3.0, 2.0, 0.0]
    return torch.cat([torch.randn(8, VOCAB, generator=generator) * scale for scale in scales])


def _chunks(logits: torch.Tensor, widths: list[int]) -> list[torch.Tensor]:
    assert sum(widths) == logits.shape[1]
    return [part.contiguous() for part in logits.split(widths, dim=1)]


def _float64_draws(
    logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float
) -> torch.Tensor:
    """The exact draw: softmax, sort and inverse CDF, all in float64."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    ordered, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    return _nucleus_pick(ordered, order, uniforms.double(), top_p)


UNEVEN = [1000, 37, 4096, 64, 4096 * 5 + 3, VOCAB - 1000 - 37 - 4096 - 64 - 4096 * 5 - 3]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.95])
def test_candidates_hold_the_exact_nucleus_with_float64_probabilities(
    top_p: float, temperature: float
) -> None:
    logits = _logits(torch.Generator().manual_seed(0))
    values, ids, found, rungs = native.top_p_candidates(
        _chunks(logits, UNEVEN), 1.0 / temperature, top_p, threads=2
    )
    exact = torch.softmax(logits.double() / temperature, dim=-1)
    ordered, _ = torch.sort(exact, dim=-1, descending=True)
    sizes = ((ordered.cumsum(-1) - ordered) < top_p).sum(-1)
    assert found.any() and not found.all()  # the uniform rows are beyond the ladder
    for row in np.flatnonzero(found):
        count = int((values[row] > 0).sum())
        assert count >= int(sizes[row])  # the whole nucleus is among the candidates
        kept = torch.from_numpy(ids[row, :count])
        truth = exact[row, kept]
        assert torch.allclose(torch.from_numpy(values[row, :count]).double(), truth, rtol=2e-6)
        assert (np.diff(values[row, :count]) <= 0).all()
        assert float(truth.min()) >= float(rungs[row]) * (1 - 1e-5)
    # The same rungs as the numba ladder on torch's probabilities.
    probs = torch.softmax(logits / temperature, dim=-1).contiguous().numpy()
    assert np.array_equal(rungs, nucleus.chosen_rungs(probs, top_p))


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.99])
def test_draws_equal_the_float64_reference(top_p: float) -> None:
    generator = torch.Generator().manual_seed(1)
    logits = _logits(generator)
    chunks = _chunks(logits, [4096] * 9 + [VOCAB - 4096 * 9])
    mismatches = draws = 0
    for _ in range(25):
        uniforms = torch.rand(logits.shape[0], generator=generator)
        got = torch.from_numpy(native.top_p_sample(chunks, 1.0, top_p, uniforms.numpy(), 2))
        found = got >= 0
        expected = _float64_draws(logits, uniforms, 1.0, top_p)
        mismatches += int((got[found] != expected[found]).sum())
        draws += int(found.sum())
    # float32 probabilities can move a draw that lands within ~1e-7 of a boundary
    assert draws >= 500 and mismatches <= 1


def test_native_pick_is_the_torch_pick_on_the_same_candidates() -> None:
    generator = torch.Generator().manual_seed(2)
    logits = _logits(generator)
    chunks = _chunks(logits, UNEVEN)
    for top_p in (0.3, 0.9, 0.99):
        uniforms = torch.rand(logits.shape[0], generator=generator)
        values, ids, found, _ = native.top_p_candidates(chunks, 1.0, top_p)
        got = native.top_p_sample(chunks, 1.0, top_p, uniforms.numpy())
        rows = torch.from_numpy(np.flatnonzero(found))
        expected = _nucleus_pick(
            torch.from_numpy(values)[rows], torch.from_numpy(ids)[rows], uniforms[rows], top_p
        )
        assert torch.equal(torch.from_numpy(got)[rows], expected)
        assert (got[~found] == -1).all()


def test_how_the_logits_are_chunked_changes_nothing() -> None:
    generator = torch.Generator().manual_seed(3)
    logits = _logits(generator)
    uniforms = torch.rand(logits.shape[0], generator=generator).numpy()
    layouts = [[VOCAB], [4096] * 9 + [VOCAB - 4096 * 9], UNEVEN, [1] * 7 + [VOCAB - 7]]
    draws = [native.top_p_sample(_chunks(logits, widths), 1.0, 0.9, uniforms) for widths in layouts]
    for other in draws[1:]:
        assert np.array_equal(draws[0], other)
    threads = native.top_p_sample(_chunks(logits, UNEVEN), 1.0, 0.9, uniforms, threads=3)
    assert np.array_equal(draws[0], threads)


def test_rows_beyond_the_ladder_fall_back_to_the_torch_sampler() -> None:
    generator = torch.Generator().manual_seed(4)
    logits = torch.cat([torch.zeros(3, VOCAB), torch.randn(3, VOCAB, generator=generator) * 6])
    uniforms = torch.rand(6, generator=generator)
    chunks = _chunks(logits, [4096] * 9 + [VOCAB - 4096 * 9])
    raw = native.top_p_sample(chunks, 1.0, 0.9, uniforms.numpy())
    assert (raw[:3] == -1).all() and (raw[3:] >= 0).all()  # uniform: p = 1/40000 < 2^-15
    got = sample_logit_chunks(chunks, uniforms, 1.0, 0.9)
    assert torch.equal(got[:3], sample_tokens(logits[:3], uniforms[:3], top_p=0.9))
    assert torch.equal(got[3:], torch.from_numpy(raw[3:]))


def _hard_logits(generator: torch.Generator) -> torch.Tensor:
    """Rows through every branch of the kernel: the usual spreads; the first blocks all
    -inf (a NaN the exponential's clamp absorbs) and -inf holes; spreads that put most
    exponents below -87; ties everywhere; a maximum that grows in every block (the
    normaliser rescaled each time); one token far above the rest."""
    masked = torch.randn(4, VOCAB, generator=generator) * 4
    masked[:, :200] = -float("inf")
    masked[:, 5000:9000:3] = -float("inf")
    wide = torch.randn(4, VOCAB, generator=generator) * 60
    ties = torch.round(torch.randn(4, VOCAB, generator=generator) * 4)
    rising = torch.linspace(-40.0, 12.0, VOCAB).expand(4, -1) + torch.rand(
        4, VOCAB, generator=generator
    )
    spike = torch.randn(4, VOCAB, generator=generator)
    spike[:, 31_337] = 40.0
    return torch.cat([_logits(generator), masked, wide, ties, rising, spike])


@pytest.mark.skipif(
    native.flavour() == "portable", reason="this CPU runs the portable build: nothing to compare"
)
def test_this_cpus_build_has_the_portable_builds_bits(tmp_path: Path) -> None:
    """The vector build this CPU runs (AVX-512 or AVX2) against the portable C one, the
    reference every build is held to: the same probabilities bit for bit, so the same
    rungs and draws from the same logits on every kind of CPU."""
    cc = native.compiler()
    assert cc is not None
    portable = native.build_flavour(tmp_path, cc, "portable")
    vector = native.build_flavour(tmp_path, cc, str(native.flavour()))
    assert (portable.top_p_flavour(), vector.top_p_flavour()) == (
        b"portable",
        str(native.flavour()).encode(),
    )
    generator = torch.Generator().manual_seed(5)
    logits = _hard_logits(generator)
    chunks = _chunks(logits, UNEVEN)
    for temperature, top_p in [(1.0, 0.9), (0.7, 0.5), (1.3, 0.99), (1.0, 0.3)]:
        got = native.top_p_candidates(chunks, 1.0 / temperature, top_p, 2, library=vector)
        want = native.top_p_candidates(chunks, 1.0 / temperature, top_p, 2, library=portable)
        assert got[2].any() and not got[2].all()
        for mine, reference in zip(got, want, strict=True):
            assert mine.dtype == reference.dtype and mine.tobytes() == reference.tobytes()
        uniforms = torch.rand(logits.shape[0], generator=generator).numpy()
        drawn = native.top_p_sample(chunks, 1.0 / temperature, top_p, uniforms, library=vector)
        expected = native.top_p_sample(chunks, 1.0 / temperature, top_p, uniforms, library=portable)
        assert np.array_equal(drawn, expected)


def test_masked_tokens_are_never_drawn() -> None:
    logits = torch.full((2, 5000), -float("inf"))
    logits[0, [11, 4000, 4999]] = torch.tensor([1.0, 2.0, 0.5])
    logits[1, 777] = 3.0  # one token left: every draw is that token
    for u in np.linspace(0.0, 0.999, 7, dtype=np.float32):
        uniforms = np.array([u, u], dtype=np.float32)
        drawn = native.top_p_sample(_chunks(logits, [1000, 1000, 3000]), 1.0, 0.99, uniforms)
        assert drawn[0] in (11, 4000, 4999) and drawn[1] == 777


def test_bad_inputs_say_what_is_wrong() -> None:
    logits = torch.randn(4, 256)
    with pytest.raises(ValueError, match="contiguous float32"):
        native.top_p_sample([logits[:, ::2]], 1.0, 0.9, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="one uniform per row"):
        native.top_p_sample([logits], 1.0, 0.9, np.zeros(3, np.float32))


def test_build_is_cached_and_a_failing_compiler_is_named(tmp_path: Path) -> None:
    cc = native.compiler()
    assert cc is not None
    first = native.build(tmp_path, cc)
    stamp = first.stat().st_mtime_ns
    assert native.build(tmp_path, cc) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporaries left
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\necho 'no such target' >&2\nexit 1\n")
    broken.chmod(0o755)
    with pytest.raises(RuntimeError, match="(?s)broken-cc could not compile .*no such target"):
        native.build(tmp_path / "other", str(broken))
    assert not any((tmp_path / "other" / "native").iterdir())


def test_the_environment_switch_turns_it_off() -> None:
    code = "from toxtests.engines.torch import native; print(native.load() is None)"
    env = {**os.environ, native.DISABLE_ENV: "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "True"


def test_sampling_with_the_kernel_does_not_import_numba() -> None:
    """The C path shares only the ladder with the numba one: importing numba (~0.5 s,
    holding the GIL) is for the runs that sample on its path."""
    code = (
        "import sys, torch\n"
        "from toxtests.engines.torch.sampling import sample_logit_chunks\n"
        "chunks = [torch.randn(4, 300) * 3, torch.randn(4, 200) * 3]\n"
        "tokens = sample_logit_chunks(chunks, torch.rand(4), 1.0, 0.9)\n"
        "print(sorted(int(t) < 500 for t in tokens), 'numba' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[True, True, True, True] False"


def test_native_draws_follow_transformers_top_p_distribution() -> None:
    """Chi-square test of many draws against transformers' own top-p filtering."""
    from scipy import stats
    from transformers.generation.logits_process import TopPLogitsWarper

    tail = torch.linspace(-4.0, -6.0, 300).tolist()  # distinct values: no tie at the edge
    logits = torch.tensor([[3.0, 2.5, 2.0, 1.0, 0.5, 0.0, -1.0, -2.0, *tail]])
    expected = torch.softmax(TopPLogitsWarper(top_p=0.9)(None, logits.clone()), -1)[0]
    draws = 40000
    uniforms = torch.rand(draws, generator=torch.Generator().manual_seed(1)).numpy()
    rows = logits.expand(draws, -1).contiguous()
    tokens = torch.from_numpy(native.top_p_sample(_chunks(rows, [100, 208]), 1.0, 0.9, uniforms))
    support = (expected > 0).nonzero().squeeze(-1)
    assert set(tokens.unique().tolist()) <= set(support.tolist())
    observed = torch.bincount(tokens, minlength=logits.shape[1])[support].double()
    frequencies = expected[support].double()
    result = stats.chisquare(observed.numpy(), (frequencies / frequencies.sum() * draws).numpy())
    assert result.pvalue > 1e-3
