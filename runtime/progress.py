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

    def __call__(self, done: int, total: int) -> None:
        global _open
        filled = self.width * done // max(total, 1)
        rate = done / max(time.perf_counter() - self.start, 1e-9)
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} {rate:.1f}/s")
        _open = done < total
        if not _open:
            self.stream.write("\n")
        self.stream.flush()
