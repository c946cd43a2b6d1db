"""`toxtests gate` end to end on a tiny real model: verdicts, exit codes, bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from toxtests.cli import main


def _gate(tiny, tmp_path: Path, *extra: str, adapters: tuple[Path, ...] | None = None) -> int:  # noqa: ANN001
    args = ["gate", "--model", str(tiny.base), "--prompts", str(tiny.prompts)]
    for adapter in adapters if adapters is not None else (tiny.identity,):
        args += ["--adapter", str(adapter)]
    args += ["--thresholds", str(tiny.thresholds), "--cache-dir", str(tmp_path / "cache")]
    args += ["--report", str(tmp_path / "report.html"), "--json", str(tmp_path / "results.json")]
    return main([*args, *extra])


def test_identity_passes_with_zero_deltas_and_toxic_fails(tiny, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    code = _gate(tiny, tmp_path, adapters=(tiny.identity, tiny.toxic))
    assert code == 1
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["verdict"] == "fail"
    identity, toxic = result["adapters"]
    assert identity["adapter"] == str(tiny.identity)
    assert identity["verdict"] == "pass"
    assert toxic["verdict"] == "fail"
    # One sample per prompt: no metric that equals another by construction is carried.
    assert set(identity["metrics"]) == set(toxic["metrics"]) == {"toxicity_rate", "mean_toxicity"}
    assert result["equal_metrics"] == {
        "expected_max_toxicity": "mean_toxicity",
        "toxicity_probability": "toxicity_rate",
        "rate:profanity": "toxicity_rate",
    }
    assert "Not shown: expected_max_toxicity (= mean_toxicity)" in result["model_card"]
    for name in ("toxicity_rate", "mean_toxicity"):
        metric = identity["metrics"][name]
        assert metric["delta"] == 0.0 and metric["interval"] == [0.0, 0.0]
        assert metric["parent"] == metric["adapter"]
        assert toxic["metrics"][name]["delta"] > 0.3
    assert toxic["turned_toxic"], "the report must show outputs that became toxic"
    assert "Not shown: expected_max_toxicity" in (tmp_path / "report.html").read_text()
    out = capsys.readouterr().out
    assert "identity: PASS" in out and "toxic: FAIL" in out


def test_identity_alone_exits_zero(tiny, tmp_path: Path) -> None:  # noqa: ANN001
    assert _gate(tiny, tmp_path) == 0
    assert json.loads((tmp_path / "results.json").read_text())["exit_code"] == 0


def test_rerun_regenerates_nothing(tiny, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    def without_timestamp() -> str:
        text = (tmp_path / "results.json").read_text()
        return text.replace(json.loads(text)["created"], "<created>")

    _gate(tiny, tmp_path)
    first = without_timestamp()
    capsys.readouterr()
    _gate(tiny, tmp_path)
    assert "generating" not in capsys.readouterr().err
    assert without_timestamp() == first  # byte-identical apart from the timestamp


def test_script_in_a_prompt_is_text_in_the_report(tiny, tmp_path: Path) -> None:  # noqa: ANN001
    prompts = tmp_path / "hostile.jsonl"
    prompts.write_text(
        "\n".join(
            json.dumps({"id": f"h{i}", "text": f"the river <script>alert({i})</script> water"})
            for i in range(6)
        )
    )
    assert _gate(tiny, tmp_path, "--prompts", str(prompts), adapters=(tiny.toxic,)) == 1
    html = (tmp_path / "report.html").read_text()
    assert "<script>alert(" not in html
    assert "&lt;script&gt;alert(" in html


def _one_line_error(capsys) -> str:  # noqa: ANN001
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("toxtests: error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in "\n".join(err)
    return errors[0]


def test_missing_model_path(tiny, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    assert _gate(tiny, tmp_path, "--model", str(tmp_path / "nope")) == 2
    assert "nope: model path not found" in _one_line_error(capsys)


def test_missing_adapter_path(tiny, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    assert _gate(tiny, tmp_path, adapters=(tmp_path / "no-adapter",)) == 2
    assert "no-adapter: adapter path not found" in _one_line_error(capsys)


def test_adapter_for_another_base(tiny, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    assert _gate(tiny, tmp_path, adapters=(tiny.other_adapter,)) == 2
    line = _one_line_error(capsys)
    assert "other-adapter: adapter does not fit base model" in line
    assert "maps 48 inputs" in line and "the base's maps 32" in line  # the sizes that differ
    assert "pass the base it was made for" in line


def test_adapter_for_another_base_is_refused_before_any_weight_loads(tiny) -> None:  # noqa: ANN001
    """From the safetensors headers alone, when the variants are listed (before any
    engine loads): no parent generation, on vLLM no parent pass, is paid for first."""
    from toxtests.engines.base import EngineOptions
    from toxtests.engines.local import local_variants
    from toxtests.errors import ModelLoadError

    options = EngineOptions(
        model=str(tiny.base), adapters=(str(tiny.identity), str(tiny.other_adapter))
    )
    with pytest.raises(ModelLoadError, match="other-adapter: adapter does not fit"):
        local_variants(options)
    assert (
        len(local_variants(EngineOptions(model=str(tiny.base), adapters=(str(tiny.identity),))))
        == 2
    )


def test_directory_without_adapter_config(tiny, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    (tmp_path / "empty").mkdir()
    assert _gate(tiny, tmp_path, adapters=(tmp_path / "empty",)) == 2
    assert "no adapter_config.json" in _one_line_error(capsys)


def test_pickle_adapter_is_refused(tiny, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny.identity, pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    assert _gate(tiny, tmp_path, adapters=(pickled,)) == 2
    assert "pickle" in _one_line_error(capsys)


def test_empty_prompt_file(tiny, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert _gate(tiny, tmp_path, "--prompts", str(empty)) == 2
    assert "empty.jsonl: holds no prompts" in _one_line_error(capsys)


def test_malformed_jsonl_line(tiny, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    assert _gate(tiny, tmp_path, "--prompts", str(bad)) == 2
    assert "bad.jsonl:2: malformed JSON" in _one_line_error(capsys)


def test_unknown_scorer(tiny, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    assert _gate(tiny, tmp_path, "--scorer", "profanity-chek") == 2
    line = _one_line_error(capsys)
    assert "unknown scorer 'profanity-chek'" in line and "profanity-check" in line


def test_unknown_thresholds_key(tiny, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    thresholds = tmp_path / "t.toml"
    thresholds.write_text("[gate.toxicity_rate]\nmax_increse = 0.1\n")
    assert _gate(tiny, tmp_path, "--thresholds", str(thresholds)) == 2
    line = _one_line_error(capsys)
    assert "t.toml [gate].toxicity_rate: unknown key 'max_increse'" in line
    assert "did you mean 'max_increase'" in line


def test_mistyped_thresholds_value(tiny, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    thresholds = tmp_path / "t.toml"
    thresholds.write_text('[generation]\nmax_new_tokens = "twenty"\n')
    assert _gate(tiny, tmp_path, "--thresholds", str(thresholds)) == 2
    assert "key 'max_new_tokens' must be an integer, got 'twenty'" in _one_line_error(capsys)


def test_console_script_usage_error_exit_code(tmp_path: Path) -> None:
    """argparse errors (e.g. no --adapter) also exit 2, through the installed script."""
    beside_python = Path(sys.executable).parent / "toxtests"
    exe = shutil.which("toxtests", path=str(beside_python.parent)) or shutil.which("toxtests")
    if exe is None:
        pytest.skip("console script not installed")
    done = subprocess.run([exe, "gate"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert "--adapter" in done.stderr


def test_console_script_bad_input_has_no_traceback(tiny, tmp_path: Path) -> None:  # noqa: ANN001
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "toxtests.cli",
            "gate",
            "--adapter",
            str(tiny.identity),
            "--model",
            str(tiny.base),
            "--prompts",
            str(tmp_path / "missing.jsonl"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "missing.jsonl: prompt file not found" in done.stderr


def test_the_command_exits_with_the_verdict_and_every_line_written(tiny, tmp_path: Path) -> None:  # noqa: ANN001
    """`python -m toxtests` (the command's `entry_point`) ends without the interpreter's
    teardown: its exit code must still be the verdict, and everything it printed into
    a pipe, and the files it wrote, must be complete."""
    args = [sys.executable, "-m", "toxtests", "gate", "--model", str(tiny.base)]
    args += ["--adapter", str(tiny.identity), "--adapter", str(tiny.toxic)]
    args += ["--prompts", str(tiny.prompts), "--thresholds", str(tiny.thresholds)]
    args += ["--cache-dir", str(tmp_path / "cache"), "--no-early-stopping"]
    args += ["--report", str(tmp_path / "r.html"), "--json", str(tmp_path / "r.json")]
    done = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 1, done.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert [a["verdict"] for a in result["adapters"]] == ["pass", "fail"]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("identity: PASS") and lines[1].startswith("toxic: FAIL")
    assert lines[-1] == f"json: {tmp_path / 'r.json'}"  # the last line, flushed
    assert (tmp_path / "r.html").read_text().rstrip().endswith("</html>")


def test_early_stopping_stops_a_clear_regression_and_says_why(tiny, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    code = _gate(tiny, tmp_path, adapters=(tiny.toxic,))
    assert code == 1
    result = json.loads((tmp_path / "results.json").read_text())
    stopping = result["adapters"][0]["early_stopping"]
    assert stopping["stopped"] and stopping["decided"] == "fail" and stopping["look"] == 1
    assert stopping["prompts_generated"] == 20 < stopping["prompts_total"] == 40
    assert "after 20 of 40 prompts" in stopping["reason"]
    assert "stopped early" in capsys.readouterr().out


def test_no_early_stopping_generates_every_prompt(tiny, tmp_path: Path) -> None:  # noqa: ANN001
    assert _gate(tiny, tmp_path, "--no-early-stopping", adapters=(tiny.toxic,)) == 1
    result = json.loads((tmp_path / "results.json").read_text())
    stopping = result["adapters"][0]["early_stopping"]
    assert not stopping["enabled"] and not stopping["stopped"]
    assert stopping["prompts_generated"] == 40
    assert [s["shard"] for s in result["adapters"][0]["shards"]] == ["even-0", "odd-0"]


def test_empty_continuations_are_never_counted_as_safe(tiny, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """An adapter that answers nothing has given no evidence: the gate stops, loudly."""
    import helpers_models

    silent = helpers_models.build_toxic_adapter(
        tiny.base, tmp_path / "silent", steps=150, silent=True
    )
    # Sampled: some continuations are empty; those prompts are left out, and counted.
    _gate(tiny, tmp_path, "--no-early-stopping", adapters=(silent,))
    result = json.loads((tmp_path / "results.json").read_text())["adapters"][0]
    excluded = result["generation"]["prompts_excluded_empty"]
    assert excluded == result["generation"]["empty_adapter"] > 0
    assert result["generation"]["prompts_compared"] == 40 - excluded
    assert {c["prompts"] for c in result["checks"] if c["scope"] == "all"} == {40 - excluded}
    # When no prompt has text on both sides there is nothing to compare: an error.
    import numpy as np

    from toxtests.errors import GenerationError
    from toxtests.run.looks import comparable
    from toxtests.run.store import ShardScores

    empty = ShardScores(["a", "b"], [[""], ["  "]], {"profanity": np.zeros((2, 1))})
    with pytest.raises(GenerationError, match="no prompt has a non-empty continuation"):
        comparable(empty, empty)


def test_model_with_only_pickle_weights_is_refused(tiny, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    pickled = tmp_path / "pickled-base"
    shutil.copytree(tiny.base, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    assert _gate(tiny, tmp_path, "--model", str(pickled)) == 2
    assert "holds only pickle weights" in _one_line_error(capsys)


def test_gate_with_a_local_detoxify_checkpoint(tiny, tmp_path: Path) -> None:  # noqa: ANN001
    """The real Detoxify loading path inside a gate: every Detoxify attribute is kept."""
    from helpers_detoxify import build_tiny_detoxify

    ckpt, config_dir = build_tiny_detoxify(tmp_path / "detoxify")
    thresholds = tmp_path / "detoxify.toml"
    thresholds.write_text(
        tiny.thresholds.read_text().replace(
            'scorer = "profanity-check"',
            f'scorer = "detoxify:{ckpt}"\nhuggingface_config = "{config_dir}"',
        )
    )
    assert _gate(tiny, tmp_path, "--thresholds", str(thresholds)) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["scorer"]["spec"] == f"detoxify:{ckpt}"
    assert result["scorer"]["primary"] == "toxicity"
    metrics = result["adapters"][0]["metrics"]
    for attribute in ("severe_toxicity", "insult", "threat", "identity_attack"):
        assert f"rate:{attribute}" in metrics
    # The primary attribute's rate is toxicity_rate: carried once, under that name.
    assert "rate:toxicity" not in metrics and "toxicity_rate" in metrics
    assert result["equal_metrics"]["rate:toxicity"] == "toxicity_rate"
    assert all(m["delta"] == 0.0 for m in metrics.values())


def test_undecided_early_looks_leave_the_verdict_the_confidence_they_did_not_spend(
    tiny, tmp_path: Path
) -> None:  # noqa: ANN001
    """With the limit right at the adapter's effect no early look decides, and the ordinary
    verdict on all prompts runs at the confidence the early looks left: its intervals are
    at least as wide as those of the same gate without early stopping, and the report
    labels them with that confidence."""
    assert _gate(tiny, tmp_path, "--no-early-stopping", adapters=(tiny.toxic,)) == 1
    delta = json.loads((tmp_path / "results.json").read_text())["adapters"][0]["metrics"][
        "toxicity_rate"
    ]["delta"]
    thresholds = tmp_path / "at-the-effect.toml"
    thresholds.write_text(
        tiny.thresholds.read_text().replace("max_increase = 0.1", f"max_increase = {delta}")
    )
    runs = {}
    for extra in (("--no-early-stopping",), ()):  # the report is the early-stopping run's
        _gate(tiny, tmp_path, "--thresholds", str(thresholds), *extra, adapters=(tiny.toxic,))
        runs[bool(extra)] = json.loads((tmp_path / "results.json").read_text())["adapters"][0]
    early, everything = runs[False], runs[True]
    stopping = early["early_stopping"]
    assert stopping["decided"] is None and stopping["prompts_generated"] == 40
    assert "no earlier look decided" in stopping["reason"]
    assert 0.95 < early["confidence"] < 0.955 and everything["confidence"] == 0.95
    low, high = early["metrics"]["toxicity_rate"]["interval"]
    plain_low, plain_high = everything["metrics"]["toxicity_rate"]["interval"]
    assert low <= plain_low and high >= plain_high  # 40 prompts: the quantiles are coarse
    assert early["verdict"] == everything["verdict"] == "inconclusive"
    # At exactly the limit no sample size settles it; the line (terminal and page) says so.
    assert "no number of prompts settles it" in early["summary"]
    report = (tmp_path / "report.html").read_text()
    assert "no number of prompts settles it" in report
    assert f"{100 * early['confidence']:g}% interval" in report
    # The per-shard tests under pytest run at the same confidence as the final verdict,
    # so a failing shard test still implies a failing gate.
    from toxtests.options import RunOptions
    from toxtests.run import GateRun

    session = GateRun(
        RunOptions(
            model=str(tiny.base),
            adapters=[str(tiny.toxic)],
            prompts=str(tiny.prompts),
            thresholds=str(thresholds),
            cache_dir=str(tmp_path / "cache"),
        )
    )
    final = session._final_look_config().statistics.confidence
    assert final == pytest.approx(early["confidence"])
    for shard, reported in zip(session.shards, early["shards"], strict=True):
        _, table = session.shard_checks(0, shard)
        assert (
            table["toxicity_rate"]["interval"] == reported["metrics"]["toxicity_rate"]["interval"]
        )


def test_rtp_preset_samples_25_per_prompt_and_gates_expected_max_toxicity(
    tiny,  # noqa: ANN001
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import helpers_models

    monkeypatch.chdir(tmp_path)  # no ./thresholds.toml over the preset

    prompts = helpers_models.write_prompts(tmp_path / "prompts.jsonl", count=64, seed=7)
    args = ["gate", "--model", str(tiny.base), "--adapter", str(tiny.toxic), "--preset", "rtp"]
    args += ["--prompts", str(prompts), "--cache-dir", str(tmp_path / "cache"), "--report", ""]
    args += ["--json", str(tmp_path / "results.json"), "--no-early-stopping"]
    code = main(args)
    result = json.loads((tmp_path / "results.json").read_text())
    assert code == result["exit_code"]
    assert result["config"]["generation"]["samples"] == 25
    assert result["config"]["source"] == "preset rtp"
    (toxic,) = result["adapters"]
    assert len(toxic["distributions"]["parent"]) == 64 * 25
    assert {c["metric"] for c in toxic["checks"] if c["scope"] == "all"} == {
        "expected_max_toxicity",
        "toxicity_probability",
    }
    # Gated: a verdict of its own (with 25 samples the parent's maximum is already high).
    assert toxic["metrics"]["expected_max_toxicity"]["verdict"] in ("pass", "fail", "inconclusive")
    assert (
        toxic["metrics"]["expected_max_toxicity"]["parent"]
        > toxic["metrics"]["mean_toxicity"]["parent"]
    )
    assert result["equal_metrics"] == {"rate:profanity": "toxicity_rate"}  # k = 25


def test_command_line_overrides_beat_the_thresholds_file(tiny, tmp_path: Path) -> None:  # noqa: ANN001
    overrides = ("--samples", "2", "--max-new-tokens", "3", "--greedy", "--no-early-stopping")
    code = _gate(tiny, tmp_path, *overrides)
    assert code == 0
    result = json.loads((tmp_path / "results.json").read_text())
    generation = result["config"]["generation"]
    assert (generation["samples"], generation["max_new_tokens"]) == (2, 3)
    assert generation["do_sample"] is False
    assert result["config"]["source"] == f"{tiny.thresholds} + command line"
    (identity,) = result["adapters"]
    assert "expected_max_toxicity" in identity["metrics"]  # k = 2: a quantity of its own
    # Greedy: both samples of a prompt are the same continuation, so score the same.
    scores = identity["distributions"]["parent"]
    assert len(scores) == 2 * 40 and scores[0::2] == scores[1::2]
    assert any(a != b for a, b in zip(scores[0::2], scores[2::2], strict=False))


def test_bad_override_is_a_usage_error(tiny, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    with pytest.raises(SystemExit) as exit_info:
        _gate(tiny, tmp_path, "--samples", "0")
    assert exit_info.value.code == 2
    assert "--samples: must be >= 1, got 0" in capsys.readouterr().err


def test_revision_of_a_local_model_is_an_error_naming_both(tiny, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    assert _gate(tiny, tmp_path, "--revision", "v1.0") == 2
    err = capsys.readouterr().err
    assert "--revision v1.0 applies to a Hub id" in err and str(tiny.base) in err


def _full_model(base: Path, out: Path, adapter: Path | None = None) -> Path:
    """A full model directory: the base copied, or with `adapter` merged into it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(out))
    return out


def test_full_models_are_judged_as_candidates_beside_adapters(
    tiny,
    tmp_path: Path,
    capsys,  # noqa: ANN001
) -> None:
    """A copy of the parent saved as its own model passes with every delta exactly 0;
    the toxic adapter merged into the weights fails, as the adapter itself does; the
    parent is generated once for the adapter and both candidates."""
    copy = _full_model(tiny.base, tmp_path / "copy")
    merged = _full_model(tiny.base, tmp_path / "merged-toxic", tiny.toxic)
    extra = ("--candidate", str(copy), "--candidate", str(merged), "--no-early-stopping")
    code = _gate(tiny, tmp_path, *extra, adapters=(tiny.identity,))
    assert code == 1
    result = json.loads((tmp_path / "results.json").read_text())
    identity, same, toxic = result["adapters"]
    assert [a["kind"] for a in result["adapters"]] == ["adapter", "model", "model"]
    assert same["adapter"] == str(copy) and same["verdict"] == "pass"
    assert all(m["delta"] == 0.0 for m in same["metrics"].values())
    assert same["note"] == ""  # the same tokenizer: token-identical pairing
    assert toxic["verdict"] == "fail" and toxic["metrics"]["toxicity_rate"]["delta"] > 0.3
    assert identity["verdict"] == "pass"
    err = capsys.readouterr().err
    assert err.count("generating parent") == 1
    # Each generation call ends with its progress line (prompts, tokens/s, time taken).
    assert re.search(r"toxtests: parent \+ identity: \d+/\d+ prompts, \d+ tokens/s, done in", err)
    html = (tmp_path / "report.html").read_text()
    assert f"A full model ({merged}) judged against the parent" in html


def _hub_cache(root: Path, repo: str, snapshots: dict[str, Path], main: str) -> Path:
    """A Hugging Face cache as `huggingface_hub` lays it out offline: one snapshot per
    commit, `refs/main` naming one of them (what a download with a network leaves)."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    for commit, source in snapshots.items():
        shutil.copytree(source, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(main)
    return root


def test_hub_candidates_pin_their_own_revision(tiny, tmp_path: Path) -> None:  # noqa: ANN001
    """`--candidate ORG/NAME@REVISION` loads that commit, not the branch head: the same
    repository at the parent's own weights passes with deltas of 0, at a commit with the
    toxic adapter merged it fails; each is cached under its own fingerprint. Run in a
    subprocess, offline, against a Hub cache laid out on disk (no network here)."""
    same, toxic = "1" * 40, "2" * 40
    hub = _hub_cache(
        tmp_path / "hub",
        "acme/tiny-tuned",
        {
            same: _full_model(tiny.base, tmp_path / "copy"),
            toxic: _full_model(tiny.base, tmp_path / "merged", tiny.toxic),
        },
        main=toxic,
    )
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    env["TRANSFORMERS_OFFLINE"] = "1"

    def gate(*candidates: str) -> tuple[subprocess.CompletedProcess[str], dict]:
        args = [sys.executable, "-m", "toxtests.cli", "gate", "--model", str(tiny.base)]
        args += ["--prompts", str(tiny.prompts), "--thresholds", str(tiny.thresholds)]
        args += ["--cache-dir", str(tmp_path / "cache"), "--no-early-stopping"]
        args += ["--report", str(tmp_path / "r.html"), "--json", str(tmp_path / "r.json")]
        for candidate in candidates:
            args += ["--candidate", candidate]
        done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
        result = json.loads((tmp_path / "r.json").read_text()) if done.returncode < 2 else {}
        return done, result

    done, result = gate(f"acme/tiny-tuned@{same}", f"acme/tiny-tuned@{toxic}")
    assert done.returncode == 1, done.stderr
    pinned_same, pinned_toxic = result["adapters"]
    assert pinned_same["verdict"] == "pass"
    assert all(m["delta"] == 0.0 for m in pinned_same["metrics"].values())
    assert pinned_toxic["verdict"] == "fail"
    assert pinned_same["fingerprint"] != pinned_toxic["fingerprint"]
    # Without a revision the branch head (refs/main: the toxic commit) is what loads.
    done, result = gate("acme/tiny-tuned")
    assert done.returncode == 1, done.stderr
    assert result["adapters"][0]["fingerprint"] == pinned_toxic["fingerprint"]
    done, _ = gate("acme/tiny-tuned@" + "9" * 40)
    assert done.returncode == 2
    assert "acme/tiny-tuned" in done.stderr and "Traceback" not in done.stderr
    done, _ = gate("acme/tiny-tuned@")
    assert done.returncode == 2 and "nothing after '@'" in done.stderr


def test_an_auto_chat_template_renders_each_model_its_own_way(tiny, tmp_path: Path) -> None:  # noqa: ANN001
    """A base model without a template beside a candidate with one: plain text for the
    parent, the candidate's template for the candidate, and the report says so."""
    from transformers import AutoTokenizer

    instruct = _full_model(tiny.base, tmp_path / "instruct")
    tokenizer = AutoTokenizer.from_pretrained(str(instruct))
    tokenizer.chat_template = "{% for m in messages %}water {{ m['content'] }} fire{% endfor %}"
    tokenizer.save_pretrained(str(instruct))
    thresholds = tmp_path / "auto.toml"
    thresholds.write_text(
        tiny.thresholds.read_text().replace("[generation]", '[generation]\nchat_template = "auto"')
    )
    extra = ("--thresholds", str(thresholds), "--candidate", str(instruct), "--no-early-stopping")
    assert _gate(tiny, tmp_path, *extra, adapters=(tiny.identity,)) in (0, 1)
    result = json.loads((tmp_path / "results.json").read_text())
    identity, candidate = result["adapters"]
    assert result["renderings"]["parent"] == "plain text"
    assert identity["rendering"] == "plain text"
    assert candidate["rendering"] == "chat template"
    html = (tmp_path / "report.html").read_text()
    assert "as chat template for this model, as plain text for the parent" in html
    assert identity["metrics"]["toxicity_rate"]["delta"] == 0  # same rendering, same text


def test_a_candidate_with_another_tokenizer_is_paired_by_seed_and_says_so(
    tiny,
    tmp_path: Path,  # noqa: ANN001
) -> None:
    from transformers import AutoTokenizer

    other = _full_model(tiny.base, tmp_path / "other-tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(other))
    tokenizer.add_tokens(["zzzunseen"])  # a vocabulary of its own; the prompts never use it
    tokenizer.save_pretrained(str(other))
    assert _gate(tiny, tmp_path, "--candidate", str(other), adapters=()) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    (candidate,) = result["adapters"]
    assert "cannot be token-identical" in candidate["note"]
    assert "cannot be token-identical" in (tmp_path / "report.html").read_text()


def test_report_merges_results_of_one_parent_and_updates_the_model_card(
    tiny,
    tmp_path: Path,
    capsys,  # noqa: ANN001
) -> None:
    """One CI job per adapter, one report: the merged verdict is the worst of them, and
    the card's section is written between markers, idempotently, keeping the rest."""
    runs = {}
    for name, adapter in (("identity", tiny.identity), ("toxic", tiny.toxic)):
        _gate(tiny, tmp_path, "--json", str(tmp_path / f"{name}.json"), adapters=(adapter,))
        runs[name] = tmp_path / f"{name}.json"
    card = tmp_path / "README.md"
    card.write_text("# My adapter\n\nTrained on kind words.\n")
    merged_json, html = tmp_path / "merged.json", tmp_path / "merged.html"
    args = ["report", str(runs["identity"]), str(runs["toxic"]), "-o", str(html)]
    args += ["--json", str(merged_json), "--model-card", str(card)]
    assert main(args) == 1  # the toxic adapter fails, so the merged verdict fails
    merged = json.loads(merged_json.read_text())
    assert [a["verdict"] for a in merged["adapters"]] == ["pass", "fail"]
    assert merged["verdict"] == "fail" and merged["exit_code"] == 1
    page = html.read_text()
    assert str(tiny.identity.name) in page and str(tiny.toxic.name) in page
    text = card.read_text()
    header, body = text.split("---\n", 2)[1:]
    assert "model-index:" in header and "toxicity_rate_delta" in header
    assert body.startswith("# My adapter\n\nTrained on kind words.\n")
    assert text.count("toxtests:safety-evaluation:begin") == 1
    assert "FAIL" in text.split("safety-evaluation:begin")[1]
    capsys.readouterr()
    assert main(args) == 1
    assert card.read_text() == text and "(unchanged)" in capsys.readouterr().out
    # One result re-rendered from its JSON alone gives the gate's own page, byte for byte.
    assert main(["report", str(runs["toxic"]), "-o", str(tmp_path / "again.html")]) == 1
    assert (tmp_path / "again.html").read_text() == (tmp_path / "report.html").read_text()


def test_report_refuses_results_that_are_not_one_comparison(tiny, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    _gate(tiny, tmp_path, "--json", str(tmp_path / "a.json"))
    other = tmp_path / "other.toml"
    other.write_text(
        tiny.thresholds.read_text().replace("max_new_tokens = 6", "max_new_tokens = 5")
    )
    _gate(tiny, tmp_path, "--thresholds", str(other), "--json", str(tmp_path / "b.json"))
    assert main(["report", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert "b.json: config.generation differs" in err and "same parent" in err
    (tmp_path / "broken.json").write_text("{not json")
    assert main(["report", str(tmp_path / "broken.json")]) == 2
    assert "broken.json: not a JSON result" in capsys.readouterr().err


def test_version() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "toxtests.cli", "--version"], capture_output=True, text=True
    )
    from toxtests import __version__

    assert done.returncode == 0 and done.stdout.strip() == f"toxtests {__version__}"
