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
