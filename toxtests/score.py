"""Scorers: texts in, one probability per attribute out, and never a number that is not a score.

A safety gate must not guess: a scorer that cannot load raises with the fix, a pickle is
refused unless it is trusted, and every batch is checked (finite, in [0, 1], one per text)
before anyone computes a statistic from it.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.util
import os
import pickle
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from toxtests.errors import ScorerError, ToxtestsError, UnsafeCheckpointError
from toxtests.files import fingerprint_tree, sha256_file

DETOXIFY_VARIANTS = ("original", "unbiased", "multilingual", "original-small", "unbiased-small")
VALID_SPECS = "detoxify:<variant|path.ckpt>, hf:<model id or path>, profanity-check"
# Bump when a change here alters scores, so cached scores from older code are not reused.
SCORER_CODE_VERSION = "1"
_TOXIC_WORDS = ("toxic", "hate", "offensive", "abusive")
_NEGATED = re.compile(r"^(non|not|no)[-_]?(toxic|hate|offensive|abusive)")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_OFFLINE_HINT = (
    "for offline use pass detoxify:/path/to/checkpoint.ckpt and set scoring.huggingface_config "
    "to a directory with its config.json and tokenizer files"
)


class Scorer(Protocol):
    """A batch-in, batch-out toxicity classifier; one small class per back end."""

    spec: str
    attributes: tuple[str, ...]
    primary: str

    def fingerprint(self) -> str: ...

    def score(self, texts: Sequence[str]) -> dict[str, np.ndarray]: ...


def load_scorer(
    spec: str,
    *,
    device: str = "cpu",
    batch_size: int = 64,
    huggingface_config: str = "",
    allow_pickle: bool = False,
) -> Scorer:
    """Build the scorer named by `spec`; anything unknown or unloadable is a ScorerError."""
    if batch_size < 1:
        raise ScorerError(f"scoring.batch_size is {batch_size}; set it to 1 or more")
    if spec == "profanity-check":
        return ProfanityCheckScorer(spec, batch_size)
    if spec.startswith("detoxify:") and spec != "detoxify:":
        target = spec.removeprefix("detoxify:")
        if target in DETOXIFY_VARIANTS:
            checkpoint = _fetch_official_detoxify(spec, target)
            hub_config = (
                _config_dir(spec, checkpoint, huggingface_config) if huggingface_config else None
            )
        elif target.endswith(".ckpt") or "/" in target or Path(target).exists():
            checkpoint, hub_config = (
                Path(target),
                _config_dir(spec, Path(target), huggingface_config),
            )
        else:
            close = difflib.get_close_matches(target, DETOXIFY_VARIANTS, n=1)
            hint = f"; did you mean 'detoxify:{close[0]}'?" if close else ""
            raise ScorerError(
                f"unknown Detoxify variant {target!r} in scorer {spec!r}; valid: "
                f"{', '.join(DETOXIFY_VARIANTS)} or a path to a .ckpt file{hint}"
            )
        return DetoxifyScorer(spec, checkpoint, hub_config, device, batch_size, allow_pickle)
    if spec.startswith("hf:") and spec != "hf:":
        return HFScorer(spec, spec.removeprefix("hf:"), device, batch_size, allow_pickle)
    candidates = ["profanity-check", *(f"detoxify:{v}" for v in DETOXIFY_VARIANTS)]
    close = difflib.get_close_matches(spec, candidates, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ScorerError(f"unknown scorer {spec!r}; valid: {VALID_SPECS}{hint}")


def validate_scores(
    scorer_spec: str, texts: Sequence[str], scores: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Return the scores as float64 arrays, or raise at the first one that is not a probability."""
    if not scores:
        raise ScorerError(f"scorer {scorer_spec!r} returned no attributes; it is broken")
    checked: dict[str, np.ndarray] = {}
    for attribute, raw in scores.items():
        try:
            values = np.asarray(raw, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ScorerError(
                f"scorer {scorer_spec!r} returned non-numeric scores for attribute "
                f"{attribute!r}: {exc}"
            ) from exc
        if values.ndim != 1 or len(values) != len(texts):
            raise ScorerError(
                f"scorer {scorer_spec!r} returned {values.shape} scores for attribute "
                f"{attribute!r} but was given {len(texts)} texts; expected one score per text"
            )
        for problem, mask in (
            ("NaN", np.isnan(values)),
            ("an infinite value", np.isinf(values)),
            ("a value outside [0, 1]", (values < 0.0) | (values > 1.0)),
        ):
            if mask.any():
                index = int(np.flatnonzero(mask)[0])
                value = float(values[index])
                raise ScorerError(
                    f"scorer {scorer_spec!r} returned {problem} ({value!r}) for attribute "
                    f"{attribute!r} at text index {index} ({str(texts[index])[:60]!r}); the scorer "
                    "failed on this text, so no score is trusted: check its input or model"
                )
        checked[attribute] = values
    return checked


def _score_in_batches(
    scorer: Any, texts: Sequence[str], score_batch: Callable[[list[str]], Mapping[str, Any]]
) -> dict[str, np.ndarray]:
    """Run `score_batch` over `scorer.batch_size` texts at a time, then validate everything."""
    texts = list(texts)
    if not texts:
        return {attribute: np.empty(0, dtype=np.float64) for attribute in scorer.attributes}
    parts: dict[str, list[np.ndarray]] = {attribute: [] for attribute in scorer.attributes}
    for start in range(0, len(texts), scorer.batch_size):
        batch = texts[start : start + scorer.batch_size]
        try:
            out = score_batch(batch)
            for attribute in scorer.attributes:
                parts[attribute].append(np.atleast_1d(np.asarray(out[attribute], dtype=np.float64)))
        except ToxtestsError:
            raise
        except Exception as exc:
            raise ScorerError(
                f"scorer {scorer.spec!r} failed on texts {start}..{start + len(batch) - 1}: "
                f"{type(exc).__name__}: {exc}; check the scorer's device and memory, or lower "
                "scoring.batch_size"
            ) from exc
    joined = {attribute: np.concatenate(chunks) for attribute, chunks in parts.items()}
    return validate_scores(scorer.spec, texts, joined)


def _fingerprint(*parts: str) -> str:
    return hashlib.sha256("\0".join((SCORER_CODE_VERSION, *parts)).encode()).hexdigest()


def _versions(*distributions: str) -> str:
    found = []
    for name in distributions:
        try:
            found.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name}==?")
    return ",".join(found)


class ProfanityCheckScorer:
    """alt-profanity-check: a linear SVM over word n-grams that ships its weights (offline).

    Scored from its arrays converted once into the user's cache (toxtests.profanity: no
    scikit-learn import, bit-identical scores), else through scikit-learn, converting then.
    """

    attributes: tuple[str, ...] = ("profanity",)
    primary = "profanity"

    def __init__(self, spec: str, batch_size: int) -> None:
        # Found, not imported: importing it imports scikit-learn (~1.5 s), which only
        # scoring needs; the fingerprint is its files' (a fully cached run never imports it).
        found = importlib.util.find_spec("profanity_check")
        if found is None or found.origin is None:
            raise ScorerError(
                f"scorer {spec!r} needs the alt-profanity-check package: "
                "pip install alt-profanity-check"
            )
        self.spec, self.batch_size = spec, batch_size
        self._data_dir = Path(found.origin).parent / "data"
        self._data = sorted(self._data_dir.glob("*.joblib"))
        self._lock = threading.Lock()
        self._predict: Callable[[list[str]], np.ndarray] | None = None

    def fingerprint(self) -> str:
        # Unchanged by the converted fast path: its scores are bit-identical (tests prove it).
        files = [f"{p.name}:{sha256_file(p)}" for p in self._data]
        return _fingerprint(
            "profanity-check", _versions("alt-profanity-check", "scikit-learn"), *files
        )

    def warm_up(self) -> None:
        """Load the converted classifier, or import it (and scikit-learn) and convert it;
        `ScorerHandle.preload` runs this on a thread while the engine generates."""
        self._predictor()

    def score(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        predict = self._predictor()
        return _score_in_batches(self, texts, lambda batch: {"profanity": predict(batch)})

    def _predictor(self) -> Callable[[list[str]], np.ndarray]:
        with self._lock:  # warm_up's thread and score() must not both import and convert
            if self._predict is None:
                self._predict = self._load()
            return self._predict

    def _load(self) -> Callable[[list[str]], np.ndarray]:
        from toxtests import profanity

        try:
            path: Path | None = profanity.cache_path(self._data_dir)
        except OSError:  # a data file is missing: profanity_check's import will say so
            path = None
        converted = profanity.load(path) if path is not None else None
        if converted is not None:
            return converted.score
        from profanity_check import predict_prob

        if path is not None:
            # Next time without scikit-learn; refused or failed, it stays scikit-learn's job
            # (same scores). Into a cache that cannot be written, nothing is converted.
            with contextlib.suppress(Exception):
                path.parent.mkdir(parents=True, exist_ok=True)
                if os.access(path.parent, os.W_OK):
                    profanity.save(profanity.convert(self._data_dir), path)
        return predict_prob


class DetoxifyScorer:
    """A Detoxify checkpoint loaded without running its pickle, scored by Detoxify's own predict."""

    def __init__(
        self,
        spec: str,
        checkpoint: Path,
        hub_config: Path | None,
        device: str,
        batch_size: int,
        allow_pickle: bool,
    ) -> None:
        import torch
        from detoxify import Detoxify
        from detoxify.detoxify import get_model_and_tokenizer

        self.spec, self.batch_size, self._checkpoint = spec, batch_size, checkpoint
        loaded = _load_checkpoint(spec, checkpoint, allow_pickle)
        try:
            arch = dict(loaded["config"]["arch"]["args"])
            classes = [str(c) for c in loaded["config"]["dataset"]["args"]["classes"]]
            state_dict = loaded["state_dict"]
        except (KeyError, TypeError) as exc:
            raise ScorerError(
                f"{checkpoint} is not a Detoxify checkpoint (missing {exc}); it needs 'config' "
                "with arch.args and dataset.args.classes, and 'state_dict'"
            ) from exc
        # The checkpoint picks transformers classes by name: allow only classifier/tokenizer ones.
        if not (
            str(arch.get("model_name", "")).endswith("ForSequenceClassification")
            and re.fullmatch(r"\w+Tokenizer(Fast)?", str(arch.get("tokenizer_name", "")))
        ):
            raise ScorerError(
                f"{checkpoint} names model {arch.get('model_name')!r} and tokenizer "
                f"{arch.get('tokenizer_name')!r}; expected a *ForSequenceClassification model "
                "and a *Tokenizer class"
            )
        if hub_config is not None:
            # detoxify calls config_class.from_pretrained(model_type): a local dir keeps it offline.
            arch["model_type"] = str(hub_config)
        try:
            model, tokenizer = get_model_and_tokenizer(
                **arch,
                state_dict=state_dict,
                huggingface_config_path=str(hub_config) if hub_config else None,
            )
            _verify_weights_loaded(spec, model, state_dict)
        except ToxtestsError:
            raise
        except Exception as exc:
            where = f"config dir {hub_config}" if hub_config else "the Hugging Face Hub"
            if hub_config is None and _is_network_error(exc):
                raise ScorerError(
                    f"scorer {spec!r}: the config and tokenizer for {arch.get('model_type')!r} "
                    f"could not be fetched ({type(exc).__name__}); {_OFFLINE_HINT}"
                ) from exc
            raise ScorerError(
                f"scorer {spec!r}: cannot build the model from {checkpoint} with {where}: "
                f"{type(exc).__name__}: {exc}; check that the config dir matches the checkpoint"
            ) from exc
        if len(classes) != model.config.num_labels:
            raise ScorerError(
                f"{checkpoint} lists {len(classes)} classes but its model has "
                f"{model.config.num_labels} outputs; the checkpoint is inconsistent"
            )
        _to_device(spec, model, device)
        _cap_max_length(tokenizer, model.config)
        # Standardised class names, as detoxify.load_checkpoint does.
        change = {
            "toxic": "toxicity",
            "identity_hate": "identity_attack",
            "severe_toxic": "severe_toxicity",
        }
        self.attributes = tuple(change.get(c, c) for c in classes)
        self.primary = "toxicity" if "toxicity" in self.attributes else self.attributes[0]
        self._detoxify = Detoxify.__new__(Detoxify)
        self._detoxify.model, self._detoxify.tokenizer = model, tokenizer
        self._detoxify.class_names, self._detoxify.device = list(self.attributes), device
        self._torch = torch

    def fingerprint(self) -> str:
        versions = _versions("detoxify", "transformers", "torch")
        return _fingerprint("detoxify", sha256_file(self._checkpoint), versions)

    def score(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        with self._torch.inference_mode():
            return _score_in_batches(self, texts, self._detoxify.predict)


class HFScorer:
    """Any transformers sequence classifier; remote code stays off and pickles are refused."""

    def __init__(
        self, spec: str, model_ref: str, device: str, batch_size: int, allow_pickle: bool
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.spec, self.batch_size, self._torch = spec, batch_size, torch
        local = Path(model_ref).expanduser()
        self._local = local if local.is_dir() else None
        if self._local is not None:
            _check_hf_weights(spec, self._local, allow_pickle)
        elif model_ref.startswith((".", "/", "~")):
            raise ScorerError(f"scorer {spec!r}: directory {model_ref} does not exist")
        options: dict[str, Any] = {
            "trust_remote_code": False,
            "local_files_only": self._local is not None,
            "use_safetensors": None if allow_pickle else True,
        }
        try:
            from toxtests.models import quiet_loading

            with quiet_loading():
                tokenizer = AutoTokenizer.from_pretrained(str(model_ref), **options)
                model, info = AutoModelForSequenceClassification.from_pretrained(
                    str(model_ref), output_loading_info=True, **options
                )
        except Exception as exc:
            if self._local is None and _is_network_error(exc):
                hint = "check the model id and the network, or download it and pass hf:/local/dir"
            else:
                hint = "it must be a text-classification model with a tokenizer and weights"
            raise ScorerError(
                f"scorer {spec!r} cannot load: {type(exc).__name__}: {exc}; {hint}"
            ) from exc
        if info.get("missing_keys"):
            missing = sorted(info["missing_keys"])
            raise ScorerError(
                f"scorer {spec!r}: {len(missing)} weights were not in the model files "
                f"(e.g. {missing[0]!r}), so they would be random; use a fine-tuned "
                "text-classification model"
            )
        _to_device(spec, model, device)
        _cap_max_length(tokenizer, model.config)
        self._model, self._tokenizer = model, tokenizer
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        self.attributes = tuple(str(label).lower().replace(" ", "_") for label in labels)
        if len(set(self.attributes)) != len(self.attributes):
            raise ScorerError(f"scorer {spec!r} has duplicate labels {self.attributes}")
        self.primary = _pick_primary(self.attributes)
        self._multi_label = model.config.problem_type == "multi_label_classification"
        self._revision = getattr(model.config, "_commit_hash", None)

    def fingerprint(self) -> str:
        if self._local is not None:
            weights = fingerprint_tree(self._local)
        elif self._revision:
            weights = f"{self.spec}@{self._revision}"
        else:  # a hub model with no recorded commit: hash the weights themselves
            digest = hashlib.sha256()
            for name, tensor in sorted(self._model.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().float().cpu().numpy().tobytes())
            weights = digest.hexdigest()
        return _fingerprint("hf", weights, _versions("transformers", "torch"))

    def score(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        with self._torch.inference_mode():
            return _score_in_batches(self, texts, self._score_batch)

    def _score_batch(self, batch: list[str]) -> dict[str, np.ndarray]:
        inputs = self._tokenizer(batch, return_tensors="pt", truncation=True, padding=True)
        logits = self._model(**inputs.to(self._model.device)).logits.float()
        probs = logits.sigmoid() if self._multi_label else logits.softmax(dim=-1)
        table = probs.cpu().numpy().astype(np.float64)
        return {attribute: table[:, i] for i, attribute in enumerate(self.attributes)}


def _official_hash_prefixes() -> dict[str, str]:
    """torch.hub convention: 'name-<sha256 prefix>.ckpt' -> {prefix: url}."""
    from detoxify.detoxify import MODEL_URLS

    prefixes = {}
    for url in MODEL_URLS.values():
        match = re.search(r"-([a-f0-9]{8,})\.", url.rsplit("/", 1)[-1])
        if match:
            prefixes[match.group(1)] = url
    return prefixes


def _fetch_official_detoxify(spec: str, variant: str) -> Path:
    """Download (once, hash-checked) into torch.hub's cache, where detoxify itself keeps it."""
    import torch
    from detoxify.detoxify import MODEL_URLS

    url = MODEL_URLS[variant]
    target = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if target.is_file():
        return target
    prefix = next(p for p, u in _official_hash_prefixes().items() if u == url)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(target), hash_prefix=prefix, progress=False)
    except Exception as exc:
        raise ScorerError(
            f"scorer {spec!r}: the weights could not be fetched from {url} "
            f"({type(exc).__name__}: {exc}); {_OFFLINE_HINT}"
        ) from exc
    return target


def _load_checkpoint(spec: str, checkpoint: Path, allow_pickle: bool) -> Any:
    """torch.load with weights_only; a real pickle only if allowed or its hash is official."""
    import torch

    if not checkpoint.is_file():
        raise ScorerError(f"scorer {spec!r}: checkpoint {checkpoint} does not exist")
    try:
        return torch.load(checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        official = any(sha256_file(checkpoint).startswith(p) for p in _official_hash_prefixes())
        if not (allow_pickle or official):
            raise UnsafeCheckpointError(
                f"{checkpoint} is not a plain-tensor checkpoint: loading it means unpickling, "
                "which can run code, and its hash is not an official Detoxify one; set "
                "scoring.allow_pickle = true (--tox-allow-pickle) only if you trust it"
            ) from exc
    except Exception as exc:
        raise ScorerError(
            f"checkpoint {checkpoint} cannot be read ({type(exc).__name__}: {exc}); "
            "expected a torch.save'd Detoxify checkpoint"
        ) from exc
    try:
        return torch.load(checkpoint, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ScorerError(
            f"checkpoint {checkpoint} cannot be read ({type(exc).__name__}: {exc}); "
            "expected a torch.save'd Detoxify checkpoint"
        ) from exc


def _config_dir(spec: str, checkpoint: Path, huggingface_config: str) -> Path:
    """The HF config + tokenizer dir: the one given, else the checkpoint's own if it has one."""
    candidate = Path(huggingface_config).expanduser() if huggingface_config else checkpoint.parent
    if (candidate / "config.json").is_file():
        return candidate
    seen = (
        f"{candidate} has no config.json"
        if huggingface_config
        else f"scoring.huggingface_config is not set and {candidate} has no config.json"
    )
    raise ScorerError(
        f"scorer {spec!r}: {seen}; set scoring.huggingface_config to a directory with the "
        "model's config.json and tokenizer files (e.g. from save_pretrained)"
    )


def _check_hf_weights(spec: str, directory: Path, allow_pickle: bool) -> None:
    if any(directory.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if not pickles:
        raise ScorerError(f"scorer {spec!r}: {directory} holds no model weights (*.safetensors)")
    if not allow_pickle:
        raise UnsafeCheckpointError(
            f"{directory / pickles[0]} is a pickle that can run code when loaded and there is no "
            "*.safetensors beside it; convert it to safetensors, or set scoring.allow_pickle = "
            "true (--tox-allow-pickle) only if you trust it"
        )


def _verify_weights_loaded(spec: str, model: Any, state_dict: Mapping[str, Any]) -> None:
    """transformers only logs missing weights; a scorer with random weights must not run."""
    import torch

    by_suffix: dict[str, Any] = {}
    for key, tensor in state_dict.items():
        name = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", key))
        parts = name.split(".")
        for i in range(len(parts)):  # tolerate wrapper prefixes such as "model."
            by_suffix.setdefault(".".join(parts[i:]), tensor)
    bad = []
    for name, param in model.named_parameters():
        stripped = name.removeprefix(f"{model.base_model_prefix}.")
        saved = by_suffix.get(name, by_suffix.get(stripped))
        if not (
            isinstance(saved, torch.Tensor)
            and saved.shape == param.shape
            and torch.equal(saved.to(param.device, param.dtype), param.detach())
        ):
            bad.append(name)
    if bad:
        raise ScorerError(
            f"scorer {spec!r}: {len(bad)} model weights were missing from the checkpoint or did "
            f"not load (e.g. {bad[0]!r}), so they would be random; check that the config dir "
            "matches the checkpoint"
        )


def _to_device(spec: str, model: Any, device: str) -> None:
    try:
        model.to(device).eval()
    except Exception as exc:
        raise ScorerError(
            f"scorer {spec!r} cannot run on device {device!r} ({type(exc).__name__}: {exc}); "
            "pick an available device such as 'cpu'"
        ) from exc


def _cap_max_length(tokenizer: Any, config: Any) -> None:
    """Tokenizers saved without a limit would let long texts overrun the position table."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions and tokenizer.model_max_length > 1_000_000:
        offset = 2 if config.model_type in ("roberta", "xlm-roberta", "camembert") else 0
        tokenizer.model_max_length = positions - offset


def _pick_primary(attributes: tuple[str, ...]) -> str:
    for attribute in attributes:
        if any(word in attribute for word in _TOXIC_WORDS) and not _NEGATED.match(attribute):
            return attribute
    return attributes[1] if len(attributes) == 2 else attributes[0]


def _is_network_error(exc: BaseException) -> bool:
    """Download failures arrive as OSError subclasses or as requests/httpx/hub errors."""
    seen: BaseException | None = exc
    while seen is not None:
        module = type(seen).__module__.split(".")[0]
        if isinstance(seen, (OSError, ConnectionError, TimeoutError)) or module in (
            "requests",
            "urllib3",
            "httpx",
            "huggingface_hub",
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
