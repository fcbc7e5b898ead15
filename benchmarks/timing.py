"""Side-by-side timing: implementations run in turn, the order rotated run by run, so machine noise hits each alike."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def interleaved(fns: dict[str, Callable[[], Any]], runs: int) -> dict[str, list[float]]:
    """Seconds of each of `runs` calls per implementation; run i starts at the i-th implementation (rotation)."""
    order = list(fns)
    times: dict[str, list[float]] = {name: [] for name in order}
    for i in range(runs):
        k = i % len(order)
        for name in order[k:] + order[:k]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times
