"""Progress of a generation call (prompts done of total, tokens/s, the time left) or of
scoring (texts, texts/s).

On a terminal the line is redrawn in place; in a CI log (no terminal) a plain line is
written every `every_s` seconds, so a log shows the run is alive without a line per
prompt. Either way a last line says how the call ended.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class Ticker:
    """`update(done, tokens)` after each prompt (or each chunk of `items`, with `rate`
    counting what the speed is in), `finish()` at the end.

    `write(text, redraw)`: `redraw` asks to overwrite the current line (a terminal);
    the writer decides what that means where it writes."""

    def __init__(
        self,
        label: str,
        total: int,
        write: Callable[[str, bool], None],
        interactive: bool,
        every_s: float = 20.0,
        clock: Callable[[], float] = time.monotonic,
        items: str = "prompts",
        rate: str = "tokens",
    ):
        self.label, self.total = label, total
        self._items, self._rate = items, rate
        self._write, self._interactive, self._every = write, interactive, every_s
        self._clock = clock
        self._started = clock()
        self._last = self._started
        self.done = self.tokens = 0

    def line(self) -> str:
        elapsed = max(self._clock() - self._started, 1e-9)
        rate = self.tokens / elapsed
        text = f"{self.label}: {self.done}/{self.total} {self._items}, {rate:.0f} {self._rate}/s"
        # The first batch or two say little about the rest (prefill, the slow first call).
        if max(1, self.total // 20) <= self.done < self.total:
            text += f", about {_duration(elapsed / self.done * (self.total - self.done))} left"
        return text

    def update(self, done: int, tokens: int) -> None:
        self.done, self.tokens = done, tokens
        now = self._clock()
        if self._interactive and now - self._last >= 0.2:
            self._last = now
            self._write(self.line(), True)
        elif not self._interactive and now - self._last >= self._every:
            self._last = now
            self._write(self.line(), False)

    def finish(self) -> None:
        elapsed = self._clock() - self._started
        self._write(f"{self.line()}, done in {_duration(elapsed)}", False)


def stream_writer(stream: object, interactive: bool) -> Callable[[str, bool], None]:
    """A `write` for a text stream: redraws with a carriage return on a terminal."""

    def write(text: str, redraw: bool) -> None:
        if interactive:
            end = "" if redraw else "\n"
            print(f"\r\033[Ktoxtests: {text}", end=end, file=stream, flush=True)  # type: ignore[call-overload]
        else:
            print(f"toxtests: {text}", file=stream, flush=True)  # type: ignore[call-overload]

    return write
