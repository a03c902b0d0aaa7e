"""Progress of a long command (convert, dicom export) on a terminal or in a log."""

from __future__ import annotations

import math
import sys
import threading
import time
from typing import Any


def clock(seconds: float | None) -> str:
    """``m:ss`` or ``h:mm:ss``; ``--:--`` when unknown."""
    if seconds is None:
        return "--:--"
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
    return f"{s // 60}:{s % 60:02d}"


def eta(done: int, total: int, elapsed: float) -> float | None:
    """Seconds left at the rate so far; None before there is a rate."""
    if done == 0 or elapsed <= 0:
        return None
    return elapsed * (total - done) / done


class LineProgress:
    """A bar redrawn in place on a terminal; plain lines, prefixed by ``label``, every
    ``interval`` s otherwise. Thread-safe; the final state is always shown."""

    def __init__(self, label: str, stream: Any = None, interval: float = 5.0) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.1 if self.tty else interval
        self._last = -math.inf
        self._lock = threading.Lock()

    def show(self, fraction: float, text: str, final: bool) -> None:
        now = time.monotonic()
        with self._lock:
            if not final and now - self._last < self.interval:
                return
            self._last = now
            if self.tty:
                width = 30
                filled = int(width * fraction)
                bar = "#" * filled + "-" * (width - filled)
                self.stream.write(f"\r[{bar}] {text}" + ("\n" if final else ""))
            else:
                self.stream.write(f"{self.label}: {text}\n")
            self.stream.flush()
