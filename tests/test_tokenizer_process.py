"""The torch engine's tokenizer in a child process: the same answers as in process, its
errors as model-load errors, and a child that ends with it."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from toxtests.engines.torch import load as load_module
from toxtests.engines.torch.load import load_base
from toxtests.engines.torch.tokenizer_process import TokenizerProcess, TokenizerProcessError
from toxtests.errors import ModelLoadError


@pytest.fixture(autouse=True)
def _every_tokenizer_in_a_child(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only large tokenizers go to a child by default; the tiny one here must too."""
    monkeypatch.setattr(load_module, "CHILD_TOKENIZER_BYTES", 0)


TEXTS = [
    "the weather",
    "she said that they would go home after the river",
    "",
    "  spaces   and\ttabs\n",
    "Ärger über 🙂 and ﬁ ligatures",
    "idiot idiot idiot",
]


def _gone(pid: int, within: float = 10.0) -> bool:
    """Whether process `pid` has exited (a zombie left to its reaper counts as exited)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        status = Path(f"/proc/{pid}/status")
        try:
            if "State:\tZ" in status.read_text():
                return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


def test_the_tokenizer_answers_from_its_own_process_as_it_would_here(tiny, tmp_path) -> None:  # noqa: ANN001
    from transformers import AutoTokenizer

    loaded = load_base(str(tiny.base), cache_dir=tmp_path, device="cpu")
    remote = loaded.tokenizer
    assert isinstance(remote, TokenizerProcess) and remote.pid != os.getpid()
    remote.wait_loaded()
    if Path(f"/proc/{remote.pid}/maps").exists():
        # The point of the child: it loads the tokenizer without torch or the model's code.
        assert "libtorch" not in Path(f"/proc/{remote.pid}/maps").read_text()
    local = AutoTokenizer.from_pretrained(str(tiny.base))
    for text in TEXTS:
        ids = local(text)["input_ids"]
        assert remote(text)["input_ids"] == ids
        assert remote.decode(ids, skip_special_tokens=True) == local.decode(
            ids, skip_special_tokens=True
        )
    batch = remote(TEXTS[:2], return_tensors="pt", padding=True)
    assert isinstance(batch["input_ids"], torch.Tensor)
    # As the engine sets it up: left padding, a pad token.
    assert remote.padding_side == "left" and remote.pad_token_id is not None
    assert remote.eos_token_id == local.eos_token_id
    assert remote.get_vocab() == local.get_vocab() and len(remote) == len(local)
    with pytest.raises(TokenizerProcessError):
        remote.decode("not token ids", not_an_option=True)


def test_the_child_ends_with_its_tokenizer(tiny, tmp_path) -> None:  # noqa: ANN001
    loaded = load_base(str(tiny.base), cache_dir=tmp_path, device="cpu")
    pid = loaded.tokenizer.pid
    assert loaded.tokenizer.decode([1, 2]) is not None  # a remembered remote method
    os.kill(pid, 0)  # alive while the model is
    del loaded
    gc.collect()
    assert _gone(pid)


def test_a_tokenizer_that_cannot_load_is_a_model_load_error(tiny, tmp_path) -> None:  # noqa: ANN001
    broken = tmp_path / "broken"
    shutil.copytree(tiny.base, broken)
    (broken / "tokenizer.json").write_text("{ this is not a tokenizer")
    with pytest.raises(ModelLoadError, match=r"broken: cannot load model \(.+\)"):
        load_base(str(broken), cache_dir=tmp_path, device="cpu")


def test_a_killed_gate_leaves_no_tokenizer_process_behind(tiny) -> None:  # noqa: ANN001
    """The child reads its requests from the parent's pipe: a parent killed outright
    (no finalizer runs) closes it, and the child ends instead of lingering."""
    code = (
        "import sys, time\n"
        "from toxtests.engines.torch.tokenizer_process import TokenizerProcess\n"
        f"tokenizer = TokenizerProcess({str(tiny.base)!r}, {{'local_files_only': True}})\n"
        "tokenizer.wait_loaded()\n"
        "print(tokenizer.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        os.kill(child, 0)
    finally:
        parent.kill()
        parent.wait()
    assert _gone(child)


def test_a_child_that_cannot_run_leaves_the_tokenizer_to_this_process(
    tiny,
    tmp_path,
    monkeypatch,
    capsys,  # noqa: ANN001
) -> None:
    """An interpreter that cannot run the child (here one that exits at once) costs the
    start-up overlap, not the gate: the tokenizer loads here, with a line saying so."""
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\nexit 3\n")
    broken.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(broken))
    loaded = load_base(str(tiny.base), cache_dir=tmp_path, device="cpu")
    assert not isinstance(loaded.tokenizer, TokenizerProcess)
    assert loaded.tokenizer.padding_side == "left" and loaded.tokenizer.pad_token_id is not None
    assert "loading the tokenizer in this process instead" in capsys.readouterr().err


def test_a_small_tokenizer_loads_here(tiny, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """Starting a child costs more than a small tokenizer takes to load."""
    monkeypatch.setattr(load_module, "CHILD_TOKENIZER_BYTES", 8 << 20)
    loaded = load_base(str(tiny.base), cache_dir=tmp_path, device="cpu")
    assert not isinstance(loaded.tokenizer, TokenizerProcess)
    assert loaded.tokenizer.padding_side == "left"
