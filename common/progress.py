"""Progress of long work: a tqdm bar on a terminal, a log line every few seconds otherwise.

A bar redrawn with carriage returns is right for a person at a terminal and wrong for a log file (one
MNIST run wrote ~360 kB of redraws to a log). When standard error is not a terminal, :func:`progress`
returns a quiet counter that writes one plain line -- what, how far, elapsed, ETA -- at most every
``LOG_EVERY`` seconds, and one when the work ends.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator

LOG_EVERY = 10.0  # seconds between progress lines when the output is not a terminal


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


class LogProgress:
    """The part of tqdm's interface fedsynth uses, writing a line every ``LOG_EVERY`` s to standard error."""

    def __init__(self, iterable: Iterable | None, total: int | None, desc: str, unit: str, enabled: bool) -> None:
        self.iterable, self.desc, self.unit, self.enabled = iterable, desc, unit, enabled
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.postfix = 0, ""
        self.start = self.last = time.monotonic()

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.enabled and now - self.last >= LOG_EVERY:
            self.last = now
            self._write(now)

    def close(self) -> None:
        if self.enabled and self.n and self.last != -1:
            self._write(time.monotonic())
            self.last = -1  # written once at the end

    def _write(self, now: float) -> None:
        elapsed = now - self.start
        if self.total:
            eta = elapsed / self.n * (self.total - self.n) if self.n else 0.0
            where = f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%), {_clock(elapsed)} elapsed, " \
                    f"ETA {_clock(eta)}"
        else:
            where = f"{self.n} {self.unit}, {_clock(elapsed)} elapsed"
        print(f"{self.desc}: {where}" + (f" [{self.postfix}]" if self.postfix else ""), file=sys.stderr, flush=True)


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             enabled: bool = True, leave: bool = False) -> Any:
    """A tqdm bar when standard error is a terminal, else a :class:`LogProgress`; nothing shown if not ``enabled``."""
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, leave=leave)
    return LogProgress(iterable, total, desc, unit, enabled)
