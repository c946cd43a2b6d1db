"""profanity-check without scikit-learn: the converted arrays score bit-identically to
`profanity_check.predict_prob`, which is what lets the scorer keep its fingerprint."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from toxtests import profanity
from toxtests.files import default_cache_dir
from toxtests.score import ProfanityCheckScorer, load_scorer

RTP = Path(__file__).resolve().parents[2] / "shared" / "data" / "rtp"
_SPEC = importlib.util.find_spec("profanity_check")
assert _SPEC is not None and _SPEC.origin is not None
DATA_DIR = Path(_SPEC.origin).parent / "data"

EDGE_TEXTS = [
    "",
    " ",
    "\t\n \r\n",
    "a",  # one letter: no token
    "I",
    "FUCK YOU",
    "Fuck You, Shithead!!!",
    "fuck fuck fuck fuck fuck fuck fuck fuck fuck fuck",
    "shit " * 200,
    "12 345 6789 2024",
    "__init__ snake_case_word _ __ foo_bar",
    "Ärger über Öl, straße, ÉCOLE, naïve café",
    "ﬁne ﬂow ﬀ",  # ligatures: .lower() keeps them, \w matches them
    "İstanbul ΣΊΣΥΦΟΣ",  # lowercasing changes the length
    "😀 🤬 💩 damn 😡",
    "tabs\tand\nnewlines\r\nbitch\x0bass\x0cdick",
    "the and of a to in is it",  # stop words only
    "a.b,c;d:e!f?g",
    "don't can't won't you're",
    "ﾌｧｯｸ　全角　ｆｕｃｋ",
    "x" * 5000,
    "\u200bshit\u200b \u00a0crap\u00a0",
]


def _rtp_texts() -> list[str]:
    texts = []
    for name in ("toxic.jsonl", "nontoxic.jsonl"):
        for line in (RTP / name).read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            texts.append(record["prompt"]["text"])
            if "continuation" in record:
                texts.append(record["continuation"]["text"])
    return texts


def _sklearn_scores(texts: list[str]) -> np.ndarray:
    from profanity_check import predict_prob

    return np.asarray(predict_prob(texts), dtype=np.float64)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty user cache: TOXTESTS_CACHE is what default_cache_dir reads."""
    monkeypatch.setenv("TOXTESTS_CACHE", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"
    assert profanity.cache_path(DATA_DIR).parent == tmp_path / "cache" / "scorers"
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def arrays() -> profanity.ProfanityArrays:
    return profanity.convert(DATA_DIR)


@pytest.fixture(scope="module")
def fitted() -> tuple[Any, Any]:
    import joblib

    return joblib.load(DATA_DIR / "vectorizer.joblib"), joblib.load(DATA_DIR / "model.joblib")


# --- bit-identical scores ----------------------------------------------------------------------


def test_scores_are_bit_identical_on_every_rtp_text(arrays: profanity.ProfanityArrays) -> None:
    texts = _rtp_texts()
    assert len(texts) == 3600  # 1,800 records, each with a prompt and a continuation
    expected = _sklearn_scores(texts)
    found = arrays.score(texts)
    assert found.dtype == np.float64 and found.shape == (len(texts),)
    assert np.array_equal(found, expected), np.flatnonzero(found != expected)[:10]
    # Rows are independent: any batching gives the same bits.
    for start in range(0, len(texts), 61):
        assert np.array_equal(arrays.score(texts[start : start + 61]), expected[start : start + 61])
    assert expected.min() > 0.0 and expected.max() < 1.0 and (expected > 0.5).sum() > 100


def test_scores_are_bit_identical_on_edge_cases(arrays: profanity.ProfanityArrays) -> None:
    expected = _sklearn_scores(EDGE_TEXTS)
    assert np.array_equal(arrays.score(EDGE_TEXTS), expected)
    for text, value in zip(EDGE_TEXTS, expected, strict=True):
        assert np.array_equal(arrays.score([text]), [value]), text[:40]
    assert arrays.score([]).shape == (0,)
    # The empty text has no terms: its score is the intercepts' alone, the same for all.
    assert expected[0] == expected[1] == expected[2] == expected[16]
    assert expected[5] > 0.9 and expected[15] > 0.9  # case and separators handled


def test_bytes_are_decoded_as_scikit_learn_does(arrays: profanity.ProfanityArrays) -> None:
    texts = ["Ärger shit", "fine day"]
    raw: Any = [t.encode("utf-8") for t in texts]
    assert np.array_equal(arrays.score(raw), _sklearn_scores(raw))


def test_the_scorer_scores_bit_identically_from_the_cache_and_through_sklearn(
    cache: Path,
) -> None:
    texts = _rtp_texts()[:500] + EDGE_TEXTS
    path = profanity.cache_path(DATA_DIR)
    assert not path.exists()
    first = load_scorer("profanity-check", batch_size=64)
    through_sklearn = first.score(texts)["profanity"]  # converts for next time
    assert path.is_file()
    second = ProfanityCheckScorer("profanity-check", batch_size=64)
    from_cache = second.score(texts)["profanity"]
    assert isinstance(getattr(second._predict, "__self__", None), profanity.ProfanityArrays)
    assert np.array_equal(from_cache, through_sklearn)
    assert np.array_equal(from_cache, _sklearn_scores(texts))
    assert second.fingerprint() == first.fingerprint()


# --- the cache file -------------------------------------------------------------------------------


def test_a_stored_conversion_round_trips_exactly(
    cache: Path, arrays: profanity.ProfanityArrays
) -> None:
    path = profanity.cache_path(DATA_DIR)
    profanity.save(arrays, path)
    loaded = profanity.load(path)
    assert loaded is not None
    assert loaded.terms == arrays.terms and loaded.vocabulary == arrays.vocabulary
    for name in ("idf", "coef", "intercept", "a", "b"):
        assert np.array_equal(getattr(loaded, name), getattr(arrays, name)), name
    with np.load(path, allow_pickle=False) as stored:  # no pickles in it
        assert stored["terms"].dtype.kind == "U" and stored["coef"].dtype == np.float64
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind


def test_the_cache_key_follows_the_joblib_files(cache: Path, tmp_path: Path) -> None:
    copied = tmp_path / "data"
    copied.mkdir()
    for name in profanity.DATA_FILES:
        (copied / name).write_bytes((DATA_DIR / name).read_bytes())
    assert profanity.cache_path(copied) == profanity.cache_path(DATA_DIR)
    with open(copied / "model.joblib", "ab") as handle:
        handle.write(b"\0")
    assert profanity.cache_path(copied) != profanity.cache_path(DATA_DIR)


def test_the_first_score_in_an_empty_cache_writes_the_conversion(cache: Path) -> None:
    path = profanity.cache_path(DATA_DIR)
    assert not path.exists()
    scores = load_scorer("profanity-check").score(["you idiot", "hello"])["profanity"]
    assert scores[0] > scores[1]
    loaded = profanity.load(path)
    assert loaded is not None and np.array_equal(loaded.score(["you idiot", "hello"]), scores)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "old-format", "pickled"])
def test_an_unreadable_conversion_is_ignored_and_rewritten(
    cache: Path, arrays: profanity.ProfanityArrays, damage: str
) -> None:
    path = profanity.cache_path(DATA_DIR)
    profanity.save(arrays, path)
    whole = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(whole[: len(whole) // 2])
    elif damage == "garbage":
        path.write_bytes(b"PK\x03\x04" + os.urandom(4096))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "old-format":
        with np.load(path) as stored:
            fields = dict(stored)
        fields["version"] = np.array(profanity.FORMAT_VERSION - 1)
        np.savez(path, **fields)
    else:  # an object array would need a pickle to load: refused, never run
        with np.load(path) as stored:
            fields = dict(stored)
        fields["terms"] = np.array(list(arrays.terms), dtype=object)
        np.savez(path, **fields)
    assert profanity.load(path) is None
    texts = ["what the hell", "nice"]
    scores = load_scorer("profanity-check").score(texts)["profanity"]
    assert np.array_equal(scores, _sklearn_scores(texts))
    assert path.read_bytes() == whole  # rebuilt, identical
    assert profanity.load(path) is not None


def test_a_refused_conversion_still_scores_through_scikit_learn(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(data_dir: Path) -> profanity.ProfanityArrays:
        raise profanity.ConversionRefused("vectorizer ngram_range is (1, 2)")

    monkeypatch.setattr(profanity, "convert", refuse)
    texts = ["shit happens", "the weather is nice"]
    scorer = ProfanityCheckScorer("profanity-check", batch_size=64)
    scorer.warm_up()
    assert np.array_equal(scorer.score(texts)["profanity"], _sklearn_scores(texts))
    assert not profanity.cache_path(DATA_DIR).exists()


def test_an_unwritable_cache_still_scores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file: nothing can go under it")
    monkeypatch.setenv("TOXTESTS_CACHE", str(blocked))
    texts = ["damn it", "ok"]
    assert np.array_equal(
        load_scorer("profanity-check").score(texts)["profanity"], _sklearn_scores(texts)
    )


def test_a_subprocess_with_the_conversion_never_imports_scikit_learn(cache: Path) -> None:
    texts = _rtp_texts()[:300] + EDGE_TEXTS
    load_scorer("profanity-check").score(["warm the cache"])
    assert profanity.cache_path(DATA_DIR).is_file()
    script = (
        "import json, sys\n"
        "from toxtests.score import ProfanityCheckScorer, load_scorer\n"
        "texts = json.load(sys.stdin)\n"
        "scorer = load_scorer('profanity-check', batch_size=64)\n"
        "scorer.warm_up()\n"
        "scores = scorer.score(texts)['profanity']\n"
        "heavy = ('sklearn', 'profanity_check', 'joblib', 'scipy')\n"
        "gone = [m for m in heavy if m in sys.modules]\n"
        "print(json.dumps({'loaded': gone, 'scores': [float(s).hex() for s in scores]}))\n"
    )
    env = {**os.environ, "TOXTESTS_CACHE": str(cache)}
    done = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(texts),
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["loaded"] == []
    child = np.array([float.fromhex(s) for s in result["scores"]])
    assert np.array_equal(child, _sklearn_scores(texts))


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ngram_range", (1, 2)),
        ("sublinear_tf", True),
        ("lowercase", False),
        ("strip_accents", "unicode"),
        ("binary", True),
        ("token_pattern", r"(?u)\b\w+\b"),
        ("norm", "l1"),
        ("stop_words", None),
        ("dtype", np.float32),
    ],
)
def test_a_vectorizer_parameter_not_implemented_is_refused(
    fitted: tuple[Any, Any], name: str, value: object
) -> None:
    vectorizer, model = fitted
    changed = copy.deepcopy(vectorizer)
    changed.set_params(**{name: value})
    with pytest.raises(profanity.ConversionRefused, match=rf"vectorizer {name} is"):
        profanity.from_sklearn(changed, model)


def test_convert_refuses_a_data_dir_with_bigrams(fitted: tuple[Any, Any], tmp_path: Path) -> None:
    import joblib

    vectorizer, model = fitted
    bigrams = copy.deepcopy(vectorizer)
    bigrams.set_params(ngram_range=(1, 2))
    joblib.dump(bigrams, tmp_path / "vectorizer.joblib")
    joblib.dump(model, tmp_path / "model.joblib")
    # It matters: with bigrams scikit-learn counts "fuck you" as a term too (if known).
    with pytest.raises(profanity.ConversionRefused, match=r"ngram_range is \(1, 2\)"):
        profanity.convert(tmp_path)


def test_the_tfidf_transformer_is_checked_too(fitted: tuple[Any, Any]) -> None:
    vectorizer, model = fitted
    changed = copy.deepcopy(vectorizer)
    changed._tfidf.sublinear_tf = True  # what transform() really uses
    with pytest.raises(profanity.ConversionRefused, match=r"_tfidf\.sublinear_tf"):
        profanity.from_sklearn(changed, model)


def test_a_stop_word_in_the_vocabulary_is_refused(fitted: tuple[Any, Any]) -> None:
    vectorizer, model = fitted
    changed = copy.deepcopy(vectorizer)
    first = min(changed.vocabulary_, key=changed.vocabulary_.__getitem__)
    column = changed.vocabulary_.pop(first)
    changed.vocabulary_["the"] = column  # scikit-learn would drop it before the lookup
    with pytest.raises(profanity.ConversionRefused, match=r"stop words in the vocabulary"):
        profanity.from_sklearn(changed, model)


@pytest.mark.parametrize("change", ["isotonic", "three-classes", "calibrator", "estimator"])
def test_a_model_not_implemented_is_refused(fitted: tuple[Any, Any], change: str) -> None:
    from sklearn.linear_model import LogisticRegression

    vectorizer, model = fitted
    changed = copy.deepcopy(model)
    if change == "isotonic":
        changed.method = "isotonic"
        match = "model method"
    elif change == "three-classes":
        changed.classes_ = np.array([0, 1, 2])
        match = "model classes_"
    elif change == "calibrator":
        changed.calibrated_classifiers_[2].calibrators.append(
            changed.calibrated_classifiers_[2].calibrators[0]
        )
        match = r"calibrated_classifiers_\[2\]\.calibrators"
    else:
        changed.calibrated_classifiers_[0].estimator = LogisticRegression()
        match = r"calibrated_classifiers_\[0\]\.estimator"
    with pytest.raises(profanity.ConversionRefused, match=match):
        profanity.from_sklearn(vectorizer, changed)


def test_the_self_check_catches_a_one_ulp_difference(
    fitted: tuple[Any, Any], arrays: profanity.ProfanityArrays
) -> None:
    vectorizer, model = fitted
    profanity.self_check(arrays, vectorizer, model)  # the real arrays pass
    # A term whose score is mid-range, where one ulp of one weight can show (near 0 or 1 the
    # sigmoid saturates), nudged by one ulp in one of the five SVMs.
    alone = arrays.score(list(arrays.terms))
    column = int(np.argmin(np.abs(alone - 0.5)))
    coef = arrays.coef.copy()
    coef[column, 0] = np.nextafter(coef[column, 0], np.inf)
    nudged = profanity.ProfanityArrays(
        arrays.terms, arrays.idf, coef, arrays.intercept, arrays.a, arrays.b
    )
    assert nudged.score([arrays.terms[column]]) != arrays.score([arrays.terms[column]])
    with pytest.raises(profanity.ConversionRefused, match="scores probe"):
        profanity.self_check(nudged, vectorizer, model)
