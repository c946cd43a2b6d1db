"""A model's tokenizer, loaded and run in a child process of its own.

Loading Gemma 3's tokenizer is ~2 s of work that holds the GIL (transformers parses its
33 MB tokenizer.json in Python, then builds a 262k-token BPE in Rust). On a thread it
only takes turns with the imports of transformers and the model's code, which hold the
GIL too, while the second core idles. In its own process it loads beside them. The
engine then asks it for what it needs (each prompt's ids, each continuation's text, a
few attributes) over a pipe: a few hundred small calls a gate, ~50 µs each.

Run as a script (`python tokenizer_process.py`), the child imports transformers'
tokenizer alone: none of toxtests, torch or the model's code.
"""

from __future__ import annotations

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

    def __init__(self, source: str, load_options: Mapping[str, Any]) -> None:
        self._source = source
        self._values: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._loaded = False
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
        _send(self._child.stdin, pickle.dumps((source, dict(load_options))))

    def wait_loaded(self) -> None:
        """Block until the child has loaded the tokenizer; raise its error if it failed."""
        with self._lock:
            if not self._loaded:
                self._reply()
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
            return self._reply()

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


def main() -> None:
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # what the libraries print must not enter the protocol
    source, options = _receive(stdin)
    try:
        tokenizer = load_padded_tokenizer(source, options)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        _send(stdout, pickle.dumps(("error", type(exc).__name__, str(exc))))
        return
    _send(stdout, pickle.dumps(("ok", None)))
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
