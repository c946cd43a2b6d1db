"""The generation progress line: what it says, and how often a CI log gets one."""

from __future__ import annotations

from toxtests.progress import Ticker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_ci_log_gets_a_line_every_interval_and_one_at_the_end() -> None:
    clock, lines = Clock(), []
    ticker = Ticker("generating parent", 40, lambda t, r: lines.append((t, r)), False, 20.0, clock)
    for done in range(1, 41):
        clock.now += 1.0  # a prompt a second, 10 tokens each
        ticker.update(done, done * 10)
    ticker.finish()
    assert [redraw for _, redraw in lines] == [False, False, False]
    assert lines[0][0] == "generating parent: 20/40 prompts, 10 tokens/s, about 20s left"
    assert lines[1][0].startswith("generating parent: 40/40 prompts, 10 tokens/s")
    assert "left" not in lines[1][0]
    assert lines[2][0].endswith(", done in 40s")


def test_a_terminal_redraws_one_line_at_most_five_times_a_second() -> None:
    clock, lines = Clock(), []
    ticker = Ticker("generating kind", 1000, lambda t, r: lines.append((t, r)), True, 20.0, clock)
    for done in range(1, 1001):
        clock.now += 0.01
        ticker.update(done, done)
    ticker.finish()
    redraws = [text for text, redraw in lines if redraw]
    assert 45 <= len(redraws) <= 50  # 10 s at one redraw per 0.2 s
    # Time left once a twentieth is done (the first prompts say little about the rest).
    early = [t for t in redraws if int(t.split(": ")[1].split("/")[0]) < 50]
    assert early and not any("left" in t for t in early)
    assert all("left" in t for t in redraws[len(early) : -1])
    assert lines[-1] == ("generating kind: 1000/1000 prompts, 100 tokens/s, done in 10s", False)


def test_long_waits_read_in_minutes_and_hours() -> None:
    clock, lines = Clock(), []
    ticker = Ticker("g", 10_000, lambda t, r: lines.append(t), False, 20.0, clock)
    clock.now += 30.0
    ticker.update(10, 100)
    assert "left" not in lines[-1]  # 10 of 10,000 says too little to guess the rest
    clock.now += 270.0
    ticker.update(600, 6000)
    assert lines[-1].endswith("about 1h18m left")
    ticker = Ticker("g", 100, lambda t, r: lines.append(t), False, 20.0, clock)
    clock.now += 30.0
    ticker.update(20, 100)
    assert lines[-1].endswith("about 2m00s left")


def test_a_long_scoring_pass_shows_progress_and_scores_as_one_call(tmp_path) -> None:  # noqa: ANN001
    """Chunks of whole scorer batches: the same batches, so the same scores, as one call
    (the real profanity-check classifier), with a line per chunk in a CI log."""
    import numpy as np

    from toxtests.cache import Cache
    from toxtests.config import GenerationConfig
    from toxtests.run.store import GenerationStore, Timings
    from toxtests.score import load_scorer

    scorer = load_scorer("profanity-check", batch_size=64)
    texts = [f"text {i} is {'a damn insult' if i % 7 == 0 else 'kind'}" for i in range(1200)]
    lines: list[str] = []
    store = GenerationStore(
        Cache(tmp_path),
        None,
        GenerationConfig(),
        None,
        dict,
        Timings(),  # type: ignore[arg-type]
    )
    store.ticker = lambda label, total, **units: Ticker(
        label, total, lambda t, r: lines.append(t), False, 0.0, **units
    )
    chunked = store._score_in_chunks(scorer, texts)
    whole = scorer.score(texts)
    assert set(chunked) == set(whole)
    assert all(np.array_equal(chunked[a], whole[a]) for a in whole)
    assert lines[-1].startswith("scoring: 1200/1200 texts,") and "texts/s, done in" in lines[-1]
    assert any(line.startswith("scoring: 512/1200 texts") for line in lines)
