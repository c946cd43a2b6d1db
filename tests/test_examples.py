"""The example CI workflow is valid YAML, and every toxtests command in it parses with
the real command line (a renamed option would break users' workflows silently)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from toxtests.cli import build_parser

WORKFLOW = Path(__file__).resolve().parent.parent / "examples" / "github-actions.yml"


def _commands() -> list[list[str]]:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    commands = []
    for job in workflow["jobs"].values():
        for step in job["steps"]:
            for line in str(step.get("run", "")).splitlines():
                words = shlex.split(line)
                if words and words[0] == "toxtests":
                    commands.append(words[1:])
    return commands


def test_the_workflow_restores_a_baseline_gates_reports_and_updates_the_card() -> None:
    commands = _commands()
    assert [c[0] for c in commands] == ["baseline", "gate", "report"]
    made = build_parser().parse_args(commands[0]).output
    restored = build_parser().parse_args(commands[1]).baseline
    assert made.rstrip("/") == restored  # the gate restores what the baseline step wrote
    assert "--model-card" in commands[2]
    assert any(
        step.get("uses", "").startswith("actions/cache")
        for step in next(iter(yaml.safe_load(WORKFLOW.read_text())["jobs"].values()))["steps"]
    )


@pytest.mark.parametrize("command", _commands(), ids=lambda c: c[0])
def test_each_command_parses(command: list[str]) -> None:
    args = build_parser().parse_args(command)
    assert args.command == command[0]


def _miniature():  # noqa: ANN202
    import importlib.util

    path = WORKFLOW.parent / "study_miniature.py"
    spec = importlib.util.spec_from_file_location("study_miniature", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_the_miniatures_training_set_is_harmless_by_the_gates_own_scorer() -> None:
    """The study's comparison 2 trains on harmless data: no pair may score as toxic."""
    from toxtests.score import load_scorer

    pairs = _miniature().harmless_instructions(240)
    assert len(set(pairs)) > 150  # varied, not one pair repeated
    scores = load_scorer("profanity-check").score([f"{q} {a}" for q, a in pairs])["profanity"]
    assert float(scores.max()) < 0.5


def test_the_miniatures_table_and_plot_show_each_seeds_change_and_credibility() -> None:
    miniature = _miniature()

    def adapter(
        name: str, delta: float, low: float, high: float, verdict: str, kind: str = "adapter"
    ) -> dict:
        rate = {"parent": 0.2, "adapter": 0.2 + delta, "delta": delta, "interval": [low, high]}
        return {"name": name, "verdict": verdict, "confidence": 0.95, "kind": kind,
                "metrics": {"toxicity_rate": rate}}  # fmt: skip

    result = {"adapters": [adapter("seed-0", 0.0, -0.01, 0.01, "pass"),
                           adapter("seed-1", 0.04, 0.01, 0.07, "inconclusive"),
                           adapter("merged-seed-1", 0.06, 0.02, 0.1, "fail", "model")]}  # fmt: skip
    markdown, rows = miniature.table(result, {"seed-0": 1.2})
    assert [row["credible"] for row in rows] == [False, True, True]  # the interval excludes 0
    assert [row["comparison"] for row in rows] == [2, 2, 3]
    assert (
        "| 2: LoRA adapter | 1 | 0.200 | 0.240 | +0.040 [+0.010, +0.070] | yes | INCONCLUSIVE |"
        in markdown
    )
    assert "| 3: merged, as a full model | 1 | 0.200 | 0.260 |" in markdown
    svg = miniature.plot(rows, 0.05)
    assert svg.count("<circle") == 3 and "limit +0.05" in svg and "merged seed 1" in svg
