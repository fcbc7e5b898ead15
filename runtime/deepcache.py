"""DeepCache at run time (opt-in step caching; exact results stay the default).

A pipeline opened with cache="deepcache[:N]" runs the package's DeepCache graphs (`diffrt deepcache add`): every N-th
step of a call the full UNet, which also hands back its deep features; the steps between only the shallow branch
over the features kept from the last full step. N=1 (or "none") is the exact path: the full graph every step, whose
output is the plain UNet's. A request may ask for its own interval, or none, on a pipeline opened with the graphs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import UserError

if TYPE_CHECKING:
    from .package import Package

FEATURE = "deep_features"
DEFAULT_INTERVAL = 3  # DeepCache's own default for SD 1.5 (cache_interval=3, branch 0)
ADD = "`diffrt deepcache add PACKAGE`"


def parse_cache(spec: str | None) -> int:
    """The full-step interval a cache setting asks for: none (or None) 1, deepcache 3, deepcache:N N."""
    if spec is None or spec in ("", "none"):
        return 1
    kind, _, every = str(spec).partition(":")
    if kind != "deepcache":
        raise UserError(f"unknown cache {spec!r}; use deepcache, deepcache:N (a full UNet step every N steps) or none")
    if not every:
        return DEFAULT_INTERVAL
    if not every.isdigit() or not 1 <= int(every) <= 50:
        raise UserError(f"cache {spec!r}: N in deepcache:N is a whole number of steps from 1 to 50 (a full UNet step "
                        "every N steps), e.g. deepcache:3")
    return int(every)


def label(interval: int) -> str | None:
    """A cache interval as images record it (None: exact)."""
    return None if interval <= 1 else f"deepcache:{interval}"


def graphs(package: Package, family: Any, backend: Any, options: Any) -> dict[str, Path]:
    """The package's DeepCache graphs (full, shallow), refused in one line where this pipeline cannot run them."""
    if family.denoiser != "unet":
        raise UserError(f"--cache deepcache reuses a UNet's deep features; {family.name} models have a transformer, not a "
                        "UNet: leave --cache out")
    if backend.opener is None:
        raise UserError(f"the {backend.name} backend runs only the engines built ahead, not DeepCache's graphs; use "
                        "--backend ort-cpu, ov-cpu or ort-cuda with --cache, or leave --cache out")
    if options.fp32_fallback:
        raise UserError("--cache deepcache and --fp32-fallback cannot be combined yet (the float32 copy has no DeepCache "
                        "graphs); leave one out")
    if backend.openvino_ir and package.openvino_weights("unet"):
        raise UserError(f"{package.name}'s UNet runs from OpenVINO IR with compressed weights, which DeepCache's graphs "
                        "do not have; use --cache on the package it was compressed from, or leave --cache out")
    entry = package.manifest.get("components", {}).get("unet", {}).get("deepcache")
    paths = {k: package.root / entry[k] for k in ("full", "shallow")} if entry else {}
    if not paths or not all(p.is_file() for p in paths.values()):
        raise UserError(f"{package.name} has no DeepCache graphs; add them with {ADD} (seconds, no re-export), or "
                        "leave --cache out")
    return paths


def refresh(streams: list[Any]) -> bool:
    """Whether this call runs the full UNet: a stream is at a full step, or has no features kept yet."""
    return any(s.deep is None or s.i % s.req.cache_interval == 0 for s in streams)


def kept(streams: list[Any]) -> np.ndarray:
    """The streams' kept features, row for row as their UNet rows are joined."""
    return np.concatenate([s.deep for s in streams]) if len(streams) > 1 else streams[0].deep


def keep(streams: list[Any], feature: np.ndarray) -> None:
    """Each caching stream's rows of a full call's features (exact streams keep none)."""
    start = 0
    for s in streams:
        rows = s.rows()
        s.deep = feature[start:start + rows] if s.req.cache_interval > 1 else None
        s.full_steps += 1
        start += rows


def shallow_feeds(engine: Any, feeds: dict[str, Any]) -> dict[str, Any]:
    """What the shallow branch takes of the full UNet's feeds (it reads fewer residuals, maybe no text)."""
    return {k: v for k, v in feeds.items() if k in engine.inputs}
