"""Scorers on real parts: alt-profanity-check, a tiny Detoxify checkpoint, a tiny HF classifier."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_detoxify import build_tiny_detoxify, build_tiny_hf, tiny_bert
from hypothesis import given
from hypothesis import strategies as st

from toxtests.errors import ScorerError, UnsafeCheckpointError
from toxtests.files import sha256_file
from toxtests.score import load_scorer, validate_scores

TEXTS = [
    "have a nice day",
    "you are a stupid idiot and i hate you",
    "the model is fine",
    "",
    "what a terrible awful world " * 30,  # longer than the tiny model's 64 positions
    "they love their friend",
    "ok",
]


@pytest.fixture(scope="session")
def tiny_detoxify(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_tiny_detoxify(tmp_path_factory.mktemp("detoxify"))


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_hf(tmp_path_factory.mktemp("hf") / "tiny-toxic")


# --- profanity-check -------------------------------------------------------------------------


def test_profanity_check_ranks_profane_text_above_benign() -> None:
    scorer = load_scorer("profanity-check")
    texts = ["Thank you for the lovely dinner last night.", "fuck you, you worthless piece of shit"]
    scores = scorer.score(texts)
    assert scorer.attributes == ("profanity",) and scorer.primary == "profanity"
    assert scores["profanity"].dtype == np.float64
    assert ((scores["profanity"] >= 0) & (scores["profanity"] <= 1)).all()
    assert scores["profanity"][1] > 0.5 > scores["profanity"][0]
    assert len(scorer.fingerprint()) == 64 and scorer.fingerprint() == scorer.fingerprint()


def test_profanity_checks_identity_needs_no_scikit_learn_import(tmp_path: Path) -> None:
    """A gate keys its cache by the scorer's fingerprint before anything is scored: that
    must not import scikit-learn (~1.5 s, and a fully cached run never scores), and must
    be the same fingerprint before and after the classifier is imported (else caches
    written by earlier versions, which imported first, would be missed). The first score
    in an empty user cache goes through scikit-learn and converts the classifier; the next
    process scores from the conversion, bit-identically, without importing it at all."""
    import os
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from toxtests.score import load_scorer\n"
        "scorer = load_scorer('profanity-check')\n"
        "before = scorer.fingerprint()\n"
        "print('sklearn' in sys.modules, 'profanity_check' in sys.modules)\n"
        "score = scorer.score(['hello there', 'fuck off'])['profanity']\n"
        "print(before == scorer.fingerprint(), 'sklearn' in sys.modules)\n"
        "print(before)\n"
        "print(*(float(s).hex() for s in score))\n"
    )
    env = {**os.environ, "TOXTESTS_CACHE": str(tmp_path / "user-cache")}
    runs = []
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False
        )
        assert done.returncode == 0, done.stderr
        runs.append(done.stdout.split("\n"))
    first, second = runs
    assert first[0] == second[0] == "False False"  # identified without importing either
    assert first[1] == "True True"  # the same identity once scoring imported them
    assert second[1] == "True False"  # the same identity, scored without scikit-learn
    assert first[2] == second[2] == load_scorer("profanity-check").fingerprint()
    assert first[3] == second[3]  # the same scores, to the bit


def test_a_preloaded_scorer_scores_like_one_loaded_on_demand() -> None:
    """`ScorerHandle.preload` imports the classifier on a thread while the engine
    generates; scores afterwards are the scorer's own."""
    from toxtests.config import Config
    from toxtests.run.store import ScorerHandle, Timings

    handle = ScorerHandle("profanity-check", Config(), "cpu", False, Timings())
    handle.preload()
    handle.preload()  # once: a second call starts nothing
    thread = handle._preloading
    assert thread is not None
    thread.join(timeout=120)
    assert not thread.is_alive()
    np.testing.assert_array_equal(
        handle.scorer.score(TEXTS)["profanity"],
        load_scorer("profanity-check").score(TEXTS)["profanity"],
    )


def test_profanity_check_batches_match_one_call() -> None:
    whole = load_scorer("profanity-check", batch_size=64).score(TEXTS)
    batched = load_scorer("profanity-check", batch_size=2).score(TEXTS)
    np.testing.assert_array_equal(whole["profanity"], batched["profanity"])


def test_empty_input_gives_empty_arrays() -> None:
    scores = load_scorer("profanity-check").score([])
    assert list(scores) == ["profanity"] and scores["profanity"].shape == (0,)


def test_library_failure_is_wrapped_with_the_batch() -> None:
    scorer = load_scorer("profanity-check", batch_size=2)
    with pytest.raises(ScorerError, match=r"scorer 'profanity-check' failed on texts 2\.\.3: "):
        scorer.score(["fine", "ok", None, "ok"])  # type: ignore[list-item]


# --- detoxify: a local checkpoint ------------------------------------------------------------


def _independent_detoxify_scores(ckpt: Path, config_dir: Path, texts: list[str]) -> np.ndarray:
    """Sigmoid of the tiny model's own logits, one text at a time, without toxtests or detoxify."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    config = BertConfig.from_pretrained(config_dir)
    model = BertForSequenceClassification(config).eval()
    model.load_state_dict(state)
    tokenizer = BertTokenizer.from_pretrained(config_dir)
    rows = []
    with torch.no_grad():
        for text in texts:
            inputs = tokenizer(
                text,
                return_tensors="pt",
                truncation=True,
                max_length=config.max_position_embeddings,
            )
            rows.append(torch.sigmoid(model(**inputs).logits)[0].numpy())
    return np.array(rows, dtype=np.float64)


def test_detoxify_checkpoint_scores_are_sigmoid_of_its_logits(
    tiny_detoxify: tuple[Path, Path],
) -> None:
    ckpt, config_dir = tiny_detoxify
    scorer = load_scorer(f"detoxify:{ckpt}", huggingface_config=str(config_dir), batch_size=3)
    assert scorer.attributes == (
        "toxicity",
        "severe_toxicity",
        "obscene",
        "threat",
        "insult",
        "identity_attack",
    )
    assert scorer.primary == "toxicity"
    scores = scorer.score(TEXTS)  # 3 + 3 + 1: the last batch is a single text
    expected = _independent_detoxify_scores(ckpt, config_dir, TEXTS)
    for i, attribute in enumerate(scorer.attributes):
        np.testing.assert_allclose(scores[attribute], expected[:, i], rtol=0, atol=1e-5)
    assert max(np.ptp(values) for values in scores.values()) > 0.05  # not a constant model


def test_detoxify_checkpoint_is_deterministic(tiny_detoxify: tuple[Path, Path]) -> None:
    ckpt, config_dir = tiny_detoxify
    first = load_scorer(f"detoxify:{ckpt}", huggingface_config=str(config_dir))
    second = load_scorer(f"detoxify:{ckpt}", huggingface_config=str(config_dir), batch_size=2)
    once, again, other = first.score(TEXTS), first.score(TEXTS), second.score(TEXTS)
    for attribute in first.attributes:
        np.testing.assert_array_equal(once[attribute], again[attribute])
        np.testing.assert_allclose(once[attribute], other[attribute], rtol=0, atol=1e-6)
    assert first.fingerprint() == second.fingerprint()
    assert len(first.fingerprint()) == 64 and sha256_file(ckpt) not in ("", first.fingerprint())


def test_detoxify_uses_config_beside_the_checkpoint(
    tiny_detoxify: tuple[Path, Path], tmp_path: Path
) -> None:
    ckpt, config_dir = tiny_detoxify
    bundle = shutil.copytree(config_dir, tmp_path / "bundle")
    shutil.copy(ckpt, bundle / "model.ckpt")
    scorer = load_scorer(f"detoxify:{bundle / 'model.ckpt'}")
    assert scorer.score(["have a nice day"])["toxicity"].shape == (1,)


def test_detoxify_without_config_dir_says_how_to_fix(tiny_detoxify: tuple[Path, Path]) -> None:
    ckpt, _ = tiny_detoxify
    with pytest.raises(
        ScorerError, match=r"scoring\.huggingface_config is not set and .* has no config\.json; set"
    ):
        load_scorer(f"detoxify:{ckpt}")


def test_detoxify_missing_checkpoint(tmp_path: Path, tiny_detoxify: tuple[Path, Path]) -> None:
    _, config_dir = tiny_detoxify
    with pytest.raises(ScorerError, match=r"checkpoint .*nope\.ckpt does not exist"):
        load_scorer(f"detoxify:{tmp_path / 'nope.ckpt'}", huggingface_config=str(config_dir))


def test_detoxify_checkpoint_with_missing_weights_is_refused(
    tiny_detoxify: tuple[Path, Path], tmp_path: Path
) -> None:
    ckpt, config_dir = tiny_detoxify
    loaded = torch.load(ckpt, map_location="cpu", weights_only=True)
    loaded["state_dict"] = {k: v for k, v in loaded["state_dict"].items() if "classifier" not in k}
    torch.save(loaded, tmp_path / "headless.ckpt")
    with pytest.raises(ScorerError, match=r"2 model weights were missing .*would be random"):
        load_scorer(f"detoxify:{tmp_path / 'headless.ckpt'}", huggingface_config=str(config_dir))


class _Payload:
    """Pickles as a call to Path.touch: harmless stand-in for code a hostile checkpoint runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return (Path.touch, (self.marker,))


def test_malicious_pickle_is_refused_unless_allowed(
    tiny_detoxify: tuple[Path, Path], tmp_path: Path
) -> None:
    _, config_dir = tiny_detoxify
    marker, evil = tmp_path / "pwned", tmp_path / "evil.ckpt"
    torch.save({"config": _Payload(marker), "state_dict": {}}, evil)

    with pytest.raises(
        UnsafeCheckpointError,
        match=r"evil\.ckpt is not a plain-tensor checkpoint: loading it means unpickling, which "
        r"can run code, .*scoring\.allow_pickle = true \(--tox-allow-pickle\) only if you trust",
    ):
        load_scorer(f"detoxify:{evil}", huggingface_config=str(config_dir))
    assert not marker.exists()

    # The flag alone is what lets the pickle run; the result is then no Detoxify checkpoint.
    with pytest.raises(ScorerError, match=r"evil\.ckpt is not a Detoxify checkpoint"):
        load_scorer(f"detoxify:{evil}", huggingface_config=str(config_dir), allow_pickle=True)
    assert marker.exists()


def test_truncated_checkpoint_cannot_be_read(
    tiny_detoxify: tuple[Path, Path], tmp_path: Path
) -> None:
    ckpt, config_dir = tiny_detoxify
    payload = ckpt.read_bytes()
    (tmp_path / "junk.ckpt").write_bytes(payload[: len(payload) // 2])  # a cut-off download
    with pytest.raises(ScorerError, match=r"junk\.ckpt cannot be read"):
        load_scorer(f"detoxify:{tmp_path / 'junk.ckpt'}", huggingface_config=str(config_dir))


def test_detoxify_variant_that_cannot_be_fetched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import detoxify.detoxify

    # A closed local port: the real download code fails at once, with or without a network.
    url = "http://127.0.0.1:9/toxic_original-c1212f89.ckpt"
    monkeypatch.setitem(detoxify.detoxify.MODEL_URLS, "original", url)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(
        ScorerError, match=r"weights could not be fetched .*detoxify:/path/to/checkpoint\.ckpt"
    ):
        load_scorer("detoxify:original")


# --- hf: a local text-classification model ----------------------------------------------------


def test_hf_local_model_softmax(tiny_hf: Path) -> None:
    scorer = load_scorer(f"hf:{tiny_hf}", batch_size=4)
    assert scorer.attributes == ("non-toxic", "toxic") and scorer.primary == "toxic"
    scores = scorer.score(TEXTS)
    total = scores["non-toxic"] + scores["toxic"]
    np.testing.assert_allclose(total, np.ones(len(TEXTS)), atol=1e-6)
    assert np.ptp(scores["toxic"]) > 0.01
    assert len(scorer.fingerprint()) == 64 and scorer.fingerprint() == scorer.fingerprint()


def test_hf_pickle_only_dir_is_refused_unless_allowed(tiny_hf: Path, tmp_path: Path) -> None:
    pickled = build_tiny_hf(tmp_path / "pickled", safetensors=False)
    with pytest.raises(
        UnsafeCheckpointError, match=r"pytorch_model\.bin is a pickle .*safetensors"
    ):
        load_scorer(f"hf:{pickled}")
    allowed = load_scorer(f"hf:{pickled}", allow_pickle=True).score(TEXTS)
    safe = load_scorer(f"hf:{tiny_hf}").score(TEXTS)
    np.testing.assert_allclose(allowed["toxic"], safe["toxic"], atol=1e-6)


def test_hf_multi_label_uses_sigmoid_and_normalised_names(tmp_path: Path) -> None:
    labels = {0: "Severe Toxic", 1: "Insult", 2: "Threat"}
    model, tokenizer = tiny_bert(
        tmp_path,
        num_labels=3,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
        problem_type="multi_label_classification",
    )
    model.save_pretrained(tmp_path)
    scorer = load_scorer(f"hf:{tmp_path}")
    assert scorer.attributes == ("severe_toxic", "insult", "threat")
    assert scorer.primary == "severe_toxic"
    scores = scorer.score(["you are a stupid idiot"])
    with torch.no_grad():
        logits = model(**tokenizer(["you are a stupid idiot"], return_tensors="pt")).logits[0]
    for i, attribute in enumerate(scorer.attributes):
        assert scores[attribute][0] == pytest.approx(
            1 / (1 + math.exp(-float(logits[i]))), abs=1e-6
        )


def test_hf_model_without_classifier_head_is_refused(tmp_path: Path) -> None:
    model, _ = tiny_bert(tmp_path, num_labels=2)
    model.bert.save_pretrained(tmp_path)  # the encoder only, as a base checkpoint ships
    with pytest.raises(ScorerError, match=r"weights were not in the model files .*would be random"):
        load_scorer(f"hf:{tmp_path}")


# --- spec errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "profanity-chek",
            r"unknown scorer 'profanity-chek'; valid: .*did you mean 'profanity-check'",
        ),
        ("detoxify", r"unknown scorer 'detoxify'; valid: .*did you mean 'detoxify:\w+'\?$"),
        ("perspective", r"^unknown scorer 'perspective'; valid: detoxify:<variant\|path\.ckpt>, "),
        (
            "detoxify:orginal",
            r"unknown Detoxify variant 'orginal'.*did you mean 'detoxify:original'",
        ),
        ("hf:", r"unknown scorer 'hf:'"),
    ],
)
def test_unknown_scorer_names_the_valid_ones(spec: str, message: str) -> None:
    with pytest.raises(ScorerError, match=message):
        load_scorer(spec)


# --- validate_scores -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([0.1, math.nan], r"NaN \(nan\) for attribute 'toxicity' at text index 1"),
        ([0.2, 1.5], r"a value outside \[0, 1\] \(1\.5\) for attribute 'toxicity' at text index 1"),
        (
            [-0.1, 0.5],
            r"a value outside \[0, 1\] \(-0\.1\) for attribute 'toxicity' at text index 0",
        ),
        ([math.inf, 0.5], r"an infinite value \(inf\) for attribute 'toxicity' at text index 0"),
        ([0.1], r"\(1,\) scores for attribute 'toxicity' but was given 2 texts"),
    ],
)
def test_validate_scores_rejects_non_probabilities(values: list[float], message: str) -> None:
    with pytest.raises(ScorerError, match=r"^scorer 'demo' returned " + message):
        validate_scores("demo", ["first", "second"], {"toxicity": np.array(values)})


@given(st.lists(st.floats(min_value=0.0, max_value=1.0), max_size=40))
def test_validate_scores_passes_probabilities_unchanged(values: list[float]) -> None:
    texts = [f"text {i}" for i in range(len(values))]
    checked = validate_scores("demo", texts, {"toxicity": np.array(values), "insult": values})
    for attribute in ("toxicity", "insult"):
        assert checked[attribute].dtype == np.float64
        np.testing.assert_array_equal(checked[attribute], np.array(values, dtype=np.float64))
