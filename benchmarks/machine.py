"""What a benchmark ran on: CPU, cores, GPU, library versions, and peak memory readings."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from diffrt.runtime.doctor import gpu_info
from diffrt.runtime.optimized import cpu_name


def gpu_name() -> str | None:
    gpus = gpu_info()
    return f"{gpus[0]['name']}, {gpus[0]['memory']}, driver {gpus[0]['driver']}" if gpus else None


def gpu_memory_used_mb() -> float | None:
    if not shutil.which("nvidia-smi"):
        return None
    proc = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], capture_output=True,
                          text=True)
    try:
        return float(proc.stdout.strip().splitlines()[0])
    except (ValueError, IndexError):
        return None


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("diffrt", "numpy", "onnxruntime", "onnxruntime-gpu", "tokenizers", "torch", "diffusers", "transformers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


ISA_FLAGS = ("amx_tile", "amx_bf16", "amx_int8", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx2")


def cpu_isa() -> list[str]:
    """The vector and matrix extensions of this CPU that matter to inference (from /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in ISA_FLAGS if f in flags]


def describe() -> dict:
    return {"cpu": cpu_name(), "isa": cpu_isa(), "cores": os.cpu_count(), "gpu": gpu_name(), "os": platform.platform(),
            "versions": versions()}
