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

EXIT_PASS, EXIT_REGRESSION, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="toxtests",
        description="Did this LoRA/PEFT adapter make the model more toxic than its parent?",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    gate = commands.add_parser("gate", help="Judge adapters against their parent model.")
    gate.add_argument(
        "--model",
        default="gemma3-270m",
        help="Base model: gemma3-270m (embedded, default), smollm2-135m, a .gguf "
        "file, a transformers directory or a Hub id.",
    )
    gate.add_argument(
        "--adapter",
        action="append",
        required=True,
        default=None,
        help="PEFT adapter directory or Hub id (repeatable).",
    )
    gate.add_argument(
        "--prompts",
        default=None,
        help="JSONL (RealToxicityPrompts or id/text), text file, or rtp:challenging. "
        "Default: the demo prompts in fixtures/.",
    )
    gate.add_argument(
        "--scorer",
        default=None,
        help="profanity-check, detoxify:<variant|path.ckpt>, hf:<id or path> "
        "(default: thresholds.toml's, else profanity-check).",
    )
    gate.add_argument(
        "--thresholds", default=None, help="thresholds.toml (default: built-in limits)."
    )
    gate.add_argument(
        "--report", default="toxtests-report.html", help="HTML report path ('' for none)."
    )
    gate.add_argument(
        "--json", default="toxtests-results.json", help="JSON results path ('' for none)."
    )
    gate.add_argument(
        "--limit",
        type=int,
        default=0,
        help="Deterministic stratified subset of N prompts (default 0: all).",
    )
    gate.add_argument(
        "--cache-dir", default=None, help="Cache directory (default ~/.cache/toxtests)."
    )
    gate.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: auto).")
    gate.add_argument(
        "--allow-pickle",
        action="store_true",
        help="Load pickle checkpoints whose hash is not a known official one.",
    )
    gate.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="Let model repositories run their own code.",
    )
    gate.add_argument(
        "--no-early-stopping",
        action="store_true",
        help="Generate every prompt even once the verdict is settled.",
    )
    gate.add_argument("--quiet", action="store_true", help="Print only the summary.")
    return parser


def run_gate(args: argparse.Namespace) -> int:
    from toxtests.report import write_report
    from toxtests.session import GateSession, RunOptions

    if args.limit < 0:
        raise ToxtestsError(f"--limit must be >= 0, got {args.limit}")
    options = RunOptions(
        model=args.model,
        adapters=args.adapter,
        prompts=args.prompts,
        scorer=args.scorer,
        thresholds=args.thresholds,
        report=args.report or None,
        json=args.json or None,
        limit=args.limit,
        cache_dir=args.cache_dir,
        device=args.device,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
        early_stopping=False if args.no_early_stopping else None,
    )
    session = GateSession(options)
    if not args.quiet:
        session.progress = lambda message: print(
            f"toxtests: {message}", file=sys.stderr, flush=True
        )
        print(
            f"toxtests: {len(session.prompts)} prompts in {len(session.shards)} shards, "
            f"{len(options.adapters)} adapter(s), scorer {session.scorer_spec}",
            file=sys.stderr,
        )
    result = session.result()
    write_report(result, options.report, options.json)
    for adapter in result["adapters"]:
        print(adapter["summary"])
        stopping = adapter["early_stopping"]
        if stopping["stopped"]:
            print(f"  stopped early: {stopping['reason']}")
    for label, path in (("report", options.report), ("json", options.json)):
        if path:
            print(f"{label}: {path}")
    return int(result["exit_code"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
