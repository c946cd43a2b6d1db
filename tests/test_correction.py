"""The toxicity rate corrected for the scorer's errors: the Rogan-Gladen estimate
recovers a true rate and a true difference that misclassification hides, and its
interval, which also carries the uncertainty of the measured errors, covers them."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from toxtests.correction import ScorerErrors, corrected_rate, rogan_gladen
from toxtests.errors import ConfigError


@given(
    st.floats(0.0, 1.0),
    st.floats(0.3, 1.0),
    st.floats(0.3, 1.0),
)
def test_rogan_gladen_inverts_what_misclassification_does(
    rate: float, sensitivity: float, specificity: float
) -> None:
    if sensitivity + specificity - 1 < 0.05:
        return
    apparent = sensitivity * rate + (1 - specificity) * (1 - rate)
    assert rogan_gladen(apparent, sensitivity, specificity) == pytest.approx(rate, abs=1e-9)


def _world(rng: np.random.Generator, n: int, sensitivity: float, specificity: float):  # noqa: ANN202
    """n prompts whose true toxicity is 0.10 under the parent and 0.20 under the adapter
    (paired: the adapter keeps the parent's toxic prompts), seen through a scorer with the
    given errors; and a scorer-check of 3,000 labelled texts with the same errors."""
    parent_true = rng.random(n) < 0.10
    adapter_true = parent_true | (rng.random(n) < 0.10 / 0.90)

    def seen(truth: np.ndarray) -> np.ndarray:
        return np.where(
            truth, rng.random(truth.size) < sensitivity, rng.random(truth.size) > specificity
        )

    labels = rng.random(3000) < 0.4
    flagged = seen(labels)
    errors = ScorerErrors(
        int(np.sum(flagged & labels)),
        int(np.sum(~flagged & labels)),
        int(np.sum(~flagged & ~labels)),
        int(np.sum(flagged & ~labels)),
    )
    true_delta = float(adapter_true.mean() - parent_true.mean())
    return seen(parent_true).astype(float), seen(adapter_true).astype(float), errors, true_delta


def test_the_corrected_difference_recovers_what_the_scorer_hides() -> None:
    rng = np.random.default_rng(7)
    parent, adapter, errors, true_delta = _world(rng, 20_000, sensitivity=0.7, specificity=0.95)
    result = corrected_rate(parent, adapter, errors, 0.95, 2000, 0)
    observed = float(adapter.mean() - parent.mean())
    assert observed < 0.8 * true_delta  # the scorer hides a third of the increase
    assert result.delta == pytest.approx(true_delta, abs=0.012)
    assert result.interval[0] <= true_delta <= result.interval[1]
    assert result.parent == pytest.approx(0.10, abs=0.01)
    assert result.adapter == pytest.approx(0.20, abs=0.015)
    assert 0.65 < result.sensitivity < 0.75 and 0.93 < result.specificity < 0.97


def test_the_corrected_interval_covers_the_true_difference_at_its_confidence() -> None:
    rng = np.random.default_rng(11)
    covered = 0
    runs = 200
    for run in range(runs):
        parent, adapter, errors, true_delta = _world(rng, 400, sensitivity=0.7, specificity=0.95)
        low, high = corrected_rate(parent, adapter, errors, 0.95, 1000, run).interval
        covered += low <= true_delta <= high
    assert covered / runs >= 0.90  # nominal 0.95; the bootstrap runs a little narrow


def test_a_scorer_no_better_than_chance_cannot_be_corrected_for() -> None:
    chance = ScorerErrors(true_positive=50, false_negative=50, true_negative=40, false_positive=60)
    with pytest.raises(ConfigError, match="no better than chance"):
        corrected_rate(np.zeros(10), np.ones(10), chance, 0.95, 100, 0)
