"""DeepCache at run time (opt-in step caching; exact results stay the default).

A pipeline opened with cache="deepcache[:N]" runs the package's DeepCache graphs (`diffrt deepcache add`): every N-th
step of a call the full UNet, which also hands back its deep features; the steps between only the shallow branch
over the features kept from the last full step. N=1 (or "none") is the exact path: the full graph every step, whose
output is the plain UNet's. A request may ask for its own interval, or none, on a pipeline opened with the graphs."""

from __future__ import annotations

from typing import Any

import numpy as np

FEATURE = "deep_features"

def refresh(streams: list[Any]) -> bool:
    """Whether this call runs the full UNet: a stream is at a full step, or has no features kept yet."""
    return any(s.deep is None or s.i % s.req.cache.interval == 0 for s in streams)


def kept(streams: list[Any]) -> np.ndarray:
    """The streams' kept features, row for row as their UNet rows are joined."""
    return np.concatenate([s.deep for s in streams]) if len(streams) > 1 else streams[0].deep


def keep(streams: list[Any], feature: np.ndarray) -> None:
    """Each caching stream's rows of a full call's features (exact streams keep none)."""
    start = 0
    for s in streams:
        rows = s.rows()
        s.deep = feature[start:start + rows] if s.req.cache.interval > 1 else None
        s.full_steps += 1
        start += rows


def shallow_feeds(engine: Any, feeds: dict[str, Any]) -> dict[str, Any]:
    """What the shallow branch takes of the full UNet's feeds (it reads fewer residuals, maybe no text)."""
    return {k: v for k, v in feeds.items() if k in engine.inputs}
