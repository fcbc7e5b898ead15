"""A one-line text progress bar on stderr."""

from __future__ import annotations

import sys
import time

_open = False  # a progress line is on the screen without its newline


def end_line(stream=None) -> None:
    """End an unfinished progress line, so the next message starts a line of its own."""
    global _open
    stream = stream or sys.stderr  # looked up when called: the CLI may run with its streams redirected
    if _open:
        stream.write("\n")
        stream.flush()
        _open = False


class ProgressBar:
    def __init__(self, label: str, width: int = 30, stream=None) -> None:
        self.label, self.width, self.stream = label, width, stream or sys.stderr
        self.start = time.perf_counter()

    def __call__(self, done: int, total: int, eta: float | None = None) -> None:
        """Draw done of total, the rate so far and the time left (eta, seconds; else estimated from the rate)."""
        global _open
        filled = self.width * done // max(total, 1)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = done / elapsed
        left = eta if eta is not None else (total - done) / rate if done else None
        tail = f" ETA {clock(left)}" if left is not None and done < total else f" in {clock(elapsed)}" if done >= total else ""
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} {speed(rate)}{tail}  ")
        _open = done < total
        if not _open:
            self.stream.write("\n")
        self.stream.flush()


def speed(rate: float) -> str:
    """Steps per second, or seconds per step when steps take longer than a second."""
    return f"{rate:.1f}/s" if rate >= 1 or rate == 0 else f"{1 / rate:.1f} s/step"


def clock(seconds: float) -> str:
    """Seconds as m:ss (h:mm:ss past an hour)."""
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
