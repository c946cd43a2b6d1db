"""The content-addressed cache: round trips, checksums, atomic writes, locks."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest

from toxtests.cache import Cache, make_key
from toxtests.errors import CacheCorruptionWarning


def test_round_trip_and_key_sensitivity(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    key = make_key("generation", "model", "adapter", "p1", {"top_p": 0.9})
    assert cache.get("generations", key) is None
    cache.put("generations", key, {"samples": [{"text": "héllo <b>", "tokens": 2}]})
    assert cache.get("generations", key) == {"samples": [{"text": "héllo <b>", "tokens": 2}]}
    assert make_key("generation", "model", "adapter", "p1", {"top_p": 0.95}) != key
    assert make_key("generation", "model", "adapter", "p1", {"top_p": 0.9}) == key


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw[: len(raw) // 2],  # a torn write
        lambda raw: raw.replace("h\\u00e9llo", "hallo"),  # an edited payload
        lambda raw: "",  # an empty file
        lambda raw: json.dumps({"payload": "{}"}),  # no checksum
        lambda raw: "\0" * len(raw),  # unsynced blocks after a power loss read as zeros
    ],
)
def test_corrupt_entries_are_reported_discarded_and_never_used(tmp_path: Path, damage) -> None:  # noqa: ANN001
    cache = Cache(tmp_path)
    key = make_key("x")
    cache.put("scores", key, {"text": "héllo"})
    path = cache.path("scores", key)
    path.write_text(damage(path.read_text()))
    with pytest.warns(CacheCorruptionWarning, match="is corrupt"):
        assert cache.get("scores", key) is None
    assert not path.exists()
    # Reported once: a second read is a plain miss.
    assert cache.get("scores", key) is None


def test_entries_skip_the_fsync_that_reports_keep(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """A gate writes thousands of entries: they are atomic but not fsynced (a checksum
    catches what a power loss could tear, above); reports and baselines, which nothing
    checks on reading, are still synced before they replace the old file."""
    import os

    from toxtests.files import atomic_write_text

    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    cache = Cache(tmp_path)
    for index in range(5):
        cache.put("generations", make_key(index), {"samples": []})
    assert synced == [] and cache.get("generations", make_key(3)) == {"samples": []}
    atomic_write_text(tmp_path / "report.html", "<html></html>")
    assert len(synced) == 1


def test_writes_leave_no_temporary_files(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    for i in range(20):
        cache.put("scores", make_key(i), {"i": i})
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".json"]
    assert leftovers == []


def test_stale_temporaries_are_swept_and_live_ones_kept(tmp_path: Path) -> None:
    """A run killed between writing and renaming leaves `.<key>.json.<random>.tmp`
    behind; the next run deletes it once it is clearly abandoned (an hour old)."""
    import os

    cache = Cache(tmp_path)
    key = make_key("kept")
    cache.put("generations", key, {"text": "kept"})
    folder = cache.path("generations", key).parent
    stale = folder / f".{key}.json.abc123.tmp"
    live = folder / f".{key}.json.def456.tmp"
    other_stale = tmp_path / "scores" / "ff" / ".x.json.1.tmp"
    other_stale.parent.mkdir(parents=True)
    for path in (stale, live, other_stale):
        path.write_text("{")
    hours_ago = time.time() - 2 * 3600
    os.utime(stale, (hours_ago, hours_ago))
    os.utime(other_stale, (hours_ago, hours_ago))
    assert cache.sweep_stale_temporaries() == 2
    assert not stale.exists() and not other_stale.exists()
    assert live.exists()  # a writer may be about to rename it
    assert cache.get("generations", key) == {"text": "kept"}
    assert cache.sweep_stale_temporaries() == 0


def _hold_lock(root: str, started: str, seconds: float) -> None:
    with Cache(root).lock("shard"):
        Path(started).write_text("locked")
        time.sleep(seconds)


def test_lock_excludes_other_processes(tmp_path: Path) -> None:
    started = tmp_path / "started"
    child = multiprocessing.get_context("spawn").Process(
        target=_hold_lock, args=(str(tmp_path), str(started), 1.5)
    )
    child.start()
    while not started.exists():
        time.sleep(0.01)
    begin = time.monotonic()
    with Cache(tmp_path).lock("shard"):
        waited = time.monotonic() - begin
    child.join()
    assert waited > 0.5
