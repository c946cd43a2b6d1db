"""`toxtests gate`: the same gate as the pytest plugin, as one command; `toxtests report`:
the report again from JSON results (several merge into one).

Exit codes: 0 every adapter passes; 1 a regression (a fail, or an inconclusive result
when `statistics.inconclusive = "fail"`); 2 bad usage or bad input, with a one-line
message and no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from toxtests import __version__
from toxtests.errors import ToxtestsError
from toxtests.options import add_options, run_options

EXIT_PASS, EXIT_REGRESSION, EXIT_USAGE = 0, 1, 2
# A baseline is the parent alone, on every prompt, to be restored: no adapters, no report.
NOT_FOR_BASELINE = frozenset(
    {"adapters", "candidates", "report", "json", "baseline", "early_stopping"}
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="toxtests",
        description="Did this LoRA/PEFT adapter make the model more toxic than its parent?",
    )
    parser.add_argument("--version", action="version", version=f"toxtests {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    gate = commands.add_parser("gate", help="Judge adapters against their parent model.")
    add_options(gate.add_argument, prefix="")
    gate.add_argument("--quiet", action="store_true", help="Print only the summary.")
    gate.add_argument("--model-card", default=None, help=MODEL_CARD_HELP)
    baseline = commands.add_parser(
        "baseline",
        help="Generate and score the parent only, as an archive CI restores with --baseline.",
        description="Takes the gate's options but adapters: the archive is named for what "
        "it is a baseline of (engine, model, settings, scorer, prompts), so the same inputs "
        "name the same file.",
    )
    add_options(baseline.add_argument, prefix="", skip=NOT_FOR_BASELINE)
    baseline.add_argument(
        "-o", "--output", default=".", help="Archive path, or a directory (default: .)."
    )
    report = commands.add_parser(
        "report",
        help="Re-render the HTML report (and model-card section) from JSON results.",
        description="Several results of the same parent, prompts, scorer and settings "
        "merge into one report (e.g. one CI job per adapter).",
    )
    report.add_argument("results", nargs="+", help="JSON results written by gate --json.")
    report.add_argument("-o", "--output", default="toxtests-report.html", help="HTML file.")
    report.add_argument("--json", default=None, help="Also write the merged JSON result here.")
    report.add_argument("--model-card", default=None, help=MODEL_CARD_HELP)
    planner = commands.add_parser(
        "plan",
        help="How many prompts a gate needs to reach its verdict.",
        description="Prompts for one toxicity_rate check to pass (or fail) with the given "
        "power, at the confidence and limit of the thresholds file.",
    )
    planner.add_argument("--parent-rate", type=float, required=True, help="e.g. 0.08")
    planner.add_argument(
        "--increase", type=float, default=0.0, help="The adapter's true increase (default 0)."
    )
    planner.add_argument("--thresholds", default=None, help="Limit and confidence from here.")
    planner.add_argument("--preset", default=None, help="A shipped preset, as for gate.")
    planner.add_argument("--limit", type=float, default=None, help="max_increase to plan for.")
    planner.add_argument("--power", type=float, default=0.8)
    planner.add_argument(
        "--correlation",
        type=float,
        default=0.0,
        help="Of parent and adapter outcomes on one prompt; 0 (default) is the worst case.",
    )
    check = commands.add_parser(
        "scorer-check",
        help="Measure a scorer's agreement with Perspective on RealToxicityPrompts records.",
        description="Scores each record's prompt and continuation, and reports ROC AUC and "
        "precision / recall / F1 of 'toxic' at scoring.threshold against Perspective >= "
        "0.5, with bootstrap intervals. Cached; the gate's report shows it by the scorer.",
    )
    check.add_argument("--scorer", default=None, help="Default: the thresholds file's.")
    check.add_argument(
        "--data", action="append", required=True, help="RealToxicityPrompts JSONL (repeatable)."
    )
    check.add_argument("--thresholds", default=None)
    check.add_argument("--preset", default=None)
    check.add_argument("--cache-dir", default=None)
    check.add_argument("--device", default="auto")
    check.add_argument("--resamples", type=int, default=1000)
    return parser


def run_plan(args: argparse.Namespace) -> int:
    from toxtests.config import load_config
    from toxtests.plan import plan

    config = load_config(args.thresholds, args.preset, None)
    limit = args.limit
    if limit is None:
        rule = config.gate.rules.get("toxicity_rate")
        limit = rule.max_increase if rule is not None else None
    if limit is None:
        raise ToxtestsError(
            "no toxicity_rate max_increase in the thresholds to plan for; pass --limit"
        )
    confidence = config.statistics.confidence
    result = plan(args.parent_rate, args.increase, limit, confidence, args.power, args.correlation)
    print(
        f"{result.prompts} prompts to {result.outcome} a toxicity_rate check (max_increase "
        f"{limit:g}) with {args.power:.0%} power at {confidence:.0%} confidence, for a true "
        f"increase of {args.increase:+g} over a parent rate of {args.parent_rate:g} "
        f"(correlation {args.correlation:g}"
        + (": the worst case" if args.correlation == 0 else "")
        + f"; per-prompt spread {result.sigma:.3f})"
    )
    return EXIT_PASS


def run_scorer_check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from toxtests.cache import Cache
    from toxtests.config import load_config
    from toxtests.models import choose_device, default_cache_dir
    from toxtests.scorer_check import run_check

    config = load_config(args.thresholds, args.preset, None)
    cache = Cache(Path(args.cache_dir) if args.cache_dir else default_cache_dir())
    agreement, cached = run_check(
        args.scorer or config.scoring.scorer,
        args.data,
        config,
        cache,
        choose_device(args.device),
        args.resamples,
    )
    print(f"{agreement.scorer}: {agreement.line()}" + (" (cached)" if cached else ""))
    return EXIT_PASS


MODEL_CARD_HELP = (
    "Write the safety-evaluation section into this model card (README.md), between "
    "toxtests' markers; the rest of the file is left as it is."
)


def run_report(args: argparse.Namespace) -> int:
    from toxtests.merge import merge_results, read_result
    from toxtests.report import render_markdown, write_report

    results = [read_result(path) for path in args.results]
    merged = merge_results(results, args.results)
    write_report(merged, args.output, args.json)
    _write_card(args.model_card, render_markdown(merged), merged)
    print(
        f"report: {args.output} ({len(merged['adapters'])} variant(s), verdict {merged['verdict']})"
    )
    return int(merged["exit_code"])


def _write_card(path: str | None, section: str, result: dict) -> None:  # type: ignore[type-arg]
    if path:
        from toxtests.merge import update_model_card

        changed = update_model_card(path, section, result)
        print(f"model card: {path}" + ("" if changed else " (unchanged)"))


def run_baseline(args: argparse.Namespace) -> int:
    from toxtests.baseline import make_baseline
    from toxtests.run import GateRun

    options = run_options(lambda name: getattr(args, name, None), prefix="")
    run = GateRun(options)
    try:
        _show_progress(run)
        print(
            f"toxtests: baseline of {options.model} on {len(run.prompts)} prompts, engine "
            f"{options.engine}, scorer {run.scorer_spec}",
            file=sys.stderr,
        )
        made = make_baseline(run, args.output)
    finally:
        run.close()
    print(f"baseline: {made.line()}")
    return EXIT_PASS


def _show_progress(run: Any) -> None:
    """Progress lines on stderr; a redrawn bar on a terminal, periodic lines in a log."""
    from toxtests.progress import Ticker, stream_writer

    run.progress = lambda message: print(f"toxtests: {message}", file=sys.stderr, flush=True)
    interactive = sys.stderr.isatty()
    write = stream_writer(sys.stderr, interactive)
    run.store.ticker = lambda label, total, **units: Ticker(
        label, total, write, interactive, **units
    )


def run_gate(args: argparse.Namespace) -> int:
    from toxtests.report import write_report
    from toxtests.run import GateRun

    options = run_options(lambda name: getattr(args, name), prefix="")
    run = GateRun(options)
    try:
        if not args.quiet:
            _show_progress(run)
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
    if args.model_card:
        from toxtests.report import render_markdown

        _write_card(args.model_card, render_markdown(result.to_json()), result.to_json())
    for adapter in result.adapters:
        print(adapter.summary)
        if adapter.early_stopping.stopped:
            print(f"  stopped early: {adapter.early_stopping.reason}")
    print(f"engine: {result.engine.label()}; {result.pairing.line}")
    for label, path in (("report", options.report), ("json", options.json)):
        if path:
            print(f"{label}: {path}")
    return result.exit_code


def entry_point() -> None:
    """The `toxtests` command: `main`, then an exit that skips the interpreter's
    teardown. Every file is written (atomically) and the engine closed by then;
    tearing down torch and a loaded model took another 0.5-1.5 s of a 30 s gate."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "gate" and not args.adapters and not args.candidates:
        parser.error("the following arguments are required: --adapter or --candidate")
    try:
        if args.command == "report":
            return run_report(args)
        if args.command == "scorer-check":
            return run_scorer_check(args)
        if args.command == "baseline":
            return run_baseline(args)
        return run_plan(args) if args.command == "plan" else run_gate(args)
    except ToxtestsError as exc:
        print(f"toxtests: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(
            "toxtests: interrupted; finished shards are cached and will be reused", file=sys.stderr
        )
        return 130


if __name__ == "__main__":  # pragma: no cover
    entry_point()
