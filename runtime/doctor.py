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
    from .backends.onnxruntime import both_onnxruntimes, onnxruntime
    from .backends.openvino import openvino_available
    from .optimized import cpu_isa, cpu_name

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
    from .backends.openvino import compute_precision

    return compute_precision("auto")


def available_backends(report: dict[str, Any]) -> list[str]:
    found = ["ort-cpu"] + (["ov-cpu"] if report.get("openvino") else [])
    if "CUDAExecutionProvider" in report["providers"]:
        found.append("ort-cuda")
    if (report["tensorrt"] or report["tensorrt_lean"]) and report["gpus"]:
        found.append("trt")
    return found


def paths(backends: list[str], bf16: bool) -> list[tuple[str, str]]:
    """(backend, --precision) of every path to check: each backend as auto runs it, and in fp32 too a backend that
    computes in bf16 by default (OpenVINO)."""
    from .backends.registry import get

    return [(b, "auto") for b in backends] + [(b, "fp32") for b in backends if bf16 and "bf16" in get(b).precisions]


def gate_images(pipe, steps: int | None, seeds: int) -> np.ndarray:
    return np.stack([pipe(p, steps=steps, seed=s).array[0] for p in GATE_PROMPTS for s in range(seeds)])


def check_backends(package: Path, backends: list[str], steps: int | None = None, seeds: int = 2) -> dict[str, Any]:
    """Every path on the gate prompts (same seeds) against the package's float32 graphs on ort-cpu: lowest PSNR and
    largest difference, held to the path's gate (trust.gate_db); each CPU verdict recorded for this machine, where
    auto and --backend then follow it."""
    from . import trust
    from .errors import UserError
    from .package import load_package
    from .pipeline import Pipeline

    pkg = load_package(package)
    reference = Pipeline(pkg, backend="ort-cpu", gated=False)
    reference.use_float32()
    ref = gate_images(reference, steps, seeds)
    reference.close()
    bf16 = "ov-cpu" in backends and cpu_precision() == "bf16"
    results: dict[str, Any] = {}
    for backend, precision in paths(backends, bf16):
        label = backend if precision == "auto" else f"{backend} {precision}"
        try:
            pipe = Pipeline(pkg, backend=backend, precision=precision, gated=False)
        except UserError as exc:
            results[label] = {"ok": False, "error": str(exc)}
            continue
        same = backend == "ort-cpu" and all(pkg.precision(c) == "fp32" for c in pipe.stages)  # the reference itself
        array = ref if same else gate_images(pipe, steps, seeds)
        pipe.close()
        low, gate = min(psnr(a, b) for a, b in zip(array, ref)), trust.gate_db(pipe.computes)
        results[label] = {"ok": low >= gate, "precision": pipe.computes, "psnr_db_min": low, "gate_db": gate,
                          "max_abs_diff_vs_fp32": float(np.abs(array - ref).max())}
        trust.record(pkg, backend, pipe.computes, low)
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
    for label, r in (checks or {}).items():
        if "error" in r:
            lines.append(f"check {label}: fails: {r['error']}")
            continue
        lines.append(f"check {label} ({r['precision']}): {'ok' if r['ok'] else 'fails'}, PSNR min {r['psnr_db_min']:.1f} dB "
                     f"against ort-cpu float32 (gate {r['gate_db']:.0f} dB), max |diff| {r['max_abs_diff_vs_fp32']:.2e}")
    if checks:
        from .trust import store_path

        lines.append(f"verdicts kept in {store_path()}: on this machine auto skips, and --backend refuses, a CPU path "
                     "that fails")
    return "\n".join(lines)
