"""Interrupted, damaged and concurrent runs: the cache makes them all end where a clean run ends.

Every run is the real `python -m toxtests.cli gate` in a subprocess on the tiny model,
killed with SIGKILL (no handler runs, as when CI cancels a job or a laptop dies), with
400 prompts in shards of 20 so that the run spends seconds between its first cache entry
and its end. Each result is compared with that of one uninterrupted run in a fresh cache.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
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
GENERATING = re.compile(r"^toxtests: generating (\S+) on (\S+) \((\d+) prompts\)$", re.M)


@dataclass
class Workload:
    command: list[str]
    root: Path

    def gate(self, cache: Path, name: str) -> list[str]:
        outputs = ["--report", str(self.root / f"{name}.html"),
                   "--json", str(self.root / f"{name}.json")]
        return [*self.command, "--cache-dir", str(cache), *outputs]

    def result(self, name: str) -> dict[str, Any]:
        """The JSON result, without the time it was made (also quoted in the model card)."""
        result = json.loads((self.root / f"{name}.json").read_text(encoding="utf-8"))
        created = result.pop("created")
        result["model_card"] = result["model_card"].replace(created, "<created>")
        return result


class Reference:
    """The uninterrupted run, started at once and awaited only when a test needs it."""

    def __init__(self, workload: Workload) -> None:
        self.workload = workload
        self.cache = workload.root / "reference-cache"
        self.process = subprocess.Popen(
            workload.gate(self.cache, "reference"), env=ENV, cwd=workload.root,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self._result: dict[str, Any] | None = None

    def result(self) -> dict[str, Any]:
        if self._result is None:
            _, err = self.process.communicate(timeout=RUN_TIMEOUT)
            assert self.process.returncode == 0, err[-3000:]
            self._result = self.workload.result("reference")
        return self._result


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
    command = [sys.executable, "-m", "toxtests.cli", "gate", "--model", str(tiny.base),
               "--adapter", str(tiny.identity), "--prompts", str(prompts),
               "--thresholds", str(thresholds)]
    return Workload(command, root)


@pytest.fixture(scope="module")
def reference(workload: Workload) -> Any:
    ref = Reference(workload)
    yield ref
    if ref.process.poll() is None:
        ref.process.kill()
        ref.process.wait()


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


def run(workload: Workload, cache: Path, name: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(workload.gate(cache, name), env=ENV, cwd=workload.root,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_killed_run_resumes_without_redoing_finished_work(
    workload: Workload, reference: Reference, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    process = subprocess.Popen(workload.gate(cache, "killed"), env=ENV, cwd=workload.root,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not any((cache / "generations").glob("*/*.json")):
            assert process.poll() is None, "the gate ended before writing a generation"
            assert time.monotonic() < deadline, "no generation was cached in time"
            time.sleep(0.01)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the gate finished before it was killed"

    before = entries(cache)
    generations_before = sum(1 for path in before if path.parent.parent.name == "generations")
    assert 0 < generations_before < ENTRIES
    verify(cache)  # SIGKILL leaves whole entries or none: the writes are atomic

    resumed = run(workload, cache, "resumed")
    after = entries(cache)
    changed = [path for path, stamp in before.items() if after.get(path) != stamp]
    assert changed == [], "finished entries were rewritten"
    assert generated_prompts(resumed.stderr) == ENTRIES - generations_before
    assert len(after) == 2 * ENTRIES
    assert workload.result("resumed") == reference.result()


def test_truncated_entry_is_reported_once_and_regenerated(
    workload: Workload, reference: Reference, tmp_path: Path
) -> None:
    reference.result()
    cache = tmp_path / "cache"
    shutil.copytree(reference.cache, cache)
    victim = sorted((cache / "generations").glob("*/*.json"))[len(entries(cache)) // 7]
    whole = victim.read_bytes()
    victim.write_bytes(whole[: len(whole) // 2])

    done = run(workload, cache, "truncated")
    corrupt = [line for line in done.stderr.splitlines() if "corrupt" in line]
    assert len(corrupt) == 1, done.stderr[-3000:]
    assert str(victim) in corrupt[0]
    assert generated_prompts(done.stderr) == 1
    assert victim.read_bytes() == whole  # regenerated alone, the same text as in its batch
    verify(cache)
    assert workload.result("truncated") == reference.result()


def test_two_gates_on_one_cache_share_the_work(
    workload: Workload, reference: Reference, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    gates = [
        subprocess.Popen(workload.gate(cache, f"twin-{i}"), env=ENV, cwd=workload.root,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for i in (0, 1)
    ]
    stderr = [gate.communicate(timeout=RUN_TIMEOUT)[1] for gate in gates]
    assert [gate.returncode for gate in gates] == [0, 0], [err[-2000:] for err in stderr]

    assert workload.result("twin-0") == workload.result("twin-1") == reference.result()
    # The shard lock: every prompt generated once, by one of the two.
    assert generated_prompts(stderr[0]) + generated_prompts(stderr[1]) == ENTRIES
    found = entries(cache)
    assert len(found) == 2 * ENTRIES
    assert [p for p in cache.rglob("*") if p.is_file() and p.suffix != ".lock"
            and p not in found] == []  # no temporary or stray files
    verify(cache)
