"""A progress bar on stderr, no dependency.

The run is a list of planned steps with expected durations; the bar shows
the planned fraction done plus the current step's elapsed time (capped at
its plan), so it moves smoothly and never runs backwards. On a terminal it
redraws one line; in a log (make's output piped) it prints a line when a
step starts and every 10 s.
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, plan: list[tuple[str, float]], stream=None, width: int = 30) -> None:
        self.plan = plan
        self.total = sum(seconds for _, seconds in plan) or 1.0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.width = width
        self.index = -1
        self.done = 0.0
        self.started = self.step_started = self.last_line = time.monotonic()
        self.label = ""

    def step(self, label: str) -> None:
        """Start the next planned step (``label`` says what happens now)."""
        if 0 <= self.index < len(self.plan):
            self.done += self.plan[self.index][1]
        self.index += 1
        self.step_started = time.monotonic()
        self.label = label
        self.draw(force=True)

    def note(self, label: str) -> None:
        """Change the label within a step."""
        self.label = label
        self.draw(force=not self.tty)

    def draw(self, force: bool = False) -> None:
        """Redraw (call it often; off a terminal it prints at most every 10 s)."""
        now = time.monotonic()
        planned = self.plan[self.index][1] if 0 <= self.index < len(self.plan) else 0.0
        fraction = min(1.0, (self.done + min(planned, now - self.step_started)) / self.total)
        self._write(fraction, now, force)

    def finish(self, label: str = "done") -> None:
        self.label = label
        self._write(1.0, time.monotonic(), True)
        if self.tty:
            self.stream.write("\n")

    def clear(self) -> None:
        """Before printing something else on a terminal."""
        if self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def _write(self, fraction: float, now: float, force: bool) -> None:
        filled = int(fraction * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        line = f"[{bar}] {fraction * 100:3.0f}% {now - self.started:4.0f}s  {self.label}"
        if self.tty:
            self.stream.write("\r\x1b[K" + line[:150])
        elif force or now - self.last_line >= 10:
            self.stream.write(line + "\n")
            self.last_line = now
        self.stream.flush()
