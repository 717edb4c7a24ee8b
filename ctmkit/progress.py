"""Progress output that suits where it goes: a live tqdm bar on a terminal; in a log file or CI (stderr is not
a terminal) one plain line every few percent instead of hundreds of redrawn bars, and nothing for short-lived
inner loops (transient bars)."""

from __future__ import annotations

import sys
import time
from typing import Iterable

from tqdm.auto import tqdm

LINE_EVERY_PERCENT = 10.0
LINE_EVERY_SECONDS = 60.0   # and at least one line a minute while work goes on (long runs in a log stay visible)


def is_terminal(stream=None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class LineProgress:
    """tqdm's interface (iterate, update, set_postfix, close) printing one line per `every` percent, and after
    `seconds` without a line: `desc: 40% (400/1000) loss=0.12 [35 s]`; at close, a last line if the count moved
    since the last one."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "", initial: int = 0,
                 every: float = LINE_EVERY_PERCENT, stream=None, seconds: float = LINE_EVERY_SECONDS):
        self.iterable, self.desc, self.n, self.every, self.seconds = iterable, desc, initial, every, seconds
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.stream = stream if stream is not None else sys.stderr
        self.postfix, self.t0, self.closed = "", time.monotonic(), False
        self.next_pct = self._pct_floor(initial) + every
        self.printed_n, self.printed_t = initial, self.t0

    def _pct(self, n: int) -> float:
        return min(100.0, 100.0 * n / self.total) if self.total else 0.0

    def _pct_floor(self, n: int) -> float:
        return (self._pct(n) // self.every) * self.every

    def _line(self) -> None:
        done = f"{self._pct(self.n):3.0f}% ({self.n}/{self.total})" if self.total else f"{self.n}"
        post = f" {self.postfix}" if self.postfix else ""
        now = time.monotonic()
        print(f"{self.desc}: {done}{post} [{now - self.t0:.0f} s]", file=self.stream, flush=True)
        self.printed_n, self.printed_t = self.n, now

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.total and self._pct(self.n) >= self.next_pct - 1e-9:
            self._line()
            self.next_pct = self._pct_floor(self.n) + self.every
        elif time.monotonic() - self.printed_t >= self.seconds:
            self._line()

    def set_postfix(self, refresh: bool = True, **kwargs) -> None:
        """Shown at the end of the next line (`refresh`: tqdm's redraw switch, without effect here)."""
        self.postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())

    def close(self) -> None:
        if not self.closed and self.n != self.printed_n:
            self._line()
        self.closed = True

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 enabled: bool | None = True, initial: int = 0, transient: bool = False, stream=None):
    """A progress bar over `iterable` (or updated by hand up to `total`). enabled=False: silent; None: only on
    a terminal. On a terminal: a live tqdm bar (removed at the end when `transient`). Elsewhere: one line every
    LINE_EVERY_PERCENT percent, or nothing when `transient`."""
    terminal = is_terminal(stream)
    if enabled is False or (enabled is None and not terminal) or (transient and not terminal):
        return tqdm(iterable, total=total, initial=initial, disable=True)
    if terminal:
        return tqdm(iterable, total=total, desc=desc, initial=initial, leave=not transient, dynamic_ncols=True,
                    file=stream)
    return LineProgress(iterable, total, desc, initial, stream=stream)
