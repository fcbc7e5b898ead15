"""Numpy schedulers built from diffusers scheduler configs; look one up by short or diffusers class name."""

from __future__ import annotations

import json
from pathlib import Path

from .base import Scheduler
from .ddim import DDIM
from .dpmpp_2m import DPMSolverPP2M
from .euler import Euler
from .euler_ancestral import EulerAncestral
from .lcm import LCM
from .pndm import PNDM

CLASSES: dict[str, type[Scheduler]] = {c.class_name: c for c in (DDIM, PNDM, Euler, EulerAncestral, DPMSolverPP2M, LCM)}
# short name -> (class, config overrides)
SHORT_NAMES: dict[str, tuple[type[Scheduler], dict]] = {
    "ddim": (DDIM, {}),
    "pndm": (PNDM, {}),
    "euler": (Euler, {}),
    "euler_a": (EulerAncestral, {}),
    "dpmpp_2m": (DPMSolverPP2M, {"use_karras_sigmas": False}),
    "dpmpp_2m_karras": (DPMSolverPP2M, {"use_karras_sigmas": True}),
    "lcm": (LCM, {}),
}


# AUTOMATIC1111's sampler names (what diffrt writes into image metadata) -> short name
A1111_NAMES = {"DDIM": "ddim", "PLMS": "pndm", "Euler": "euler", "Euler a": "euler_a", "DPM++ 2M": "dpmpp_2m",
               "DPM++ 2M Karras": "dpmpp_2m_karras", "LCM": "lcm"}


def scheduler_names() -> list[str]:
    return list(SHORT_NAMES) + list(CLASSES) + list(A1111_NAMES)


def canonical_name(name: str) -> str | None:
    """The short or class name for any accepted spelling (short, diffusers class or A1111 name, any case)."""
    folded = {n.lower(): n for n in list(SHORT_NAMES) + list(CLASSES)}
    folded.update({k.lower(): v for k, v in A1111_NAMES.items()})
    return folded.get(name.strip().lower())


def make_scheduler(name: str | None, config: dict) -> Scheduler:
    """Build scheduler `name` (short, class or A1111 name, any case; None = the config's own class) from a diffusers
    config."""
    given = name or config.get("_class_name")
    name = canonical_name(given) if isinstance(given, str) else None
    if name in SHORT_NAMES:
        cls, overrides = SHORT_NAMES[name]
    elif name in CLASSES:
        cls, overrides = CLASSES[name], {}
    else:
        raise ValueError(f"unknown scheduler {given!r}; choose one of: {', '.join(SHORT_NAMES)} (or their diffusers class "
                         f"or AUTOMATIC1111 names: {', '.join(A1111_NAMES)})")
    return cls(**{**config, **overrides})


def short_name(scheduler: Scheduler) -> str:
    """The short name that rebuilds this scheduler (dpmpp_2m_karras for DPM++ 2M over Karras sigmas)."""
    if isinstance(scheduler, DPMSolverPP2M) and scheduler.config["use_karras_sigmas"]:
        return "dpmpp_2m_karras"
    return scheduler.name


def load_config(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


__all__ = ["Scheduler", "make_scheduler", "scheduler_names", "canonical_name", "short_name", "load_config", "CLASSES",
           "SHORT_NAMES", "A1111_NAMES"]
