"""Progress of long stages on stderr: throttled lines, so logs stay readable and CI output small."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


class Progress:
    """``step(i, total, detail)`` prints at most every ``interval`` seconds, plus the first and last step."""

    def __init__(self, label: str, stream: TextIO | None = None, interval: float = 2.0, quiet: bool = False):
        self.label = label
        self.stream = stream
        self.interval = interval
        self.quiet = quiet
        self._last = 0.0
        self._lock = threading.Lock()

    def _write(self, text: str) -> None:
        if not self.quiet:
            with self._lock:
                print(text, file=self.stream or sys.stderr, flush=True)

    def note(self, message: str) -> None:
        self._write(f"[{self.label}] {message}")

    def step(self, i: int, total: int, detail: str = "") -> None:
        now = time.monotonic()
        if i in (1, total) or now - self._last >= self.interval:
            self._last = now
            self._write(f"[{self.label}] {i}/{total} {detail}".rstrip())


SILENT = Progress("", quiet=True)
