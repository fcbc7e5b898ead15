"""Step caching choices (opt-in; exact results stay the default): DeepCache for UNets (deepcache.py), First-Block
Cache for the DiT families' transformers (fbcache.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .errors import UserError

if TYPE_CHECKING:
    from .package import Package

DEFAULT_INTERVAL = 3  # DeepCache's own default for SD 1.5 (cache_interval=3, branch 0)
DEFAULT_THRESHOLD = 0.05  # diffusers' FirstBlockCacheConfig default
USE = ("use deepcache, deepcache:N (UNets: a full UNet step every N steps), fbcache, fbcache:T (SD3/FLUX: the other "
       "blocks skipped while the first block's residual moves less than T) or none")


# each method's component, the graphs `diffrt <method> add` cuts from it (the manifest's keys), its name
METHODS = {"deepcache": ("unet", ("full", "shallow"), "DeepCache"),
           "fbcache": ("transformer", ("head", "tail", "out"), "First-Block Cache")}


class CacheChoice(NamedTuple):
    interval: int = 1  # DeepCache: a full UNet step every N steps, the shallow branch between (1: none)
    threshold: float = 0.0  # First-Block Cache: the relative change under which the other blocks are skipped (0: none)

    @property
    def method(self) -> str | None:
        return "deepcache" if self.interval > 1 else "fbcache" if self.threshold > 0 else None

    @property
    def label(self) -> str | None:
        """As images record it (None: exact)."""
        if self.method is None:
            return None
        return f"deepcache:{self.interval}" if self.interval > 1 else f"fbcache:{self.threshold:g}"


def parse_cache(spec: str | None) -> CacheChoice:
    """A cache setting: none (or None), deepcache[:N], fbcache[:T]."""
    if spec is None or spec in ("", "none"):
        return CacheChoice()
    kind, _, value = str(spec).partition(":")
    if kind == "deepcache":
        if not value:
            return CacheChoice(interval=DEFAULT_INTERVAL)
        if not value.isdigit() or not 1 <= int(value) <= 50:
            raise UserError(f"cache {spec!r}: N in deepcache:N is a whole number of steps from 1 to 50 (a full UNet step "
                            "every N steps), e.g. deepcache:3")
        return CacheChoice(interval=int(value))
    if kind == "fbcache":
        try:
            threshold = float(value) if value else DEFAULT_THRESHOLD
        except ValueError:
            threshold = -1.0
        if not 0 <= threshold <= 1:
            raise UserError(f"cache {spec!r}: T in fbcache:T is a number from 0 to 1 (the first block's relative change "
                            f"under which the other blocks are skipped; diffusers' default {DEFAULT_THRESHOLD}), e.g. "
                            "fbcache:0.1")
        return CacheChoice(threshold=threshold)
    raise UserError(f"unknown cache {spec!r}; {USE}")


def graphs(package: Package, family: Any, backend: Any, options: Any, method: str) -> dict[str, Path]:
    """The package's graphs for a caching method, refused in one line where this pipeline cannot run them."""
    component, keys, name = METHODS[method]
    if family.denoiser != component:
        other = next(m for m, (c, _, _) in METHODS.items() if c == family.denoiser)
        raise UserError(f"--cache {method} is {name}, for a {component}; {family.name} models have a {family.denoiser}: "
                        f"use --cache {other}, or leave --cache out")
    if backend.opener is None:
        raise UserError(f"the {backend.name} backend runs only the engines built ahead, not {name}'s graphs; use "
                        "--backend ort-cpu, ov-cpu or ort-cuda with --cache, or leave --cache out")
    if options.fp32_fallback:
        raise UserError(f"--cache {method} and --fp32-fallback cannot be combined yet (the float32 copy has no {name} "
                        "graphs); leave one out")
    if backend.openvino_ir and package.openvino_weights(component):
        raise UserError(f"{package.name}'s {component} runs from OpenVINO IR with compressed weights, which {name}'s "
                        "graphs do not have; use --cache on the package it was compressed from, or leave --cache out")
    entry = package.manifest.get("components", {}).get(component, {}).get(method)
    paths = {k: package.root / entry[k] for k in keys} if entry else {}
    if not paths or not all(p.is_file() for p in paths.values()):
        raise UserError(f"{package.name} has no {name} graphs; add them with `diffrt {method} add PACKAGE` (seconds, no "
                        "re-export), or leave --cache out")
    return paths
