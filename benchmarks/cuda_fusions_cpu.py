"""What making the CUDA-fused graphs of a full-size package costs on the CPU, and how close they stay to the plain ones.

    python -m diffrt.benchmarks.cuda_fusions_cpu .cache/sd15/package --out benchmarks/results/NAME.json [--sides 8,64]

For the UNet and the VAE decoder of an fp32 package: the time and peak RSS of onnxruntime's fusions plus float16
conversion, then the fused float16 graph (onnx's reference evaluator, CUDA-only ops written out) against the plain
float32 graph (onnxruntime, CPU) on random inputs at each latent side: max error as a share of the output's range,
and the seconds the reference run took. Each graph is fused in a fresh process so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .machine import describe


def feeds(component: str, side: int, hidden: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    if component == "vae_decoder":
        return {"latent_sample": rng.standard_normal((1, 4, side, side), dtype=np.float32)}
    return {"sample": rng.standard_normal((2, 4, side, side), dtype=np.float32), "timestep": np.full(2, 500.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, hidden), dtype=np.float32)}


def measure(package: Path, component: str, sides: list[int], work: Path) -> dict:
    """In this process: fuse one component, then compare it with the plain graph at each side."""
    from diffrt.export.cuda_fusions import fuse_for_cuda, parity

    entry = json.loads((package / "diffrt.json").read_text())["components"][component]
    plain, fused = package / entry["file"], work / component / "model.onnx"
    t = time.perf_counter()
    counts = fuse_for_cuda(plain, fused, component)
    row = {"component": component, "fuse_s": time.perf_counter() - t, "fused_ops": counts,
           "fuse_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "parity": []}
    hidden = (entry.get("inputs", {}).get("encoder_hidden_states", {}).get("dims") or [0, 0, 768])[-1]
    for side in sides:
        t = time.perf_counter()
        error = parity(plain, fused, feeds(component, side, hidden, np.random.default_rng(side)))
        row["parity"].append({"latent_side": side, "max_error_of_range": error, "seconds": time.perf_counter() - t})
    row["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package", type=Path, help="an fp32 package exported with fused attention")
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--sides", default="8,64", help="latent sides to compare at (default %(default)s)")
    ap.add_argument("--component", help=argparse.SUPPRESS)  # one component, in a child process
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sides = [int(s) for s in args.sides.split(",")]
    if args.component:
        args.out.write_text(json.dumps(measure(args.package, args.component, sides, args.work)))
        return 0
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": describe(), "package": str(args.package), "rows": []}
    with tempfile.TemporaryDirectory(prefix="diffrt-fusions-") as tmp:
        for component in ("unet", "vae_decoder"):
            part = Path(tmp) / f"{component}.json"
            subprocess.run([sys.executable, "-m", "diffrt.benchmarks.cuda_fusions_cpu", str(args.package), "--out", str(part),
                            "--sides", args.sides, "--component", component, "--work", tmp], check=True)
            report["rows"].append(json.loads(part.read_text()))
    args.out.write_text(json.dumps(report, indent=1))
    print("| component | fuse s | fuse peak RSS GB | latent side | max error of range | reference run s |")
    print("|---|---|---|---|---|---|")
    for row in report["rows"]:
        for p in row["parity"]:
            print(f"| {row['component']} | {row['fuse_s']:.0f} | {row['fuse_peak_rss_gb']:.1f} | {p['latent_side']} | "
                  f"{p['max_error_of_range']:.2e} | {p['seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
