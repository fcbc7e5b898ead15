"""First-Block Cache at run time, for the DiT families (opt-in step caching; exact results stay the default).

A pipeline opened with cache="fbcache[:T]" runs the package's First-Block Cache graphs (`diffrt fbcache add`) in
turn: the head (embedders and first block) every step; then, for a stream whose first-block residual moved by more
than T since its last full step (mean |change| over mean |residual|, as diffusers' FirstBlockCacheConfig measures
it), the tail (the other blocks), keeping what they added; otherwise what they added on its last full step is added
again. The output head runs on the result. Each stream decides for its own rows, and FLUX's true-CFG negatives
apart from its prompts (diffusers runs them as separate passes, each with its own cache)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

HIDDEN_IN, HIDDEN, CONTEXT, LAST = "fbc_hidden_in", "fbc_hidden", "fbc_context", "fbc_hidden_last"
TAIL, OUT = "transformer_tail", "transformer_out"  # the stages' engines beside the head (the denoiser's)

Run = Callable[[str, dict[str, Any], tuple[str, ...]], list[np.ndarray]]


def groups(stream: Any, separate_negatives: bool) -> list[slice]:
    """The row ranges of a stream's denoiser rows that decide together: all of them, or its negatives and prompts
    apart where the family runs true CFG as two passes."""
    rows = stream.rows()
    if separate_negatives and stream.req.guided:
        return [slice(0, rows // 2), slice(rows // 2, rows)]
    return [slice(0, rows)]


def changed(residual: np.ndarray, kept: np.ndarray | None, threshold: float) -> bool:
    """Whether the other blocks run: no full step yet, or the first block's residual moved more than threshold."""
    if kept is None:
        return True
    change = np.abs(residual - kept).mean(dtype=np.float64) / max(np.abs(kept).mean(dtype=np.float64), 1e-30)
    return bool(change > threshold)


def denoise(streams: list[Any], feeds: dict[str, Any], run: Run, output: str, separate_negatives: bool) -> np.ndarray:
    """The transformer's output for the joined rows of these streams, run as head, tail where a stream needs it, out."""
    hidden_in, hidden, context = run("head", feeds, (HIDDEN_IN, HIDDEN, CONTEXT))
    residual, plan, start = hidden - hidden_in, [], 0
    for s in streams:
        parts = groups(s, separate_negatives)
        if s.fbc is None:
            s.fbc = [{"head": None, "tail": None} for _ in parts]
        full = [s.req.cache.threshold <= 0 or changed(residual[start + g.start:start + g.stop], kept["head"],
                                                      s.req.cache.threshold) for g, kept in zip(parts, s.fbc)]
        plan.append((s, start, parts, full))
        s.full_steps += any(full)
        start += s.rows()
    last = hidden.copy()
    if any(any(full) for *_, full in plan):
        tail = run("tail", {**feeds, HIDDEN: hidden, CONTEXT: context}, (LAST,))[0]
    for s, at, parts, full in plan:
        for g, kept, computed in zip(parts, s.fbc, full):
            rows = slice(at + g.start, at + g.stop)
            if computed:
                kept["head"], kept["tail"], last[rows] = residual[rows], tail[rows] - hidden[rows], tail[rows]
            else:
                last[rows] += kept["tail"]
    return run("out", {**feeds, LAST: last}, (output,))[0]
