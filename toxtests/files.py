"""Atomic writes and remembered file fingerprints: nothing half-written, nothing hashed twice."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path

_fingerprints: dict[tuple[str, int, int], str] = {}
_lock = threading.Lock()


def _default_mode() -> int:
    # mkstemp creates 0600 files; a report should get the mode a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: str | Path, payload: bytes, durable: bool = True) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it.

    A reader sees the old file or the new one, never a torn write, even if the process
    is killed half-way (the temporary file is left behind, never the target).
    `durable=False` skips the fsync, for files that prove themselves when read (cache
    entries carry a checksum): a process killed at any point still leaves the old file
    or the new one, and only a power loss could leave a torn one, which the reader
    detects and recomputes. One fsync per entry cost ~0.5 ms, thousands a gate.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, _default_mode())
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, value: object) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def default_cache_dir() -> Path:
    """The user's cache: $TOXTESTS_CACHE, else $XDG_CACHE_HOME/toxtests, else ~/.cache."""
    env = os.environ.get("TOXTESTS_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "toxtests"


# Files at least this large are remembered in the user's cache, whichever cache directory
# a run uses: a fresh CI cache would otherwise re-read a gigabyte of weights (~1.5 s).
REMEMBERED_SIZE = 16 << 20


def _load_store(store: Path) -> dict[str, str]:
    try:
        value = json.loads(store.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def sha256_file(path: str | Path, chunk: int = 1 << 20, store: Path | None = None) -> str:
    """SHA-256 of a file, remembered by (path, size, mtime) so large weights hash once.

    With `store` (a JSON file in the cache) the memo outlives the process, so a re-run
    does not re-read a gigabyte of weights to learn that nothing changed.
    """
    file = Path(path).resolve()
    stat = file.stat()
    key = (str(file), stat.st_size, stat.st_mtime_ns)
    store_key = f"{key[0]}|{key[1]}|{key[2]}"
    with _lock:
        if key in _fingerprints:
            return _fingerprints[key]
    stores = [store] if store is not None else []
    if stat.st_size >= REMEMBERED_SIZE:
        stores.append(default_cache_dir() / "fingerprints.json")
    for memo_file in stores:
        remembered = _load_store(memo_file).get(store_key)
        if isinstance(remembered, str) and len(remembered) == 64:
            with _lock:
                _fingerprints[key] = remembered
            return remembered
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    value = digest.hexdigest()
    with _lock:
        _fingerprints[key] = value
    for memo_file in stores:
        # A concurrent writer may drop this entry (last rename wins): it is only a memo,
        # and one that cannot be written (a read-only home) costs a re-hash, no more.
        memo = _load_store(memo_file)
        memo[store_key] = value
        try:
            atomic_write_json(memo_file, memo)
        except OSError:
            if memo_file == store:
                raise
    return value


def fingerprint_tree(path: str | Path, suffixes: tuple[str, ...] | None = None) -> str:
    """Hash of every file under a directory (names and contents), in a fixed order."""
    root = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for file in files:
        if suffixes and file.suffix not in suffixes:
            continue
        digest.update(str(file.relative_to(root)).encode() + b"\0")
        digest.update(sha256_file(file).encode() + b"\0")
    return digest.hexdigest()
