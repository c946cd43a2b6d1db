"""A model's tokenizer, loaded and run in a child process of its own.

Loading Gemma 3's tokenizer is ~2 s of work that holds the GIL (transformers parses its
33 MB tokenizer.json in Python, then builds a 262k-token BPE in Rust). On a thread it
only takes turns with the imports of transformers and the model's code, which hold the
GIL too, while the second core idles. In its own process it loads beside them. The
engine then asks it for what it needs (each prompt's ids, each continuation's text, a
few attributes) over a pipe: a few hundred small calls a gate, ~50 µs each.

Run as a script (`python tokenizer_process.py`), the child imports transformers'
tokenizer alone: none of toxtests, torch or the model's code.

While the engine generates, the child keeps its tokenizer for the next run in the cache
directory (`keep_tokenizer`: the backend as transformers built it, a decode-only copy,
the prompts' ids, each checked against transformers' answers). A later child loads that
with the `tokenizers` library alone (`KeptTokenizer`) and never imports transformers
unless asked for something the kept files do not hold (a chat template to render). The
engine tells the child which prompts are coming before it imports torch (`expect`), so
that prompts no earlier run kept are ready by the time the decode loop asks for them.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import struct
import subprocess
import sys
import threading
import weakref
from collections.abc import Mapping
from typing import Any

_HEADER = struct.Struct("<Q")
# The prompts a run is about to encode and its chat_template setting (true, false or
# "auto"): what `TokenizerProcess.expect` tells the child.
Expected = tuple[list[str], bool | str]


def _send(stream: Any, payload: bytes) -> None:
    stream.write(_HEADER.pack(len(payload)) + payload)
    stream.flush()


def _receive(stream: Any) -> Any:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError("the tokenizer process closed its pipe")
    (size,) = _HEADER.unpack(header)
    payload = stream.read(size)
    if len(payload) < size:
        raise EOFError("the tokenizer process closed its pipe mid-message")
    return pickle.loads(payload)  # noqa: S301 - our own child process, over its own pipe


class TokenizerProcessError(RuntimeError):
    """The child failed to load the tokenizer or a call on it failed: the child's message."""


class TokenizerProcessExited(TokenizerProcessError):
    """The child ended without answering (it could not start Python, say)."""


class TokenizerProcess:
    """A transformers tokenizer in a child process, used as if it were the tokenizer:
    attributes are read once and remembered (a loaded tokenizer does not change), methods
    are called remotely, and a mapping result (`tokenizer(text)`) comes back as a dict."""

    def __init__(
        self,
        source: str,
        load_options: Mapping[str, Any],
        keep_in: str | None = None,
        expected: Expected | None = None,
    ) -> None:
        """`keep_in`: a directory where an earlier run kept this tokenizer, loaded from
        there with `tokenizers` alone (`KeptTokenizer`) where it is; else where the child
        keeps it for later runs (`keep_tokenizer`) once asked to (`keep_after_encoding`).
        `expected`: the prompts the run is about to encode and its chat_template setting,
        as `expect` takes them, known before the child starts."""
        self._source = source
        self._values: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._loaded = False
        self._keep_in = keep_in
        # Loading what an earlier run kept (Gemma 3: ~0.4-1.5 s, not ~2.2 s).
        self.kept = bool(
            keep_in
            and os.environ.get(KEPT_VARIABLE, "1") != "0"
            and os.path.isfile(os.path.join(keep_in, KEPT_INDEX))
        )
        self._encoded: list[str] = []  # texts encoded here, checked before keeping
        self._unanswered = 0  # replies to requests sent without waiting
        self._failure: TokenizerProcessError | None = None
        # "kept" or "real" (transformers'), once loaded.
        self.loaded_from: str | None = None
        self._state = {"loaded": False}  # what the finalizer reads (it holds no self)
        environment = dict(os.environ)
        environment.setdefault("TOKENIZERS_PARALLELISM", "false")
        self._child = subprocess.Popen(  # noqa: S603 - this interpreter, this file
            [sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=environment,
        )
        self._finalizer = weakref.finalize(self, _stop, self._child, self._state)
        _send(self._child.stdin, pickle.dumps((source, dict(load_options), keep_in, expected)))

    def wait_loaded(self) -> None:
        """Block until the child has loaded the tokenizer; raise its error if it failed."""
        with self._lock:
            if self._failure is not None:
                raise self._failure  # the same error at every call
            if not self._loaded:
                try:
                    self.loaded_from = self._reply()
                except TokenizerProcessError as failure:
                    self._failure = failure
                    raise
                self._loaded = self._state["loaded"] = True

    def _reply(self) -> Any:
        try:
            reply = _receive(self._child.stdout)
        except EOFError:
            code = self._child.poll()
            raise TokenizerProcessExited(
                f"the tokenizer process for {self._source} exited"
                + (f" with code {code}" if code is not None else "")
            ) from None
        if reply[0] == "error":
            raise TokenizerProcessError(reply[2] or reply[1])
        return reply[1] if len(reply) > 1 else None

    def _request(self, kind: str, name: str, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.wait_loaded()
        with self._lock:
            _send(self._child.stdin, pickle.dumps((kind, name, args, kwargs or {})))
            self._drain()
            return self._reply()

    def _drain(self) -> None:
        """Read the replies to requests sent without waiting (they come first)."""
        while self._unanswered:
            self._unanswered -= 1
            with contextlib.suppress(TokenizerProcessError):
                self._reply()  # keeping failed: later runs load it as this one did

    def expect(self, texts: list[str], chat_template: bool | str) -> None:
        """Tell the child, without waiting, which prompts the run is about to encode, so
        that it gets ready for them while this process imports torch and packs weights:
        a kept tokenizer loads its whole backend for prompts the keeping run did not
        see (Gemma 3's: ~1.2 s, else spent at the first prompt's encoding, with the
        decode loop waiting), and a chat template loads the real tokenizer. `chat_template`
        is the run's setting (true, false or "auto"). `wait_ready` waits for it. Known
        before the child starts, they are better given to it then (`expected`): a kept
        tokenizer then loads its whole backend in place of its decode-only copy."""
        with self._lock:
            if self._failure is not None:
                return
            request: tuple = ("expect", "", (list(texts), chat_template), {})
            try:
                _send(self._child.stdin, pickle.dumps(request))
            except OSError:  # the child has ended: `wait_loaded` says why
                return
            self._unanswered += 1

    def wait_ready(self) -> None:
        """`wait_loaded`, then wait for what the child was asked to do without waiting
        (`expect`, `keep_after_encoding`): afterwards it answers at once."""
        self.wait_loaded()
        with self._lock:
            self._drain()

    def loaded_parts(self) -> list[str]:
        """What the child has loaded: "real" (transformers' tokenizer), or for a kept one
        "decoder" and, once it has encoded a prompt the keeping run did not see,
        "encoder" (and "real" once something needed it)."""
        return list(self._request("parts", ""))

    def keep_after_encoding(self) -> None:
        """Ask the child, once, to keep its tokenizer for later runs (`keep_tokenizer`)
        and go on without waiting: it does so at the lowest priority while this process
        generates, checked against the texts encoded so far."""
        if self._keep_in is None or not self._loaded:
            return
        directory, self._keep_in = self._keep_in, None
        with self._lock:
            request: tuple = ("keep", directory, (list(self._encoded),), {})
            _send(self._child.stdin, pickle.dumps(request))
            self._unanswered += 1

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        values = self.__dict__.get("_values")
        if values is None:  # during construction or after a failed one
            raise AttributeError(name)
        if name not in values:
            kind, value = self._request("attr", name)
            if kind == "callable":
                # Through a weak reference: a method remembered here must not keep its
                # tokenizer (and so the child) alive in a cycle until the next collection.
                owner = weakref.ref(self)

                def remote(*args: Any, _name: str = name, **kwargs: Any) -> Any:
                    tokenizer = owner()
                    if tokenizer is None:
                        raise TokenizerProcessError("the tokenizer process has ended")
                    return tokenizer._request("call", _name, args, kwargs)

                value = remote
            values[name] = value
        return values[name]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and not kwargs and isinstance(args[0], str) and len(self._encoded) < 512:
            self._encoded.append(args[0])
        return self._request("call", "__call__", args, kwargs)

    def __len__(self) -> int:
        return int(self._request("call", "__len__"))

    def __repr__(self) -> str:
        return f"TokenizerProcess({self._source!r}, pid {self._child.pid})"

    @property
    def source(self) -> str:
        """The model directory (or Hub id) whose tokenizer this is."""
        return self._source

    @property
    def pid(self) -> int:
        return int(self._child.pid)

    def close(self) -> None:
        self._finalizer()


def _stop(child: subprocess.Popen, state: Mapping[str, bool]) -> None:
    """End the child: closing its input ends its loop; kill it if it does not stop. One
    never waited on is killed at once rather than left to finish loading (a tokenizer
    started ahead of a run that turned out fully cached), at `close` or at exit."""
    if not state["loaded"] and child.poll() is None:
        child.kill()
    for stream in (child.stdin, child.stdout):
        try:
            if stream is not None:
                stream.close()
        except OSError:
            pass
    try:
        child.wait(timeout=5)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _tokenizer_class(source: str, options: Mapping[str, Any]) -> Any:
    """The class a local tokenizer_config.json names, as AutoTokenizer would pick it, or
    AutoTokenizer itself: it reads the model's config.json for the rest, which imports
    torch (~1.2 s this process need not spend)."""
    import json
    from pathlib import Path

    import transformers

    config = Path(source) / "tokenizer_config.json"
    try:
        named = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        named = {}
    name = named.get("tokenizer_class") if isinstance(named, dict) else None
    if isinstance(name, str) and "auto_map" not in named and not options.get("trust_remote_code"):
        found = getattr(transformers, name, None)
        if found is not None and hasattr(found, "from_pretrained"):
            return found
    return transformers.AutoTokenizer


def load_padded_tokenizer(source: str, options: Mapping[str, Any]) -> Any:
    """The tokenizer as the engine uses it: left padding, a pad token guaranteed."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = _tokenizer_class(source, options).from_pretrained(source, **options)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        # Padding positions are masked out, so any token works; EOS is the convention.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _answer(tokenizer: Any, kind: str, name: str, args: tuple, kwargs: dict) -> bytes:
    """The pickled reply to one request: ("ok", value) or ("error", type, message). An
    attribute's value is ("callable", None) for a method, else ("value", its value)."""
    try:
        if kind == "keep":  # name: the directory; args: the texts encoded
            if isinstance(tokenizer, KeptTokenizer):  # loaded from there
                tokenizer.keep_prompts()
                return pickle.dumps(("ok", None))
            _lowest_priority()
            return pickle.dumps(("ok", keep_tokenizer(tokenizer, name, *args)))
        if kind == "expect":  # args: the texts, the chat_template setting
            if isinstance(tokenizer, KeptTokenizer):
                tokenizer.expect(*args)
            return pickle.dumps(("ok", None))
        if kind == "parts":
            parts = tokenizer.parts() if isinstance(tokenizer, KeptTokenizer) else ["real"]
            return pickle.dumps(("ok", parts))
        if kind == "attr":
            value = getattr(tokenizer, name)
            answer: Any = ("callable", None) if callable(value) else ("value", value)
        else:
            answer = getattr(tokenizer, name)(*args, **kwargs)
            if isinstance(answer, Mapping):  # BatchEncoding: its data, as a plain dict
                answer = dict(answer)
        return pickle.dumps(("ok", answer))
    except Exception as exc:  # noqa: BLE001 - every failure goes back to the caller
        return pickle.dumps(("error", type(exc).__name__, str(exc)))


# What the decode loop reads of a tokenizer besides encoding and decoding (`KeptTokenizer`).
KEPT_ATTRIBUTES = (
    "pad_token_id", "eos_token_id", "bos_token_id", "unk_token_id",
    "pad_token", "eos_token", "bos_token", "unk_token",
    "chat_template", "padding_side", "split_special_tokens",
)  # fmt: skip
# The methods between a call and the `tokenizers` backend: a subclass overriding one may
# encode or decode otherwise than its backend does.
ENCODING_METHODS = frozenset(
    {
        "__call__", "_call_one", "encode", "encode_plus", "_encode_plus", "batch_encode_plus",
        "_batch_encode_plus", "_encode_without_added_tokens", "_convert_encoding", "tokenize",
        "decode", "_decode", "batch_decode", "convert_tokens_to_string",
        "set_truncation_and_padding",
    }
)  # fmt: skip
# 3: prompts.json in a file of its own (checked by its own checksum), so that a later
# run can add the prompts it encoded to it.
KEPT_FORMAT = 3
# TOXTESTS_KEPT_TOKENIZER=0: always load the real tokenizer (to compare the two).
KEPT_VARIABLE = "TOXTESTS_KEPT_TOKENIZER"
KEPT_BACKEND, KEPT_DECODER, KEPT_PROMPTS = "backend.json", "decoder.json", "prompts.json"
KEPT_INDEX = "kept.json"
# At most this many prompts' ids are kept: a run's own prompts first, then earlier ones.
KEPT_PROMPT_LIMIT = 4096


def _lowest_priority() -> None:
    """The parent is generating: take only a core it leaves idle. SCHED_IDLE (Linux)
    yields to a waking torch thread at once; nice 19 alone still took ~3% of a
    225-row batch's time from its threads."""
    with contextlib.suppress(OSError, AttributeError):
        os.nice(19)
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def not_keepable(tokenizer: Any) -> str | None:
    """Why `tokenizer` cannot be replaced by its `tokenizers` backend alone, or None."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return "this transformers has no TokenizersBackend"
    if not isinstance(tokenizer, TokenizersBackend):
        return f"{type(tokenizer).__name__} is not backed by the tokenizers library"
    for cls in type(tokenizer).__mro__:
        if cls is TokenizersBackend:
            break
        overridden = ENCODING_METHODS & set(vars(cls))
        if overridden:
            return f"{cls.__name__} overrides {sorted(overridden)[0]}"
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return "it cleans up tokenization spaces after decoding"
    return None


def _atomic_write(path: str, payload: bytes) -> None:
    """`path` holds `payload` whole or is untouched (this child imports no toxtests)."""
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "wb") as handle:
            handle.write(payload)
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temporary)  # left only where writing failed


def keep_tokenizer(tokenizer: Any, directory: str, texts: list[str]) -> str | None:
    """Keep `tokenizer` in `directory` for later runs to load with `tokenizers` alone
    (`KeptTokenizer`): its backend as it stands (`to_str`, with
    the tokens transformers added) and the attributes the decode loop reads. Only where
    transformers adds nothing to encoding or decoding (`not_keepable`), checked on
    `texts` and on random token sequences. None if kept, else why not."""
    import hashlib
    import json
    import random

    why = not_keepable(tokenizer)
    if why is not None:
        return why
    backend = tokenizer.backend_tokenizer
    for text in texts:
        if list(tokenizer(text)["input_ids"]) != backend.encode(text).ids:
            return f"its backend encodes {text[:40]!r} otherwise"
    generator = random.Random(0)
    specials = list(getattr(tokenizer, "all_special_ids", []) or [])
    size = len(tokenizer)
    for _ in range(200):
        ids = [
            generator.choice(specials) if specials and generator.random() < 0.1 else
            generator.randrange(size)
            for _ in range(generator.randrange(1, 24))
        ]  # fmt: skip
        for skip in (True, False):
            if tokenizer.decode(ids, skip_special_tokens=skip) != backend.decode(
                ids, skip_special_tokens=skip
            ):
                return "its backend decodes otherwise"
    attributes = {name: getattr(tokenizer, name, None) for name in KEPT_ATTRIBUTES}
    attributes["length"] = size
    files = {
        KEPT_BACKEND: backend.to_str().encode("utf-8"),
        KEPT_DECODER: _decoder_json(backend).encode("utf-8"),
    }
    index = {
        "format": KEPT_FORMAT,
        "sha256": {name: hashlib.sha256(payload).hexdigest() for name, payload in files.items()},
        "attributes": attributes,
    }
    try:
        encoded_index = json.dumps(index).encode("utf-8")
    except (TypeError, ValueError):
        return "an attribute is not plain data"
    os.makedirs(directory, exist_ok=True)
    for name, payload in files.items():
        _atomic_write(os.path.join(directory, name), payload)
    prompts = {text: backend.encode(text).ids for text in texts}
    _atomic_write(os.path.join(directory, KEPT_PROMPTS), _prompts_file(prompts))
    _atomic_write(os.path.join(directory, KEPT_INDEX), encoded_index)  # last: complete
    return None


def _prompts_file(prompts: Mapping[str, list[int]]) -> bytes:
    """prompts.json: each kept prompt's ids with the checksum of them all, so that it
    can be replaced on its own (`KeptTokenizer.keep_prompts`) and checked on its own."""
    import hashlib
    import json

    body = json.dumps(prompts, sort_keys=True)
    checksum = hashlib.sha256(body.encode("utf-8")).hexdigest()
    return json.dumps({"sha256": checksum, "prompts": json.loads(body)}).encode("utf-8")


def _read_prompts(path: str) -> dict[str, list[int]]:
    """The prompts a prompts.json keeps (`_prompts_file`); a damaged one keeps none."""
    import hashlib
    import json

    try:
        with open(path, "rb") as handle:
            stored = json.loads(handle.read())
        prompts = stored["prompts"]
        body = json.dumps(prompts, sort_keys=True)
        if hashlib.sha256(body.encode("utf-8")).hexdigest() != stored["sha256"]:
            return {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if not isinstance(prompts, dict):
        return {}
    return prompts


def _decoder_json(backend: Any) -> str:
    """`backend` for decoding only: the same vocabulary, added tokens and decoder, in a
    WordLevel model without the BPE merges (Gemma 3's loads in ~0.3 s, not ~1.1 s).
    `tokenizers` decodes every model alike (each id's token from the added vocabulary or
    the model's, then the decoder), so its text is the backend's, bit for bit."""
    import json

    vocab = backend.get_vocab(with_added_tokens=False)
    added = [
        {
            "id": token_id,
            "content": token.content,
            "single_word": token.single_word,
            "lstrip": token.lstrip,
            "rstrip": token.rstrip,
            "normalized": token.normalized,
            "special": token.special,
        }
        for token_id, token in sorted(backend.get_added_tokens_decoder().items())
    ]
    decoder = backend.decoder
    return json.dumps(
        {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": None,
            "pre_tokenizer": None,
            "post_processor": None,
            "decoder": None if decoder is None else json.loads(decoder.__getstate__()),
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": next(iter(vocab), "")},
        },
        ensure_ascii=False,
    )


class KeptTokenizer:
    """A tokenizer kept by an earlier run (`keep_tokenizer`), loaded with `tokenizers`
    alone, without transformers. It answers the prompts earlier runs encoded from their
    kept ids and decodes with the decode-only backend (Gemma 3's ready in ~0.5 s instead
    of ~2.2 s); a prompt not seen then loads the whole kept backend (~1.2 s), which
    encodes as transformers did with it, and is kept for the next run (`keep_prompts`).
    Told the prompts ahead (`expect`), it loads that backend before it is asked. The
    attributes kept with it are answered; anything else (a chat template to render, the
    vocabulary) loads the real tokenizer first."""

    def __init__(
        self,
        directory: str,
        index: dict[str, Any],
        load_real: Any,
        expected: Expected | None = None,
    ):
        """`expected`: the prompts the run will encode and its chat_template setting
        (`TokenizerProcess`): where one was not kept, the whole backend loads now and
        decodes too (its decode-only copy gives the same text), not after the copy."""
        from tokenizers import Tokenizer

        self._directory = directory
        self._checksums: dict[str, str] = index["sha256"]
        self._attributes: dict[str, Any] = index["attributes"]
        self._load_real = load_real
        self._real: Any = None
        self._encoder: Any = None
        self._prompts = _read_prompts(os.path.join(directory, KEPT_PROMPTS))
        self._added: dict[str, list[int]] = {}  # encoded here: kept too (`keep_prompts`)
        if expected is not None and self._unkept(*expected):
            with contextlib.suppress(Exception):  # damaged: the real tokenizer encodes
                self._load_encoder()
        self._decoder = (
            self._encoder
            if self._encoder is not None
            else Tokenizer.from_str(self._read(KEPT_DECODER).decode("utf-8"))
        )
        if expected is not None:
            self.expect(*expected)

    def _read(self, name: str) -> bytes:
        """A kept file's bytes, checked against the checksum kept with them."""
        import hashlib

        with open(os.path.join(self._directory, name), "rb") as handle:
            payload = handle.read()
        if hashlib.sha256(payload).hexdigest() != self._checksums.get(name):
            raise ValueError(f"{name} does not match its checksum")
        return payload

    @classmethod
    def load(
        cls,
        directory: str,
        load_real: Any,
        expected: Expected | None = None,
    ) -> KeptTokenizer | None:
        """The tokenizer kept in `directory`, or None if none is (or it is damaged)."""
        import json

        try:
            with open(os.path.join(directory, KEPT_INDEX), encoding="utf-8") as handle:
                index = json.load(handle)
            if (
                index.get("format") != KEPT_FORMAT
                or not isinstance(index.get("attributes"), dict)
                or not isinstance(index.get("sha256"), dict)
            ):
                return None
            return cls(directory, index, load_real, expected)
        except Exception:  # noqa: BLE001 - nothing usable kept: the real tokenizer loads
            return None

    def real(self) -> Any:
        if self._real is None:
            self._real = self._load_real()
        return self._real

    def _encode(self, text: str) -> list[int]:
        ids = self._prompts.get(text)
        if ids is not None:
            return ids
        if self._encoder is None:
            try:
                self._load_encoder()
            except Exception:  # noqa: BLE001 - damaged since: the real tokenizer encodes
                return list(self.real()(text)["input_ids"])
        ids = list(self._encoder.encode(text).ids)
        self._prompts[text] = self._added[text] = ids
        return ids

    def keep_prompts(self) -> None:
        """Add the prompts this run encoded with the kept backend to the kept ones, so
        that the next run on them (a second adapter on the same prompts) needs only the
        decode-only copy: the ids are the backend's, which the keeping run checked
        against transformers. Another run may have added its own since: they stay too,
        after this run's, within `KEPT_PROMPT_LIMIT`."""
        if not self._added:
            return
        path = os.path.join(self._directory, KEPT_PROMPTS)
        merged = dict(list(self._added.items())[:KEPT_PROMPT_LIMIT])
        for text, ids in _read_prompts(path).items():
            if len(merged) >= KEPT_PROMPT_LIMIT:
                break
            merged.setdefault(text, ids)
        self._added = {}
        with contextlib.suppress(OSError):  # not kept: the next run encodes them again
            _atomic_write(path, _prompts_file(merged))

    def _uses_template(self, chat_template: bool | str) -> bool:
        """`toxtests.engines.base.uses_chat_template`, repeated here: this process
        imports no toxtests."""
        return chat_template is True or (
            chat_template == "auto" and bool(self._attributes.get("chat_template"))
        )

    def _unkept(self, texts: list[str], chat_template: bool | str) -> list[str]:
        """The texts among `texts` that the kept backend will have to encode."""
        if self._uses_template(chat_template):
            return []
        return [text for text in texts if isinstance(text, str) and text not in self._prompts]

    def expect(self, texts: list[str], chat_template: bool | str) -> None:
        """Load now what encoding `texts` will need: the real tokenizer where they go
        through a chat template, else the kept backend where one of them was not kept.
        Their ids are then answered at once."""
        if self._uses_template(chat_template):
            self.real()
            return
        for text in self._unkept(texts, chat_template):
            self._encode(text)

    def _load_encoder(self) -> None:
        from tokenizers import Tokenizer

        encoder = Tokenizer.from_str(self._read(KEPT_BACKEND).decode("utf-8"))
        encoder.no_padding()
        encoder.no_truncation()
        encoder.encode_special_tokens = bool(self._attributes.get("split_special_tokens"))
        self._encoder = encoder

    def parts(self) -> list[str]:
        """What is loaded (`TokenizerProcess.loaded_parts`)."""
        loaded = ["decoder"]
        if self._encoder is not None:
            loaded.append("encoder")
        if self._real is not None:
            loaded.append("real")
        return loaded

    def __call__(self, text: Any, **kwargs: Any) -> Any:
        if kwargs or not isinstance(text, str):
            return self.real()(text, **kwargs)
        ids = self._encode(text)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def decode(self, ids: Any, skip_special_tokens: bool = False, **kwargs: Any) -> str:
        if kwargs:
            return str(self.real().decode(ids, skip_special_tokens=skip_special_tokens, **kwargs))
        return str(
            self._decoder.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        )

    def __len__(self) -> int:
        return int(self._attributes["length"])

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self._attributes and name != "length":
            return self._attributes[name]
        return getattr(self.real(), name)


def main() -> None:
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # what the libraries print must not enter the protocol
    source, options, kept_in, expected = _receive(stdin)
    try:
        tokenizer: Any = None
        if kept_in and os.environ.get(KEPT_VARIABLE, "1") != "0":
            tokenizer = KeptTokenizer.load(
                kept_in, lambda: load_padded_tokenizer(source, options), expected
            )
        if tokenizer is None:
            tokenizer = load_padded_tokenizer(source, options)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        _send(stdout, pickle.dumps(("error", type(exc).__name__, str(exc))))
        return
    _send(stdout, pickle.dumps(("ok", "kept" if isinstance(tokenizer, KeptTokenizer) else "real")))
    while True:
        try:
            kind, name, args, kwargs = _receive(stdin)
        except EOFError:
            # The parent is done: exit now, without tearing down a 262k-token tokenizer
            # and transformers (~0.2 s that a parent waiting on this process, or a caller
            # reading its inherited stderr to the end, would wait for).
            sys.stderr.flush()
            os._exit(0)
        _send(stdout, _answer(tokenizer, kind, name, args, kwargs))


if __name__ == "__main__":
    # Run by path: this folder's modules (loop.py, memory.py, ...) must not shadow
    # anything the tokenizer's libraries import.
    sys.path.pop(0)
    main()
