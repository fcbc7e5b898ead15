"""A one-line text progress bar on stderr."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    def __init__(self, label: str, width: int = 30, stream=sys.stderr) -> None:
        self.label, self.width, self.stream = label, width, stream
        self.start = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        filled = self.width * done // max(total, 1)
        rate = done / max(time.perf_counter() - self.start, 1e-9)
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} {rate:.1f}/s")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()
