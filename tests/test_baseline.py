"""`toxtests baseline` and `--baseline`: the parent made once, restored by a CI job that
then generates only the adapter, and refused when it was made for another run."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from toxtests.cli import main


def _common(tiny, cache: Path) -> list[str]:  # noqa: ANN001
    return [
        "--model", str(tiny.base), "--prompts", str(tiny.prompts),
        "--thresholds", str(tiny.thresholds), "--cache-dir", str(cache),
    ]  # fmt: skip


def _baseline(tiny, tmp_path: Path, *extra: str, out: Path | None = None) -> Path:  # noqa: ANN001
    out = out or tmp_path / "baselines"
    out.mkdir(exist_ok=True)
    assert main(["baseline", *_common(tiny, tmp_path / "made"), "-o", f"{out}/", *extra]) == 0
    (archive,) = sorted(out.glob("toxtests-baseline-*.tar.gz"))
    return archive


def _gate(tiny, tmp_path: Path, name: str, *extra: str) -> int:  # noqa: ANN001
    args = ["gate", *_common(tiny, tmp_path / f"{name}-cache"), "--adapter", str(tiny.toxic)]
    args += ["--no-early-stopping", "--report", str(tmp_path / f"{name}.html")]
    return main([*args, "--json", str(tmp_path / f"{name}.json"), *extra])


def _numbers(path: Path) -> list:
    result = json.loads(path.read_text())
    return [(a["verdict"], a["metrics"], a["distributions"]) for a in result["adapters"]]


def test_a_restored_baseline_spares_the_parent_and_changes_no_number(
    tiny,
    tmp_path: Path,
    capsys,  # noqa: ANN001
) -> None:
    archive = _baseline(tiny, tmp_path)
    made = capsys.readouterr()
    assert "generating parent" in made.err and f"baseline: {archive}" in made.out
    # The same inputs name the same file, byte for byte: a CI cache key.
    again = _baseline(tiny, tmp_path, out=tmp_path / "again")
    assert again.name == archive.name and again.read_bytes() == archive.read_bytes()
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
    assert manifest["identity"]["prompts"]["count"] == 40
    assert manifest["model_spec"] == str(tiny.base)
    assert sum(n.startswith("generations/") for n in names) == 40  # every prompt
    assert sum(n.startswith("scores/") for n in names) == 40
    capsys.readouterr()

    # A fresh cache (a CI job): the parent comes from the archive, only the adapter runs.
    assert _gate(tiny, tmp_path, "restored", "--baseline", str(archive.parent)) == 1
    err = capsys.readouterr().err
    assert "baseline restored from" in err
    assert "generating parent" not in err and "generating toxic" in err
    assert _gate(tiny, tmp_path, "plain") == 1
    assert _numbers(tmp_path / "restored.json") == _numbers(tmp_path / "plain.json")


@pytest.mark.parametrize(
    ("baseline_args", "gate_args", "named"),
    [
        (("--limit", "20"), ("--limit", "30"), "prompts.count: archive 20, this run 30"),
        ((), ("--max-new-tokens", "5"), "generation.max_new_tokens: archive 6, this run 5"),
        ((), ("--samples", "2"), "generation.samples: archive 1, this run 2"),
    ],
)
def test_a_baseline_made_for_another_run_is_refused_naming_what_differs(
    tiny,
    tmp_path: Path,
    capsys,  # noqa: ANN001
    baseline_args: tuple[str, ...],
    gate_args: tuple[str, ...],
    named: str,
) -> None:
    archive = _baseline(tiny, tmp_path, *baseline_args)
    capsys.readouterr()
    assert _gate(tiny, tmp_path, "other", "--baseline", str(archive), *gate_args) == 2
    err = capsys.readouterr().err
    assert f"--baseline {archive}: made for another run" in err and named in err
    assert "toxtests baseline" in err  # the hint: how to make the right one
    assert "generating" not in err  # refused before anything is generated


def test_a_damaged_or_foreign_archive_is_refused(tiny, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    archive = _baseline(tiny, tmp_path)
    # A truncated download.
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    assert _gate(tiny, tmp_path, "t", "--baseline", str(truncated)) == 2
    assert "not a toxtests baseline archive" in capsys.readouterr().err
    # An entry edited inside an otherwise well-formed archive.
    edited = tmp_path / "edited.tar.gz"
    with tarfile.open(archive) as source, tarfile.open(edited, "w:gz") as target:
        changed = False
        for info in source.getmembers():
            data = source.extractfile(info).read()  # type: ignore[union-attr]
            if info.name.startswith("scores/") and not changed:
                entry = json.loads(data)  # a score lowered, its checksum left as it was
                entry["payload"] = entry["payload"].replace("0.", "0.0", 1)
                data, changed = json.dumps(entry).encode(), True
            info.size = len(data)
            target.addfile(info, io.BytesIO(data))
    assert _gate(tiny, tmp_path, "e", "--baseline", str(edited)) == 2
    assert "is missing or damaged (checksum)" in capsys.readouterr().err
    # A directory without one.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _gate(tiny, tmp_path, "d", "--baseline", str(empty)) == 2
    assert "holds no toxtests-baseline-" in capsys.readouterr().err


def test_the_plugin_restores_a_baseline_under_xdist(pytester: pytest.Pytester, tiny) -> None:  # noqa: ANN001
    """Every xdist worker restores it (idempotently) before its first cache read, so
    only the adapter's shards are generated: half the generation locks of a run without."""
    archive = _baseline(tiny, pytester.path)

    def run(cache: str, *extra: str) -> dict:
        args = [
            "--tox-model", str(tiny.base), "--tox-prompts", str(tiny.prompts),
            "--tox-thresholds", str(tiny.thresholds), "--tox-cache-dir", str(pytester.path / cache),
            "--tox-adapter", str(tiny.identity), "--tox-json", str(pytester.path / f"{cache}.json"),
            "-p", "no:randomly", "-n", "2", *extra,
        ]  # fmt: skip
        assert pytester.runpytest_subprocess(*args).ret == 0
        return json.loads((pytester.path / f"{cache}.json").read_text())

    restored = run("restored", "--tox-baseline", str(archive))
    plain = run("plain")
    assert _numbers_of(restored) == _numbers_of(plain)
    locks = {
        c: len(list((pytester.path / c / "locks").glob("*.lock"))) for c in ("restored", "plain")
    }
    assert locks["plain"] == 2 * locks["restored"] > 0, locks


def _numbers_of(result: dict) -> list:
    return [(a["verdict"], a["metrics"]) for a in result["adapters"]]
