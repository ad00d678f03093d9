"""The progress display: one line per phase or fault, rewritten in place while it runs.

On a terminal the current line is redrawn (at most 10 times a second); elsewhere (a log,
a test's captured stderr) an update is printed at most every 5 seconds, and the phase's
final line always.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.phase = ""
        self.started = time.monotonic()
        self.phase_started = self.started
        self._last_draw = 0.0
        self._drawn = ""

    def _write(self, text: str, final: bool) -> None:
        elapsed = time.monotonic() - self.started
        line = (
            f"[{elapsed:6.1f}s] {self.phase}: {text}" if text else f"[{elapsed:6.1f}s] {self.phase}"
        )
        if self.tty:
            self.stream.write("\r\x1b[K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def begin(self, phase: str) -> None:
        self.phase = phase
        self.phase_started = time.monotonic()
        self._drawn = ""
        self._last_draw = 0.0
        self._write("", not self.tty)

    def __call__(self, text: str) -> None:
        now = time.monotonic()
        every = 0.1 if self.tty else 5.0
        since = now - self._last_draw
        # a change at most every `every`; the same line again after 30 s (still alive)
        if (text != self._drawn and since >= every) or since >= 30.0:
            self._write(text, False)
            self._last_draw = now
            self._drawn = text

    def end(self, summary: str) -> None:
        took = time.monotonic() - self.phase_started
        self._write(f"{summary} ({took:.1f}s)", True)
