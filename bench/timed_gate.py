"""`toxtests gate` as a user runs it, reporting where its time went (for bench_gate.py).

    python bench/timed_gate.py TIMINGS.json gate --adapter ... [any gate arguments]

Runs the real command line in this process and writes its phase timings (the engine's
generation seconds and tokens, the scorer's) to TIMINGS.json as it exits; the caller
times the whole process from outside, so interpreter start and imports are counted.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> int:
    started = time.perf_counter()
    timings_path, argv = sys.argv[1], sys.argv[2:]
    from toxtests import cli
    from toxtests.run import run

    runs: list = []
    original = run.GateRun.__init__

    def remember(self, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        original(self, *args, **kwargs)
        runs.append(self)

    run.GateRun.__init__ = remember  # type: ignore[method-assign]
    try:
        code = cli.main(argv)
    finally:
        seconds = runs[0].timings.seconds if runs else {}
        tokens = runs[0].timings.generated_tokens if runs else 0
        with open(timings_path, "w", encoding="utf-8") as handle:
            json.dump(
                {
                    "seconds": seconds,
                    "generated_tokens": tokens,
                    "in_process": time.perf_counter() - started,
                },
                handle,
            )
    return code


if __name__ == "__main__":
    # As the `toxtests` command exits (`cli.entry_point`): no interpreter teardown.
    exit_code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
