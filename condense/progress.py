"""Progress of long stages on stderr.

In a terminal, one live progress bar per running job (rich, which Prefect depends on): its steps,
elapsed time and ETA, and a line when it finishes. Anywhere else (a log file, CI, a pipe): throttled
lines, at most one every ``interval`` seconds per job plus the first and last step, so logs stay
readable and small.
"""

from __future__ import annotations

import atexit
import sys
import threading
import time
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress

INFRASTRUCTURE = "progress lines"


class Bars:
    """A live display of bars, one per running job, shared by every job of the process."""

    def __init__(self, console: Console):
        self.display = RichProgress(
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[detail]}", markup=False),
            console=console,
        )
        self._tasks: dict[int, tuple[TaskID, float]] = {}
        self._lock = threading.Lock()
        self._started = False

    def update(self, owner: object, label: str, i: int, total: int, detail: str) -> None:
        """Set ``owner``'s bar to step ``i`` of ``total``; at the last step it becomes one line."""
        with self._lock:
            if not self._started:
                self.display.start()
                self._started = True
            found = self._tasks.get(id(owner))
            if found is None or i == 1:  # a new loop of the same job (the next seed) restarts its bar
                if found is not None:
                    self.display.remove_task(found[0])
                found = (self.display.add_task(label, total=total, detail=detail), time.monotonic())
                self._tasks[id(owner)] = found
            self.display.update(found[0], completed=i, total=total, detail=detail)
            if i >= total:
                self.display.remove_task(found[0])
                del self._tasks[id(owner)]
                self.print(f"[{label}] {i}/{total} {detail} ({time.monotonic() - found[1]:.1f} s)")

    def print(self, text: str) -> None:
        """A line above the bars (labels hold brackets: no rich markup)."""
        self.display.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        """Stop the live display (before a command prints its result)."""
        with self._lock:
            if self._started:
                self.display.stop()
                self._started = False


_terminal: Bars | None = None
_terminal_lock = threading.Lock()


def terminal_bars() -> Bars | None:
    """The process's bars when stderr is a terminal, else None (progress goes as lines)."""
    global _terminal
    if not sys.stderr.isatty():
        return None
    with _terminal_lock:
        if _terminal is None:
            _terminal = Bars(Console(file=sys.stderr))
            atexit.register(_terminal.close)
        return _terminal


def close_bars() -> None:
    """Stop the live display, if one was started (a no-op otherwise)."""
    if _terminal is not None:
        _terminal.close()


class Progress:
    """``step(i, total, detail)``: a bar in a terminal (``bars``, default: :func:`terminal_bars` when
    writing to stderr), else a line at most every ``interval`` seconds plus the first and last step."""

    def __init__(
        self,
        label: str,
        stream: TextIO | None = None,
        interval: float = 2.0,
        quiet: bool = False,
        bars: Bars | None = None,
    ):
        self.label = label
        self.stream = stream
        self.interval = interval
        self.quiet = quiet
        self.bars = bars if bars is not None or quiet or stream is not None else terminal_bars()
        self._last = 0.0
        self._lock = threading.Lock()

    def _write(self, text: str) -> None:
        if self.quiet:
            return
        if self.bars is not None:
            self.bars.print(text)
            return
        with self._lock:
            print(text, file=self.stream or sys.stderr, flush=True)

    def note(self, message: str) -> None:
        self._write(f"[{self.label}] {message}")

    def step(self, i: int, total: int, detail: str = "") -> None:
        if self.quiet:
            return
        if self.bars is not None:
            self.bars.update(self, self.label, i, total, detail)
            return
        now = time.monotonic()
        if i in (1, total) or now - self._last >= self.interval:
            self._last = now
            self._write(f"[{self.label}] {i}/{total} {detail}".rstrip())


SILENT = Progress("", quiet=True)
