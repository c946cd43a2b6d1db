"""Content-addressed cache of generations and scores, safe under pytest-xdist.

An entry's key is a hash of everything that determines it (model, adapter, prompt,
generation settings, seed; plus the scorer for scores), so a changed input can never
return a stale entry, and an identical re-run regenerates nothing. Entries are written
atomically and carry a checksum of their payload: a torn or edited file is reported
once, deleted and recomputed, never used. Work on one shard is serialised across
processes with a file lock, so two workers never generate the same parent shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock

from toxtests.errors import CacheCorruptionWarning
from toxtests.files import atomic_write_bytes

FORMAT = 1
# A writer's temporary file lives for milliseconds; one this old was left by a killed run.
STALE_TEMPORARY_S = 3600


def make_key(*parts: Any) -> str:
    """A stable key from JSON-able parts."""
    body = json.dumps([FORMAT, *parts], sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(body.encode()).hexdigest()


def _checksum(payload_text: str) -> str:
    return hashlib.sha256(payload_text.encode()).hexdigest()


class Cache:
    """JSON entries under `root/<kind>/<key[:2]>/<key>.json`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.reported: set[str] = set()

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.json"

    def get(self, kind: str, key: str) -> Any | None:
        path = self.path(kind, key)
        try:
            raw = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            entry = json.loads(raw)
            payload_text = entry["payload"]
            if not isinstance(payload_text, str) or _checksum(payload_text) != entry["sha256"]:
                raise ValueError("checksum mismatch")
            value = json.loads(payload_text)
        except (ValueError, KeyError, TypeError) as exc:
            self._corrupt(path, str(exc))
            return None
        return value

    def put(self, kind: str, key: str, value: Any) -> None:
        payload_text = json.dumps(value, sort_keys=True, ensure_ascii=False)
        entry = json.dumps({"sha256": _checksum(payload_text), "payload": payload_text})
        # No fsync: the checksum makes an entry torn by a power loss a miss, not an error.
        atomic_write_bytes(self.path(kind, key), entry.encode("utf-8"), durable=False)

    def _corrupt(self, path: Path, why: str) -> None:
        if str(path) not in self.reported:
            self.reported.add(str(path))
            warnings.warn(
                f"cache entry {path} is corrupt ({why}); it was discarded and will be recomputed",
                CacheCorruptionWarning,
                stacklevel=3,
            )
        path.unlink(missing_ok=True)

    def sweep_stale_temporaries(self, older_than_s: float = STALE_TEMPORARY_S) -> int:
        """Delete the `.<entry>.tmp` files a killed writer left behind; the count.

        Atomic writes go through a temporary file renamed into place, so a SIGKILL at
        the wrong moment leaves one behind: harmless, but nothing else would ever delete
        it. Only files older than `older_than_s` go: a live writer's file is never one.
        """
        cutoff = time.time() - older_than_s
        removed = 0
        for kind in ("generations", "scores"):
            base = self.root / kind
            if not base.is_dir():
                continue
            for shard in os.scandir(base):
                if not shard.is_dir():
                    continue
                for entry in os.scandir(shard.path):
                    if not (entry.name.startswith(".") and entry.name.endswith(".tmp")):
                        continue
                    try:
                        if entry.stat().st_mtime < cutoff:
                            os.unlink(entry.path)
                            removed += 1
                    except FileNotFoundError:
                        pass  # another process swept it first
        return removed

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """A cross-process lock: one worker computes, the others wait and then read."""
        lock_path = self.root / "locks" / f"{name}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(lock_path)):
            yield
