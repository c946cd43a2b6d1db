"""The built wheel works outside the repository: its data, templates, presets, kernel
sources and demo adapters are inside it, and nothing reaches back into the source tree."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_the_wheel_gates_from_another_directory(tmp_path: Path, tiny) -> None:  # noqa: ANN001
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "-q", "-w", str(wheels), str(REPO)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    (wheel,) = wheels.glob("toxtests-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    )  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
         str(wheel)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    # The dependencies from this environment, after the wheel: a path a .pth file adds is
    # not a site directory, so the editable install's own .pth hook there never runs.
    (site / "zz-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = (
        "import toxtests, pathlib\n"
        "from toxtests.options import demo_adapter\n"
        "from toxtests.config import load_config\n"
        "from toxtests.engines.torch import native, native_attention\n"
        "root = pathlib.Path(toxtests.__file__).parent\n"
        "assert 'site-packages' in str(root), root\n"
        "toxic = pathlib.Path(demo_adapter('demo:toxic'))\n"
        "assert (toxic / 'adapter_model.safetensors').is_file()\n"
        "assert native.SOURCE.is_file() and native_attention.SOURCE.is_file()\n"
        "assert load_config(None, 'rtp', None).generation.samples == 25\n"
        "print(root)\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [str(python), "-c", probe], cwd=elsewhere, capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    assert str(REPO) not in done.stdout
    # The gate itself, on the demo prompts the wheel carries (the default --prompts).
    gate = [
        str(python), "-m", "toxtests.cli", "gate", "--model", str(tiny.base),
        "--adapter", str(tiny.identity), "--thresholds", str(tiny.thresholds),
        "--cache-dir", str(tmp_path / "cache"), "--json", "out.json", "--report", "out.html",
    ]  # fmt: skip
    done = subprocess.run(gate, cwd=elsewhere, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((elsewhere / "out.json").read_text())
    assert result["prompts"]["source"].endswith("data/demo.jsonl")
    assert "site-packages" in result["prompts"]["source"]
    assert (elsewhere / "out.html").read_text().startswith("<!DOCTYPE html>")
