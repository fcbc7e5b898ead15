"""TensorRT engines inside a package: where they live, what each takes, which one serves a request.

engines/<gpu>_sm<cc>_trt<version>/<component>.<precision>.plan, each with a .json beside it (profiles,
flags, TensorRT version, build time, source hashes). Pure Python: tested without TensorRT.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError

Shape = tuple[int, ...]


def gpu_slug(name: str) -> str:
    """'NVIDIA GeForce RTX 4090' -> 'nvidia-geforce-rtx-4090'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def engine_dir_name(gpu: str, compute_capability: tuple[int, int], trt_version: str) -> str:
    return f"{gpu_slug(gpu)}_sm{compute_capability[0]}{compute_capability[1]}_trt{trt_version}"


def engine_file(package: Path, gpu: str, cc: tuple[int, int], trt_version: str, component: str, precision: str) -> Path:
    name = component.replace("/", "--")  # a ControlNet's component, controlnet/<name>: one file beside the others
    return package / "engines" / engine_dir_name(gpu, cc, trt_version) / f"{name}.{precision}.plan"


@dataclass(frozen=True)
class Device:
    """The GPU and TensorRT a request runs on."""

    gpu: str
    compute_capability: tuple[int, int]
    trt_version: str

    @property
    def label(self) -> str:
        cc = self.compute_capability
        return f"{self.gpu} (sm{cc[0]}{cc[1]}), TensorRT {self.trt_version}"


@dataclass(frozen=True)
class EngineInfo:
    plan: Path
    meta: dict[str, Any]

    @property
    def component(self) -> str:
        return self.meta["component"]

    @property
    def precision(self) -> str:
        return self.meta["precision"]

    def accepts(self, shapes: dict[str, Shape]) -> bool:
        """Whether some optimization profile of the engine covers every input shape."""
        for profile in self.meta["profiles"]:
            if all(_within(shapes[name], profile[name]) for name in shapes if name in profile):
                return True
        return False

    def runs_on(self, device: Device) -> bool:
        if self.meta["gpu"] != gpu_slug(device.gpu) or tuple(self.meta["compute_capability"]) != device.compute_capability:
            return False
        if self.meta["tensorrt"] == device.trt_version:
            return True
        # a version-compatible plan runs on the same or a later TensorRT (the lean runtime included)
        return bool(self.meta.get("version_compatible")) and _version(self.meta["tensorrt"]) <= _version(device.trt_version)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def _within(shape: Shape, bounds: dict[str, list[int]]) -> bool:
    lo, hi = bounds["min"], bounds["max"]
    return len(shape) == len(lo) and all(a <= s <= b for s, a, b in zip(shape, lo, hi))


def write_engine_meta(plan: Path, meta: dict[str, Any]) -> Path:
    path = plan.with_suffix(".json")
    path.write_text(json.dumps(meta, indent=1) + "\n")
    return path


def list_engines(package: Path) -> list[EngineInfo]:
    found = []
    for meta_path in sorted((package / "engines").glob("*/*.json")):
        plan = meta_path.with_suffix(".plan")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            raise UserError(f"{meta_path} is not valid JSON; delete it and its .plan and rebuild with `diffrt build`") from None
        if plan.is_file():
            found.append(EngineInfo(plan, meta))
    return found


def build_command(package: Path, precision: str, shapes: dict[str, Shape] | None = None) -> str:
    return f"diffrt build {package} --precision {precision}" + ("" if shapes is None else " --batch 1-4 --size 256-1024")


def select_engine(package: Path, component: str, precision: str, device: Device,
                  shapes: dict[str, Shape] | None = None) -> EngineInfo:
    """The engine for this component, precision, GPU, TensorRT and (when given) input shapes; else a clear error."""
    engines = [e for e in list_engines(package) if e.component == component and e.precision == precision]
    fix = build_command(package, precision)
    if not engines:
        raise UserError(f"no {component}.{precision} TensorRT engine in {package / 'engines'}; build one on this machine: {fix}")
    here = [e for e in engines if e.runs_on(device)]
    if not here:
        seen = sorted({f"{e.meta['gpu']} (sm{''.join(map(str, e.meta['compute_capability']))}), TensorRT {e.meta['tensorrt']}"
                       for e in engines})
        raise UserError(f"the {component}.{precision} engines here were built for {'; '.join(seen)}, not for {device.label}; "
                        f"engines are specific to GPU and TensorRT version: {fix}")
    if shapes is None:
        return here[0]
    for engine in here:
        if engine.accepts(shapes):
            return engine
    ranges = "; ".join(describe_profiles(e.meta["profiles"]) for e in here)
    asked = ", ".join(f"{k} {list(v)}" for k, v in shapes.items())
    raise UserError(f"no {component}.{precision} engine takes {asked} (built for {ranges}); rebuild with wider ranges, "
                    f"e.g. {build_command(package, precision, shapes)}")


def pick_engine(package: Path, component: str, precisions: tuple[str, ...], device: Device) -> EngineInfo:
    """The first precision (in the order given) with an engine for this component that runs here; the first
    precision's error when there is none."""
    errors = []
    for precision in precisions:
        try:
            return select_engine(package, component, precision, device)
        except UserError as exc:
            errors.append(exc)
    raise errors[0]


def engine_precisions(unet_precision: str) -> tuple[str, ...]:
    """Which engine precisions a package's TensorRT backend takes, most preferred first: an int8 package's int8
    engines; otherwise fp16 engines, else fp32 ones (`diffrt build --precision fp32`)."""
    return ("int8",) if unet_precision == "int8" else ("fp16", "fp32")


def describe_profiles(profiles: list[dict[str, dict[str, list[int]]]]) -> str:
    return " | ".join(", ".join(f"{n} {p['min']}..{p['max']}" for n, p in prof.items()) for prof in profiles)
