"""The openai engine: any OpenAI-compatible `/v1/completions` server generates.

The parent is the served base model and each adapter a served name (a vLLM
`--lora-modules` entry, a llama.cpp alias). Every request carries its own seed, `n=1`
and every sampling parameter explicitly, because servers fill in what a request leaves
out from the model's generation_config (Gemma 3's says top_k 64, top_p 0.95).

Nothing but a complete continuation is ever returned: a failed, truncated or malformed
response, after the retries that 429/5xx/connection errors get, is an `EndpointError`
naming the request and the endpoint. Finished prompts reach the cache as they complete,
so a run against a server that died resumes where it stopped.

Only the standard library talks HTTP: one dependency fewer for a CI job.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toxtests.config import GenerationConfig
from toxtests.engines.base import (
    MODEL,
    PARENT,
    SEEDED,
    EngineInfo,
    EngineOptions,
    Generation,
    OnPromptDone,
    Variant,
    cut_at_stop,
    rendering_label,
)
from toxtests.engines.crn import request_seed
from toxtests.errors import ConfigError, EndpointError
from toxtests.models import DEFAULT_MODEL, adapter_fingerprint, adapter_names, fingerprint_tree
from toxtests.prompts import Prompt

RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
BACKOFF_S = 0.5  # first retry waits ~0.5 s, then 1, 2, 4 ... (with jitter)
MAX_BACKOFF_S = 30.0


@dataclass(frozen=True)
class ServedModel:
    """One entry of the server's /v1/models."""

    id: str
    root: str | None  # vLLM: the path or Hub id the model or LoRA was loaded from
    parent: str | None  # vLLM: the base model of a LoRA; None for a base model


class RetryableError(Exception):
    """A response worth retrying (429, 5xx, a dropped connection, a timeout)."""


def _first_line(text: str, limit: int = 300) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:limit]


def _weights_fingerprint(served: ServedModel) -> str:
    """The weights behind a served name where the server says where they came from."""
    root = Path(served.root) if served.root else None
    if root is not None and root.is_dir():
        return fingerprint_tree(root, (".safetensors", ".bin", ".json", ".gguf"))[:16]
    return hashlib.sha256(f"{served.id}\0{served.root}".encode()).hexdigest()[:16]


class OpenAIEngine:
    """Sends one request per (prompt, sample) to an OpenAI-compatible server."""

    def __init__(self, options: EngineOptions):
        if not options.endpoint:
            raise ConfigError(
                "--engine openai needs --endpoint URL, the server's base URL "
                "(e.g. http://127.0.0.1:8000/v1)"
            )
        self.options = options
        self.endpoint = options.endpoint.rstrip("/")
        self._api_key = os.environ.get(options.api_key_env) or None
        self._served: list[ServedModel] | None = None
        self._version: str | None = None
        self._model: ServedModel | None = None
        self._variants: list[Variant] | None = None
        self._served_names: dict[str, str] = {}  # variant name -> served model id
        self._local = threading.local()

    # -- HTTP ---------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _once(self, method: str, url: str, body: dict[str, Any] | None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method, headers=self._headers())
        try:
            with urllib.request.urlopen(request, timeout=self.options.request_timeout) as reply:
                raw = reply.read()
        except urllib.error.HTTPError as exc:
            detail = _first_line(exc.read().decode(errors="replace"))
            if exc.code in RETRY_STATUSES:
                raise RetryableError(f"HTTP {exc.code} {detail}") from None
            raise EndpointError(f"HTTP {exc.code} from {url}: {detail}") from None
        except (
            urllib.error.URLError,
            http.client.HTTPException,  # a reply cut off mid-body (IncompleteRead), ...
            ConnectionError,
            TimeoutError,
            OSError,
        ) as exc:
            reason = getattr(exc, "reason", exc)
            raise RetryableError(f"{type(exc).__name__}: {reason}") from None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            raise EndpointError(
                f"malformed response from {url}: not JSON ({len(raw)} bytes: "
                f"{_first_line(raw.decode(errors='replace'), 80)!r})"
            ) from None

    def _call(self, method: str, path: str, body: dict[str, Any] | None, what: str) -> Any:
        """One request with retries; `what` names it in the error."""
        url = f"{self.endpoint}{path}"
        last = ""
        for attempt in range(self.options.max_retries + 1):
            try:
                return self._once(method, url, body)
            except RetryableError as exc:
                last = str(exc)
            except EndpointError as exc:
                raise EndpointError(f"{what}: {exc}") from None
            if attempt < self.options.max_retries:
                delay = min(MAX_BACKOFF_S, BACKOFF_S * 2**attempt)
                time.sleep(delay * (0.5 + random.random()))  # jitter: retries do not align
        raise EndpointError(
            f"{what}: {url} failed after {self.options.max_retries + 1} attempts ({last}); "
            "is the server up? (--max-retries, --request-timeout)"
        )

    # -- discovery ----------------------------------------------------------------------

    def served(self) -> list[ServedModel]:
        if self._served is None:
            listing = self._call("GET", "/models", None, "listing the served models")
            entries = listing.get("data") if isinstance(listing, dict) else None
            if not isinstance(entries, list) or not all(
                isinstance(e, dict) and isinstance(e.get("id"), str) for e in entries
            ):
                raise EndpointError(
                    f"malformed response from {self.endpoint}/models: expected "
                    '{"data": [{"id": ...}, ...]}'
                )
            self._served = [ServedModel(e["id"], e.get("root"), e.get("parent")) for e in entries]
        return self._served

    def _base_model(self) -> ServedModel:
        if self._model is None:
            served = self.served()
            by_id = {m.id: m for m in served}
            wanted = self.options.model
            if wanted in by_id:
                self._model = by_id[wanted]
            else:
                bases = [m for m in served if m.parent is None]
                if wanted != DEFAULT_MODEL or len(bases) != 1:
                    raise EndpointError(
                        f"--model {wanted!r} is not served by {self.endpoint}; it serves: "
                        f"{', '.join(m.id for m in served) or 'nothing'} "
                        "(pass one of them as --model)"
                    )
                self._model = bases[0]
        return self._model

    def _served_adapter(self, spec: str) -> tuple[ServedModel, str | None]:
        """(served entry, local path) for `NAME`, `PATH=NAME`, or a path the server loaded."""
        local, _, name = spec.rpartition("=") if "=" in spec else ("", "", spec)
        served = self.served()
        by_id = {m.id: m for m in served}
        if name in by_id:
            return by_id[name], local or None
        path = Path(spec).expanduser()
        if path.exists():
            for model in served:
                if model.root and Path(model.root).expanduser().resolve() == path.resolve():
                    return model, str(path)
        adapters = [m.id for m in served if m.parent is not None] or [m.id for m in served]
        raise EndpointError(
            f"adapter {spec!r} is not served by {self.endpoint} (it serves: "
            f"{', '.join(adapters) or 'nothing'}); give a served name, or PATH=SERVED_NAME"
        )

    # -- the seam -----------------------------------------------------------------------

    def describe(self) -> EngineInfo:
        if self._version is None:
            root = self.endpoint.removesuffix("/v1")
            try:
                reply = self._once("GET", f"{root}/version", None)
                self._version = str(reply.get("version", "unknown"))
            except (RetryableError, EndpointError):
                self.served()  # a server that is down fails here, naming the endpoint
                self._version = "unknown"
        return EngineInfo(
            engine="openai",
            version=f"server {self._version}",
            dtype=self.options.dtype if self.options.dtype != "auto" else "server",
            device="remote",
            sampler="openai-seeded",
            pairing=SEEDED,
            batch_invariant=False,
            details={"endpoint": self.endpoint},
        )

    def model_identity(self) -> dict[str, str]:
        model = self._base_model()
        return {
            "spec": model.id,
            "kind": "served",
            "fingerprint": _weights_fingerprint(model),
            "device": "remote",
            "dtype": self.describe().dtype,
        }

    def variants(self) -> list[Variant]:
        """The parent, the served adapters, then the candidates: other models the same
        server serves (a community fine-tune, a merged LoRA), by served name."""
        if self._variants is None:
            self._base_model()
            resolved = [self._served_adapter(spec) for spec in self.options.adapters]
            candidates = [self._served_candidate(spec) for spec in self.options.candidates]
            names = adapter_names([local or model.id for model, local in [*resolved, *candidates]])
            self._variants = [Variant(PARENT, None, None, PARENT)]
            for index, ((model, local), name) in enumerate(zip(resolved, names, strict=False)):
                fingerprint = (
                    adapter_fingerprint(local)
                    if local and Path(local).is_dir()
                    else _weights_fingerprint(model)
                )
                self._variants.append(Variant(name, index, model.id, fingerprint))
                self._served_names[name] = model.id
            for offset, (model, local) in enumerate(candidates):
                index = len(resolved) + offset
                fingerprint = (
                    fingerprint_tree(Path(local), (".safetensors", ".bin", ".json", ".gguf"))[:16]
                    if local and Path(local).is_dir()
                    else _weights_fingerprint(model)
                )
                self._variants.append(
                    Variant(names[index], index, model.id, f"model:{fingerprint}", MODEL)
                )
                self._served_names[names[index]] = model.id
        return list(self._variants)

    def _served_candidate(self, spec: str) -> tuple[ServedModel, str | None]:
        """(served entry, local path) for a candidate: a served name, or PATH=NAME."""
        local, _, name = spec.rpartition("=") if "=" in spec else ("", "", spec)
        by_id = {m.id: m for m in self.served()}
        if name not in by_id:
            raise EndpointError(
                f"--candidate {spec!r} is not served by {self.endpoint} (it serves: "
                f"{', '.join(by_id) or 'nothing'}); start the server with that model too "
                "(vLLM: one server per model, or a router) and pass its served name"
            )
        if name == self._base_model().id:
            raise ConfigError(
                f"--candidate {spec!r} is the parent itself (--model); pass another model"
            )
        return by_id[name], local or None

    def prompt_rendering(self, variant: Variant, settings: GenerationConfig) -> str:
        """The server's chat template (/chat/completions) or plain text (/completions)."""
        return rendering_label(settings.chat_template is True)

    def request_body(
        self, prompt: Prompt, sample: int, variant: Variant, settings: GenerationConfig
    ) -> dict[str, Any]:
        """One request: every sampling parameter explicit, so server defaults cannot leak."""
        sampled = settings.do_sample
        body: dict[str, Any] = {
            "model": self._base_model().id
            if variant.is_parent
            else self._served_names[variant.name],
            "n": 1,
            "seed": request_seed(settings.seed, prompt.id, sample),
            "max_tokens": settings.max_new_tokens,
            "temperature": settings.temperature if sampled else 0.0,
            "top_p": settings.top_p if sampled else 1.0,
            "top_k": settings.top_k if sampled and settings.top_k > 0 else -1,
            "min_p": 0.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "repetition_penalty": 1.0,
            "stream": False,
        }
        if settings.stop:  # the server stops there; the text is cut here as well
            body["stop"] = list(settings.stop)
        if settings.chat_template:
            body["messages"] = [{"role": "user", "content": prompt.text}]
        else:
            body["prompt"] = prompt.text
        return body

    def _complete(
        self, prompt: Prompt, sample: int, variant: Variant, settings: GenerationConfig
    ) -> Generation:
        what = f"request for prompt {prompt.id} sample {sample} of {variant.name}"
        path = "/chat/completions" if settings.chat_template else "/completions"
        reply = self._call("POST", path, self.request_body(prompt, sample, variant, settings), what)
        return self._continuation(reply, prompt, sample, settings, what)

    def _continuation(
        self, reply: Any, prompt: Prompt, sample: int, settings: GenerationConfig, what: str
    ) -> Generation:
        def malformed(why: str) -> EndpointError:
            return EndpointError(f"{what}: malformed response from {self.endpoint} ({why})")

        choices = reply.get("choices") if isinstance(reply, dict) else None
        if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
            raise malformed("expected exactly one choice")
        choice = choices[0]
        if settings.chat_template:
            message = choice.get("message")
            text = message.get("content") if isinstance(message, dict) else None
        else:
            text = choice.get("text")
        if not isinstance(text, str):
            raise malformed("the choice has no text")
        finish = choice.get("finish_reason")
        if finish not in ("stop", "length"):
            raise EndpointError(
                f"{what}: {self.endpoint} returned an unfinished continuation "
                f"(finish_reason {finish!r}); the server cut it short"
            )
        usage = reply.get("usage")
        tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
        if not isinstance(tokens, int) or not 0 <= tokens <= settings.max_new_tokens + 1:
            raise malformed(f"usage.completion_tokens is {tokens!r}")
        if finish == "length" and tokens < settings.max_new_tokens:
            raise EndpointError(
                f"{what}: {self.endpoint} stopped at {tokens} of {settings.max_new_tokens} "
                "tokens for 'length'; is the server's context (--max-model-len) too short?"
            )
        if finish == "stop" and tokens and choice.get("stop_reason") is None:
            tokens -= 1  # the end-of-sequence token is counted by the server, not by us
        cut = cut_at_stop(text, settings.stop) if settings.stop else None
        text = text if cut is None else cut
        return Generation(prompt.id, sample, text, min(tokens, settings.max_new_tokens))

    def generate(
        self,
        prompts: Sequence[Prompt],
        variant: Variant,
        settings: GenerationConfig,
        on_prompt_done: OnPromptDone | None = None,
    ) -> list[list[Generation]]:
        self.variants()
        if settings.chat_template == "auto":
            raise ConfigError(
                'generation.chat_template = "auto" needs each model\'s tokenizer, which the '
                "openai engine cannot see; set it to true (the server's /chat/completions) "
                "or false (/completions)"
            )
        results: list[list[Generation | None]] = [[None] * settings.samples for _ in prompts]
        remaining = [settings.samples] * len(prompts)
        with ThreadPoolExecutor(max_workers=max(1, self.options.concurrency)) as pool:
            futures: dict[Future[Generation], tuple[int, int]] = {
                pool.submit(self._complete, prompt, j, variant, settings): (i, j)
                for i, prompt in enumerate(prompts)
                for j in range(settings.samples)
            }
            pending = set(futures)
            try:
                while pending:
                    # FIRST_COMPLETED: each prompt reaches the cache the moment it is done,
                    # so a server that dies mid-run loses only what was in flight.
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    failed = [f for f in done if f.exception() is not None]
                    for future in sorted(done, key=futures.__getitem__):
                        if future.exception() is None:
                            i, j = futures[future]
                            results[i][j] = future.result()
                            remaining[i] -= 1
                            if remaining[i] == 0 and on_prompt_done is not None:
                                on_prompt_done(i, list(results[i]))  # type: ignore[arg-type]
                    if failed:
                        raise min(failed, key=futures.__getitem__).exception()  # type: ignore[misc]
            finally:
                for future in pending:
                    future.cancel()
        return [list(samples) for samples in results]  # type: ignore[arg-type]

    def close(self) -> None:
        """Nothing to free: every request opens and closes its own connection."""
