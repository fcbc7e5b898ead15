"""Numpy schedulers built from diffusers scheduler configs; look one up by short or diffusers class name."""

from __future__ import annotations

import json
from pathlib import Path

from .base import COMMON_DEFAULTS, Scheduler
from .ddim import DDIM
from .ddpm import DDPM
from .deis import DEIS
from .dpm2 import DPM2
from .dpm2_ancestral import DPM2Ancestral
from .dpmpp_2m import DPMSolverPP2M
from .euler import Euler
from .euler_ancestral import EulerAncestral
from .flow_match_euler import FlowMatchEuler
from .heun import Heun
from .lcm import LCM
from .lms import LMS
from .pndm import PNDM
from .tcd import TCD
from .unipc import UniPC

CLASSES: dict[str, type[Scheduler]] = {c.class_name: c for c in (
    DDIM, PNDM, Euler, EulerAncestral, DPMSolverPP2M, LCM, Heun, LMS, UniPC, DEIS, DPM2, DPM2Ancestral, DDPM, TCD,
    FlowMatchEuler)}
KARRAS = {"use_karras_sigmas": True, "use_exponential_sigmas": False}  # Karras names mean Karras sigmas, whatever the config
EXPONENTIAL = {"use_karras_sigmas": False, "use_exponential_sigmas": True}
PLAIN = {"use_karras_sigmas": False, "use_exponential_sigmas": False}  # A1111's Automatic / Uniform schedule
ODE = {"algorithm_type": "dpmsolver++"}
SDE = {"algorithm_type": "sde-dpmsolver++"}
# short name -> (class, config overrides, AUTOMATIC1111's name); A1111's name goes into image metadata
SAMPLERS: dict[str, tuple[type[Scheduler], dict, str]] = {
    "ddim": (DDIM, {}, "DDIM"),
    "pndm": (PNDM, {}, "PLMS"),
    "euler": (Euler, PLAIN, "Euler"),
    "euler_karras": (Euler, KARRAS, "Euler Karras"),
    "euler_exponential": (Euler, EXPONENTIAL, "Euler Exponential"),
    "euler_a": (EulerAncestral, {}, "Euler a"),
    "heun": (Heun, PLAIN, "Heun"),
    "heun_karras": (Heun, KARRAS, "Heun Karras"),
    "heun_exponential": (Heun, EXPONENTIAL, "Heun Exponential"),
    "lms": (LMS, PLAIN, "LMS"),
    "lms_karras": (LMS, KARRAS, "LMS Karras"),
    "lms_exponential": (LMS, EXPONENTIAL, "LMS Exponential"),
    "dpm2": (DPM2, PLAIN, "DPM2"),
    "dpm2_karras": (DPM2, KARRAS, "DPM2 Karras"),
    "dpm2_exponential": (DPM2, EXPONENTIAL, "DPM2 Exponential"),
    "dpm2_a": (DPM2Ancestral, PLAIN, "DPM2 a"),
    "dpm2_a_karras": (DPM2Ancestral, KARRAS, "DPM2 a Karras"),
    "dpm2_a_exponential": (DPM2Ancestral, EXPONENTIAL, "DPM2 a Exponential"),
    "dpmpp_2m": (DPMSolverPP2M, {**ODE, **PLAIN}, "DPM++ 2M"),
    "dpmpp_2m_karras": (DPMSolverPP2M, {**ODE, **KARRAS}, "DPM++ 2M Karras"),
    "dpmpp_2m_exponential": (DPMSolverPP2M, {**ODE, **EXPONENTIAL}, "DPM++ 2M Exponential"),
    "dpmpp_2m_sde": (DPMSolverPP2M, {**SDE, **PLAIN}, "DPM++ 2M SDE"),
    "dpmpp_2m_sde_karras": (DPMSolverPP2M, {**SDE, **KARRAS}, "DPM++ 2M SDE Karras"),
    "dpmpp_2m_sde_exponential": (DPMSolverPP2M, {**SDE, **EXPONENTIAL}, "DPM++ 2M SDE Exponential"),
    "unipc": (UniPC, {}, "UniPC"),
    "deis": (DEIS, {}, "DEIS"),
    "ddpm": (DDPM, {}, "DDPM"),
    "lcm": (LCM, {}, "LCM"),
    "tcd": (TCD, {}, "TCD"),
    "flow_euler": (FlowMatchEuler, {}, "Flow Euler"),  # flow-matching models (SD3, FLUX) only
}
SHORT_NAMES: dict[str, tuple[type[Scheduler], dict]] = {k: (cls, o) for k, (cls, o, _) in SAMPLERS.items()}
A1111_NAMES = {a1111: k for k, (_, _, a1111) in SAMPLERS.items()}


def is_flow_config(config: dict) -> bool:
    """Whether a scheduler config is a flow-matching model's (SD3, FLUX)."""
    return str(config.get("_class_name", "")).startswith("FlowMatch")


def samplers_for(flow: bool) -> list[str]:
    """The short names of the samplers for flow-matching models (flow=True) or for discrete-time ones."""
    return [name for name, (cls, _) in SHORT_NAMES.items() if cls.flow == flow]


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
    flow = is_flow_config(config)
    if cls.flow != flow:
        kind = "a flow-matching model (SD3, FLUX)" if flow else "a discrete-time model (SD 1.x/2.x, SDXL)"
        raise ValueError(f"the {cls.name} scheduler cannot sample {kind}; use one of: {', '.join(samplers_for(flow))}")
    return cls(**{**config, **overrides})


def short_name(scheduler: Scheduler) -> str:
    """The short name that rebuilds this scheduler (dpmpp_2m_sde_karras for DPM++ 2M SDE over Karras sigmas)."""
    name = scheduler.name
    if scheduler.config.get("algorithm_type") == "sde-dpmsolver++":
        name += "_sde"
    for key, suffix in (("use_karras_sigmas", "_karras"), ("use_exponential_sigmas", "_exponential")):
        if f"{name}{suffix}" in SAMPLERS and scheduler.config.get(key):
            return f"{name}{suffix}"
    return name


SCHEDULE_TYPES = {"automatic": "", "uniform": "", "karras": "_karras", "exponential": "_exponential"}


def a1111_scheduler(sampler: str | None, schedule: str | None) -> str | None:
    """The scheduler for an AUTOMATIC1111 sampler and schedule type, which A1111 1.9 and later send apart ("DPM++ 2M"
    and "Karras"); a sampler alone, or a scheduler name in the schedule's field, is taken as a scheduler name (as
    older clients send them); Automatic or Uniform alone means the package's own scheduler."""
    if not schedule:
        return sampler
    suffix = SCHEDULE_TYPES.get(schedule.strip().lower())
    if not sampler:
        if suffix:
            raise ValueError(f"schedule type {schedule!r} needs a sampler_name (such as 'DPM++ 2M')")
        return None if suffix == "" else schedule
    if suffix is None:
        raise ValueError(f"unknown schedule type {schedule!r}; diffrt offers Automatic, Uniform, Karras and Exponential")
    base = canonical_name(sampler)
    if base not in SHORT_NAMES:  # an unknown name, or a diffusers class: said as it is, or refused where it is used
        return sampler if not suffix else f"{sampler} {schedule}"
    plain = base.removesuffix("_karras").removesuffix("_exponential")
    if suffix and f"{plain}{suffix}" not in SHORT_NAMES:
        raise ValueError(f"{sampler} has no {schedule} schedule in diffrt; use schedule type Automatic")
    return f"{plain}{suffix}" if suffix else base


def sampler_table() -> list[str]:
    """One line per sampler: short name, AUTOMATIC1111 name, diffusers class (with the settings it implies), UNet
    calls per step, and whether it draws noise while sampling."""
    lines = [f"{'name':<20} {'AUTOMATIC1111':<22} {'diffusers class (settings)':<88} calls/step  noise"]
    for short, (cls, overrides, a1111) in SAMPLERS.items():
        sampler = cls(**overrides)
        settings = ", ".join(f"{k}={v!r}" for k, v in overrides.items() if v != cls.defaults.get(k, COMMON_DEFAULTS.get(k)))
        described = f"{cls.class_name} ({settings})" if settings else cls.class_name
        lines.append(f"{short:<20} {a1111:<22} {described:<88} {sampler.order:^10}  {'yes' if sampler.stochastic else ''}")
    return lines


def load_config(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


__all__ = ["Scheduler", "make_scheduler", "samplers_for", "is_flow_config", "sampler_table", "scheduler_names",
           "canonical_name", "short_name", "load_config", "CLASSES", "SHORT_NAMES", "A1111_NAMES", "a1111_scheduler"]
