"""`diffrt doctor`: what this machine offers diffrt, and (with a package) every backend checked against the others."""

from __future__ import annotations

import shutil
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

GATE_PROMPTS = (  # images a reduced-precision path is compared on against float32 (quantize's gates and doctor's)
    "a large magenta cross on a green background, top right", "a small white circle on a black background, center",
    "a portrait of an old man, charcoal drawing", "a red sports car on a mountain road",
)


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
    from .optimized import cpu_isa, cpu_name
    from .ov_backend import openvino_available

    ort = onnxruntime()
    openvino = _version("openvino") if openvino_available() else None
    return {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(), "cpu": cpu_name(),
            "cpu_isa": cpu_isa(), "openvino": openvino, "openvino_precision": cpu_precision() if openvino else None,
            "tensorrt": _version("tensorrt") or _version("tensorrt-cu12") or _version("tensorrt-cu13"),
            "tensorrt_lean": _version("tensorrt-lean") or _version("tensorrt-lean-cu12") or _version("tensorrt-lean-cu13"),
            "gpus": gpu_info(), "both_onnxruntimes": both_onnxruntimes()}


def int8_path(isa: list[str]) -> str:
    """What int8 packages (`diffrt quantize --precision int8`) run on here, from the CPU's extensions."""
    found = next((name for flag, name in (("amx_int8", "AMX-INT8"), ("avx512_vnni", "AVX-512 VNNI"),
                                          ("avx_vnni", "AVX-VNNI")) if flag in isa), None)
    if found:
        return f"int8 packages compute their convolutions and matrix products in int8 here ({found})"
    return "int8 packages gain little here (no AMX-INT8 or VNNI: int8 products are emulated)"


def cpu_precision() -> str:
    from .ov_backend import compute_precision

    return compute_precision("auto")


def available_backends(report: dict[str, Any]) -> list[str]:
    found = ["ort-cpu"] + (["ov-cpu"] if report.get("openvino") else [])
    if "CUDAExecutionProvider" in report["providers"]:
        found.append("ort-cuda")
    if (report["tensorrt"] or report["tensorrt_lean"]) and report["gpus"]:
        found.append("trt")
    return found


def check_backends(package: Path, backends: list[str], steps: int = 4, seeds: int = 2) -> dict[str, Any]:
    """The gate prompts' images (same seeds) on each backend, against ort-cpu's float32: max difference and the lowest
    PSNR; a reduced-precision CPU path (ov-cpu in bf16) passes only above BF16_GATE_DB."""
    from .errors import UserError
    from .ov_backend import BF16_GATE_DB
    from .pipeline import Pipeline

    results, arrays = {}, {}
    for backend in backends:
        try:
            pipe = Pipeline.from_package(package, backend=backend)
            arrays[backend] = np.stack([pipe(p, steps=steps, seed=s).array[0] for p in GATE_PROMPTS for s in range(seeds)])
            results[backend] = {"ok": True, "precision": pipe.computes}
        except UserError as exc:
            results[backend] = {"ok": False, "error": str(exc)}
    for backend, array in arrays.items():
        if "ort-cpu" in arrays:
            ref = arrays["ort-cpu"]
            results[backend]["max_abs_diff_vs_ort_cpu"] = float(np.abs(array - ref).max())
            results[backend]["psnr_db_min"] = min(psnr(a, b) for a, b in zip(array, ref))
            if results[backend]["precision"] == "bf16":
                results[backend]["gate_db"] = BF16_GATE_DB
                results[backend]["ok"] = results[backend]["psnr_db_min"] >= BF16_GATE_DB
    return results


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two images in [0, 1], in dB (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * float(np.log10(1.0 / mse))


def format_report(report: dict[str, Any], checks: dict[str, Any] | None = None) -> str:
    lines = [f"CPU: {report['cpu']}; {', '.join(report['cpu_isa']) or 'no AVX2/AVX-512/AMX'}",
             f"OpenVINO: {report['openvino']}, computes in {report['openvino_precision']} here" if report["openvino"] else
             'OpenVINO: not installed (`pip install "diffrt[openvino]"` for backend ov-cpu)',
             int8_path(report["cpu_isa"]),
             f"onnxruntime {report['onnxruntime']}: {', '.join(report['providers'])}",
             f"TensorRT: {report['tensorrt'] or 'not installed'}; lean runtime: {report['tensorrt_lean'] or 'not installed'}"]
    lines += [f"GPU: {g['name']}, {g['memory']}, driver {g['driver']}, compute capability {g['compute_capability']}"
              for g in report["gpus"]] or ["GPU: none found (nvidia-smi absent or sees none)"]
    if report.get("both_onnxruntimes"):
        lines.append("warning: onnxruntime and onnxruntime-gpu are both installed (one import folder): keep one, "
                     "`pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu` on a GPU machine")
    lines.append(f"backends usable here: {', '.join(available_backends(report))}")
    for backend, r in (checks or {}).items():
        if "error" in r:
            lines.append(f"check {backend}: FAILED: {r['error']}")
            continue
        gate = f" (gate {r['gate_db']:.0f} dB)" if "gate_db" in r else ""
        lines.append(f"check {backend} ({r['precision']}): {'ok' if r['ok'] else 'FAILED its quality gate'}, max |diff| vs "
                     f"ort-cpu {r.get('max_abs_diff_vs_ort_cpu', 0.0):.2e}, PSNR min {r.get('psnr_db_min', float('inf')):.1f} "
                     f"dB{gate}")
    return "\n".join(lines)
