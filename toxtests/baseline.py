"""The parent's generations and scores as one archive a CI job restores (`toxtests
baseline`, then `gate --baseline`), so CI generates only the adapter.

The archive holds the cache entries themselves (each with its checksum) and a manifest
of what they are a baseline *for*: engine, model weights, generation settings, scorer
and prompts. Its name is the hash of that identity, so the same inputs always name the
same file (a CI cache key), and its bytes are reproducible. Restoring into a run whose
identity differs is refused, naming every field that differs: entries that could not be
used would otherwise be silently regenerated, and a CI job would pay for the parent
while its author believes it does not.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toxtests import __version__
from toxtests.errors import ConfigError
from toxtests.files import atomic_write_bytes

if TYPE_CHECKING:
    from toxtests.run.run import GateRun

FORMAT = 1
KINDS = ("generations", "scores", "pairing")
PREFIX = "toxtests-baseline-"
REMAKE_HINT = (
    "make the baseline again with `toxtests baseline` and this run's --model, --prompts, "
    "--limit, thresholds file, --scorer and engine options, or drop --baseline"
)


def run_identity(run: GateRun) -> dict[str, Any]:
    """What the parent's cached entries depend on, as the manifest records it."""
    fingerprints = run.fingerprints(restore=False)
    model = fingerprints["model"]
    prompts = [[p.id, p.text] for p in run.prompts]
    digest = hashlib.sha256(json.dumps(prompts, ensure_ascii=True).encode()).hexdigest()
    settings = {k: v for k, v in vars(run.config.generation).items() if k != "batch_size"}
    return {
        "engine": fingerprints["engine"],
        "model": {"fingerprint": model["fingerprint"], "dtype": model["dtype"]},
        "generation": json.loads(json.dumps(settings)),
        "scorer": {
            "fingerprint": fingerprints["scorer"]["fingerprint"],
            "attributes": fingerprints["scorer"]["attributes"],
        },
        "prompts": {"count": len(prompts), "sha256": digest},
    }


def identity_key(identity: dict[str, Any]) -> str:
    body = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def archive_name(identity: dict[str, Any]) -> str:
    return f"{PREFIX}{identity_key(identity)}.tar.gz"


@dataclass(frozen=True)
class Baseline:
    """A written or restored baseline: where, for what, and how many entries."""

    path: Path
    identity: dict[str, Any]
    entries: dict[str, int]
    model_spec: str = ""

    def line(self) -> str:
        counts = ", ".join(f"{n} {kind}" for kind, n in self.entries.items() if n)
        return f"{self.path} ({counts})"


def make_baseline(run: GateRun, output: str | Path) -> Baseline:
    """Generate and score the parent on every prompt of `run` (cached entries reused),
    then write the archive: into `output` when it is a directory, else at `output`."""
    parent = run.parent
    run.store.prefetch(parent, run.prompts, "all prompts, for a baseline")
    texts = run.store.scores(parent, run.prompts, "baseline").texts
    run.pairing()  # a seeded engine's replays, so the restoring job skips them too
    identity = run_identity(run)
    generation_keys = [run.store.generation_key(parent, p) for p in run.prompts]
    keys = {
        "generations": generation_keys,
        "scores": [run.store.score_key(k, t) for k, t in zip(generation_keys, texts, strict=True)],
        "pairing": [k for k in [run.pairing_key()] if k is not None],
    }
    files: dict[str, bytes] = {}
    for kind, names in keys.items():
        for key in names:
            path = run.cache.path(kind, key)
            try:
                files[f"{kind}/{key}.json"] = path.read_bytes()
            except FileNotFoundError:
                raise ConfigError(
                    f"{path}: the cache lost this entry while the baseline was written "
                    "(another process cleaning it?); run `toxtests baseline` again"
                ) from None
    manifest = {
        "format": FORMAT,
        "toxtests_version": __version__,
        "identity": identity,
        "model_spec": run.options.model,
        "entries": keys,
    }
    target = Path(output)
    if target.is_dir() or str(output).endswith("/"):
        target = target / archive_name(identity)
    atomic_write_bytes(target, _archive(manifest, files))
    return Baseline(target, identity, {k: len(v) for k, v in keys.items()}, run.options.model)


def _archive(manifest: dict[str, Any], files: dict[str, bytes]) -> bytes:
    """A gzip'd tar with fixed order, times and owners: the same entries, the same bytes."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        members = {"manifest.json": json.dumps(manifest, indent=1, sort_keys=True).encode()}
        members.update(sorted(files.items()))
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


def _read(path: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest and every member's bytes (a baseline is megabytes, not gigabytes)."""
    try:
        with tarfile.open(path, mode="r:gz") as tar:
            members = {}
            for info in tar.getmembers():
                handle = tar.extractfile(info) if info.isfile() else None
                if handle is not None:
                    members[info.name] = handle.read()
        manifest = json.loads(members.pop("manifest.json"))
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}, this toxtests reads {FORMAT}")
        return manifest, members
    except (OSError, EOFError, tarfile.TarError, KeyError, ValueError) as exc:
        raise ConfigError(
            f"{path}: not a toxtests baseline archive ({type(exc).__name__}: {exc}); make "
            "one with `toxtests baseline`"
        ) from None


def differences(archived: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Each field where the archive's identity and this run's differ, as 'where: a vs b'."""
    found = []
    for section in sorted(set(archived) | set(current)):
        was, now = archived.get(section, {}), current.get(section, {})
        for key in sorted(set(was) | set(now)):
            if was.get(key) != now.get(key):
                found.append(
                    f"{section}.{key}: archive {was.get(key)!r}, this run {now.get(key)!r}"
                )
    return found


def find_archive(path: Path, identity: dict[str, Any]) -> Path:
    """`path` itself, or in a directory the archive named for this run's identity."""
    if not path.is_dir():
        if not path.exists():
            raise ConfigError(f"--baseline {path}: no such file; make it with `toxtests baseline`")
        return path
    exact = path / archive_name(identity)
    if exact.is_file():
        return exact
    others = sorted(path.glob(f"{PREFIX}*.tar.gz"))
    if not others:
        raise ConfigError(
            f"--baseline {path}: the directory holds no {PREFIX}*.tar.gz; make one with "
            "`toxtests baseline -o DIR`"
        )
    return others[0]  # not this run's: restore_baseline names what differs


def restore_baseline(run: GateRun, path: str | Path) -> Baseline:
    """Copy the archive's entries into the run's cache, after checking that they are this
    run's parent; an entry already cached is kept, a corrupt one refuses the archive."""
    identity = run_identity(run)
    archive = find_archive(Path(path), identity)
    manifest, members = _read(archive)
    changed = differences(manifest["identity"], identity)
    if changed:
        made_for = manifest.get("model_spec", "?")
        raise ConfigError(
            f"--baseline {archive}: made for another run (model {made_for}); "
            + "; ".join(changed[:6])
            + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
            + f". {REMAKE_HINT}"
        )
    counts = {}
    for kind in KINDS:
        keys = manifest["entries"].get(kind, [])
        for key in keys:
            data = members.get(f"{kind}/{key}.json", b"")
            if not _intact(data):
                raise ConfigError(
                    f"--baseline {archive}: entry {kind}/{key} is missing or damaged "
                    "(checksum); the archive was altered or truncated. " + REMAKE_HINT
                )
            target = run.cache.path(kind, key)
            if not target.exists():
                atomic_write_bytes(target, data)
        counts[kind] = len(keys)
    return Baseline(archive, identity, counts, manifest.get("model_spec", ""))


def _intact(data: bytes) -> bool:
    try:
        entry = json.loads(data)
        payload = entry["payload"]
        return hashlib.sha256(payload.encode()).hexdigest() == entry["sha256"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return False
