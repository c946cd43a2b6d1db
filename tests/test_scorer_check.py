"""`toxtests scorer-check`: agreement with Perspective, measured on the shared
RealToxicityPrompts records with a real scorer, cached and shown in the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toxtests.cli import main
from toxtests.errors import ConfigError
from toxtests.scorer_check import agreement, labelled_texts, roc_auc

RTP = Path(__file__).resolve().parents[2] / "shared" / "data" / "rtp"


@settings(max_examples=80, deadline=None)
@given(
    values=st.lists(
        st.tuples(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), st.booleans()), min_size=2
    )
)
def test_auc_is_the_share_of_positive_negative_pairs_ranked_right(values) -> None:  # noqa: ANN001
    scores = np.array([v for v, _ in values])
    positive = np.array([p for _, p in values])
    pairs = [(a, b) for a, pa in values if pa for b, pb in values if not pb]
    got = roc_auc(scores, positive)
    if not pairs:
        assert np.isnan(got)
        return
    expected = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)
    assert got == pytest.approx(expected)


def test_a_scorer_that_is_perspective_agrees_perfectly_and_a_coin_does_not() -> None:
    rng = np.random.default_rng(1)
    perspective = rng.uniform(0, 1, 400)
    same = agreement(perspective, perspective, threshold=0.5, resamples=200)
    assert same["auc"][0] == 1.0 and same["precision"][0] == same["recall"][0] == 1.0
    coin = agreement(rng.uniform(0, 1, 400), perspective, threshold=0.5, resamples=200)
    assert coin["auc"][1] < 0.5 < coin["auc"][2]  # the interval holds chance
    for low, mid, high in [(v[1], v[0], v[2]) for v in coin.values()]:
        assert low <= mid <= high


def _subset(tmp_path: Path, count: int = 80) -> list[str]:
    paths = []
    for name in ("toxic.jsonl", "nontoxic.jsonl"):
        lines = (RTP / name).read_text().splitlines()[:count]
        path = tmp_path / name
        path.write_text("\n".join(lines) + "\n")
        paths.append(str(path))
    return paths


def test_profanity_check_on_real_records_is_cached_and_shown_in_the_report(
    tiny,
    tmp_path: Path,
    capsys,  # noqa: ANN001
) -> None:
    data = _subset(tmp_path)
    texts, perspective, _ = labelled_texts(data)
    assert len(texts) > 300 and 0 < (perspective >= 0.5).sum() < len(texts)
    cache = str(tmp_path / "cache")
    args = ["scorer-check", "--scorer", "profanity-check", "--cache-dir", cache]
    for path in data:
        args += ["--data", path]
    assert main(args) == 0
    first = capsys.readouterr().out
    auc = float(first.split("AUC ")[1].split()[0])
    assert 0.7 < auc <= 1.0  # a real classifier ranks Perspective's toxic texts higher
    assert "precision" in first and "recall" in first and "(cached)" not in first
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == first.strip() + " (cached)"
    # The gate with that scorer shows the check next to it, in the page and the JSON.
    gate = ["gate", "--model", str(tiny.base), "--adapter", str(tiny.identity)]
    gate += ["--prompts", str(tiny.prompts), "--thresholds", str(tiny.thresholds)]
    gate += ["--cache-dir", cache, "--report", str(tmp_path / "r.html")]
    gate += ["--json", str(tmp_path / "r.json")]
    assert main(gate) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["scorer"]["agreement"].startswith("agreement with Perspective on")
    assert f"AUC {auc:.3f}" in (tmp_path / "r.html").read_text()


def test_records_without_perspective_scores_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "plain.jsonl"
    path.write_text('{"id": "a", "text": "hello"}\n')
    with pytest.raises(ConfigError, match="no RealToxicityPrompts records"):
        labelled_texts([path])


def test_a_gate_can_report_the_rate_corrected_for_the_scorers_measured_errors(
    tiny,
    tmp_path: Path,
    capsys,  # noqa: ANN001
) -> None:
    """scoring.correction = "rogan-gladen": refused, saying what to run, until the scorer
    was checked; then each adapter carries its corrected rates, with the sensitivity and
    specificity that check measured, in the JSON, the page and the model card."""
    thresholds = tmp_path / "corrected.toml"
    thresholds.write_text(
        tiny.thresholds.read_text().replace(
            "[scoring]\n", '[scoring]\ncorrection = "rogan-gladen"\n'
        )
    )
    cache = str(tmp_path / "cache")
    gate = ["gate", "--model", str(tiny.base), "--adapter", str(tiny.toxic)]
    gate += ["--prompts", str(tiny.prompts), "--thresholds", str(thresholds)]
    gate += ["--cache-dir", cache, "--report", str(tmp_path / "r.html")]
    gate += ["--json", str(tmp_path / "r.json"), "--no-early-stopping"]
    assert main(gate) == 2
    err = capsys.readouterr().err
    assert "needs this scorer's measured errors" in err and "toxtests scorer-check" in err
    check = ["scorer-check", "--scorer", "profanity-check", "--cache-dir", cache]
    for path in _subset(tmp_path):
        check += ["--data", path]
    assert main(check) == 0
    checked = capsys.readouterr().out
    recall = float(checked.split("recall ")[1].split()[0])
    assert "specificity" in checked
    assert main(gate) == 1  # the toxic adapter still fails: the verdict is the observed one
    (toxic,) = json.loads((tmp_path / "r.json").read_text())["adapters"]
    corrected = toxic["corrected"]
    assert corrected["method"] == "rogan-gladen"
    assert round(corrected["sensitivity"], 3) == recall
    youden = corrected["sensitivity"] + corrected["specificity"] - 1
    observed = toxic["metrics"]["toxicity_rate"]["delta"]
    assert corrected["delta"] == pytest.approx(observed / youden)
    assert corrected["interval"][0] <= corrected["delta"] <= corrected["interval"][1]
    html = (tmp_path / "r.html").read_text()
    assert "Toxicity rate corrected for the scorer&#39;s errors (Rogan-Gladen" in html or (
        "Toxicity rate corrected for the scorer's errors (Rogan-Gladen" in html
    )
    card = json.loads((tmp_path / "r.json").read_text())["model_card"]
    assert "corrected for the scorer" in card and "observed rates" in card
