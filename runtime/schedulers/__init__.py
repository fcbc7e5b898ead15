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


def scheduler_names() -> list[str]:
    return list(SHORT_NAMES) + list(CLASSES)


def make_scheduler(name: str | None, config: dict) -> Scheduler:
    """Build scheduler `name` (short or class name; None = the config's own class) from a diffusers config."""
    name = name or config.get("_class_name")
    if name in SHORT_NAMES:
        cls, overrides = SHORT_NAMES[name]
    elif name in CLASSES:
        cls, overrides = CLASSES[name], {}
    else:
        raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(scheduler_names())}")
    return cls(**{**config, **overrides})


def short_name(scheduler: Scheduler) -> str:
    """The short name that rebuilds this scheduler (dpmpp_2m_karras for DPM++ 2M over Karras sigmas)."""
    if isinstance(scheduler, DPMSolverPP2M) and scheduler.config["use_karras_sigmas"]:
        return "dpmpp_2m_karras"
    return scheduler.name


def load_config(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


__all__ = ["Scheduler", "make_scheduler", "scheduler_names", "short_name", "load_config", "CLASSES", "SHORT_NAMES"]
