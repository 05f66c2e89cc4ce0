"""Progress of a long CLI wait (``prefetch --wait``, ``pin --wait``, ``verify``) on stderr:
a live tqdm bar (bytes, rate, time left) on a terminal, else plain lines (the first at
once, then one every ``PLAIN_INTERVAL`` seconds, and the last figures at the end), so that
logs and pipes get readable lines, not bar redraws.

tqdm is imported only when a bar is drawn: the other commands start as fast as before."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from imgcache.config import format_size

#: Seconds between two plain progress lines when stderr is not a terminal.
PLAIN_INTERVAL = 10.0


def plain_line(what: str, done: int, total: int, elapsed: float, note: str) -> str:
    """``prefetch: 1.2 GiB of 4.0 GiB (30%), 120.0 MiB/s, about 25 s left; NOTE``."""
    rate = done / elapsed if elapsed > 0 else 0.0
    parts = [f"{what}: {format_size(done)} of {format_size(total)}"]
    if total:
        parts[0] += f" ({100 * done / total:.0f}%)"
    parts.append(f"{format_size(rate)}/s")
    if rate > 0 and total > done:
        parts.append(f"about {_duration((total - done) / rate)} left")
    return ", ".join(parts) + (f"; {note}" if note else "")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """Shows ``done`` of ``total`` bytes as they change, until ``close``."""

    def __init__(self, what: str, stream: TextIO | None = None,
                 interval: float = PLAIN_INTERVAL) -> None:
        self.what = what
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self._started = time.monotonic()
        self._last_line: float | None = None
        self._latest: tuple[int, int, str] | None = None
        self._bar: Any = None
        if self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=0, desc=what, unit="B", unit_scale=True,
                             unit_divisor=1024, file=self.stream, dynamic_ncols=True,
                             leave=True)

    def update(self, done: int, total: int, note: str = "") -> None:
        """The latest figures; a plain line is printed at most every ``interval`` s."""
        if self._bar is not None:
            if total != self._bar.total:
                self._bar.total = total
            self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(done - self._bar.n)
            return
        self._latest = (done, total, note)
        now = time.monotonic()
        if self._last_line is None or now - self._last_line >= self.interval:
            self._print(now)

    def close(self) -> None:
        """Stop drawing (the bar stays on screen); plain output ends with the last
        figures."""
        if self._bar is not None:
            self._bar.close()
        elif self._latest is not None:
            self._print(time.monotonic())

    def _print(self, now: float) -> None:
        assert self._latest is not None
        self._last_line = now
        done, total, note = self._latest
        print(plain_line(self.what, done, total, now - self._started, note),
              file=self.stream, flush=True)
