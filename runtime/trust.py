"""Which CPU paths (a backend and what it computes in, e.g. ov-cpu int8+bf16) a package may run on this machine.

A reduced-precision path is only as good as the gate it passed, and int8 kernels differ by CPU: OpenVINO runs a
QDQ graph with signed activations on AMX and unsigned ones without it, onnxruntime sums int8 products exactly only
with VNNI or AMX. So a gate measured at quantize time vouches for an int8 path only on a CPU of the same kind;
`diffrt doctor --check` measures every path here and records each verdict for this machine, which then wins.
Float paths (fp32, fp16, bf16 products) accumulate in float32 on every x86 kernel: their gates hold anywhere."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backends.registry import get
from .package import Package

GATES_DB = {"int8": 22.0, "bf16": 30.0, "fp16": 35.0, "fp32": 35.0}  # lowest PSNR against float32; fp32 paths as fp16
TOP_GATE = "ort-cpu"  # the manifest's quality block is this backend's gate; the others' are nested under their names
KIND_FLAGS = (("amx_int8", "amx"), ("avx512_vnni", "avx512-vnni"), ("avx_vnni", "avx-vnni"), ("avx512f", "avx512"),
              ("avx2", "avx2"))


def cpu_kind(isa: list[str] | None = None) -> str:
    """The CPU's class for int8 arithmetic, from its best extension: amx, avx512-vnni, avx-vnni, avx512, avx2 or
    baseline."""
    if isa is None:
        from .optimized import cpu_isa

        isa = cpu_isa()
    return next((kind for flag, kind in KIND_FLAGS if flag in isa), "baseline")


def int8_class(backend: str, kind: str | None) -> str | None:
    """CPU kinds whose int8 arithmetic is the same for a backend: onnxruntime's int8 products are exact integer sums
    with AMX or VNNI alike (without them they pass through saturating 16-bit sums); OpenVINO picks kernels, and the
    activations' signedness, per kind."""
    return "exact" if kind in get(backend).int8_exact_on else kind


def gate_db(computes: str) -> float:
    """The gate of a path: that of its least precise part (int8+bf16 -> int8's 22 dB)."""
    parts = computes.split("+")
    return GATES_DB[next((p for p in ("int8", "bf16", "fp16") if p in parts), "fp32")]


def store_path() -> Path:
    """Where this machine's verdicts are kept: $DIFFRT_CACHE_DIR, else $XDG_CACHE_HOME/diffrt, else ~/.cache/diffrt."""
    root = os.environ.get("DIFFRT_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffrt"
    return Path(root) / "checks.json"


def _key(package: Package, backend: str, computes: str) -> str:
    ident = package.model_hash or str(package.root.resolve())
    return f"{ident}|{backend}|{computes}|{cpu_kind()}"


def _records() -> dict[str, Any]:
    try:
        return json.loads(store_path().read_text())
    except (OSError, ValueError):
        return {}


def record(package: Package, backend: str, computes: str, psnr_db_min: float) -> None:
    """Keep doctor's measurement of a path on this machine (best effort: an unwritable cache keeps nothing)."""
    records = _records()
    records[_key(package, backend, computes)] = {"psnr_db_min": psnr_db_min, "gate_db": gate_db(computes),
                                                 "passed": psnr_db_min >= gate_db(computes),
                                                 "checked": time.strftime("%Y-%m-%d %H:%M:%S")}
    path = store_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(records, indent=1) + "\n")
        tmp.replace(path)
    except OSError:
        pass


@dataclass(frozen=True)
class Verdict:
    trusted: bool
    why: str = ""  # for an untrusted path: what is wrong, in words


def signed_activations(package: Package) -> bool:
    """Whether the int8 UNet quantizes activations as signed int8 (every package before unsigned ones were made)."""
    return package.manifest.get("components", {}).get(package.denoiser, {}).get("activations", "int8") == "int8"


def manifest_gate(package: Package, backend: str) -> dict[str, Any] | None:
    """The quantize-time gate of a backend, with what it computed and the CPU kind it ran on."""
    quality = package.manifest.get("quality") or {}
    gate = quality if backend == TOP_GATE else quality.get(backend)
    if not gate:
        return None
    return {**gate, "computes": gate.get("computes", package.precision(package.denoiser)), "cpu_kind": quality.get("cpu_kind")}


def verdict(package: Package, backend: str, computes: str) -> Verdict:
    """Whether backend may run package computing in `computes` on this machine, and if not why."""
    runner = get(backend)
    if runner.device != "cpu":  # GPU paths are not gated by CPU kind
        return Verdict(True)
    kind = cpu_kind()
    checked = _records().get(_key(package, backend, computes))
    if checked:
        return Verdict(checked["passed"], f"`diffrt doctor --check` measured {checked['psnr_db_min']:.1f} dB here on "
                                          f"{checked['checked']}, under its {checked['gate_db']:.0f} dB gate")
    if "int8" not in computes:
        return Verdict(True)
    if runner.signed_int8_on and kind not in runner.signed_int8_on and signed_activations(package):
        return Verdict(False, f"its int8 UNet quantizes activations as signed int8, which {backend} computes wrongly on CPUs "
                              f"without {' or '.join(k.upper() for k in runner.signed_int8_on)} ({kind} here: speckled images)")
    gate = manifest_gate(package, backend)
    if gate is None or gate["computes"] != computes:
        return Verdict(False, f"its gates were not measured on {backend} computing in {computes}")
    if int8_class(backend, gate["cpu_kind"]) != int8_class(backend, kind):
        return Verdict(False, f"its gates were measured on a CPU of another kind ({gate['cpu_kind'] or 'not recorded'}, "
                              f"this one is {kind}), and int8 kernels differ between them")
    return Verdict(True)


def refusal(package: Package, backend: str, computes: str, why: str) -> str:
    """One line: the path refused, why, and what to do."""
    return (f"{package.root}: {backend} ({computes}) is not trusted on this CPU: {why}; run `diffrt doctor --check "
            f"{package.root}` here to measure it (auto then picks a path that passed), or use another --backend")
