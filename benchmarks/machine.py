"""What a benchmark ran on: CPU, cores, GPU, library versions, and peak memory readings."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib.metadata import PackageNotFoundError, version

from diffrt.runtime.doctor import gpu_info
from diffrt.runtime.optimized import cpu_isa, cpu_name


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


def describe() -> dict:
    return {"cpu": cpu_name(), "isa": cpu_isa(), "cores": os.cpu_count(), "gpu": gpu_name(), "os": platform.platform(),
            "versions": versions()}
