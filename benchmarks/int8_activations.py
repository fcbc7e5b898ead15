"""int8 activations, signed (symmetric) against unsigned (zero points): the bundled model's quantize gates on every CPU
backend here, side by side in one run.

    python -m diffrt.benchmarks.int8_activations [--out FILE.md]

Both forms are made by `diffrt quantize --precision int8` (same calibration trajectories, same gate prompts and seeds);
the table gives each path's lowest and mean PSNR against the float32 package, and the report names the CPU, its ISA and
its int8 kind (runtime/trust.py), which decide the OpenVINO figures.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from diffrt.runtime.optimized import cpu_isa, cpu_name
from diffrt.runtime.trust import cpu_kind

from .machine import versions


def measure(log) -> list[dict]:
    """One row per (activations, backend): what the path computed in and its PSNRs."""
    from diffrt.export.precision import QuantizeOptions, quantize_package
    from diffrt.runtime.bundled import bundled_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for activations in ("int8", "uint8"):
            log(f"quantizing the bundled model with {activations} activations")
            gates = quantize_package(bundled_model(), Path(tmp) / activations, QuantizeOptions(
                precision="int8", activations=activations, accept_quality=True), log=log)
            for backend, gate in (("ort-cpu", gates), ("ov-cpu", gates.get("ov-cpu"))):
                if gate:
                    rows.append({"activations": activations, "backend": backend, "computes": gate["computes"],
                                 "psnr_db_min": gate["psnr_db_min"], "psnr_db_mean": gate["psnr_db_mean"],
                                 "gate_db": gate["psnr_gate_db"], "images": gate["images"]})
    return rows


def report(rows: list[dict]) -> str:
    lib = versions()
    lines = [f"# int8 activations on {cpu_name()} ({time.strftime('%Y-%m-%d')})", "",
             f"CPU: {cpu_name()}; ISA: {', '.join(cpu_isa()) or 'no AVX2/AVX-512/AMX'}; int8 kind: {cpu_kind()}. "
             f"onnxruntime {lib.get('onnxruntime')}, OpenVINO {lib.get('openvino')}.", "",
             "The bundled model quantized by `diffrt quantize --precision int8`, each activation form; PSNR of the gate "
             "images against the float32 package (`python -m diffrt.benchmarks.int8_activations`).", "",
             "| activations | backend | computes | PSNR min | PSNR mean | gate | passes |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['activations']} | {r['backend']} | {r['computes']} | {r['psnr_db_min']:.1f} dB | {r['psnr_db_mean']:.1f} dB "
              f"| {r['gate_db']:.0f} dB | {'yes' if r['psnr_db_min'] >= r['gate_db'] else 'no'} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write the report here too (Markdown)")
    args = ap.parse_args(argv)
    text = report(measure(lambda m: print(m, flush=True)))
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
