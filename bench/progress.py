"""What the run is doing, on stderr: one line per step with the time since the start.

On a terminal the current line also shows the step's own seconds, redrawn
while the orchestrator waits; in a log (make's output piped) a line per step
and one every 30 s, so a stuck step is visible either way.
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = self.step_started = self.last_line = time.monotonic()
        self.label = ""

    def step(self, label: str) -> None:
        """A new step starts (``label`` says what happens now)."""
        if self.tty and self.label:
            self.stream.write("\n")
        self.label, self.step_started = label, time.monotonic()
        self.draw(force=True)

    def draw(self, force: bool = False) -> None:
        """Call it often while waiting: cheap, and silent off a terminal but every 30 s."""
        now = time.monotonic()
        line = f"[{now - self.started:5.0f}s] {self.label}" + (
            f" ({now - self.step_started:.0f}s)" if not force else ""
        )
        if self.tty:
            self.stream.write("\r\x1b[K" + line[:150])
        elif force or now - self.last_line >= 30:
            self.stream.write(line + "\n")
            self.last_line = now
        self.stream.flush()

    def clear(self) -> None:
        """Before printing something else."""
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
