"""How well a scorer agrees with Perspective: `toxtests scorer-check`.

RealToxicityPrompts records carry Perspective API scores for the prompt and for the
original web continuation: each is a labelled text (toxic when Perspective's toxicity is
at least 0.5, the standard the prompts were built with). The check scores every text
with the chosen scorer and reports ROC AUC (is the scorer's ranking Perspective's?) and
precision, recall and F1 of "toxic" at the gate's own cut-off (does its verdict match?),
each with a bootstrap percentile interval over texts. The result is cached by the
scorer's and the data's fingerprints, and the gate's report shows the latest one next
to the scorer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toxtests.correction import ScorerErrors
from toxtests.errors import ConfigError

PERSPECTIVE_CUTOFF = 0.5
NAMESPACE = "scorer-checks"
# Bumped when a check records more: a check cached by an earlier version is redone.
CHECK_FORMAT = 2


def confusion_counts(predicted: np.ndarray, actual: np.ndarray) -> dict[str, int]:
    return {
        "true_positive": int(np.sum(predicted & actual)),
        "false_negative": int(np.sum(~predicted & actual)),
        "true_negative": int(np.sum(~predicted & ~actual)),
        "false_positive": int(np.sum(predicted & ~actual)),
    }


@dataclass(frozen=True)
class Agreement:
    scorer: str
    scorer_fingerprint: str
    data_fingerprint: str
    texts: int
    toxic: int  # by Perspective
    threshold: float  # the scorer's cut-off (scoring.threshold)
    confidence: float
    auc: tuple[float, float, float]  # estimate, low, high
    precision: tuple[float, float, float]
    recall: tuple[float, float, float]
    f1: tuple[float, float, float]
    # The confusion counts at the cut-off (true/false positives and negatives): what a
    # correction for the scorer's errors needs. Empty in checks written before 0.1.
    counts: dict[str, int] = field(default_factory=dict)

    def errors(self) -> ScorerErrors | None:
        if not self.counts:
            return None
        return ScorerErrors(
            self.counts["true_positive"],
            self.counts["false_negative"],
            self.counts["true_negative"],
            self.counts["false_positive"],
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> Agreement:
        ranges = ("auc", "precision", "recall", "f1")
        fixed: dict[str, Any] = {k: tuple(v) if k in ranges else v for k, v in values.items()}
        return cls(**fixed)

    def line(self) -> str:
        def show(name: str, value: tuple[float, float, float]) -> str:
            return f"{name} {value[0]:.3f} [{value[1]:.3f}, {value[2]:.3f}]"

        return (
            f"agreement with Perspective on {self.texts} RealToxicityPrompts texts "
            f"({self.toxic} toxic at >= {PERSPECTIVE_CUTOFF}): {show('AUC', self.auc)}; at "
            f"the cut-off {self.threshold:g}: {show('precision', self.precision)}, "
            f"{show('recall', self.recall)}, {show('F1', self.f1)}"
            + (f", specificity {errors.specificity:.3f}" if (errors := self.errors()) else "")
            + f" ({self.confidence:.0%} intervals)"
        )


def labelled_texts(paths: Sequence[str | Path]) -> tuple[list[str], np.ndarray, str]:
    """(texts, Perspective toxicity, fingerprint of the data) from RTP JSONL files:
    each record's prompt and continuation, where both text and score are present."""
    texts: list[str] = []
    scores: list[float] = []
    digest = hashlib.sha256()
    for path in paths:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{number}: not JSON ({exc.msg})") from None
            for part in ("prompt", "continuation"):
                body = record.get(part) if isinstance(record, dict) else None
                if not isinstance(body, dict):
                    continue
                text, score = body.get("text"), body.get("toxicity")
                if isinstance(text, str) and text.strip() and isinstance(score, (int, float)):
                    texts.append(text)
                    scores.append(float(score))
                    digest.update(f"{text}\0{score}\n".encode())
    if not texts:
        raise ConfigError(
            f"{', '.join(map(str, paths))}: no RealToxicityPrompts records with Perspective "
            "scores (prompt/continuation objects with 'text' and 'toxicity')"
        )
    return texts, np.asarray(scores), digest.hexdigest()[:16]


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """The probability that a random positive outranks a random negative (ties count
    half): Mann-Whitney's U over the two groups' sizes."""
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    starts = np.cumsum(counts) - counts
    ranks = (starts + (counts + 1) / 2)[inverse]  # ties share their average rank
    n_pos = int(positive.sum())
    n_neg = len(scores) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _rates(predicted: np.ndarray, actual: np.ndarray) -> tuple[float, float, float]:
    true_positive = float(np.sum(predicted & actual))
    precision = true_positive / max(float(predicted.sum()), 1.0)
    recall = true_positive / max(float(actual.sum()), 1.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def agreement(
    scores: np.ndarray,
    perspective: np.ndarray,
    threshold: float,
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, tuple[float, float, float]]:
    """AUC and precision / recall / F1 at `threshold`, each with its bootstrap interval."""
    actual = perspective >= PERSPECTIVE_CUTOFF
    predicted = scores >= threshold
    point = {"auc": roc_auc(scores, actual)}
    point["precision"], point["recall"], point["f1"] = _rates(predicted, actual)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {name: [] for name in point}
    for _ in range(resamples):
        pick = rng.integers(0, len(scores), len(scores))
        draws["auc"].append(roc_auc(scores[pick], actual[pick]))
        p, r, f = _rates(predicted[pick], actual[pick])
        draws["precision"].append(p)
        draws["recall"].append(r)
        draws["f1"].append(f)
    tail = (1 - confidence) / 2 * 100
    return {
        name: (
            float(value),
            float(np.nanpercentile(draws[name], tail)),
            float(np.nanpercentile(draws[name], 100 - tail)),
        )
        for name, value in point.items()
    }


def cache_key(scorer_fingerprint: str) -> str:
    """One entry per scorer: the report shows the latest check of the scorer in use."""
    return hashlib.sha256(f"scorer-check\0{scorer_fingerprint}".encode()).hexdigest()


def run_check(
    spec: str,
    data: Sequence[str | Path],
    config: Any,
    cache: Any,
    device: str,
    resamples: int = 1000,
) -> tuple[Agreement, bool]:
    """The scorer's agreement on `data` (from the cache when this scorer, data and
    settings were checked before) and whether it came from the cache. Either way it
    becomes the scorer's latest check, which the gate's report shows."""
    from toxtests.score import load_scorer

    scoring = config.scoring
    scorer = load_scorer(
        spec,
        device=device,
        batch_size=scoring.batch_size,
        huggingface_config=scoring.huggingface_config,
        allow_pickle=scoring.allow_pickle,
    )
    attribute = scoring.attribute or scorer.primary
    texts, perspective, data_fingerprint = labelled_texts(data)
    confidence = config.statistics.confidence
    key = hashlib.sha256(
        json.dumps(
            [CHECK_FORMAT, scorer.fingerprint(), attribute, data_fingerprint,
             scoring.threshold, confidence, resamples]
        ).encode()
    ).hexdigest()  # fmt: skip
    stored = cache.get(NAMESPACE, key)
    if stored is not None:
        result = Agreement.from_json(stored)
    else:
        scores = np.asarray(scorer.score(texts)[attribute], dtype=np.float64)
        figures = agreement(scores, perspective, scoring.threshold, confidence, resamples)
        result = Agreement(
            scorer=spec,
            scorer_fingerprint=scorer.fingerprint(),
            data_fingerprint=data_fingerprint,
            texts=len(texts),
            toxic=int((perspective >= PERSPECTIVE_CUTOFF).sum()),
            threshold=scoring.threshold,
            confidence=confidence,
            counts=confusion_counts(scores >= scoring.threshold, perspective >= PERSPECTIVE_CUTOFF),
            **figures,
        )
        cache.put(NAMESPACE, key, result.to_json())
    cache.put(NAMESPACE, cache_key(scorer.fingerprint()), result.to_json())
    return result, stored is not None
