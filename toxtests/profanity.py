"""alt-profanity-check without scikit-learn: its classifier as plain arrays, scored bit-identically.

Importing `profanity_check` imports scikit-learn (~1.3 s of CPU and GIL) and unpickles two
joblib files, on a thread that competes with generation. The classifier is only a TF-IDF
vectorizer and five sigmoid-calibrated linear SVMs, so it is converted once (with
scikit-learn, here only) into one `.npz` in the user's cache and then scored with numpy,
replaying scikit-learn's floating-point operations in their order, so the scores are
bit-identical to `profanity_check.predict_prob` (and the scorer keeps its fingerprint).
A conversion that is refused, missing or unreadable just means scoring through
scikit-learn, which gives the same numbers.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from toxtests.files import atomic_write_bytes, default_cache_dir, sha256_file

# Bump when the stored arrays or the way they are scored change.
FORMAT_VERSION = 1
TOKEN_PATTERN = r"(?u)\b\w\w+\b"
DATA_FILES = ("model.joblib", "vectorizer.joblib")
_TOKENS = re.compile(TOKEN_PATTERN)
_KEYS = ("version", "terms", "idf", "coef", "intercept", "a", "b")

# Every TfidfVectorizer parameter that acts in transform(), with the value implemented here
# (max_df, min_df, max_features, vocabulary and smooth_idf only act in fit(); smooth_idf is
# still required, as the classifier shipped uses it).
_VECTORIZER_PARAMS: dict[str, Any] = {
    "input": "content",
    "encoding": "utf-8",
    "decode_error": "strict",
    "strip_accents": None,
    "lowercase": True,
    "preprocessor": None,
    "tokenizer": None,
    "analyzer": "word",
    "stop_words": "english",
    "token_pattern": TOKEN_PATTERN,
    "ngram_range": (1, 1),
    "binary": False,
    "dtype": np.float64,
    "norm": "l2",
    "use_idf": True,
    "smooth_idf": True,
    "sublinear_tf": False,
}
_TFIDF_PARAMS: dict[str, Any] = {
    "norm": "l2",
    "use_idf": True,
    "smooth_idf": True,
    "sublinear_tf": False,
}


class ConversionRefused(ValueError):
    """The pickled classifier is not one this fast path reproduces; score with scikit-learn."""


class ProfanityArrays:
    """The classifier as arrays: terms by column, idf, and per calibrated SVM its weights
    (`coef` is features x classifiers, so one gather fetches a term's weights for all)."""

    def __init__(
        self,
        terms: Sequence[str],
        idf: np.ndarray,
        coef: np.ndarray,
        intercept: np.ndarray,
        a: np.ndarray,
        b: np.ndarray,
    ) -> None:
        n, k = len(terms), len(intercept)
        expected = {
            "idf": (idf, (n,)),
            "coef": (coef, (n, k)),
            "intercept": (intercept, (k,)),
            "a": (a, (k,)),
            "b": (b, (k,)),
        }
        for name, (array, shape) in expected.items():
            if array.dtype != np.float64 or array.shape != shape:
                raise ValueError(f"{name} is {array.dtype}{array.shape}, expected float64{shape}")
            if not np.isfinite(array).all():
                raise ValueError(f"{name} holds a non-finite value")
        if n == 0 or k == 0:
            raise ValueError("no terms or no classifiers")
        # Rows have unit norm, so |a*T + b| <= |a| (|w| + |intercept|) + |b|: below 700,
        # math.exp cannot overflow (where C's exp would return inf and Python's raise).
        bound = np.abs(a) * (np.linalg.norm(coef, axis=0) + np.abs(intercept)) + np.abs(b)
        if not (bound < 700.0).all():
            raise ValueError(f"a sigmoid argument could reach {bound.max():.0f}; exp overflows")
        self.terms = tuple(terms)
        self.vocabulary = {term: column for column, term in enumerate(self.terms)}
        if len(self.vocabulary) != n:
            raise ValueError("duplicate terms")
        self.idf, self.coef = idf, np.ascontiguousarray(coef)
        self.intercept, self.a, self.b = intercept, a, b

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """`profanity_check.predict_prob(texts)`, bit for bit (see each step's sklearn source)."""
        # CountVectorizer._count_vocab: lower, findall, count known terms, CSR sort_indices.
        vocabulary = self.vocabulary.get
        findall = _TOKENS.findall
        lengths = np.zeros(len(texts), dtype=np.intp)
        columns: list[int] = []
        counts: list[int] = []
        for row, text in enumerate(texts):
            if isinstance(text, bytes):  # _VectorizerMixin.decode, encoding utf-8 (strict)
                text = text.decode("utf-8")
            counter: dict[int, int] = {}
            for token in findall(text.lower()):
                column = vocabulary(token)
                if column is not None:
                    counter[column] = counter.get(column, 0) + 1
            ordered = sorted(counter)
            columns.extend(ordered)
            counts.extend(map(counter.__getitem__, ordered))
            lengths[row] = len(ordered)
        cols = np.asarray(columns, dtype=np.intp)
        # TfidfTransformer.transform: X.data *= idf_[X.indices].
        data = np.asarray(counts, dtype=np.float64) * self.idf[cols]
        # Rows longest first, so the rows with a k-th entry are a prefix: step k adds every
        # row's k-th term at once, keeping each row's sums in column order as sklearn does.
        order = np.argsort(-lengths, kind="stable")
        starts = (np.cumsum(lengths) - lengths)[order]
        active = np.searchsorted(-lengths[order], -np.arange(int(lengths.max(initial=0))))
        # inplace_csr_row_normalize_l2: sum_ += x*x in order, sqrt, x /= sqrt (rows of 0 skipped).
        squares = np.zeros(len(texts))
        for k, m in enumerate(active):
            values = data[starts[:m] + k]
            squares[:m] += values * values
        norms = np.sqrt(squares)
        norms[squares == 0.0] = 1.0
        by_row = np.empty_like(norms)
        by_row[order] = norms
        data /= np.repeat(by_row, lengths)
        # csr_matvec (X @ coef_.T): sum = 0; sum += x_j * w_j in column order; then + intercept_.
        sums = np.zeros((len(texts), len(self.intercept)))
        for k, m in enumerate(active):
            at = starts[:m] + k
            sums[:m] += data[at, None] * self.coef[cols[at]]
        decision = np.empty_like(sums)
        decision[order] = sums
        decision += self.intercept
        # _SigmoidCalibration.predict: expit(-(a_ * T + b_)); scipy's expit is
        # 1 / (1 + std::exp(-x)), and libm's exp is math.exp (numpy's SIMD exp differs).
        x = -(self.a * decision + self.b)
        exp = np.array([math.exp(v) for v in (-x).ravel().tolist()], dtype=np.float64)
        proba = 1.0 / (1.0 + exp.reshape(x.shape))
        # _CalibratedClassifier.predict_proba clips (1, 1 + 1e-5] to 1 (column 1 is unaffected
        # by 1 - p of column 0); CalibratedClassifierCV.predict_proba sums from 0, divides.
        proba[(proba > 1.0) & (proba <= 1.0 + 1e-5)] = 1.0
        mean = np.zeros(len(texts))
        for classifier in range(proba.shape[1]):
            mean += proba[:, classifier]
        mean /= proba.shape[1]
        return mean


def _refuse_unless(ok: bool, what: str, found: object, expected: object) -> None:
    if not ok:
        raise ConversionRefused(
            f"{what} is {found!r}, but the fast path implements only {expected!r}"
        )


def from_sklearn(vectorizer: Any, model: Any) -> ProfanityArrays:
    """Extract the arrays from the fitted objects, refusing anything not implemented here."""
    from sklearn.calibration import (
        CalibratedClassifierCV,
        _CalibratedClassifier,
        _SigmoidCalibration,
    )
    from sklearn.feature_extraction.text import TfidfTransformer, TfidfVectorizer
    from sklearn.linear_model._base import LinearClassifierMixin
    from sklearn.svm import LinearSVC

    _refuse_unless(type(vectorizer) is TfidfVectorizer, "vectorizer", type(vectorizer), "Tfidf")
    params = vectorizer.get_params()
    for name, expected in _VECTORIZER_PARAMS.items():
        found = params.get(name)
        same = tuple(found) == expected if name == "ngram_range" else found == expected
        same = same and type(found) is type(expected)
        _refuse_unless(same, f"vectorizer {name}", found, expected)
    tfidf = vectorizer._tfidf
    _refuse_unless(type(tfidf) is TfidfTransformer, "vectorizer._tfidf", type(tfidf), "Tfidf")
    for name, expected in _TFIDF_PARAMS.items():
        found = getattr(tfidf, name)
        _refuse_unless(found == expected, f"vectorizer._tfidf.{name}", found, expected)
    vocabulary = vectorizer.vocabulary_
    terms = sorted(vocabulary, key=vocabulary.__getitem__)
    _refuse_unless(
        [vocabulary[t] for t in terms] == list(range(len(terms)))
        and all(type(t) is str for t in terms),
        "vectorizer.vocabulary_",
        "not str terms on columns 0..n-1",
        "str terms on columns 0..n-1",
    )
    # Stop words are dropped before the vocabulary lookup: with no vocabulary term among
    # them, dropping them changes nothing, so the fast path need not know the list.
    stopped = sorted(set(terms) & set(vectorizer.get_stop_words() or ()))
    _refuse_unless(not stopped, "stop words in the vocabulary", stopped[:5], [])
    idf = tfidf.idf_
    _refuse_unless(
        idf.dtype == np.float64 and idf.shape == (len(terms),),
        "vectorizer idf_",
        f"{idf.dtype}{idf.shape}",
        f"float64({len(terms)},)",
    )

    _refuse_unless(type(model) is CalibratedClassifierCV, "model", type(model), "Calibrated")
    _refuse_unless(model.method == "sigmoid", "model method", model.method, "sigmoid")
    classes = list(model.classes_)
    _refuse_unless(len(classes) == 2, "model classes_", classes, "two classes")
    calibrated = list(model.calibrated_classifiers_)
    _refuse_unless(len(calibrated) > 0, "model calibrated_classifiers_", calibrated, "some")
    coef, intercept, a, b = [], [], [], []
    for i, part in enumerate(calibrated):
        where = f"model calibrated_classifiers_[{i}]"
        _refuse_unless(type(part) is _CalibratedClassifier, where, type(part), "Calibrated")
        _refuse_unless(part.method == "sigmoid", f"{where}.method", part.method, "sigmoid")
        _refuse_unless(list(part.classes) == classes, f"{where}.classes", part.classes, classes)
        svm = part.estimator
        _refuse_unless(type(svm) is LinearSVC, f"{where}.estimator", type(svm), "LinearSVC")
        _refuse_unless(
            type(svm).decision_function is LinearClassifierMixin.decision_function,
            f"{where}.estimator.decision_function",
            type(svm).decision_function,
            "X @ coef_.T + intercept_",
        )
        _refuse_unless(
            list(svm.classes_) == classes, f"{where}.estimator.classes_", svm.classes_, classes
        )
        weights, bias = np.asarray(svm.coef_), np.asarray(svm.intercept_)
        _refuse_unless(
            weights.dtype == np.float64 and weights.shape == (1, len(terms)),
            f"{where}.estimator.coef_",
            f"{weights.dtype}{weights.shape}",
            f"float64(1, {len(terms)})",
        )
        _refuse_unless(bias.shape == (1,), f"{where}.estimator.intercept_", bias.shape, (1,))
        sigmoids = list(part.calibrators)
        _refuse_unless(
            len(sigmoids) == 1 and type(sigmoids[0]) is _SigmoidCalibration,
            f"{where}.calibrators",
            [type(s) for s in sigmoids],
            "one _SigmoidCalibration",
        )
        coef.append(weights[0])
        intercept.append(float(bias[0]))
        a.append(float(sigmoids[0].a_))
        b.append(float(sigmoids[0].b_))
    try:
        return ProfanityArrays(
            terms=tuple(terms),
            idf=np.array(idf, dtype=np.float64),
            coef=np.stack(coef, axis=1),
            intercept=np.array(intercept, dtype=np.float64),
            a=np.array(a, dtype=np.float64),
            b=np.array(b, dtype=np.float64),
        )
    except ValueError as exc:
        raise ConversionRefused(f"the classifier's arrays are unusable: {exc}") from exc


def self_check(arrays: ProfanityArrays, vectorizer: Any, model: Any) -> None:
    """Refuse unless the arrays score probe texts exactly as scikit-learn does here."""
    # Every term alone (its weights exactly), then all terms again in shuffled groups of 1
    # to 40 (sums in column order, norms, repeats), and a few edge cases.
    rng = np.random.default_rng(0)
    terms = [arrays.terms[i] for i in rng.permutation(len(arrays.terms))]
    probes = list(arrays.terms)
    start = 0
    while start < len(terms):
        group = terms[start : start + int(rng.integers(1, 41))]
        start += len(group)
        probes.append(" ".join(group + group[: int(rng.integers(0, 3))]))
    probes += [p.upper() for p in probes[-50:]] + ["", " ", "a", "ok ok ok", "Ärger ﬁne 😀\t_x_"]
    expected = model.predict_proba(vectorizer.transform(probes))[:, 1]
    found = arrays.score(probes)
    if not np.array_equal(found, expected):
        index = int(np.flatnonzero(found != expected)[0])
        raise ConversionRefused(
            f"the fast path scores probe {index} {found[index]!r}, scikit-learn "
            f"{expected[index]!r}: this scikit-learn computes differently"
        )


def convert(data_dir: str | Path) -> ProfanityArrays:
    """Load alt-profanity-check's joblib files with scikit-learn and extract the arrays.

    Raises ConversionRefused when the classifier is not the one the fast path reproduces.
    """
    import joblib

    directory = Path(data_dir)
    vectorizer = joblib.load(directory / "vectorizer.joblib")
    model = joblib.load(directory / "model.joblib")
    arrays = from_sklearn(vectorizer, model)
    self_check(arrays, vectorizer, model)
    return arrays


def cache_path(data_dir: str | Path) -> Path:
    """Where the conversion of these joblib files lives: keyed by their hashes and the format."""
    digest = hashlib.sha256(f"toxtests-profanity-check\0{FORMAT_VERSION}".encode())
    for name in DATA_FILES:
        digest.update(f"\0{name}:{sha256_file(Path(data_dir) / name)}".encode())
    return default_cache_dir() / "scorers" / f"profanity-check-{digest.hexdigest()[:16]}.npz"


def save(arrays: ProfanityArrays, path: str | Path) -> None:
    """One .npz, no pickles, written atomically (built in memory, then renamed into place)."""
    buffer = io.BytesIO()
    np.savez(
        buffer,
        version=np.array(FORMAT_VERSION, dtype=np.int64),
        terms=np.array("\n".join(arrays.terms)),
        idf=arrays.idf,
        coef=arrays.coef,
        intercept=arrays.intercept,
        a=arrays.a,
        b=arrays.b,
    )
    atomic_write_bytes(path, buffer.getvalue())


def load(path: str | Path) -> ProfanityArrays | None:
    """The stored conversion, or None if it is missing, truncated or otherwise unusable."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            if sorted(stored.files) != sorted(_KEYS) or int(stored["version"]) != FORMAT_VERSION:
                return None
            joined = stored["terms"]
            if joined.dtype.kind != "U" or joined.shape != ():
                return None
            return ProfanityArrays(
                terms=tuple(str(joined).split("\n")),
                **{key: stored[key] for key in ("idf", "coef", "intercept", "a", "b")},
            )
    except Exception:  # torn, garbage, or from another numpy: rebuilt, never trusted
        return None
