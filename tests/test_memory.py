"""Freed memory kept for reuse while generating, and handed back afterwards."""

from __future__ import annotations

import resource
import subprocess
import sys
import textwrap

import pytest
import torch

from toxtests.engines.torch.memory import retained_memory

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc's allocator only; elsewhere a no-op"
)


def _resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def test_big_blocks_are_reused_inside() -> None:
    # In a fresh process: an engine another test left open keeps the heap retained for
    # the whole worker, and the "outside" figure would then be 0.
    script = textwrap.dedent(
        """
        import resource, torch
        from toxtests.engines.torch.memory import retained_memory

        def faults(repeats=6):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(repeats):
                block = torch.empty(16 << 20, dtype=torch.float32)
                block.fill_(1.0)
                del block
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

        faults(1)  # warm up
        outside = faults()
        with retained_memory() as tuned:
            assert tuned
            faults(12)  # glibc first grows the heap in pieces; the steady state counts
            inside = faults()
        print(outside, inside)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    outside, inside = map(int, done.stdout.split())
    # Outside, every allocation is a fresh mapping faulted in page by page (16k pages
    # of 4 KiB each); inside, the freed block is taken again from the heap.
    assert outside > 4 * 16384
    assert inside * 4 < outside


def test_memory_is_handed_back_on_the_way_out() -> None:
    with retained_memory():
        block = torch.empty(64 << 20, dtype=torch.float32)  # 256 MiB
        block.fill_(1.0)
        del block
        kept = _resident_mib()
    released = _resident_mib()
    assert kept - released > 200


def test_nested_use_keeps_the_outer_setting() -> None:
    with retained_memory():
        with retained_memory():
            pass
        block = torch.empty(64 << 20, dtype=torch.float32)
        block.fill_(1.0)
        del block
        kept = _resident_mib()
        assert kept - _resident_mib() < 50  # still retained after the inner exit
    assert kept - _resident_mib() > 200


def test_blocks_larger_than_the_top_pad_are_kept_too() -> None:
    """mallopt takes a C int: a trim threshold that wraps to 0 through ctypes would hand
    everything above the 256 MiB top pad back at the first free."""
    with retained_memory():
        block = torch.empty(160 << 20, dtype=torch.float32)  # 640 MiB
        block.fill_(1.0)
        before_free = _resident_mib()
        del block
        after_free = _resident_mib()
    assert before_free - after_free < 100  # still in the heap, ready for the next step


@pytest.mark.parametrize("early_stopping", [True, False])
def test_a_gate_keeps_one_heap_across_its_generation_calls(
    tiny, tmp_path, monkeypatch: pytest.MonkeyPatch, early_stopping: bool
) -> None:  # noqa: ANN001
    """Every generation call of the torch engine (parent and adapter together, then a
    second adapter; shard after shard) runs inside the engine's `retained_memory`, so
    none faults its memory in afresh."""
    from toxtests.engines.torch import memory
    from toxtests.engines.torch.loop import Generator
    from toxtests.options import RunOptions
    from toxtests.run import GateRun

    depths: list[int] = []  # a spy: the allocator state each generation call finds
    real_generate = Generator._generate_jobs  # behind generate and generate_together
    monkeypatch.setattr(
        Generator,
        "_generate_jobs",
        lambda self, *a, **k: depths.append(memory._depth) or real_generate(self, *a, **k),
    )
    session = GateRun(
        RunOptions(
            model=str(tiny.base),
            adapters=[str(tiny.toxic), str(tiny.identity)],
            prompts=str(tiny.prompts),
            thresholds=str(tiny.thresholds),
            cache_dir=str(tmp_path / "cache"),
            early_stopping=early_stopping,
        )
    )
    session.adapter_result(0)
    session.adapter_result(1)
    assert len(depths) >= 2 and all(depth >= 1 for depth in depths)
    session.close()
    assert memory._depth == 0  # handed back when the engine closes
