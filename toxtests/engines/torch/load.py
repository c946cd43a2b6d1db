"""The torch engine's model: the base loaded once, every adapter attached to it.

The parent is the base with adapters disabled, so one copy of the weights serves every
comparison. A Gemma 3 text model in float32 on the CPU, with plain LoRA adapters, loads
as toxtests' own decoder (`gemma3`, `lora`): the same arithmetic without importing
transformers or PEFT (~2 s of a small gate). Everything else loads through them.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toxtests.engines.base import package_version
from toxtests.engines.torch.tokenizer_process import (
    KEPT_FORMAT,
    Expected,
    TokenizerProcess,
    TokenizerProcessError,
    TokenizerProcessExited,
    load_padded_tokenizer,
)
from toxtests.errors import ModelLoadError
from toxtests.models import (
    DEFAULT_MODEL,
    adapter_fingerprint,
    adapter_names,
    check_adapter_dir,
    check_revision,
    choose_device,
    choose_dtype,
    default_cache_dir,
    hub_fingerprint,
    hub_revision,
    notice,
    quiet_loading,
    resolve_model,
)

# Set to 0 to load every model through transformers and PEFT (to compare the two paths).
NATIVE_VARIABLE = "TOXTESTS_NATIVE_DECODER"


@dataclass
class LoadedModel:
    """The base model with adapters attached (a PeftModel, or the native decoder with
    its LoRA layers) or bare (no adapters)."""

    spec: str
    kind: str
    fingerprint: str
    model: Any
    tokenizer: Any
    device: str
    dtype: str
    adapters: list[AdapterInfo] = field(default_factory=list)


@dataclass(frozen=True)
class AdapterInfo:
    spec: str  # as given on the command line
    name: str  # readable, unique: used in test ids and the report
    peft_name: str  # the name PEFT knows it by
    fingerprint: str


def load_base(
    spec: str = DEFAULT_MODEL,
    *,
    cache_dir: Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    revision: str | None = None,
    native: bool = True,
    started_tokenizer: Any = None,
) -> LoadedModel:
    """Load the base model and tokenizer (left padding, a pad token guaranteed).

    `native`: the native decoder where it applies (`native_decoder_config`), else
    transformers'. `started_tokenizer`: this model's tokenizer, already loading in its
    process or kept (`prestart_tokenizer`)."""
    import torch

    cache_dir = cache_dir or default_cache_dir()
    source, kind, fingerprint = resolve_model(spec, cache_dir)
    check_revision(spec, kind, revision)
    local = kind != "hub"
    if not local:  # the commit the fingerprint names is the one loaded
        revision = hub_revision(spec, revision, what="model")
        fingerprint = hub_fingerprint(spec, revision)
    pinned = {"revision": revision} if revision else {}
    device = choose_device(device)
    dtype = choose_dtype(device, dtype)
    tokenizer_options = {
        "local_files_only": local, "trust_remote_code": trust_remote_code, **pinned
    }  # fmt: skip
    # The tokenizer loads in a process of its own while this one imports the model's
    # code and maps its weights: both hold their GIL for seconds.
    tokenizer = started_tokenizer
    if tokenizer is None or tokenizer.source != source:
        if tokenizer is not None:
            tokenizer.close()
        tokenizer = start_tokenizer(source, tokenizer_options)
    config = None
    if native and local and not trust_remote_code:
        config = native_decoder_config(source, device, dtype)
    if config is not None:
        from toxtests.engines.torch import gemma3

        try:
            native_model = gemma3.load(source, config)
        except (OSError, ValueError) as exc:
            if tokenizer is not None:
                tokenizer.close()
            raise ModelLoadError(f"{spec}: cannot load model ({exc})") from None
        pending = PendingTokenizer(spec, tokenizer, source, tokenizer_options)
        return LoadedModel(spec, kind, fingerprint, native_model, pending, device, dtype)
    try:
        with quiet_loading():
            from transformers import AutoModelForCausalLM

            try:
                model = AutoModelForCausalLM.from_pretrained(
                    source,
                    dtype=getattr(torch, dtype),
                    local_files_only=local,
                    trust_remote_code=trust_remote_code,
                    **pinned,
                )
            except Exception:
                tokenizer = finish_tokenizer(tokenizer, source, tokenizer_options)
                raise  # the tokenizer's error first, as when it loaded first
            tokenizer = finish_tokenizer(tokenizer, source, tokenizer_options)
    except (OSError, ValueError, TokenizerProcessError) as exc:
        raise ModelLoadError(f"{spec}: cannot load model ({str(exc).splitlines()[0]})") from None
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    return LoadedModel(spec, kind, fingerprint, model, tokenizer, device, dtype)


def prestart_tokenizer(
    spec: str,
    *,
    cache_dir: Path | None = None,
    trust_remote_code: bool = False,
    expected: Expected | None = None,
) -> TokenizerProcess | None:
    """The tokenizer of a local model starting to load in its process now, for
    `load_base(started_tokenizer=...)`: started before this process imports torch (~1 s),
    it is ready when the native decoder is (Gemma 3's takes ~2.4 s to load; kept by an
    earlier run in this cache directory, `tokenizer_process.keep_tokenizer`, ~0.4 s on
    that run's prompts, ~1.5 s on others). None where the model is not local or its
    tokenizer is small. Close it if it goes unused. `expected`: the prompts it will
    encode and the chat_template setting (`TokenizerProcess.expect`)."""
    cache_dir = cache_dir or default_cache_dir()
    source, kind, fingerprint = resolve_model(spec, cache_dir)
    if kind == "hub":
        return None
    options = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    return start_tokenizer(
        source,
        options,
        keep_in=str(kept_directory(cache_dir, fingerprint, options)),
        expected=expected,
    )


def kept_directory(cache_dir: Path, fingerprint: str, options: dict[str, Any]) -> Path:
    """Where the tokenizer of the model with `fingerprint`, loaded with `options`, is
    kept for later runs: every input that can change what it encodes names the folder.
    Beside the converted models (`models/`), which CI caches between runs without the
    generations, so a CI gate in a fresh cache loads the kept tokenizer too."""
    identity = json.dumps(
        [
            KEPT_FORMAT,
            fingerprint,
            package_version("transformers"),
            package_version("tokenizers"),
            sorted((str(k), str(v)) for k, v in options.items()),
        ]
    )
    key = hashlib.sha256(identity.encode()).hexdigest()[:24]
    return cache_dir / "models" / "tokenizers" / key


def native_decoder_config(source: str, device: str, dtype: str) -> Any:
    """The native decoder's config for the model in directory `source`, where it runs
    there: float32 on a CPU with oneDNN's packed products, a model it supports, and not
    switched off by TOXTESTS_NATIVE_DECODER=0; else None."""
    if os.environ.get(NATIVE_VARIABLE, "1") == "0":
        return None
    if not device.startswith("cpu") or dtype != "float32" or not Path(source).is_dir():
        return None
    from toxtests.engines.torch import gemma3, packed

    config = gemma3.native_config(source)
    return config if config is not None and packed.available() else None


def native_adapters(specs: list[str]) -> bool:
    """Whether every adapter in `specs` is a LoRA the native decoder applies."""
    from toxtests.engines.torch import lora

    return all(lora.unsupported(spec) is None for spec in specs)


# A local tokenizer.json at least this large loads in a child process: Gemma 3's 33 MB
# take ~2 s, while a child costs ~1 s of the other core to start (Python, transformers),
# more than a small tokenizer takes to load here.
CHILD_TOKENIZER_BYTES = 8 << 20


def _worth_a_child(source: str) -> bool:
    """A Hub model's files are not here yet: its tokenizer is taken to be large."""
    local = Path(source)
    if not local.is_dir():
        return True
    found = local / "tokenizer.json"
    return found.is_file() and found.stat().st_size >= CHILD_TOKENIZER_BYTES


def start_tokenizer(
    source: str,
    options: dict[str, Any],
    keep_in: str | None = None,
    expected: Expected | None = None,
) -> TokenizerProcess | None:
    """The tokenizer loading in a child process where it is large; None where it is
    small or no child can start (it then loads here, after the weights). `keep_in`: where
    the child keeps it for later runs (`TokenizerProcess`)."""
    if not _worth_a_child(source):
        return None
    try:
        return TokenizerProcess(source, options, keep_in=keep_in, expected=expected)
    except OSError as exc:
        notice(
            f"the tokenizer process could not start ({exc}); "
            "loading the tokenizer in this process instead"
        )
        return None


def finish_tokenizer(started: TokenizerProcess | None, source: str, options: dict[str, Any]) -> Any:
    """The loaded tokenizer: the child's, once it has loaded, or one loaded here where
    the child could not run at all (a tokenizer that fails to load fails either way)."""
    if started is not None:
        try:
            started.wait_loaded()
            return started
        except TokenizerProcessExited as exited:
            notice(f"{exited}; loading the tokenizer in this process instead")
            started.close()
    return load_padded_tokenizer(source, options)


class PendingTokenizer:
    """A tokenizer still loading in its process, waited for at its first use: meanwhile
    the native decoder (loaded in ~0.1 s) gets its adapters merged and its weights packed
    instead of waiting ~1 s for Gemma 3's tokenizer. A tokenizer that fails to load
    raises `ModelLoadError` there, as `load_base` would have."""

    def __init__(self, spec: str, started: Any, source: str, options: dict[str, Any]):
        self._spec, self._started, self._source, self._options = spec, started, source, options
        self._tokenizer: Any = None

    def resolve(self) -> Any:
        """The loaded tokenizer (waiting for its process the first time)."""
        if self._tokenizer is None:
            try:
                self._tokenizer = finish_tokenizer(self._started, self._source, self._options)
            except (OSError, ValueError, TokenizerProcessError) as exc:
                message = str(exc).splitlines()[0]
                raise ModelLoadError(f"{self._spec}: cannot load model ({message})") from None
        return self._tokenizer

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.resolve(), name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.resolve())

    def close(self) -> None:
        if self._tokenizer is None and self._started is not None:
            self._started.close()


def _attach(model: Any, spec: str, peft_name: str, index: int, allow_pickle: bool) -> Any:
    from peft import PeftModel

    with quiet_loading():
        if index == 0:
            return PeftModel.from_pretrained(
                model,
                spec,
                adapter_name=peft_name,
                is_trainable=False,
                use_safetensors=not allow_pickle or None,
            )
        model.load_adapter(spec, adapter_name=peft_name, is_trainable=False)
    return model


def _attach_native(loaded: LoadedModel, spec: str, peft_name: str) -> None:
    from toxtests.engines.torch import lora

    reason = lora.unsupported(spec)
    if reason is not None:
        raise ModelLoadError(
            f"{spec}: the native decoder does not apply this adapter ({reason}); load the "
            "base with load_base(..., native=False) to attach it with PEFT"
        )
    try:
        lora.attach(loaded.model, spec, peft_name)
    except ValueError as exc:
        detail = str(exc).removeprefix(f"{spec}: ")
        raise ModelLoadError(
            f"{spec}: adapter does not fit base model {loaded.spec} ({detail}); "
            "it was trained on a different base: pass the base it was made for"
        ) from None


def attach_adapters(
    loaded: LoadedModel, specs: list[str], *, allow_pickle: bool = False
) -> LoadedModel:
    """Wrap the base in a PeftModel holding every adapter; weights are shared."""
    if not specs:
        return loaded

    model = loaded.model
    native = getattr(model, "toxtests_native", False)
    for index, (spec, name) in enumerate(zip(specs, adapter_names(specs), strict=True)):
        check_adapter_dir(spec, allow_pickle)
        peft_name = f"adapter{index}"
        if native:
            _attach_native(loaded, spec, peft_name)
            loaded.adapters.append(AdapterInfo(spec, name, peft_name, adapter_fingerprint(spec)))
            continue
        try:
            with warnings.catch_warnings():  # PEFT asks transformers a deprecated question
                warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing")
                model = _attach(model, spec, peft_name, index, allow_pickle)
        except RuntimeError as exc:
            first = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), "")
            raise ModelLoadError(
                f"{spec}: adapter does not fit base model {loaded.spec} ({first or exc}); "
                "it was trained on a different base: pass the base it was made for"
            ) from None
        except ValueError as exc:
            raise ModelLoadError(
                f"{spec}: adapter does not fit base model {loaded.spec} "
                f"({str(exc).splitlines()[0]}); pass the base it was made for"
            ) from None
        except OSError as exc:
            raise ModelLoadError(
                f"{spec}: cannot load adapter ({str(exc).splitlines()[0]})"
            ) from None
        loaded.adapters.append(AdapterInfo(spec, name, peft_name, adapter_fingerprint(spec)))
    model.eval()
    loaded.model = model
    return loaded
