"""`diffrt doctor`: what this machine offers diffrt, and (with a package) every backend checked against the others."""

from __future__ import annotations

import shutil
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np


def gpu_info() -> list[dict[str, str]]:
    """Name, memory, driver and compute capability of each NVIDIA GPU nvidia-smi sees."""
    if not shutil.which("nvidia-smi"):
        return []
    proc = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,compute_cap", "--format=csv,noheader"],
                          capture_output=True, text=True)
    if proc.returncode:
        return []
    keys = ("name", "memory", "driver", "compute_capability")
    return [dict(zip(keys, (p.strip() for p in line.split(",")))) for line in proc.stdout.strip().splitlines()]


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def machine_report() -> dict[str, Any]:
    from .engines import both_onnxruntimes, onnxruntime

    ort = onnxruntime()

    return {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
            "tensorrt": _version("tensorrt") or _version("tensorrt-cu12") or _version("tensorrt-cu13"),
            "tensorrt_lean": _version("tensorrt-lean") or _version("tensorrt-lean-cu12") or _version("tensorrt-lean-cu13"),
            "gpus": gpu_info(), "both_onnxruntimes": both_onnxruntimes()}


def available_backends(report: dict[str, Any]) -> list[str]:
    found = ["ort-cpu"]
    if "CUDAExecutionProvider" in report["providers"]:
        found.append("ort-cuda")
    if (report["tensorrt"] or report["tensorrt_lean"]) and report["gpus"]:
        found.append("trt")
    return found


def check_backends(package: Path, backends: list[str], steps: int = 4, seed: int = 0) -> dict[str, Any]:
    """Generate the same image (same latents) on each backend; the max difference of each against ort-cpu."""
    from .errors import UserError
    from .pipeline import Pipeline

    results, arrays = {}, {}
    for backend in backends:
        try:
            r = Pipeline.from_package(package, backend=backend)("a red circle on a blue background", steps=steps, seed=seed)
            arrays[backend] = r.array
            results[backend] = {"ok": True}
        except UserError as exc:
            results[backend] = {"ok": False, "error": str(exc)}
    for backend, array in arrays.items():
        if "ort-cpu" in arrays:
            results[backend]["max_abs_diff_vs_ort_cpu"] = float(np.abs(array - arrays["ort-cpu"]).max())
    return results


def format_report(report: dict[str, Any], checks: dict[str, Any] | None = None) -> str:
    lines = [f"onnxruntime {report['onnxruntime']}: {', '.join(report['providers'])}",
             f"TensorRT: {report['tensorrt'] or 'not installed'}; lean runtime: {report['tensorrt_lean'] or 'not installed'}"]
    lines += [f"GPU: {g['name']}, {g['memory']}, driver {g['driver']}, compute capability {g['compute_capability']}"
              for g in report["gpus"]] or ["GPU: none found (nvidia-smi absent or sees none)"]
    if report.get("both_onnxruntimes"):
        lines.append("warning: onnxruntime and onnxruntime-gpu are both installed (one import folder): keep one, "
                     "`pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu` on a GPU machine")
    lines.append(f"backends usable here: {', '.join(available_backends(report))}")
    for backend, r in (checks or {}).items():
        if r["ok"]:
            lines.append(f"check {backend}: ok, max |diff| vs ort-cpu {r.get('max_abs_diff_vs_ort_cpu', 0.0):.2e}")
        else:
            lines.append(f"check {backend}: FAILED: {r['error']}")
    return "\n".join(lines)
