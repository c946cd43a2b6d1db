"""The native Gemma 3 decoder and LoRA loader against transformers and PEFT, bit for bit:
tiny random Gemma 3 models built here (a sliding window shorter than the prompts, the
final-logit soft cap), real PEFT adapters trained-free but random, and the packaged
Gemma 3 270M with its demo adapters (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import helpers_models
import pytest
import torch

from toxtests.config import GenerationConfig
from toxtests.engines.torch import gemma3, lora
from toxtests.engines.torch.load import (
    NATIVE_VARIABLE,
    PendingTokenizer,
    attach_adapters,
    load_base,
    native_adapters,
)
from toxtests.engines.torch.loop import Generator
from toxtests.errors import ModelLoadError
from toxtests.prompts import Prompt

PROMPTS = [
    Prompt("a", "the weather"),
    Prompt("b", "little more while other house garden music and the river"),
    Prompt("c", "we made"),
    Prompt("d", "she said that they would go home after the river"),
    Prompt("e", "music"),
    Prompt("f", "other house garden"),
]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_adapter(
    model_dir: Path, out_dir: Path, targets: tuple[str, ...], seed: int, identity: bool = False
) -> Path:
    """A PEFT LoRA with random A and B (as if trained), on `targets`; with `identity`,
    as PEFT initialises one (B = 0: it changes nothing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=list(targets),
        init_lora_weights=identity,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model_dir)), config)
    with torch.no_grad():  # large enough to change the text of a random model
        for name, parameter in model.named_parameters():
            if "lora_B" in name and not identity:
                parameter.mul_(20.0)
    model.save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("native")
    base = helpers_models.build_tiny_gemma3(root / "base", sliding_window=4)
    return {
        "base": base,
        "identity": random_adapter(base, root / "identity", TARGETS, seed=0, identity=True),
        "changed": random_adapter(base, root / "changed", TARGETS, seed=1),
        "attention": random_adapter(base, root / "attention", ("q_proj", "v_proj"), seed=2),
        "head": random_adapter(base, root / "head", ("q_proj", "lm_head"), seed=3),
    }


def _texts(generations: list) -> list[str]:
    return [g.text for row in generations for g in row]


SEQUENCES = sorted(([2, 5, 9, 11, 4, 7, 3], [2, 5], [2, 8, 8, 8, 8, 8, 8, 8, 8, 8]), key=len)


def _states(generator: Generator, adapter: str | None = None) -> torch.Tensor:
    """The last prompt positions' hidden states of `SEQUENCES` (a padded prefill), then
    of two decode steps, stacked."""
    with torch.inference_mode(), generator._adapter_context(adapter), generator._attention():
        last, cache, attention, positions, _ = generator._prefill([list(s) for s in SEQUENCES])
        states = [last]
        layout = generator._layout([list(s) for s in SEQUENCES], attention.shape[1])
        for step in range(2):
            tokens = torch.tensor([[3 + step]] * len(SEQUENCES))
            positions = positions + 1
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=-1)
            layout = layout.advanced()
            last, cache = generator._forward(
                input_ids=tokens,
                attention_mask=attention,
                position_ids=positions,
                **{generator.cache_keyword: cache},
                layout=layout,
            )
            states.append(last)
    return torch.stack(states)


def _both(directory: Path, adapters: list[str], tmp_path: Path) -> tuple:
    cache = tmp_path / "cache"
    native = attach_adapters(load_base(str(directory), cache_dir=cache, device="cpu"), adapters)
    reference = attach_adapters(
        load_base(str(directory), cache_dir=cache, device="cpu", native=False), adapters
    )
    assert isinstance(native.model, gemma3.CausalLM)
    assert not isinstance(reference.model, gemma3.CausalLM)
    return native, reference


@pytest.mark.parametrize("do_sample", [True, False])
def test_the_native_decoder_gives_transformers_bits(gemma, tmp_path, do_sample: bool) -> None:  # noqa: ANN001
    """Same text from the native decoder as from transformers' Gemma 3 through the same
    decode loop (prompts longer than the sliding window of 4, decode steps past it, the
    logit soft cap), and the same hidden states to the last bit, prefill and decode steps."""
    native, reference = _both(gemma["base"], [], tmp_path)
    settings = GenerationConfig(max_new_tokens=10, do_sample=do_sample, samples=2)
    ours = Generator(native.model, native.tokenizer, settings, "cpu")
    theirs = Generator(reference.model, reference.tokenizer, settings, "cpu")
    assert ours.row_attention and theirs.row_attention
    assert _texts(ours.generate(PROMPTS, None)) == _texts(theirs.generate(PROMPTS, None))
    assert torch.equal(_states(ours), _states(theirs))


def test_native_lora_gives_peft_bits(gemma, tmp_path) -> None:  # noqa: ANN001
    """Each adapter's text equals PEFT's, alone and sharing batches with the parent; the
    identity adapter gives the parent's text; a changed adapter changes it."""
    adapters = [str(gemma["identity"]), str(gemma["changed"]), str(gemma["attention"])]
    native, reference = _both(gemma["base"], adapters, tmp_path)
    settings = GenerationConfig(max_new_tokens=8)
    ours = Generator(native.model, native.tokenizer, settings, "cpu")
    theirs = Generator(reference.model, reference.tokenizer, settings, "cpu")
    names = [None, "adapter0", "adapter1", "adapter2"]
    alone = {name: _texts(ours.generate(PROMPTS, name)) for name in names}
    for name in names:
        assert alone[name] == _texts(theirs.generate(PROMPTS, name)), name
        assert torch.equal(_states(ours, name), _states(theirs, name)), name
    together = ours.generate_together([(PROMPTS, name) for name in names])
    assert [_texts(job) for job in together] == [alone[name] for name in names]
    assert alone["adapter0"] == alone[None]
    assert alone["adapter1"] != alone[None] and alone["adapter2"] != alone[None]


def test_an_adapter_is_merged_at_its_first_use_only(gemma, tmp_path) -> None:  # noqa: ANN001
    """Attaching checks an adapter's sizes but merges nothing: a run whose rows of one
    adapter are all cached never pays for its merge. The adapter generated for is merged
    on the way, and its text is PEFT's (merged late, the same bits)."""
    adapters = [str(gemma["changed"]), str(gemma["attention"])]
    native, reference = _both(gemma["base"], adapters, tmp_path)
    layers = [m for m in native.model.modules() if isinstance(m, lora.LoraLinear)]
    assert layers and all(not layer.merged for layer in layers)
    settings = GenerationConfig(max_new_tokens=6)
    ours = Generator(native.model, native.tokenizer, settings, "cpu")
    text = _texts(ours.generate(PROMPTS, "adapter1"))
    theirs = Generator(reference.model, reference.tokenizer, settings, "cpu")
    assert text == _texts(theirs.generate(PROMPTS, "adapter1"))
    targeted = [layer for layer in layers if "adapter1" in layer.merged]
    assert targeted and all("adapter1" not in layer.pending for layer in layers)
    assert all("adapter0" in layer.pending and "adapter0" not in layer.merged for layer in layers)


def test_the_native_decoder_needs_no_invariance_probe(gemma, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """Its rows are invariant by construction (the tests above compare them bit for
    bit), so the loop does not spend probe prefills on it; transformers' model still
    gets them."""

    def probe(self: Generator) -> bool:
        raise AssertionError("probed")

    monkeypatch.setattr(Generator, "_rows_invariant", probe)
    model = gemma3.load(gemma["base"])
    generator = Generator(
        model,
        load_base(str(gemma["base"]), cache_dir=tmp_path, device="cpu").tokenizer,
        GenerationConfig(),
        "cpu",
    )
    assert generator.row_attention
    reference = load_base(str(gemma["base"]), cache_dir=tmp_path, device="cpu", native=False)
    with pytest.raises(AssertionError, match="probed"):
        Generator(reference.model, reference.tokenizer, GenerationConfig(), "cpu")


def test_a_plain_forward_takes_its_rows_from_a_left_padded_mask(gemma) -> None:  # noqa: ANN001
    """Called as a transformers model is (input ids and a mask, no layout), each row of
    a left-padded batch gets its bits alone; a mask that is not left padding is refused."""
    from toxtests.engines.torch import packed

    model = gemma3.load(gemma["base"])
    packed.pack_linears(model)  # row-invariant products, as in the decode loop
    ids = torch.tensor([[0, 0, 5, 9, 11], [2, 5, 9, 11, 4]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        batch = model(ids, attention_mask=mask, position_ids=positions).logits
        alone = [model(ids[:1, 2:]).logits[0], model(ids[1:]).logits[0]]
        assert torch.equal(batch[0, 2:], alone[0]) and torch.equal(batch[1], alone[1])
        with pytest.raises(ValueError, match="left-padded"):
            model(ids, attention_mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))


def test_adapters_the_native_path_cannot_apply_go_to_peft(gemma, tmp_path) -> None:  # noqa: ANN001
    """LoRA on the output layer (or DoRA, trained modules, ...) is PEFT's: the engine
    loads transformers for it, and attaching it to a native model says what to do."""
    assert native_adapters([str(gemma["changed"])])
    assert not native_adapters([str(gemma["changed"]), str(gemma["head"])])
    assert "lm_head" in (lora.unsupported(str(gemma["head"])) or "")
    dora = tmp_path / "dora"
    dora.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (dora / name).write_bytes((gemma["changed"] / name).read_bytes())
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    assert lora.unsupported(str(dora)) == "use_dora is set"
    loaded = load_base(str(gemma["base"]), cache_dir=tmp_path / "cache", device="cpu")
    with pytest.raises(ModelLoadError, match=r"head.*lm_head.*native=False"):
        attach_adapters(loaded, [str(gemma["head"])])


def test_an_adapter_for_another_base_is_refused_by_name(gemma, tmp_path) -> None:  # noqa: ANN001
    """An adapter trained on a wider model: the error names the layer and says why."""
    other = helpers_models.build_tiny_gemma3(tmp_path / "other", sliding_window=4)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config))
    wide = tmp_path / "wide"
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    settings = {k: v for k, v in config.items() if k in Gemma3TextConfig().to_dict()}
    settings.update(hidden_size=48, intermediate_size=96)
    Gemma3ForCausalLM(Gemma3TextConfig(**settings)).save_pretrained(str(wide))
    adapter = random_adapter(wide, tmp_path / "wide-adapter", ("q_proj",), seed=4)
    loaded = load_base(str(gemma["base"]), cache_dir=tmp_path / "cache", device="cpu")
    with pytest.raises(ModelLoadError, match=r"q_proj.*size mismatch.*different base"):
        attach_adapters(loaded, [str(adapter)])


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"model_type": "llama"}, "another architecture"),
        ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantized"),
        ({"attn_logit_softcapping": 50.0}, "an attention soft cap"),
        ({"hidden_activation": "gelu"}, "another activation"),
        (
            {
                "rope_parameters": {
                    "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                }
            },
            "a scaled RoPE",
        ),
        ({"use_bidirectional_attention": True}, "bidirectional attention"),
    ],
)
def test_models_the_native_decoder_does_not_compute_are_left_to_transformers(
    gemma,
    tmp_path,
    change: dict,
    why: str,  # noqa: ANN001
) -> None:
    directory = tmp_path / "model"
    directory.mkdir()
    config = json.loads((gemma["base"] / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **change}))
    weights = (gemma["base"] / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(weights)
    assert gemma3.native_config(gemma["base"]) is not None
    assert gemma3.native_config(directory) is None, why


def test_a_config_leaving_a_value_to_transformers_defaults_is_left_to_transformers(
    gemma, tmp_path
) -> None:  # noqa: ANN001
    """Gemma3TextConfig's defaults (head size 256, not hidden / heads) are transformers'
    to apply: a config.json without the key loads through transformers."""
    directory = tmp_path / "model"
    directory.mkdir()
    config = json.loads((gemma["base"] / "config.json").read_text())
    del config["head_dim"]
    (directory / "config.json").write_text(json.dumps(config))
    weights = (gemma["base"] / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(weights)
    assert gemma3.native_config(directory) is None


def test_generation_stops_at_the_eos_ids_transformers_would(gemma, tmp_path) -> None:  # noqa: ANN001
    """generation_config.json's EOS ids (a chat model's end of turn too) win over
    config.json's, as transformers reads them."""
    directory = tmp_path / "model"
    directory.mkdir()
    for entry in gemma["base"].iterdir():
        (directory / entry.name).write_bytes(entry.read_bytes())
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7]}))
    cache = tmp_path / "cache"
    native = load_base(str(directory), cache_dir=cache, device="cpu")
    reference = load_base(str(directory), cache_dir=cache, device="cpu", native=False)
    assert native.model.generation_config.eos_token_id == [1, 7]
    assert reference.model.generation_config.eos_token_id == [1, 7]
    settings = GenerationConfig(max_new_tokens=4)
    ours = Generator(native.model, native.tokenizer, settings, "cpu")
    theirs = Generator(reference.model, reference.tokenizer, settings, "cpu")
    assert ours.eos_ids == theirs.eos_ids and 7 in ours.eos_ids


def test_sharded_weights_and_a_saved_copy_of_a_tied_head_load_the_same_model(
    gemma, tmp_path
) -> None:  # noqa: ANN001
    """Weights split over files with an index (as large checkpoints are), one of them
    holding a copy of the tied output layer: the same model, tied to the embeddings."""
    from safetensors.torch import load_file, save_file

    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_bytes((gemma["base"] / "config.json").read_bytes())
    state = load_file(str(gemma["base"] / "model.safetensors"))
    names = sorted(state)
    halves = {"part-1.safetensors": names[::2], "part-2.safetensors": names[1::2]}
    for file, part in halves.items():
        tensors = {name: state[name] for name in part}
        if file == "part-2.safetensors":
            tensors["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
        save_file(tensors, str(directory / file))
    weight_map = {name: file for file, part in halves.items() for name in part}
    index = {"metadata": {}, "weight_map": {**weight_map, "lm_head.weight": "part-2.safetensors"}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    whole, sharded = gemma3.load(gemma["base"]), gemma3.load(directory)
    assert sharded.lm_head.weight is sharded.model.embed_tokens.weight
    for (name, a), (_, b) in zip(whole.named_parameters(), sharded.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_a_weight_the_config_does_not_describe_is_named(gemma, tmp_path) -> None:  # noqa: ANN001
    from safetensors.torch import load_file, save_file

    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_bytes((gemma["base"] / "config.json").read_bytes())
    state = load_file(str(gemma["base"] / "model.safetensors"))
    state["model.layers.0.mlp.gate_proj.weight"] = torch.zeros(3, 3)
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"gate_proj.weight has shape \(3, 3\)"):
        load_base(str(directory), cache_dir=tmp_path / "cache", device="cpu")


def test_a_gate_process_imports_neither_transformers_nor_peft(gemma, tmp_path) -> None:  # noqa: ANN001
    """The point of the native path: with the tokenizer in its own process (as Gemma
    3's large one is), loading, attaching and generating import neither library."""
    script = textwrap.dedent(
        f"""
        import sys
        from toxtests.config import GenerationConfig
        from toxtests.engines.torch import load
        from toxtests.engines.torch.loop import Generator
        from toxtests.prompts import Prompt
        load.CHILD_TOKENIZER_BYTES = 0  # this tiny tokenizer in a child too
        loaded = load.attach_adapters(
            load.load_base({str(gemma["base"])!r}, cache_dir={str(tmp_path)!r}, device="cpu"),
            [{str(gemma["changed"])!r}],
        )
        settings = GenerationConfig(max_new_tokens=4)
        generator = Generator(loaded.model, loaded.tokenizer, settings, "cpu")
        texts = generator.generate([Prompt("a", "the weather")], "adapter0")
        imported = ["transformers" in sys.modules, "peft" in sys.modules]
        print(type(loaded.model).__name__, len(texts), *imported)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300
    )
    assert done.stdout.split() == ["CausalLM", "1", "False", "False"]


def test_the_native_path_can_be_switched_off(gemma, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv(NATIVE_VARIABLE, "0")
    loaded = load_base(str(gemma["base"]), cache_dir=tmp_path / "cache", device="cpu")
    assert not isinstance(loaded.model, gemma3.CausalLM)


def test_a_broken_tokenizer_fails_at_its_first_use_with_the_model_named(gemma, tmp_path) -> None:  # noqa: ANN001
    """The native model does not wait for its tokenizer; a tokenizer that cannot load
    still fails as a model load, naming the model, when it is first used."""
    directory = tmp_path / "model"
    directory.mkdir()
    for entry in gemma["base"].iterdir():
        (directory / entry.name).write_bytes(entry.read_bytes())
    (directory / "tokenizer.json").write_text("{ not json")
    loaded = load_base(str(directory), cache_dir=tmp_path / "cache", device="cpu")
    assert isinstance(loaded.tokenizer, PendingTokenizer)
    with pytest.raises(ModelLoadError, match=str(directory).replace("\\", "\\\\")):
        loaded.tokenizer.encode("the weather")


def test_a_tokenizer_started_for_nothing_is_killed_not_awaited(gemma) -> None:  # noqa: ANN001
    """A fully cached run closes the tokenizer it started early: killed at once, not
    left to finish loading (which the plugin's process would wait for)."""
    from toxtests.engines.torch.tokenizer_process import TokenizerProcess

    started = TokenizerProcess(str(gemma["base"]), {"local_files_only": True})
    started.close()
    assert started._child.returncode == -9
    forgotten = TokenizerProcess(str(gemma["base"]), {"local_files_only": True})
    child = forgotten._child
    del forgotten  # its finalizer, as at the interpreter's exit
    assert child.wait(timeout=5) == -9
    loaded = TokenizerProcess(str(gemma["base"]), {"local_files_only": True})
    loaded.wait_loaded()
    loaded.close()  # a loaded child ends by its own loop, not killed
    assert loaded._child.returncode == 0


@pytest.mark.slow
def test_gemma3_270m_natively_gives_transformers_text() -> None:
    """The packaged Gemma 3 270M and its demo adapters: native and transformers + PEFT
    paths give the same text, parent and adapters sharing batches."""
    from toxtests.models import default_cache_dir
    from toxtests.prompts import load_prompts
    from toxtests.shards import stratified_subset

    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "rtp" / "toxic.jsonl"
    prompts = stratified_subset(load_prompts(str(data)).prompts, 24)
    adapters = Path(__file__).resolve().parents[1] / "toxtests" / "data" / "adapters"
    specs = [str(adapters / "identity"), str(adapters / "toxic")]
    cache = default_cache_dir()
    texts = []
    for native in (True, False):
        loaded = attach_adapters(
            load_base("gemma3-270m", cache_dir=cache, device="cpu", native=native), specs
        )
        assert isinstance(loaded.model, gemma3.CausalLM) is native
        generator = Generator(
            loaded.model, loaded.tokenizer, GenerationConfig(max_new_tokens=12), "cpu"
        )
        jobs = [(prompts, None), (prompts, "adapter0"), (prompts, "adapter1")]
        texts.append([_texts(job) for job in generator.generate_together(jobs)])
        del loaded, generator
    assert texts[0] == texts[1]
    assert texts[0][0] == texts[0][1] and texts[0][2] != texts[0][0]
