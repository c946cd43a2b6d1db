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


def test_prompts_told_to_a_child_that_failed_wait_for_its_error(tiny, tmp_path) -> None:  # noqa: ANN001
    """A child whose tokenizer cannot load has ended by the time the gate tells it its
    prompts: telling it does not raise, and waiting for it raises the child's error."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny.base, broken)
    (broken / "tokenizer.json").write_text("{ this is not a tokenizer")
    child = TokenizerProcess(str(broken), {"local_files_only": True})
    child._child.wait(timeout=60)  # ended, its pipe closed
    child.expect(TEXTS, False)
    with pytest.raises(TokenizerProcessError):
        child.wait_ready()
    child.close()


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


# --- kept tokenizers: loaded with `tokenizers` alone by later runs -------------------------


def _keep(source: str, kept: Path, texts: list[str]) -> TokenizerProcess:
    """A first run's child: encode `texts`, keep the tokenizer, answer one more call (which
    reads the keep reply first), then end."""
    first = TokenizerProcess(source, {"local_files_only": True}, keep_in=str(kept))
    first.wait_loaded()
    assert first.loaded_from == "real" and not first.kept
    for text in texts:
        first(text)
    first.keep_after_encoding()
    first.decode([1, 2], skip_special_tokens=True)
    first.close()
    return first


def _random_sequences(size: int, specials: list[int], count: int = 300) -> list[list[int]]:
    import random

    generator = random.Random(7)
    return [
        [
            generator.choice(specials) if specials and generator.random() < 0.15 else
            generator.randrange(size)
            for _ in range(generator.randrange(1, 30))
        ]
        for _ in range(count)
    ]  # fmt: skip


def _same_answers(kept: TokenizerProcess, real, texts: list[str]) -> None:  # noqa: ANN001
    """Every answer the decode loop asks for, from the kept child and from transformers."""
    for text in texts:
        assert kept(text)["input_ids"] == list(real(text)["input_ids"]), text
    for ids in _random_sequences(len(real), list(real.all_special_ids)):
        for skip in (True, False):
            assert kept.decode(ids, skip_special_tokens=skip) == real.decode(
                ids, skip_special_tokens=skip
            )
    for name in ("pad_token_id", "eos_token_id", "bos_token_id", "padding_side"):
        assert getattr(kept, name) == getattr(real, name), name
    assert len(kept) == len(real)


def _kept_answers_as_transformers(source: str, kept_in: Path, texts: list[str]) -> None:
    """A new child finds the tokenizer kept in `kept_in` and answers as transformers."""
    from toxtests.engines.torch.tokenizer_process import load_padded_tokenizer

    child = TokenizerProcess(source, {"local_files_only": True}, keep_in=str(kept_in))
    child.wait_loaded()
    assert child.loaded_from == "kept"
    _same_answers(child, load_padded_tokenizer(source, {"local_files_only": True}), texts)
    child.close()


def test_a_kept_tokenizer_loads_without_transformers_and_answers_as_it(tiny, tmp_path) -> None:  # noqa: ANN001
    """A run keeps its tokenizer (`keep_after_encoding`); the next loads the kept backend
    (`loaded_from == "kept"`) and encodes, decodes and answers as transformers does, on
    texts the first run never saw too; what it does not keep (the vocabulary) comes from
    the real tokenizer, loaded then."""
    from toxtests.engines.torch.tokenizer_process import load_padded_tokenizer

    kept_in = tmp_path / "kept"
    _keep(str(tiny.base), kept_in, TEXTS[:2])
    assert (kept_in / "kept.json").is_file() and (kept_in / "backend.json").is_file()
    second = TokenizerProcess(str(tiny.base), {"local_files_only": True}, keep_in=str(kept_in))
    assert second.kept
    second.wait_loaded()
    assert second.loaded_from == "kept"
    real = load_padded_tokenizer(str(tiny.base), {"local_files_only": True})
    _same_answers(second, real, TEXTS)
    assert second.get_vocab() == real.get_vocab()  # loads the real one in the child
    second.close()


def test_a_kept_tokenizer_told_the_prompts_ahead_loads_its_backend_before_asked(
    tiny, tmp_path
) -> None:  # noqa: ANN001
    """Told the run's prompts as it starts (`expected`) or later (`expect`), a kept child
    loads the whole backend at once where a prompt was not kept, so that the decode loop
    never waits for it at its first prompt, and only then: for kept prompts it stays with
    the decode-only copy. A chat template to apply loads the real tokenizer instead. The
    answers are transformers' every time."""
    from toxtests.engines.torch.tokenizer_process import load_padded_tokenizer

    source, options = str(tiny.base), {"local_files_only": True}
    real = load_padded_tokenizer(source, options)
    kept_in = tmp_path / "kept"
    _keep(source, kept_in, TEXTS[:2])

    def parts(expected, later=None) -> list[str]:  # noqa: ANN001
        child = TokenizerProcess(source, options, keep_in=str(kept_in), expected=expected)
        if later is not None:
            child.expect(*later)
        child.wait_ready()
        assert child.loaded_from == "kept"
        loaded = child.loaded_parts()  # before any prompt is encoded
        _same_answers(child, real, TEXTS)
        child.close()
        return loaded

    assert parts(None) == ["decoder"]
    assert parts((TEXTS[:2], False)) == ["decoder"]  # all kept: nothing more to load
    assert "encoder" in parts((TEXTS, False))
    assert "encoder" in parts((TEXTS, "auto"))  # a tokenizer without a chat template
    assert "encoder" in parts(None, later=(TEXTS, False))
    assert "real" in parts((TEXTS[:2], True))  # the template is transformers' to apply
    # A kept backend damaged since: the prompts go to the real tokenizer, as before.
    backend = kept_in / "backend.json"
    backend.write_bytes(backend.read_bytes().replace(b'"', b"'", 1))
    assert "encoder" not in parts((TEXTS, False))


def test_prompts_a_kept_tokenizer_encodes_are_kept_for_the_next_run(
    tiny, tmp_path, monkeypatch
) -> None:  # noqa: ANN001
    """A run on prompts the keeping run did not see adds them to the kept ones as it
    generates (`keep_after_encoding`), so a second adapter on the same prompts needs only
    the decode-only copy; a damaged prompts.json keeps nothing (the backend encodes
    again, with the same answers, and keeps them anew); at the limit a run's own prompts
    stay first."""
    import json

    from toxtests.engines.torch import tokenizer_process
    from toxtests.engines.torch.tokenizer_process import KeptTokenizer, load_padded_tokenizer

    source, options = str(tiny.base), {"local_files_only": True}
    real = load_padded_tokenizer(source, options)
    kept_in = tmp_path / "kept"
    _keep(source, kept_in, TEXTS[:2])
    second = TokenizerProcess(source, options, keep_in=str(kept_in), expected=(TEXTS, False))
    for text in TEXTS:
        second(text)
    second.keep_after_encoding()
    second.wait_ready()
    second.close()
    third = TokenizerProcess(source, options, keep_in=str(kept_in), expected=(TEXTS, False))
    third.wait_ready()
    assert third.loaded_parts() == ["decoder"]
    _same_answers(third, real, TEXTS)
    third.close()

    prompts = kept_in / "prompts.json"
    stored = json.loads(prompts.read_text())
    assert set(stored["prompts"]) == set(TEXTS)
    stored["prompts"][TEXTS[0]] = [1, 2, 3]  # ids that are not the text's
    prompts.write_text(json.dumps(stored))
    fourth = TokenizerProcess(source, options, keep_in=str(kept_in), expected=(TEXTS, False))
    fourth.wait_ready()
    assert "encoder" in fourth.loaded_parts()
    _same_answers(fourth, real, TEXTS)
    fourth.keep_after_encoding()  # keeps them anew
    fourth.wait_ready()
    fourth.close()
    healed = json.loads(prompts.read_text())["prompts"]
    assert healed == {text: list(real(text)["input_ids"]) for text in TEXTS}

    monkeypatch.setattr(tokenizer_process, "KEPT_PROMPT_LIMIT", 3)
    kept = KeptTokenizer.load(str(kept_in), lambda: real)
    assert kept is not None
    newest = ["a prompt no run saw", "another one"]
    for text in newest:
        assert kept(text)["input_ids"] == list(real(text)["input_ids"])
    kept.keep_prompts()
    now_kept = json.loads(prompts.read_text())["prompts"]
    assert len(now_kept) == 3 and set(newest) <= set(now_kept)
    many = [f"prompt number {n}" for n in range(5)]  # more than the limit in one run
    for text in many:
        kept(text)
    kept.keep_prompts()
    assert list(json.loads(prompts.read_text())["prompts"]) == sorted(many[:3])


def test_a_damaged_or_switched_off_kept_tokenizer_loads_the_real_one(
    tiny, tmp_path, monkeypatch
) -> None:  # noqa: ANN001
    """A kept decoder whose bytes no longer match their checksum, an index of another
    format, or TOXTESTS_KEPT_TOKENIZER=0: the child loads transformers' tokenizer. A
    damaged kept backend (read only for prompts the keeping run did not see) leaves those
    prompts to the real tokenizer. The answers are the same every time."""
    import json

    from toxtests.engines.torch.tokenizer_process import load_padded_tokenizer

    real = load_padded_tokenizer(str(tiny.base), {"local_files_only": True})
    kept_in = tmp_path / "kept"
    _keep(str(tiny.base), kept_in, TEXTS[:2])
    index = kept_in / "kept.json"

    def loaded_from() -> str | None:
        child = TokenizerProcess(str(tiny.base), {"local_files_only": True}, keep_in=str(kept_in))
        child.wait_loaded()
        _same_answers(child, real, TEXTS)
        child.close()
        return child.loaded_from

    assert loaded_from() == "kept"
    monkeypatch.setenv("TOXTESTS_KEPT_TOKENIZER", "0")
    assert loaded_from() == "real"
    monkeypatch.delenv("TOXTESTS_KEPT_TOKENIZER")
    for name, expected in (("backend.json", "kept"), ("decoder.json", "real")):
        damaged = kept_in / name
        original = damaged.read_bytes()
        damaged.write_bytes(original.replace(b'"', b"'", 1))
        assert loaded_from() == expected, name
        damaged.write_bytes(original)
    index.write_text(json.dumps({**json.loads(index.read_text()), "format": 0}))
    assert loaded_from() == "real"


def test_a_tokenizer_transformers_decodes_otherwise_is_not_kept(tiny, tmp_path) -> None:  # noqa: ANN001
    """Where transformers adds to its backend's decoding (cleaning up spaces) or a class
    overrides a method between the call and the backend, nothing is kept: the reason is
    returned and the folder stays empty."""
    from toxtests.engines.torch.tokenizer_process import keep_tokenizer, load_padded_tokenizer

    tokenizer = load_padded_tokenizer(str(tiny.base), {"local_files_only": True})
    tokenizer.clean_up_tokenization_spaces = True
    assert "cleans up" in keep_tokenizer(tokenizer, str(tmp_path / "a"), TEXTS)
    assert not (tmp_path / "a").exists()

    class Lower(type(tokenizer)):  # type: ignore[misc]
        def decode(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
            return super().decode(*args, **kwargs).lower()

    tokenizer = load_padded_tokenizer(str(tiny.base), {"local_files_only": True})
    tokenizer.__class__ = Lower
    assert "overrides decode" in keep_tokenizer(tokenizer, str(tmp_path / "b"), TEXTS)
    assert not (tmp_path / "b").exists()


def test_the_engine_keeps_the_tokenizer_for_the_next_gate(tiny, tmp_path) -> None:  # noqa: ANN001
    """Two gates: the first's child keeps the tokenizer while it generates; the second,
    in a fresh cache folder that has only the first's `models/` (what the CI example
    caches), loads it kept, and the texts are the first's."""
    import shutil

    from toxtests.config import GenerationConfig
    from toxtests.engines.base import EngineOptions
    from toxtests.engines.torch.engine import TorchEngine
    from toxtests.prompts import load_prompts

    prompts = load_prompts(str(tiny.prompts)).prompts[:6]
    settings = GenerationConfig(max_new_tokens=6)
    texts, sources = [], []
    for folder in ("first", "second"):
        options = EngineOptions(
            model=str(tiny.base),
            adapters=(str(tiny.toxic),),
            cache_dir=tmp_path / folder,
            device="cpu",
        )
        engine = TorchEngine(options)
        engine.describe()
        early = engine._early_tokenizer
        parent, toxic = engine.variants()
        generated = engine.generate_together([(prompts, parent), (prompts, toxic)], settings)
        texts.append([[g.text for g in row] for job in generated for row in job])
        engine.close()
        sources.append(early.loaded_from)
        if folder == "first":
            assert list((tmp_path / "first" / "models" / "tokenizers").glob("*/kept.json"))
            shutil.copytree(tmp_path / "first" / "models", tmp_path / "second" / "models")
    assert sources == ["real", "kept"]
    assert texts[0] == texts[1]


def test_a_gate_tells_its_tokenizer_the_prompts_before_importing_torch(
    tiny, tmp_path, monkeypatch
) -> None:  # noqa: ANN001
    """`toxtests gate` in a cache whose `models/` an earlier gate on other prompts kept
    the tokenizer in: the engine is told the prompts (`TorchEngine.expect`) before it is
    described (which imports torch), its child is started with them and has its whole
    backend loaded before the first prompt is encoded; the gate's prompts are then kept
    for the next gate, and the results are those of a gate with a fresh tokenizer."""
    import json

    from toxtests.cli import main
    from toxtests.engines.torch.engine import TorchEngine
    from toxtests.engines.torch.load import PendingTokenizer
    from toxtests.engines.torch.loop import Generator
    from toxtests.prompts import load_prompts

    prompts = [p.text for p in load_prompts(str(tiny.prompts)).prompts]
    first = tmp_path / "first"
    _keep(str(tiny.base), first / "kept", TEXTS[:2])  # as if an earlier gate kept it
    calls: list[str] = []
    parts: list[list[str]] = []
    for name in ("expect", "describe"):
        original = getattr(TorchEngine, name)

        def recorded(self, *args, _original=original, _name=name):  # noqa: ANN001, ANN002, ANN202
            calls.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(TorchEngine, name, recorded)
    original_init = Generator.__init__

    def remember_parts(self, model, tokenizer, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        child = tokenizer.resolve() if isinstance(tokenizer, PendingTokenizer) else tokenizer
        parts.append(child.loaded_parts())  # as the loop first gets it
        original_init(self, model, tokenizer, *args, **kwargs)

    monkeypatch.setattr(Generator, "__init__", remember_parts)

    def gate(cache: Path, report: Path) -> dict:
        args = ["gate", "--model", str(tiny.base), "--prompts", str(tiny.prompts)]
        args += ["--adapter", str(tiny.toxic), "--thresholds", str(tiny.thresholds)]
        args += ["--cache-dir", str(cache), "--json", str(report), "--quiet"]
        args += ["--report", str(report.with_suffix(".html"))]
        assert main(args) in (0, 1)
        return json.loads(report.read_text())

    kept_gate = tmp_path / "kept-gate"
    (kept_gate / "models" / "tokenizers").mkdir(parents=True)
    from toxtests.engines.torch.load import kept_directory
    from toxtests.models import resolve_model

    _, _, fingerprint = resolve_model(str(tiny.base), kept_gate)
    where = kept_directory(
        kept_gate, fingerprint, {"local_files_only": True, "trust_remote_code": False}
    )
    shutil.copytree(first / "kept", where)
    kept_result = gate(kept_gate, tmp_path / "kept.json")
    assert calls[:2] == ["expect", "describe"]
    assert parts and "encoder" in parts[0]
    kept_prompts = json.loads((where / "prompts.json").read_text())["prompts"]
    assert set(prompts) <= set(kept_prompts)
    monkeypatch.setenv("TOXTESTS_KEPT_TOKENIZER", "0")
    fresh_result = gate(tmp_path / "fresh", tmp_path / "fresh.json")
    assert [a["metrics"] for a in kept_result["adapters"]] == [
        a["metrics"] for a in fresh_result["adapters"]
    ]


@pytest.mark.slow
def test_gemma3_270m_kept_tokenizer_answers_as_transformers() -> None:
    """The packaged Gemma 3 270M's tokenizer (262k tokens, byte fallback), kept after a
    run on 64 RealToxicityPrompts: all 1800 prompts, challenging and non-toxic, encode
    to the same ids, and random token sequences decode to the same text."""
    import tempfile

    from toxtests.models import default_cache_dir, resolve_model
    from toxtests.prompts import load_prompts

    source, _, _ = resolve_model("gemma3-270m", default_cache_dir())
    rtp = Path(__file__).resolve().parents[2] / "shared" / "data" / "rtp"
    texts = [
        p.text
        for name in ("toxic.jsonl", "nontoxic.jsonl")
        for p in load_prompts(str(rtp / name)).prompts
    ]
    with tempfile.TemporaryDirectory() as folder:
        kept_in = Path(folder) / "kept"
        _keep(source, kept_in, texts[:64])
        _kept_answers_as_transformers(source, kept_in, texts)


def test_a_tokenizer_that_cannot_be_kept_still_answers(tiny, tmp_path) -> None:  # noqa: ANN001
    """Keeping into a folder that cannot be made (a file stands in its way) fails in
    the child; the run goes on with the same answers and nothing is kept."""
    from toxtests.engines.torch.tokenizer_process import load_padded_tokenizer

    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    child = TokenizerProcess(
        str(tiny.base), {"local_files_only": True}, keep_in=str(blocked / "kept")
    )
    child.wait_loaded()
    child(TEXTS[0])
    child.keep_after_encoding()
    _same_answers(child, load_padded_tokenizer(str(tiny.base), {"local_files_only": True}), TEXTS)
    child.close()
    assert list(tmp_path.iterdir()) == [blocked]


def _trained_tokenizer(directory: Path, kind: str) -> Path:
    """A small real tokenizer of `kind` trained here and saved as transformers saves one:
    a GPT-2 style byte-level BPE, a SentencePiece-style Unigram with byte fallback, or a
    BERT-style WordPiece."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [*TEXTS, "the river ran past the garden and the house", "ﬁne 🙂 Ärger"] * 20
    special = ["<pad>", "<s>", "</s>", "<unk>"]
    if kind == "byte-level-bpe":
        core = Tokenizer(models.BPE())
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    elif kind == "unigram":
        core = Tokenizer(models.Unigram())
        core.pre_tokenizer = pre_tokenizers.Metaspace()
        core.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=200, special_tokens=special, unk_token="<unk>", byte_fallback=True
        )
    else:
        core = Tokenizer(models.WordPiece(unk_token="<unk>"))
        core.normalizer = normalizers.BertNormalizer(lowercase=True)
        core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        core.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=special)
    core.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    tokenizer.save_pretrained(str(directory))
    return directory


@pytest.mark.parametrize("kind", ["byte-level-bpe", "unigram", "wordpiece"])
def test_kept_tokenizers_of_every_model_kind_answer_as_transformers(tmp_path, kind: str) -> None:
    """Byte-level BPE, Unigram with byte fallback and WordPiece, each with a special
    token transformers added: kept after encoding two texts, the kept child answers as
    transformers on every text (the rest through the kept backend) and decodes random
    sequences (special tokens, bytes that are not whole UTF-8 characters) the same."""

    source = str(_trained_tokenizer(tmp_path / kind, kind))
    kept_in = tmp_path / "kept"
    _keep(source, kept_in, TEXTS[:2])
    _kept_answers_as_transformers(source, kept_in, TEXTS)
