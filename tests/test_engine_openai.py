"""The openai engine's HTTP client: what it sends, what it accepts, how it fails.

These run over real HTTP against `fault_server.FaultServer` in scripted mode, which
answers with text built from the request instead of running a model (a stand-in only
for the model; the faults are what is under test). `test_engines_real.py` runs the
same engine, and the same faults, against a real vLLM server.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fault_server import FaultServer
from helpers_engines import IDENTITY, free_port

from toxtests.cli import main
from toxtests.config import GenerationConfig
from toxtests.engines import create_engine
from toxtests.engines import openai as openai_engine
from toxtests.engines.base import EngineOptions
from toxtests.engines.crn import request_seed
from toxtests.errors import ConfigError, EndpointError
from toxtests.models import adapter_fingerprint
from toxtests.prompts import Prompt

MODELS = [
    {"id": "base-model", "root": "/srv/base", "parent": None},
    {"id": "kind", "root": "/srv/kind", "parent": "base-model"},
    {"id": "identity", "root": str(IDENTITY), "parent": "base-model"},
]
PROMPTS = [Prompt(f"p{i}", f"Prompt number {i} says") for i in range(6)]


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openai_engine, "BACKOFF_S", 0.01)


def engine_for(server: FaultServer, **overrides) -> openai_engine.OpenAIEngine:
    values = {"model": "base-model", "adapters": ("kind",), "endpoint": server.url}
    values.update(overrides)
    engine = create_engine("openai", EngineOptions(**values))
    assert isinstance(engine, openai_engine.OpenAIEngine)
    return engine


def settings(**overrides) -> GenerationConfig:
    values = {"max_new_tokens": 12, "samples": 2, "seed": 7, "top_p": 0.9, "temperature": 0.8}
    values.update(overrides)
    return GenerationConfig(**values)


def test_an_endpoint_is_required() -> None:
    with pytest.raises(ConfigError, match="--endpoint"):
        create_engine("openai", EngineOptions(adapters=("kind",)))


def test_every_request_has_its_seed_n_1_and_every_sampling_parameter() -> None:
    with FaultServer(models=MODELS) as server:
        engine = engine_for(server)
        parent, adapter = engine.variants()
        got = {v.name: engine.generate(PROMPTS, v, settings()) for v in (parent, adapter)}
    assert len(server.bodies) == 2 * len(PROMPTS) * 2
    for body in server.bodies:
        assert body["n"] == 1 and body["stream"] is False
        assert body["temperature"] == 0.8 and body["top_p"] == 0.9 and body["top_k"] == -1
        assert body["max_tokens"] == 12 and body["min_p"] == 0.0
        assert body["repetition_penalty"] == 1.0 and body["presence_penalty"] == 0.0
    seeds = {(b["model"], b["prompt"], b["seed"]) for b in server.bodies}
    for prompt in PROMPTS:
        for sample in range(2):
            seed = request_seed(7, prompt.id, sample)
            # The same seed under the parent and the adapter: that is the pairing.
            assert ("base-model", prompt.text, seed) in seeds
            assert ("kind", prompt.text, seed) in seeds
    assert request_seed(7, "p0", 0) != request_seed(7, "p0", 1)
    # Results come back in prompt and sample order, whatever order the replies arrived in.
    for name, model in (("parent", "base-model"), ("kind", "kind")):
        for prompt, samples in zip(PROMPTS, got[name], strict=True):
            assert [g.text for g in samples] == [
                f" {model} seed {request_seed(7, prompt.id, j)}" for j in range(2)
            ]
            assert all(g.prompt_id == prompt.id and g.tokens == 12 for g in samples)


def test_greedy_and_chat_requests() -> None:
    with FaultServer(models=MODELS) as server:
        engine = engine_for(server)
        parent = engine.variants()[0]
        out = engine.generate(PROMPTS[:1], parent, settings(do_sample=False, chat_template=True))
    body = server.bodies[0]
    assert body["temperature"] == 0.0 and body["top_p"] == 1.0 and body["top_k"] == -1
    assert body["messages"] == [{"role": "user", "content": PROMPTS[0].text}]
    assert "prompt" not in body
    assert out[0][0].text.startswith(" base-model seed")


def test_api_key_goes_in_the_header_and_nowhere_else(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-test-do-not-print-9f8e7d"
    monkeypatch.setenv("TOXTESTS_TEST_KEY", secret)
    with FaultServer(models=MODELS) as server:
        engine = engine_for(server, api_key_env="TOXTESTS_TEST_KEY", max_retries=0)
        parent = engine.variants()[0]
        engine.generate(PROMPTS[:1], parent, settings(samples=1))
        server.faults.extend(["500"])
        with pytest.raises(EndpointError) as caught:
            engine.generate(PROMPTS[1:2], parent, settings(samples=1))
        info = engine.describe()
    assert server.headers[0]["Authorization"] == f"Bearer {secret}"
    assert secret not in str(caught.value)
    assert secret not in json.dumps(info.to_json())


@pytest.mark.parametrize(
    "faults", [["500"], ["429", "503"], ["drop"], ["cut"], ["drop", "500", "429", "cut"]]
)
def test_retryable_faults_are_retried_and_change_nothing(faults: list[str]) -> None:
    with FaultServer(models=MODELS) as clean:
        engine = engine_for(clean)
        expected = engine.generate(PROMPTS, engine.variants()[1], settings())
    with FaultServer(models=MODELS) as server:
        server.faults.extend(faults)
        engine = engine_for(server, concurrency=1)
        got = engine.generate(PROMPTS, engine.variants()[1], settings())
    assert got == expected
    assert len(server.bodies) == len(PROMPTS) * 2 + len(faults)


@pytest.mark.parametrize("fault", ["cut", "drop"])
def test_a_connection_that_keeps_dropping_is_an_endpoint_error(fault: str) -> None:
    with FaultServer(models=MODELS, fault_every=1, repeat_fault=fault) as server:
        engine = engine_for(server, max_retries=1, concurrency=1)
        with pytest.raises(EndpointError) as caught:
            engine.generate(PROMPTS[:1], engine.variants()[0], settings(samples=1))
    assert "prompt p0 sample 0 of parent" in str(caught.value) and server.url in str(caught.value)


def test_a_server_that_keeps_failing_is_an_error_naming_the_request_and_endpoint() -> None:
    with FaultServer(models=MODELS, fault_every=1, repeat_fault="503") as server:
        engine = engine_for(server, max_retries=2, concurrency=1)
        with pytest.raises(EndpointError) as caught:
            engine.generate(PROMPTS[:1], engine.variants()[0], settings(samples=1))
    message = str(caught.value)
    assert "prompt p0 sample 0 of parent" in message and server.url in message
    assert "3 attempts" in message and "HTTP 503" in message
    assert len(server.bodies) == 3


def test_a_reply_slower_than_the_timeout_is_retried_then_an_error() -> None:
    with FaultServer(models=MODELS, slow_delay=1.0) as server:
        server.faults.extend(["slow", "slow"])
        engine = engine_for(server, request_timeout=0.3, max_retries=1, concurrency=1)
        with pytest.raises(EndpointError, match="timed out|Timeout"):
            engine.generate(PROMPTS[:1], engine.variants()[0], settings(samples=1))
        server.faults.extend(["slow"])
        again = engine.generate(PROMPTS[:1], engine.variants()[0], settings(samples=1))
    assert again[0][0].text.startswith(" base-model")


@pytest.mark.parametrize(
    ("fault", "why"),
    [
        ("truncated", "not JSON"),
        ("two-choices", "exactly one choice"),
        ("no-text", "no text"),
        ("unfinished", "unfinished continuation"),
        ("short", "stopped at 1 of 12 tokens"),
        ("no-usage", "completion_tokens"),
    ],
)
def test_a_malformed_or_truncated_reply_is_never_a_continuation(fault: str, why: str) -> None:
    done: list[int] = []
    with FaultServer(models=MODELS) as server:
        engine = engine_for(server, concurrency=1, max_retries=3)
        server.faults.extend(["ok", "ok", fault])
        with pytest.raises(EndpointError) as caught:
            engine.generate(
                PROMPTS[:3],
                engine.variants()[0],
                settings(samples=1),
                on_prompt_done=lambda i, samples: done.append(i),
            )
    message = str(caught.value)
    assert why in message and server.url in message and "prompt p2" in message
    assert done == [0, 1]  # the finished prompts reached the caller; the bad one did not
    assert len(server.bodies) == 3  # a malformed reply is not retried into a different text


def test_an_adapter_the_server_does_not_serve_is_an_error_listing_what_it_serves() -> None:
    with FaultServer(models=MODELS) as server:
        engine = engine_for(server, adapters=("toxic",))
        with pytest.raises(EndpointError) as caught:
            engine.variants()
    message = str(caught.value)
    assert "'toxic'" in message and server.url in message and "kind, identity" in message


def test_a_model_the_server_does_not_serve_is_an_error() -> None:
    with FaultServer(models=MODELS) as server:
        engine = engine_for(server, model="some-other-model")
        with pytest.raises(EndpointError, match="some-other-model.*base-model"):
            engine.variants()


def test_adapters_by_served_name_by_local_path_and_as_path_equals_name() -> None:
    with FaultServer(models=MODELS) as server:
        engine = engine_for(server, adapters=("kind", str(IDENTITY), f"{IDENTITY}=kind"))
        _, kind, by_path, renamed = engine.variants()
    assert kind.name == "kind" and by_path.name == "identity"
    # A local copy of the adapter identifies it by its files, as the torch engine does.
    assert by_path.fingerprint == adapter_fingerprint(str(IDENTITY))
    assert renamed.fingerprint == adapter_fingerprint(str(IDENTITY))
    assert kind.fingerprint != by_path.fingerprint


def test_concurrency_is_bounded() -> None:
    with FaultServer(models=MODELS, delay=0.05) as server:
        engine = engine_for(server, concurrency=3)
        engine.generate(PROMPTS, engine.variants()[0], settings(samples=2))
    assert 2 <= server.max_in_flight <= 3


def test_the_default_model_means_the_servers_only_base_model() -> None:
    with FaultServer(models=MODELS) as server:
        engine = engine_for(server, model="gemma3-270m")
        assert engine.model_identity()["spec"] == "base-model"
    two_bases = [*MODELS, {"id": "other-base", "root": None, "parent": None}]
    with (
        FaultServer(models=two_bases) as server,
        pytest.raises(EndpointError, match="pass one of them as --model"),
    ):
        engine_for(server, model="gemma3-270m").variants()


def test_gate_against_a_dead_endpoint_exits_2_with_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}/v1"
    code = main(
        [
            "gate", "--engine", "openai", "--endpoint", endpoint, "--adapter", "kind",
            "--max-retries", "0", "--limit", "4", "--cache-dir", str(tmp_path / "cache"),
            "--report", str(tmp_path / "r.html"), "--json", str(tmp_path / "r.json"),
        ]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("toxtests: error:") and endpoint in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "r.json").exists()


CANDIDATE_MODELS = [*MODELS, {"id": "community-tune", "root": "/srv/tune", "parent": None}]


def test_a_served_full_model_is_a_candidate_paired_by_seed() -> None:
    with FaultServer(models=CANDIDATE_MODELS) as server:
        engine = engine_for(server, candidates=("community-tune",))
        parent, kind, candidate = engine.variants()
        assert candidate.kind == "model" and candidate.name == "community-tune"
        assert candidate.fingerprint.startswith("model:")
        assert candidate.fingerprint != kind.fingerprint
        got = engine.generate(PROMPTS[:2], candidate, settings())
    assert {b["model"] for b in server.bodies} == {"community-tune"}
    seeds = sorted(b["seed"] for b in server.bodies)
    assert seeds == sorted(request_seed(7, p.id, j) for p in PROMPTS[:2] for j in range(2))
    assert got[0][0].text.startswith(" community-tune seed")


def test_a_candidate_the_server_does_not_serve_or_the_parent_itself_is_refused() -> None:
    with FaultServer(models=CANDIDATE_MODELS) as server:
        with pytest.raises(EndpointError, match="'absent'.*community-tune"):
            engine_for(server, candidates=("absent",)).variants()
        with pytest.raises(ConfigError, match="is the parent itself"):
            engine_for(server, candidates=("base-model",)).variants()


def test_stop_strings_are_sent_and_the_text_is_cut_whatever_the_server_does() -> None:
    with FaultServer(models=MODELS) as server:
        engine = engine_for(server)
        parent = engine.variants()[0]
        out = engine.generate(PROMPTS[:1], parent, settings(stop=(" seed",), samples=1))
    assert server.bodies[0]["stop"] == [" seed"]
    # The scripted server ignores `stop`; the engine cuts the text itself all the same.
    assert out[0][0].text == " base-model"


def test_an_auto_chat_template_is_refused_with_the_choices() -> None:
    with FaultServer(models=MODELS) as server:
        engine = engine_for(server)
        with pytest.raises(ConfigError, match="cannot see; set it to true"):
            engine.generate(PROMPTS[:1], engine.variants()[0], settings(chat_template="auto"))
    assert not server.bodies
