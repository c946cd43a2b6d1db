"""Interrupted, damaged and concurrent runs: the cache makes them all end where a clean run ends.

Every run is the real `python -m toxtests.cli gate` in a subprocess on the tiny model,
killed with SIGKILL (no handler runs, as when CI cancels a job or a laptop dies), with
400 prompts in shards of 20 so that the run spends seconds between its first cache entry
and its end. Each result is compared with that of an uninterrupted run in a fresh cache.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helpers_models
import pytest

from toxtests.cache import Cache

PROMPTS = 400
ENTRIES = 2 * PROMPTS  # parent and one adapter, one sample each
RUN_TIMEOUT = 180
# One thread a process: two gates side by side on a small CI machine stay fast, and the
# reference and the runs compared with it compute alike.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
ENV.pop("PYTHONWARNINGS", None)
GENERATING = re.compile(r"^toxtests: generating (\S+) on (.+?) \((\d+) prompts\)$", re.M)


@dataclass
class Workload:
    """The gate command on the tiny model, 400 prompts, shards of 20."""

    command: list[str]
    started: list[subprocess.Popen[str]] = field(default_factory=list)

    def start(self, cache: Path, results: Path, **popen: Any) -> subprocess.Popen[str]:
        command = [*self.command, "--cache-dir", str(cache), "--report", "", "--json", str(results)]
        process = subprocess.Popen(
            command,
            env=ENV,
            cwd=results.parent,
            text=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            **popen,
        )
        self.started.append(process)
        return process

    def run(self, cache: Path, results: Path) -> str:
        """Run to completion; its stderr."""
        return finish(self.start(cache, results))


def finish(process: subprocess.Popen[str]) -> str:
    _, stderr = process.communicate(timeout=RUN_TIMEOUT)
    assert process.returncode == 0, stderr[-3000:]
    return stderr


def result(path: Path) -> dict[str, Any]:
    """A JSON result without the time it was made (also quoted in the model card)."""
    loaded = json.loads(path.read_text(encoding="utf-8"))
    created = loaded.pop("created")
    loaded["model_card"] = loaded["model_card"].replace(created, "<created>")
    return loaded


@pytest.fixture(scope="module")
def workload(tiny, tmp_path_factory: pytest.TempPathFactory) -> Workload:  # noqa: ANN001
    root = tmp_path_factory.mktemp("resume")
    prompts = helpers_models.write_prompts(root / "prompts.jsonl", count=PROMPTS)
    thresholds = root / "thresholds.toml"
    # Every shard generated (no early stop), few resamples: the statistics are not under
    # test here, only that they come out equal.
    thresholds.write_text(
        tiny.thresholds.read_text()
        + "\n[shards]\nsize = 20\n\n[statistics]\nresamples = 200\nearly_stopping = false\n"
    )
    return Workload(
        [
            sys.executable,
            "-m",
            "toxtests.cli",
            "gate",
            "--model",
            str(tiny.base),
            "--adapter",
            str(tiny.identity),
            "--prompts",
            str(prompts),
            "--thresholds",
            str(thresholds),
        ]
    )


@pytest.fixture(autouse=True)
def _no_gate_outlives_its_test(workload: Workload) -> Iterator[None]:
    yield
    while workload.started:
        process = workload.started.pop()
        if process.poll() is None:
            process.kill()
            process.communicate()


def entries(cache: Path) -> dict[Path, tuple[int, bytes]]:
    """Every cache entry (not temporary files, not locks) with its mtime and bytes."""
    return {
        path: (path.stat().st_mtime_ns, path.read_bytes())
        for kind in ("generations", "scores")
        for path in sorted((cache / kind).glob("*/*.json"))
    }


def verify(cache: Path) -> None:
    """Each entry lies where its key says and passes Cache.get's checksum."""
    store = Cache(cache)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a corrupt entry would warn
        for path in entries(cache):
            kind, key = path.parent.parent.name, path.stem
            assert store.path(kind, key) == path
            assert store.get(kind, key) is not None, path


def generated_prompts(stderr: str) -> int:
    return sum(int(count) for _, _, count in GENERATING.findall(stderr))


def test_killed_run_resumes_without_redoing_finished_work(
    workload: Workload, tmp_path: Path
) -> None:
    # The uninterrupted run, in a cache of its own, alongside.
    reference = workload.start(tmp_path / "reference-cache", tmp_path / "reference.json")
    cache = tmp_path / "cache"
    process = workload.start(cache, tmp_path / "killed.json", start_new_session=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not any((cache / "generations").glob("*/*.json")):
            assert process.poll() is None, "the gate ended before writing a generation"
            assert time.monotonic() < deadline, "no generation was cached in time"
            time.sleep(0.01)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the gate finished before it was killed"

    before = entries(cache)
    generations_before = sum(1 for path in before if path.parent.parent.name == "generations")
    assert 0 < generations_before < ENTRIES
    verify(cache)  # SIGKILL leaves whole entries or none: the writes are atomic
    # What a kill between writing and renaming leaves, as if from a run hours ago:
    # the next run sweeps it.
    stale = cache / "generations" / "00" / ".planted.json.x1y2.tmp"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text('{"sha256": "')
    hours_ago = time.time() - 2 * 3600
    os.utime(stale, (hours_ago, hours_ago))

    stderr = workload.run(cache, tmp_path / "resumed.json")
    assert not stale.exists()
    after = entries(cache)
    changed = [path for path, stamp in before.items() if after.get(path) != stamp]
    assert changed == [], "finished entries were rewritten"
    assert generated_prompts(stderr) == ENTRIES - generations_before
    assert len(after) == 2 * ENTRIES
    finish(reference)
    assert result(tmp_path / "resumed.json") == result(tmp_path / "reference.json")


def test_truncated_entry_is_reported_once_and_regenerated(
    workload: Workload, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    workload.run(cache, tmp_path / "clean.json")
    victim = sorted((cache / "generations").glob("*/*.json"))[PROMPTS // 3]
    whole = victim.read_bytes()
    victim.write_bytes(whole[: len(whole) // 2])
    others = {path: stamp for path, stamp in entries(cache).items() if path != victim}

    stderr = workload.run(cache, tmp_path / "repaired.json")
    assert {path: stamp for path, stamp in entries(cache).items() if path != victim} == others
    corrupt = [line for line in stderr.splitlines() if "corrupt" in line]
    assert len(corrupt) == 1, stderr[-3000:]
    assert str(victim) in corrupt[0]
    assert generated_prompts(stderr) == 1
    assert victim.read_bytes() == whole  # regenerated alone, the same text as in its batch
    verify(cache)
    assert result(tmp_path / "repaired.json") == result(tmp_path / "clean.json")


def test_two_gates_on_one_cache_share_the_work(workload: Workload, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    twins = [workload.start(cache, tmp_path / f"twin-{i}.json") for i in (0, 1)]
    stderr = [finish(twin) for twin in twins]

    assert result(tmp_path / "twin-0.json") == result(tmp_path / "twin-1.json")
    # The shard lock: every prompt generated once, by one of the two.
    assert generated_prompts(stderr[0]) + generated_prompts(stderr[1]) == ENTRIES
    found = entries(cache)
    assert len(found) == 2 * ENTRIES
    strays = [p for p in cache.rglob("*") if p.is_file() and p.suffix != ".lock"]
    assert sorted(set(strays) - set(found)) == []  # no temporary or torn files left
    verify(cache)
