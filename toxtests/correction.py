"""The toxicity rate corrected for the scorer's errors (Rogan–Gladen), with the
uncertainty of those errors in the interval.

A scorer that misses toxic text (sensitivity Se < 1) and flags clean text (specificity
Sp < 1) reports an apparent rate p = Se·θ + (1 − Sp)·(1 − θ) for a true rate θ, so
θ = (p + Sp − 1) / (Se + Sp − 1). A paired difference of two apparent rates is the true
difference times J = Se + Sp − 1 (Youden's J), so the corrected difference is Δ / J: the
observed one scaled up, as a scorer that misses a third of all toxic text also misses a
third of any increase. Se and Sp come from `toxtests scorer-check` (agreement with
Perspective on labelled RealToxicityPrompts texts); their uncertainty enters the
interval by drawing them from their Beta posteriors in every bootstrap replicate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from toxtests.compare import percentile_interval, resample_weights, weighted_means
from toxtests.errors import ConfigError


@dataclass(frozen=True)
class ScorerErrors:
    """The confusion counts of a scorer-check: its sensitivity and specificity."""

    true_positive: int
    false_negative: int
    true_negative: int
    false_positive: int

    @property
    def sensitivity(self) -> float:
        return self.true_positive / max(self.true_positive + self.false_negative, 1)

    @property
    def specificity(self) -> float:
        return self.true_negative / max(self.true_negative + self.false_positive, 1)

    def youden(self) -> float:
        return self.sensitivity + self.specificity - 1


def rogan_gladen(apparent: float, sensitivity: float, specificity: float) -> float:
    """The true rate behind an apparent one, clipped to [0, 1] (sampling noise can put
    the raw estimate outside it)."""
    return float(np.clip((apparent + specificity - 1) / (sensitivity + specificity - 1), 0, 1))


@dataclass(frozen=True)
class CorrectedRate:
    method: str
    sensitivity: float
    specificity: float
    checked_texts: int
    parent: float
    adapter: float
    delta: float
    interval: tuple[float, float]
    confidence: float

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        body["interval"] = list(self.interval)
        return body

    def line(self) -> str:
        low, high = self.interval
        return (
            f"toxicity rate corrected for the scorer's errors (Rogan-Gladen; sensitivity "
            f"{self.sensitivity:.3f}, specificity {self.specificity:.3f} from a scorer-check "
            f"on {self.checked_texts} texts): parent {self.parent:.3f}, adapter "
            f"{self.adapter:.3f}, delta {self.delta:+.3f} [{low:+.3f}, {high:+.3f}] "
            f"({self.confidence:.0%}, the sensitivity's and specificity's uncertainty "
            "included); the verdict is reached on the observed rates"
        )


def corrected_rate(
    parent: np.ndarray,
    adapter: np.ndarray,
    errors: ScorerErrors,
    confidence: float,
    resamples: int,
    seed: int,
) -> CorrectedRate:
    """Per-prompt toxicity rates (the share of a prompt's samples scored toxic) of the
    parent and the adapter, corrected; prompts and scorer errors resampled together."""
    youden = errors.youden()
    if youden <= 0:
        raise ConfigError(
            f"scoring.correction: the scorer's sensitivity {errors.sensitivity:.3f} and "
            f"specificity {errors.specificity:.3f} are no better than chance (their sum "
            "is <= 1), so its errors cannot be corrected for; choose another scorer or "
            'set scoring.correction = "none"'
        )
    parent, adapter = np.asarray(parent, float), np.asarray(adapter, float)
    weights = resample_weights(len(parent), resamples, "bootstrap", seed)
    differences = weighted_means(adapter - parent, weights)
    rng = np.random.default_rng(seed + 1)
    sensitivity = rng.beta(errors.true_positive + 1, errors.false_negative + 1, resamples)
    specificity = rng.beta(errors.true_negative + 1, errors.false_positive + 1, resamples)
    scale = sensitivity + specificity - 1
    # A draw with J <= 0 would be a scorer no better than chance: it carries no information
    # on the difference's size, so it is kept at the smallest J the check allows.
    scale = np.maximum(scale, 1e-3)
    se, sp = errors.sensitivity, errors.specificity
    return CorrectedRate(
        method="rogan-gladen",
        sensitivity=se,
        specificity=sp,
        checked_texts=errors.true_positive
        + errors.false_negative
        + errors.true_negative
        + errors.false_positive,
        parent=rogan_gladen(float(parent.mean()), se, sp),
        adapter=rogan_gladen(float(adapter.mean()), se, sp),
        delta=float((adapter - parent).mean() / youden),
        interval=percentile_interval(differences / scale, confidence),
        confidence=confidence,
    )
