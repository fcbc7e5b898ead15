"""SD 1.5-architecture UNet (random weights) on this CPU: onnxruntime fp32 vs onnxruntime int8 (QDQ) vs torch fp32.

    python -m diffrt.benchmarks.int8_cpu [--latent 32] [--batch 2] [--runs 5] [--json OUT]

Same inputs for all three, runs interleaved. The int8 graph is made by diffrt's own quantizer (export/precision.py),
calibrated on random inputs: speed does not depend on calibration quality.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from .sd15 import DEFAULT_CACHE, prepare_package
from .timing import interleaved


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    import onnxruntime as ort
    import torch
    from diffusers import UNet2DConditionModel

    from diffrt.export.precision import INT8_KEEP_LAYERS, quantize_int8

    package, ckpt = prepare_package()
    fp32 = package / "unet" / "model.onnx"
    int8 = DEFAULT_CACHE / "unet-int8" / "model.onnx"
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((args.batch, 4, args.latent, args.latent), dtype=np.float32),
             "timestep": np.array(500.0, np.float32),
             "encoder_hidden_states": rng.standard_normal((args.batch, 77, 768), dtype=np.float32)}
    if not int8.is_file():
        int8.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        calib = [{k: (v * (0.5 + i) if k != "timestep" else np.array(100.0 + 300 * i, np.float32)) for k, v in feeds.items()}
                 for i in range(2)]
        quantize_int8(fp32, int8, calib, INT8_KEEP_LAYERS)
        print(f"quantized in {time.perf_counter() - start:.0f} s")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    sessions = {name: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for name, p in
                (("ort_fp32", fp32), ("ort_int8", int8))}
    torch.set_num_threads(args.threads)
    unet = UNet2DConditionModel.from_pretrained(ckpt / "unet").eval()
    t_feeds = {k: torch.from_numpy(v) for k, v in feeds.items()}

    def run_torch():
        with torch.no_grad():
            return unet(t_feeds["sample"], t_feeds["timestep"], t_feeds["encoder_hidden_states"]).sample.numpy()

    fns = {name: (lambda s=s: s.run(None, feeds)[0]) for name, s in sessions.items()}
    fns["torch_fp32"] = run_torch
    outs = {name: fn() for name, fn in fns.items()}  # warm-up
    times = interleaved(fns, args.runs)
    med = {k: float(np.median(v)) for k, v in times.items()}
    ref = outs["torch_fp32"]
    rel = {k: float(np.linalg.norm(v - ref) / np.linalg.norm(ref)) for k, v in outs.items()}
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "latent": args.latent, "batch": args.batch, "threads": args.threads,
              "median_s": med, "runs_s": times, "rel_err_vs_torch": rel,
              "int8_speedup_vs_ort_fp32": med["ort_fp32"] / med["ort_int8"], "ort_fp32_vs_torch": med["torch_fp32"] / med["ort_fp32"]}
    from .machine import describe

    report["machine"] = describe()
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print(f"SD 1.5 UNet, batch {args.batch}, {args.latent}x{args.latent} latents, {args.threads} threads, median of {args.runs}")
    print("| engine | median s | rel. error vs torch |")
    for k in fns:
        print(f"| {k} | {med[k]:.3f} | {rel[k]:.2e} |")
    print(f"int8 vs onnxruntime fp32: {report['int8_speedup_vs_ort_fp32']:.2f}x")


if __name__ == "__main__":
    main()
