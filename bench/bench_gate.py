"""Benchmark: toxtests' gate vs the plain transformers loop a user would write.

    python bench/bench_gate.py            # default: Gemma 3 270M, 900 challenging prompts
    python bench/bench_gate.py --quick    # 64 prompts, a couple of minutes
    python bench/bench_gate.py --small-only   # 128 prompts end to end vs the plain script
    python bench/bench_gate.py --together-only  # parent + adapter sharing batches or not
    python bench/bench_gate.py --bound-only   # the ceiling and the matrix products' bound

Measures, in one run on the same model, prompts and settings (20 new tokens, top-p 0.9,
one sample per prompt): the baseline (`model.generate` in batches, then the same
scorer); the machine's ceiling (measured matmul throughput / the model's FLOPs per
generated token); toxtests' first gate (parent + one adapter), a second adapter against
the same parent, and an identical re-run; peak memory; wall time by phase; the fixed
costs (everything but generation) on their own line; the k = 25 samples workload; the
parent and an adapter sharing batches against one after the other (128 prompts); and a
small CI-sized gate (128 prompts) end to end as processes against `plain_gate.py`, the
script a user would write. The first line names the machine: compare figures only
within one run.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PROMPTS = REPO.parent / "shared" / "data" / "rtp" / "toxic.jsonl"
ADAPTERS = REPO / "toxtests" / "data" / "adapters"


def measured_matmul_gflops(hidden: int, vocab: int, batch: int) -> dict[str, float]:
    """Best sustained fp32 GFLOP/s of each matmul library torch offers here (MKL's sgemm
    behind `@`, and oneDNN with a packed weight, which toxtests uses), over the model's
    own shapes and large square ones. The ceiling takes the best of all."""
    import torch

    from toxtests.engines.torch import packed

    shapes = (
        (batch, hidden, vocab),
        (batch, hidden, 4096),
        (batch, hidden, 4 * hidden),
        (1024, 1024, 1024),
        (2048, 2048, 2048),
    )
    best = {"mkl": 0.0, "onednn": 0.0}
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        runs = {"mkl": lambda a=a, b=b: a @ b}
        if packed.available():
            weight = packed.pack(b.t().contiguous(), m)
            runs["onednn"] = lambda a=a, w=weight: packed.linear(a, w, None)
        for name, run in runs.items():
            run()
            for _ in range(3):
                started = time.perf_counter()
                for _ in range(3):
                    run()
                seconds = (time.perf_counter() - started) / 3
                best[name] = max(best[name], 2 * m * k * n / seconds / 1e9)
    return best


def head_by_rows(model, rows: tuple[int, ...] = (128, 256), repeats: int = 3) -> dict[int, float]:  # noqa: ANN001
    """GFLOP/s of the output head as a decode step runs it (every 4096-column chunk of the
    model's own packed head, each read from memory once a step) for `rows` rows at a
    time: what one 256-row batch of parent and adapter rows would gain over two of 128."""
    import torch

    from toxtests.engines.torch.head import output_head
    from toxtests.engines.torch.memory import retained_memory

    fused = output_head(model, "cpu")
    if fused is None:
        return {}
    head = fused[1]
    hidden = int(model.config.hidden_size)
    best: dict[int, float] = {}
    with torch.inference_mode(), retained_memory():  # as generation keeps its heap
        for count in rows:
            states = torch.randn(count, hidden)
            head.logit_chunks(states)  # packing and first-touch costs out of the timing
            for _ in range(repeats):
                started = time.perf_counter()
                head.logit_chunks(states)
                seconds = time.perf_counter() - started
                flops = 2.0 * count * hidden * int(model.config.vocab_size)
                best[count] = max(best.get(count, 0.0), flops / seconds / 1e9)
    head.release()
    return best


def decoder_shapes(model) -> dict[tuple[int, int], int]:  # noqa: ANN001
    """(in, out) features of the decoder's linear layers, with how many of each."""
    import torch

    output = model.get_output_embeddings()
    counts: dict[tuple[int, int], int] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not output:
            shape = (module.in_features, module.out_features)
            counts[shape] = counts.get(shape, 0) + 1
    return counts


def linear_gflops(shape: tuple[int, int], rows: int, repeats: int = 5) -> float:
    """GFLOP/s of one packed oneDNN product (`toxtests.engines.torch.packed`, as the
    engine runs its decoder) of `rows` rows through an (in, out) layer."""
    import torch

    from toxtests.engines.torch import packed

    inputs, weight = torch.randn(rows, shape[0]), torch.randn(shape[1], shape[0])
    packed_weight = packed.pack(weight) if packed.available() else None
    best = 0.0
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first run builds the kernel
            started = time.perf_counter()
            if packed_weight is None:
                torch.nn.functional.linear(inputs, weight)
            else:
                packed.linear(inputs, packed_weight, None)
            seconds = time.perf_counter() - started
            best = max(best, 2.0 * rows * shape[0] * shape[1] / seconds / 1e9)
    return best


def batch_rows(model, prompts: int) -> int:  # noqa: ANN001
    """Rows of the first decode batch of one variant on `prompts` prompts, as free memory
    sizes it here (`toxtests.engines.torch.loop.auto_batch_size`)."""
    from toxtests.engines.torch.loop import auto_batch_size, balanced_batches

    start, end = balanced_batches(prompts, auto_batch_size(model, "cpu"))[0]
    return end - start


def product_rates(model, prompts: int) -> dict:  # noqa: ANN001
    """The measured rates `matmul_bound` needs, for a first gate on `prompts` prompts:
    the decode batch's rows, the output head's GFLOP/s at those rows, and each decoder
    layer shape's count with its GFLOP/s at those rows and in a 2048-row prefill."""
    rows = batch_rows(model, prompts)
    return {
        "rows": rows,
        "head": max(head_by_rows(model, (rows,)).values()),
        "head_flops": 2.0 * model.config.hidden_size * model.config.vocab_size,
        "shapes": [
            (shape, count, linear_gflops(shape, 2048), linear_gflops(shape, rows))
            for shape, count in decoder_shapes(model).items()
        ],
    }


def matmul_bound(rates: dict, prompt_tokens: int, generated: int, generations: int) -> float:
    """Tokens/s of a gate whose matrix products each ran at the rate measured for its
    shape (`product_rates`) and whose every other operation (attention, sampling, norms,
    the loop itself) took no time: an upper bound on the workload, in its FLOPs."""
    decode_tokens = generated - generations  # each row's last token needs no decoder step
    seconds = generated * rates["head_flops"] / (rates["head"] * 1e9)
    for shape, count, prefill_rate, decode_rate in rates["shapes"]:
        flops = count * 2.0 * shape[0] * shape[1]
        seconds += prompt_tokens * flops / (prefill_rate * 1e9)
        seconds += decode_tokens * flops / (decode_rate * 1e9)
    return generated / seconds


def flops_per_token(model) -> float:  # noqa: ANN001
    """2 × every weight a generated token passes through (the embedding lookup is free,
    the tied output projection is not)."""
    params = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    config = model.config
    output = config.vocab_size * config.hidden_size
    return 2.0 * (params + (output if getattr(config, "tie_word_embeddings", False) else 0))


def workload_flops_per_token(
    per_token: float, head: float, prompt_tokens: int, generated: int, rows: int
) -> float:
    """FLOPs per generated token counting the prompts too: every prompt token and every
    generated token but each row's last goes through the decoder, and every generated
    token through the output projection (the prompt positions before the last need no
    logits). `per_token` (`flops_per_token`) counts the generated tokens alone; `head`
    is its output projection's share."""
    decoder = per_token - head
    total = (prompt_tokens + generated - rows) * decoder + generated * head
    return total / generated


def baseline(model_dir: str, prompts: list[str], new_tokens: int, batch: int, scorer) -> dict:  # noqa: ANN001
    import torch
    from plain_gate import generate  # beside this file: the loop the plain script runs
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    load = time.perf_counter() - started
    torch.manual_seed(0)
    started = time.perf_counter()
    texts, tokens = generate(model, tokenizer, prompts, new_tokens, batch)
    generation = time.perf_counter() - started
    started = time.perf_counter()
    scorer.score(texts)
    score = time.perf_counter() - started
    return {
        "load": load,
        "generate": generation,
        "score": score,
        "tokens": tokens,
        "tokens_per_s": tokens / generation,
    }


def gate(options, label: str) -> dict:  # noqa: ANN001
    from toxtests.report import write_report
    from toxtests.run import GateRun

    started = time.perf_counter()
    session = GateRun(options)
    result = session.result()
    stats_and_generation = time.perf_counter() - started
    report_started = time.perf_counter()
    write_report(result.to_json(), options.report, options.json)
    report = time.perf_counter() - report_started
    session.close()
    t = session.timings.seconds
    tokens = session.timings.generated_tokens
    statistics = stats_and_generation - t["load"] - t["generate"] - t["score"]
    return {
        "label": label,
        "wall": stats_and_generation + report,
        "load": t["load"],
        "generate": t["generate"],
        "score": t["score"],
        "statistics": statistics,
        "report": report,
        "tokens": tokens,
        "tokens_per_s": tokens / t["generate"] if t["generate"] else None,
        "verdicts": [a.verdict for a in result.adapters],
        "early_stopping": result.early_stopping,
        "session": session,
    }


def invariance_cost(prompts: list, new_tokens: int, repeats: int = 2) -> dict:  # noqa: ANN001
    """Tokens/s of the parent's generation with the batch-invariant attention (decode
    steps in the native kernel, and through torch run by run) and with transformers'
    padded SDPA, alternated `repeats` times on one loaded model (the best of each): what
    invariance costs. The texts of the paths are compared too."""
    from toxtests.config import GenerationConfig
    from toxtests.engines.torch import loop, native_attention
    from toxtests.engines.torch.load import load_base

    # transformers' model: padded SDPA is its attention; the native decoder (which a gate
    # runs, with the same bits as the invariant path here) always attends row by row.
    loaded = load_base("gemma3-270m", native=False)
    settings = GenerationConfig(max_new_tokens=new_tokens, top_p=0.9)
    applies = loop.row_attention_applies
    kernel = native_attention.load
    best: dict[str, float] = {"invariant": 0.0, "invariant_torch": 0.0, "padded": 0.0}
    texts: dict[str, list] = {}
    try:
        for _ in range(repeats):
            for path in best:
                loop.row_attention_applies = (
                    applies if path != "padded" else (lambda model, device: False)
                )
                native_attention.load = kernel if path == "invariant" else (lambda: None)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    generator = loop.Generator(
                        loaded.model, loaded.tokenizer, settings, loaded.device
                    )
                generator.generate(prompts[:4], None)  # first-call costs out of the timing
                started = time.perf_counter()
                rows = generator.generate(prompts, None)
                seconds = time.perf_counter() - started
                tokens = sum(g.tokens for row in rows for g in row)
                best[path] = max(best[path], tokens / seconds)
                texts[path] = [g.text for row in rows for g in row]
    finally:
        loop.row_attention_applies = applies
        native_attention.load = kernel
    changed = sum(a != b for a, b in zip(texts["invariant"], texts["padded"], strict=True))
    return {
        "invariant_tokens_per_s": best["invariant"],
        "invariant_torch_tokens_per_s": best["invariant_torch"],
        "padded_tokens_per_s": best["padded"],
        "cost": 1 - best["invariant"] / best["padded"],
        "cost_torch": 1 - best["invariant_torch"] / best["padded"],
        "texts_changed": changed,
        "texts": len(texts["padded"]),
    }


def shared_prefill(prompts: list, new_tokens: int, samples: int, repeats: int = 2) -> dict:  # noqa: ANN001
    """RealToxicityPrompts' protocol (k samples a prompt, top-p 0.9): tokens/s with each
    prompt prefilled once for its k rows, and with k separate prefills, alternated on one
    loaded model (the best of each); the texts must be the same."""
    from toxtests.config import GenerationConfig
    from toxtests.engines.torch import loop
    from toxtests.engines.torch.load import load_base

    loaded = load_base("gemma3-270m")
    settings = GenerationConfig(max_new_tokens=new_tokens, top_p=0.9, samples=samples)
    best = {"shared": 0.0, "separate": 0.0}
    texts: dict[str, list] = {}
    for _ in range(repeats):
        for path in best:
            generator = loop.Generator(loaded.model, loaded.tokenizer, settings, loaded.device)
            generator.share_prefill = path == "shared"
            generator.generate(prompts[:2], None)  # first-call costs out of the timing
            started = time.perf_counter()
            rows = generator.generate(prompts, None)
            seconds = time.perf_counter() - started
            best[path] = max(best[path], sum(g.tokens for r in rows for g in r) / seconds)
            texts[path] = [g.text for row in rows for g in row]
    return {
        "shared_tokens_per_s": best["shared"],
        "separate_tokens_per_s": best["separate"],
        "speedup": best["shared"] / best["separate"],
        "same_texts": texts["shared"] == texts["separate"],
        "texts": len(texts["shared"]),
    }


def together_cost(prompts: list, new_tokens: int, repeats: int = 3) -> dict:  # noqa: ANN001
    """A gate's two generations (parent and the toxic demo adapter, one sample) with their
    rows sharing batches, and one after the other, alternated `repeats` times on one loaded
    model (the best of each); the texts must be the same."""
    from toxtests.config import GenerationConfig
    from toxtests.engines.torch import loop
    from toxtests.engines.torch.load import attach_adapters, load_base

    loaded = attach_adapters(load_base("gemma3-270m"), [str(ADAPTERS / "toxic")])
    adapter = loaded.adapters[0].peft_name
    settings = GenerationConfig(max_new_tokens=new_tokens, top_p=0.9)
    generator = loop.Generator(loaded.model, loaded.tokenizer, settings, loaded.device)
    generator.generate_together([(prompts[:2], None), (prompts[:2], adapter)])  # warm
    best = {"together": 0.0, "separate": 0.0}
    texts: dict[str, list] = {}
    for _ in range(repeats):
        for path in best:
            started = time.perf_counter()
            if path == "together":
                jobs = generator.generate_together([(prompts, None), (prompts, adapter)])
            else:
                jobs = [generator.generate(prompts, None), generator.generate(prompts, adapter)]
            seconds = time.perf_counter() - started
            tokens = sum(g.tokens for job in jobs for row in job for g in row)
            best[path] = max(best[path], tokens / seconds)
            texts[path] = [g.text for job in jobs for row in job for g in row]
    return {
        "together_tokens_per_s": best["together"],
        "separate_tokens_per_s": best["separate"],
        "speedup": best["together"] / best["separate"],
        "same_texts": texts["together"] == texts["separate"],
        "mixed": generator._can_mix([None, adapter]),
        "texts": len(texts["together"]),
    }


def machine() -> str:
    """The CPU, its vector extensions and the threads torch uses: figures compare only
    within one machine."""
    import platform

    import torch

    model, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{model}, {vector}, {torch.get_num_threads()} torch threads"


def _timed_process(
    command: list[str], timings: Path | None = None, env: dict[str, str] | None = None
) -> dict:
    """Wall seconds of a command run as its own process (interpreter start and imports
    counted), with its phase timings when it writes them (`timed_gate.py`); `env`: extra
    environment variables."""
    import os
    import subprocess

    environment = {**os.environ, **(env or {})}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
    wall = time.perf_counter() - started
    if done.returncode not in (0, 1):  # 1: the gate failed an adapter, as it should
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr}")
    figures: dict = {"wall": wall, "stdout": done.stdout}
    if timings is not None:
        figures.update(json.loads(timings.read_text()))
        generate = figures["seconds"].get("generate", 0.0)
        figures["outside_generation"] = wall - generate
        tokens = figures["generated_tokens"]
        figures["tokens_per_s"] = tokens / generate if generate else None
    return figures


def cold_cache(cache: Path, model_dir: str) -> Path:
    """A cache directory with nothing generated in it that shares the converted model,
    as a CI runner's cached `models/` would: its tokenizer kept by earlier runs, but not
    on these prompts (copied without the prompts it kept: a gate adds its own there)."""
    from toxtests.engines.torch.tokenizer_process import KEPT_PROMPTS

    (cache / "models").mkdir(parents=True)
    for entry in Path(model_dir).parent.iterdir():
        if entry.name == "tokenizers" and entry.is_dir():
            shutil.copytree(entry, cache / "models" / entry.name)
            for kept in (cache / "models" / entry.name).glob(f"*/{KEPT_PROMPTS}"):
                kept.unlink()
        else:
            (cache / "models" / entry.name).symlink_to(entry)
    return cache


def gate_workdir(prefix: str, prompts: list, new_tokens: int, model_dir: str) -> tuple:  # noqa: ANN001
    """(work directory, prompt file, thresholds.toml, cold cache) for gates on `prompts`."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    prompt_file = workdir / "prompts.jsonl"
    prompt_file.write_text(
        "".join(
            json.dumps({"id": p.id, "text": p.text, "challenging": p.challenging}) + "\n"
            for p in prompts
        )
    )
    thresholds = workdir / "thresholds.toml"
    thresholds.write_text(f"[generation]\nmax_new_tokens = {new_tokens}\ntop_p = 0.9\n")
    return workdir, prompt_file, thresholds, cold_cache(workdir / "cache", model_dir)


def small_workload(prompts: list, args: argparse.Namespace, model_dir: str) -> dict:  # noqa: ANN001
    """The CI-sized gate end to end, as processes: 128 prompts not seen before, parent +
    one adapter, early stopping off, a fresh cache directory (the converted model
    shared), against the plain transformers + PEFT script (`plain_gate.py`); then a
    second adapter against the cached parent. Then the same two gates again, in a fresh
    cache directory, with the native decoder switched off (transformers' Gemma 3 and PEFT,
    imported by the gate's process): the same text, the fixed costs of the imports."""
    from toxtests.engines.torch.load import NATIVE_VARIABLE
    from toxtests.shards import stratified_subset

    chosen = stratified_subset(prompts, args.small_prompts)
    workdir, prompt_file, thresholds, cache = gate_workdir(
        "toxtests-bench-small-", chosen, args.new_tokens, model_dir
    )
    adapters = REPO / "toxtests" / "data" / "adapters"
    bench = Path(__file__).resolve().parent
    plain = _timed_process(
        [
            sys.executable,
            str(bench / "plain_gate.py"),
            model_dir,
            str(adapters / "identity"),
            str(prompt_file),
            "--new-tokens",
            str(args.new_tokens),
        ]
    )

    def gate_process(label: str, *adapter_names: str, cache: Path = cache, env=None) -> dict:  # noqa: ANN001
        timings = workdir / f"{label}.json"
        command = [sys.executable, str(bench / "timed_gate.py"), str(timings), "gate"]
        for name in adapter_names:
            command += ["--adapter", str(adapters / name)]
        command += [
            "--prompts",
            str(prompt_file),
            "--thresholds",
            str(thresholds),
            "--cache-dir",
            str(cache),
            "--report",
            str(workdir / "report.html"),
            "--json",
            str(workdir / "results.json"),
            "--no-early-stopping",
            "--quiet",
        ]
        return _timed_process(command, timings, env)

    first = gate_process("first", "identity")
    second = gate_process("second", "identity", "toxic")
    off = {NATIVE_VARIABLE: "0"}
    other_cache = cold_cache(workdir / "cache-transformers", model_dir)
    first_off = gate_process("first-off", "identity", cache=other_cache, env=off)
    second_off = gate_process("second-off", "identity", "toxic", cache=other_cache, env=off)
    shutil.rmtree(workdir, ignore_errors=True)
    for run in (plain, first, second, first_off, second_off):
        run.pop("stdout")
    return {
        "transformers_decoder": {"first_gate": first_off, "second_adapter": second_off},
        "prompts": len(chosen),
        "plain_script": plain,
        "first_gate": first,
        "second_adapter": second,
        "speedup": plain["wall"] / first["wall"],
        "second_share": second["wall"] / first["wall"],
    }


def report_bound(  # noqa: PLR0913
    rates: dict,
    prompts: int,
    prompt_tokens: int,
    generated: int,
    ceiling: float,
    rate: float | None,
    figures: dict,
) -> None:
    """What the 60%-of-the-ceiling target leaves for everything but the matrix products:
    the first gate's products (parent and adapter, prompts and generated tokens) each at
    its shape's measured rate, nothing else costing time."""
    bound = matmul_bound(rates, 2 * prompt_tokens, generated, 2 * prompts)
    line = (
        f"matrix products alone, each at its shape's measured rate ({rates['rows']}-row "
        f"decode steps, head {rates['head']:.0f} GFLOP/s), attention, sampling, norms and the "
        f"loop free: {bound:.0f} tokens/s = {bound / ceiling:.0%} of the ceiling"
    )
    if rate:
        line += f"; toxtests generates at {rate / bound:.0%} of that bound"
    print(line)
    figures["matmul_bound_tokens_per_s"] = bound


def report_head(model, prompts: int) -> dict[int, float]:  # noqa: ANN001
    """The head at 128 and 256 rows (the small workload's batches) and at the rows of
    the default workload's batches (free memory decides them)."""
    by_rows = head_by_rows(model, tuple(sorted({128, 256, batch_rows(model, prompts)})))
    if by_rows:
        print(
            "output head as a decode step runs it (every chunk read once a step): "
            + ", ".join(f"{rows} rows {value:.0f} GFLOP/s" for rows, value in by_rows.items())
        )
    return by_rows


def report_small(prompts: list, args: argparse.Namespace, model_dir: str, figures: dict) -> None:  # noqa: ANN001
    small = small_workload(prompts, args, model_dir)
    figures["small"] = small
    first, second = small["first_gate"], small["second_adapter"]
    print(
        f"small workload ({small['prompts']} prompts, parent + identity adapter, early "
        f"stopping off, fresh cache, each run a process): plain transformers + PEFT script "
        f"{small['plain_script']['wall']:.1f}s; toxtests gate {first['wall']:.1f}s "
        f"(model and scorer load {first['seconds']['load']:.1f}s, generation "
        f"{first['seconds']['generate']:.1f}s at {first['tokens_per_s']:.1f} tokens/s) = "
        f"{small['speedup']:.1f}x; a second adapter against the cached parent "
        f"{second['wall']:.1f}s = {small['second_share']:.0%} of the first gate"
    )
    print(
        f"fixed costs (wall outside generation: interpreter, imports, model, scorer, "
        f"statistics, report): first gate {first['outside_generation']:.1f}s, second "
        f"adapter {second['outside_generation']:.1f}s"
    )
    off = small["transformers_decoder"]
    first_off, second_off = off["first_gate"], off["second_adapter"]
    print(
        f"the same two gates with the native decoder off (transformers' Gemma 3 and PEFT "
        f"imported): first gate {first_off['wall']:.1f}s "
        f"({first_off['outside_generation']:.1f}s outside generation) = "
        f"{small['plain_script']['wall'] / first_off['wall']:.1f}x the plain script, "
        f"second adapter {second_off['wall']:.1f}s "
        f"({second_off['outside_generation']:.1f}s outside) = "
        f"{second_off['wall'] / first_off['wall']:.0%}"
    )
    # second <= 55% of first, with F the fixed costs of each and G their generations:
    # F + G_second <= 0.55 (F + G_first)  <=>  F <= (0.55 G_first - G_second) / 0.45.
    first_generate = first["seconds"].get("generate", 0.0)
    second_generate = second["seconds"].get("generate", 0.0)
    budget = (0.55 * first_generate - second_generate) / 0.45
    small["fixed_cost_budget_for_55"] = budget
    print(
        f"a second adapter at 55% of the first gate, with these generations "
        f"({second_generate:.1f}s against {first_generate:.1f}s), needs fixed costs of at "
        f"most {budget:.1f}s in each (measured: {first['outside_generation']:.1f}s)"
    )


def report_samples(prompts: list, args: argparse.Namespace, figures: dict) -> None:  # noqa: ANN001
    chosen = prompts[: args.samples_prompts]
    shared = shared_prefill(chosen, args.new_tokens, args.samples)
    figures["samples"] = shared
    print(
        f"k = {args.samples} samples on {len(chosen)} prompts: one prefill a prompt "
        f"{shared['shared_tokens_per_s']:.1f} tokens/s, k separate prefills "
        f"{shared['separate_tokens_per_s']:.1f} tokens/s = {shared['speedup']:.2f}x; texts "
        + ("identical" if shared["same_texts"] else "DIFFER")
        + f" ({shared['texts']} continuations)"
    )


def report_together(prompts: list, args: argparse.Namespace, figures: dict) -> None:  # noqa: ANN001
    from toxtests.shards import stratified_subset

    chosen = stratified_subset(prompts, args.small_prompts)
    together = together_cost(chosen, args.new_tokens)
    figures["together"] = together
    print(
        f"parent + adapter on {len(chosen)} prompts (best of 3, alternated): rows sharing "
        f"batches {together['together_tokens_per_s']:.1f} tokens/s, one variant after the "
        f"other {together['separate_tokens_per_s']:.1f} tokens/s = {together['speedup']:.2f}x; "
        + ("texts identical" if together["same_texts"] else "texts DIFFER")
        + ("" if together["mixed"] else " (NOT MIXED: the adapter cannot share batches)")
    )


def report_invariance(prompts: list, args: argparse.Namespace, figures: dict) -> None:  # noqa: ANN001
    invariance = invariance_cost(prompts[: args.invariance_prompts], args.new_tokens)
    figures["invariance"] = invariance
    print(
        f"batch-invariant attention ({min(len(prompts), args.invariance_prompts)} prompts, "
        f"parent, best of 2): {invariance['invariant_tokens_per_s']:.1f} tokens/s against "
        f"{invariance['padded_tokens_per_s']:.1f} with padded SDPA = "
        f"{invariance['cost']:+.1%} cost (torch run by run, without the C kernel: "
        f"{invariance['invariant_torch_tokens_per_s']:.1f}, {invariance['cost_torch']:+.1%}); "
        f"{invariance['texts_changed']} of "
        f"{invariance['texts']} continuations differ between the two"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 prompts instead of 900")
    parser.add_argument("--prompts", default=str(DEFAULT_PROMPTS))
    parser.add_argument(
        "--limit", type=int, default=0, help="prompts to use (default all / 64 quick)"
    )
    parser.add_argument("--baseline-batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--json", default="", help="also write the figures here")
    parser.add_argument(
        "--invariance-prompts", type=int, default=256, help="prompts for the invariance cost"
    )
    parser.add_argument(
        "--invariance-only", action="store_true", help="measure only what invariance costs"
    )
    parser.add_argument(
        "--samples-only",
        action="store_true",
        help="measure only the k-samples workload (shared vs separate prefills)",
    )
    parser.add_argument("--samples", type=int, default=25, help="k of the k-samples workload")
    parser.add_argument("--samples-prompts", type=int, default=64)
    parser.add_argument(
        "--small-only",
        action="store_true",
        help="measure only the small end-to-end workload (against the plain script)",
    )
    parser.add_argument("--small-prompts", type=int, default=128)
    parser.add_argument(
        "--together-only",
        action="store_true",
        help="measure only the parent and an adapter sharing batches against one by one",
    )
    parser.add_argument(
        "--head-only",
        action="store_true",
        help=(
            "measure only the output head's throughput at 128 and 256 rows and at the "
            "default workload's batch rows"
        ),
    )
    parser.add_argument(
        "--bound-only",
        action="store_true",
        help="measure only the ceiling and the matrix products' bound (every row at its "
        "full length)",
    )
    args = parser.parse_args()

    import torch

    from toxtests.engines.torch.load import load_base
    from toxtests.options import RunOptions
    from toxtests.prompts import load_prompts
    from toxtests.score import load_scorer
    from toxtests.shards import stratified_subset

    limit = args.limit or (64 if args.quick else 0)
    prompt_set = load_prompts(args.prompts)
    prompts = stratified_subset(prompt_set.prompts, limit) if limit else prompt_set.prompts
    print(f"machine: {machine()}")
    if args.small_only:
        loaded = load_base("gemma3-270m")  # converts once into the user cache
        model_dir = loaded.model.name_or_path
        del loaded
        report_small(prompt_set.prompts, args, model_dir, {})
        return
    print(
        f"workload: Gemma 3 270M, {len(prompts)} prompts from {args.prompts}, "
        f"{args.new_tokens} new tokens, top-p 0.9, 1 sample, fp32, "
        f"{torch.get_num_threads()} threads"
    )
    if args.invariance_only:
        report_invariance(prompts, args, {})
        return
    if args.head_only:
        report_head(load_base("gemma3-270m").model, len(prompts))
        return
    if args.samples_only:
        report_samples(prompts, args, {})
        return
    if args.together_only:
        report_together(prompt_set.prompts, args, {})
        return

    loaded = load_base("gemma3-270m")  # converts once into the user cache
    model_dir = loaded.model.name_or_path
    config = loaded.model.config
    libraries = measured_matmul_gflops(config.hidden_size, config.vocab_size, 128)
    gflops = max(libraries.values())
    per_token = flops_per_token(loaded.model)
    ceiling = gflops * 1e9 / per_token
    head_flops = 2.0 * config.vocab_size * config.hidden_size
    encoded = loaded.tokenizer([p.text for p in prompts])["input_ids"]
    prompt_tokens = sum(len(ids) for ids in encoded)
    print(f"prompt tokens: {prompt_tokens} ({prompt_tokens / len(prompts):.1f} per prompt)")
    print(
        f"ceiling: {gflops:.0f} GFLOP/s measured (best of "
        + ", ".join(f"{name} {value:.0f}" for name, value in libraries.items())
        + f") x {per_token / 1e9:.3f} GFLOP/token = {ceiling:.0f} tokens/s"
    )
    rates = product_rates(loaded.model, len(prompts))
    if args.bound_only:
        generated = 2 * len(prompts) * args.new_tokens
        report_bound(rates, len(prompts), prompt_tokens, generated, ceiling, None, {})
        return
    by_rows = report_head(loaded.model, len(prompts))
    del loaded

    scorer = load_scorer("profanity-check")
    figures: dict = {
        "prompts": len(prompts),
        "ceiling_tokens_per_s": ceiling,
        "gflops": gflops,
        "gflops_by_library": libraries,
        "head_gflops_by_rows": by_rows,
    }
    if not args.skip_baseline:
        base = baseline(
            model_dir, [p.text for p in prompts], args.new_tokens, args.baseline_batch, scorer
        )
        figures["baseline"] = base
        print(
            f"baseline (transformers generate, batch {args.baseline_batch}): "
            f"{base['tokens_per_s']:.1f} tokens/s, generate {base['generate']:.1f}s, "
            f"score {base['score']:.2f}s, load {base['load']:.1f}s"
        )

    # Reuse the converted model, not any generation: a cold cache for the gate itself.
    workdir, prompt_file, thresholds, cache = gate_workdir(
        "toxtests-bench-", prompts, args.new_tokens, model_dir
    )

    def options(
        *adapters: str, early_stopping: bool = False, cache_dir: Path = cache
    ) -> RunOptions:
        return RunOptions(
            adapters=list(adapters),
            prompts=str(prompt_file),
            thresholds=str(thresholds),
            cache_dir=str(cache_dir),
            report=str(workdir / "report.html"),
            json=str(workdir / "results.json"),
            early_stopping=early_stopping,
        )

    identity = str(REPO / "toxtests" / "data" / "adapters" / "identity")
    toxic = str(REPO / "toxtests" / "data" / "adapters" / "toxic")
    first = gate(options(identity), "first gate (parent + identity adapter)")
    second = gate(options(identity, toxic), "second adapter (toxic) against the cached parent")
    rerun = gate(options(identity, toxic), "identical re-run")
    runs = [first, second, rerun]
    for run in runs:
        rate = f"{run['tokens_per_s']:.1f} tokens/s" if run["tokens_per_s"] else "no generation"
        print(
            f"{run['label']}: wall {run['wall']:.1f}s = load {run['load']:.1f} + generate "
            f"{run['generate']:.1f} + score {run['score']:.2f} + statistics "
            f"{run['statistics']:.2f} + report {run['report']:.2f}; {run['tokens']} tokens, "
            f"{rate}; verdicts {run['verdicts']}"
        )
    toxtests_rate = first["tokens_per_s"]
    print(
        f"toxtests generation: {toxtests_rate:.1f} tokens/s = "
        f"{toxtests_rate / ceiling:.0%} of the ceiling"
    )
    # The first gate generates every prompt twice (parent and adapter).
    generations = 2 * len(prompts)
    workload = workload_flops_per_token(
        per_token, head_flops, 2 * prompt_tokens, first["tokens"], generations
    )
    workload_ceiling = gflops * 1e9 / workload
    print(
        f"workload ceiling, the prompts' tokens counted too: {gflops:.0f} GFLOP/s / "
        f"{workload / 1e9:.3f} GFLOP per generated token = {workload_ceiling:.0f} tokens/s; "
        f"toxtests at {toxtests_rate / workload_ceiling:.0%} of it"
    )
    figures["workload_ceiling_tokens_per_s"] = workload_ceiling
    report_bound(
        rates, len(prompts), prompt_tokens, first["tokens"], ceiling, toxtests_rate, figures
    )
    figures["prompt_tokens"] = prompt_tokens
    if "baseline" in figures:
        speedup = toxtests_rate / figures["baseline"]["tokens_per_s"]
        print(f"speed-up over the baseline: {speedup:.1f}x")
    print(f"second adapter: {second['wall'] / first['wall']:.0%} of the first gate's wall time")
    print(f"identical re-run: {rerun['wall'] / first['wall']:.0%} of the first gate's wall time")
    print(
        "fixed costs in process (outside generation: model, scorer, statistics, report): "
        + ", ".join(
            f"{run['label'].split(' (')[0]} {run['wall'] - run['generate']:.1f}s" for run in runs
        )
    )
    # Early stopping, on a cold cache: how much of the work does a clear verdict need?
    cold = cold_cache(workdir / "cache-early", model_dir)
    early = gate(
        options(identity, toxic, early_stopping=True, cache_dir=cold),
        "early stopping on (identity + toxic, cold cache)",
    )
    print(f"{early['label']}: wall {early['wall']:.1f}s, verdicts {early['verdicts']}")
    result = json.loads((workdir / "results.json").read_text())
    for adapter in result["adapters"]:
        stop = adapter["early_stopping"]
        print(
            f"  {adapter['name']}: {stop['decided'] or adapter['verdict']} after "
            f"{stop['prompts_generated']} of {stop['prompts_total']} prompts "
            f"({stop['prompts_generated'] / stop['prompts_total']:.0%}); {stop['reason']}"
        )
    runs.append(early)
    report_invariance(prompts, args, figures)
    report_samples(prompts, args, figures)
    report_together(prompt_set.prompts, args, figures)
    report_small(prompt_set.prompts, args, model_dir, figures)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory (RSS): {peak:.0f} MiB")
    for run in runs:
        run.pop("session")
    figures.update({"runs": runs, "peak_rss_mib": peak})
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    shutil.rmtree(workdir, ignore_errors=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
