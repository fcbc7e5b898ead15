"""Model families (base.py is the seam): one module per family, chosen by a package's diffrt.json "family"."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import PER_ROW_FIX, PROMPT_SYNTAXES, Family, one_per_row, timestep_feed
from .flux import Flux
from .sd import StableDiffusion
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL

if TYPE_CHECKING:
    from ..package import Package

# diffrt.json's family -> its class; a family not listed (custom SD-shaped models) runs as SD 1.x / 2.x
FAMILIES: dict[str, type[Family]] = {"sd1": StableDiffusion, "sd2": StableDiffusion, "sdxl": StableDiffusionXL,
                                     "sd3": StableDiffusion3, "flux": Flux}


def family_class(name: str) -> type[Family]:
    return FAMILIES.get(name, StableDiffusion)


def family_for(package: Package) -> Family:
    """The family object of a package."""
    return family_class(package.family)(package)


__all__ = ["FAMILIES", "Family", "PER_ROW_FIX", "PROMPT_SYNTAXES", "family_class", "family_for", "one_per_row", "timestep_feed"]
