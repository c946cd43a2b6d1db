"""`toxtests gate`: the same gate as the pytest plugin, as one command.

Exit codes: 0 every adapter passes; 1 a regression (a fail, or an inconclusive result
when `statistics.inconclusive = "fail"`); 2 bad usage or bad input, with a one-line
message and no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from toxtests.errors import ToxtestsError
from toxtests.options import add_options, run_options

EXIT_PASS, EXIT_REGRESSION, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="toxtests",
        description="Did this LoRA/PEFT adapter make the model more toxic than its parent?",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    gate = commands.add_parser("gate", help="Judge adapters against their parent model.")
    add_options(gate.add_argument, prefix="")
    gate.add_argument("--quiet", action="store_true", help="Print only the summary.")
    return parser


def run_gate(args: argparse.Namespace) -> int:
    from toxtests.report import write_report
    from toxtests.run import GateRun

    options = run_options(lambda name: getattr(args, name), prefix="")
    run = GateRun(options)
    try:
        if not args.quiet:
            run.progress = lambda message: print(
                f"toxtests: {message}", file=sys.stderr, flush=True
            )
            print(
                f"toxtests: {len(run.prompts)} prompts in {len(run.shards)} shards, "
                f"{len(options.adapters)} adapter(s), {len(options.candidates)} candidate "
                f"model(s), engine {options.engine}, "
                f"scorer {run.scorer_spec}",
                file=sys.stderr,
            )
        result = run.result()
    finally:
        run.close()
    write_report(result.to_json(), options.report, options.json)
    for adapter in result.adapters:
        print(adapter.summary)
        if adapter.early_stopping.stopped:
            print(f"  stopped early: {adapter.early_stopping.reason}")
    print(f"engine: {result.engine.label()}; {result.pairing.line}")
    for label, path in (("report", options.report), ("json", options.json)):
        if path:
            print(f"{label}: {path}")
    return result.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.adapters and not args.candidates:
        parser.error("the following arguments are required: --adapter or --candidate")
    try:
        return run_gate(args)
    except ToxtestsError as exc:
        print(f"toxtests: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(
            "toxtests: interrupted; finished shards are cached and will be reused", file=sys.stderr
        )
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
