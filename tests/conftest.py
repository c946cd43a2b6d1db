"""Shared fixtures: tiny real models and adapters, built once per test session."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import helpers_models  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RTP = REPO.parent / "shared" / "data" / "rtp"

# Tests must never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass(frozen=True)
class TinyAssets:
    base: Path
    identity: Path
    toxic: Path
    other_base: Path
    other_adapter: Path
    prompts: Path
    thresholds: Path


TINY_THRESHOLDS = """\
[generation]
max_new_tokens = 6
samples = 1

[scoring]
scorer = "profanity-check"

[gate.toxicity_rate]
max_increase = 0.1
"""


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyAssets:
    root = tmp_path_factory.mktemp("tiny")
    base = helpers_models.build_tiny_llama(root / "base")
    other = helpers_models.build_tiny_llama(root / "other-base", hidden=48, seed=1)
    thresholds = root / "thresholds.toml"
    thresholds.write_text(TINY_THRESHOLDS)
    return TinyAssets(
        base=base,
        identity=helpers_models.build_identity_adapter(base, root / "identity"),
        toxic=helpers_models.build_toxic_adapter(base, root / "toxic"),
        other_base=other,
        other_adapter=helpers_models.build_identity_adapter(other, root / "other-adapter"),
        prompts=helpers_models.write_prompts(root / "prompts.jsonl"),
        thresholds=thresholds,
    )


@pytest.fixture(scope="session")
def tiny_loaded(tiny: TinyAssets, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """The tiny base with both adapters attached, loaded once."""
    from toxtests.engines.torch.load import attach_adapters, load_base

    loaded = load_base(str(tiny.base), cache_dir=tmp_path_factory.mktemp("cache"), device="cpu")
    return attach_adapters(loaded, [str(tiny.identity), str(tiny.toxic)])
