"""What a benchmark ran on: CPU, cores, GPU, library versions, and peak memory readings."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

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
    for name in ("diffrt", "numpy", "onnxruntime", "onnxruntime-gpu", "openvino", "tokenizers", "torch", "diffusers",
                 "transformers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def describe() -> dict:
    return {"cpu": cpu_name(), "isa": cpu_isa(), "cores": os.cpu_count(), "gpu": gpu_name(), "os": platform.platform(),
            "versions": versions()}


def unet_report(rows: list[dict], json_path: Path | None, engine: str) -> dict:
    """An SD 1.5 UNet benchmark's report (date, machine, batch 2, its rows), written to json_path where given; its
    heading line printed."""
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": describe(), "batch": 2, "rows": rows}
    if json_path:
        json_path.write_text(json.dumps(report, indent=1))
    print(f"{report['machine']['cpu']}, {report['machine']['cores']} cores | SD 1.5 UNet, batch 2, {engine}")
    return report
