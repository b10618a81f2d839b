"""Progress of long work on the operator's terminal (embedding files, builds, copies).

On a TTY one line is redrawn in place (step, count or percentage, elapsed); elsewhere (systemd's
journal, CI logs, a pipe) each step writes one line when it starts and one when it ends, so logs
stay readable and never fill with carriage returns.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO


class Progress:
    """One step: `with Progress("embedding docs", total=120) as p: p.advance(10)`."""

    # Redraws on a TTY at most this often: a fast loop must not spend its time printing.
    REDRAW_S = 0.1

    def __init__(self, step: str, total: int | None = None, *, unit: str = "",
                 stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.step = step
        self.total = total
        self.unit = unit
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.started = time.monotonic()
        self._drawn = 0.0

    def __enter__(self) -> Progress:
        self.started = time.monotonic()
        if not self.tty:
            self._line(f"{self.step}: started" + (f" ({self.total}{self._unit()})" if self.total else ""))
        else:
            self._draw(force=True)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        verdict = "done" if kind is None else f"failed ({kind.__name__})"
        if self.tty:
            self._draw(force=True)
            self.stream.write("\n")
        self._line(f"{self.step}: {verdict}, {self._count()} in {self.elapsed():.1f} s")

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.tty:
            self._draw()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def render(self) -> str:
        """The TTY line: `embedding docs  40/120 chunks (33%)  2.1 s`."""
        return f"{self.step}  {self._count()}  {self.elapsed():.1f} s"

    def _unit(self) -> str:
        return f" {self.unit}" if self.unit else ""

    def _count(self) -> str:
        if self.total:
            pct = min(100, self.done * 100 // self.total)
            return f"{self.done}/{self.total}{self._unit()} ({pct}%)"
        return f"{self.done}{self._unit()}"

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._drawn < self.REDRAW_S:
            return
        self._drawn = now
        self.stream.write("\r\x1b[2K" + self.render())
        self.stream.flush()

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()
