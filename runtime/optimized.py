"""onnxruntime's optimized graphs kept on disk, so that later sessions skip graph optimization.

Optimizing SD 1.5's UNet takes onnxruntime most of its session creation (benchmarks/results/); the optimized
graph it can save is specific to the onnxruntime version, the provider and the CPU (NCHWc layouts), so the cache
key holds all three beside the source files' path, sizes and modification times.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import UserError

GRAPH = "model.onnx"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


ISA_FLAGS = ("amx_tile", "amx_bf16", "amx_int8", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx2")


def cpu_isa() -> list[str]:
    """The vector and matrix extensions of this CPU that matter to inference (from /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in ISA_FLAGS if f in flags]


def cache_key(model: Path, backend: str) -> str:
    """Names the optimized copy of `model` (and its external-data files) for this onnxruntime, provider and CPU."""
    import onnxruntime as ort

    files = sorted(p for p in model.parent.iterdir() if p.name.startswith(model.name))
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    text = json.dumps([str(model.resolve()), stats, ort.__version__, backend, cpu_name(), platform.machine()])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def writable(cache: Path, folder: Path | None = None) -> Path:
    """folder (default: cache itself) created if need be, or a one-line refusal naming the cache."""
    try:
        (folder or cache).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"graph cache {cache} cannot be written ({exc.strerror}); choose another --graph-cache "
                        "folder or leave the option out") from None
    return folder or cache


def save_optimized(opts: Any, cache: Path) -> Path:
    """Ask onnxruntime to write the graph it optimizes into a fresh folder of the cache; `publish` it after."""
    writable(cache)
    try:
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cache))
    except OSError as exc:
        raise UserError(f"graph cache {cache} cannot be written ({exc.strerror}); choose another --graph-cache "
                        "folder or leave the option out") from None
    opts.optimized_model_filepath = str(staging / GRAPH)
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", GRAPH + ".data")
    opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return staging


def publish(staging: Path, entry: Path) -> None:
    """Move a finished staging folder to its key; a copy published first by another process wins."""
    try:
        os.rename(staging, entry)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)


def forget(folder: Path) -> None:
    """Drop a cache entry (or staging folder) onnxruntime could not load or finish."""
    shutil.rmtree(folder, ignore_errors=True)
