"""One-GPU check, at most 8 minutes on an H100/H200: full-size SD 1.5 architecture (random weights) exported with
diffrt, converted to fp16, timed on onnxruntime CUDA (I/O binding, and again with the UNet replayed from CUDA graphs)
against diffusers fp16, same latents.

    python -m diffrt.benchmarks.gpu_check --out $OUT              # on the GPU box (see README, "GPU check")
    python -m diffrt.benchmarks.gpu_check --tiny --out /tmp/gc    # the same steps at toy size, on the CPU

Prints a short table last; details go to OUT/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

TINY = {"unet": dict(sample_size=8, block_out_channels=[32, 64], layers_per_block=1, cross_attention_dim=32,
                     down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                     attention_head_dim=8),
        "text": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
        "vae": dict(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                    up_block_types=["UpDecoderBlock2D"] * 2, sample_size=16)}


def make_model(path: Path, tiny: bool) -> Path:
    from .sd15 import make_checkpoint

    return make_checkpoint(path, overrides=TINY if tiny else None)


def to_fp16(package: Path, out: Path) -> Path:
    """The fp16 package without quality gates (random weights make them meaningless; speed is what is measured)."""
    from diffrt.export.precision import FP16_KEEP_OPS, convert_fp16
    from diffrt.export.writer import file_hashes
    from diffrt.runtime.package import MANIFEST

    shutil.copytree(package, out, dirs_exist_ok=True)
    manifest = json.loads((out / MANIFEST).read_text())
    for entry in manifest["components"].values():
        graph = out / entry["file"]
        convert_fp16(package / entry["file"], graph, FP16_KEEP_OPS)
        entry["precision"] = "fp16"
    manifest["files"] = file_hashes(out)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true", help="toy-size model on the CPU, to test this script")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from diffrt.export import ExportOptions, export_package
    from diffrt.runtime.engines import cuda_available
    from diffrt.runtime.pipeline import Pipeline

    from .machine import describe, gpu_memory_used_mb

    work = args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    ckpt = make_model(work / "checkpoint", args.tiny)
    timings["build_checkpoint_s"] = time.perf_counter() - t0
    t = time.perf_counter()
    pkg = export_package(ckpt, work / "fp32", ExportOptions(components=("text_encoder", "unet", "vae_decoder"), check=False,
                                                            overwrite=True), log=lambda m: print(m, file=sys.stderr))
    timings["export_s"] = time.perf_counter() - t
    t = time.perf_counter()
    pkg16 = to_fp16(pkg, work / "fp16")
    timings["fp16_s"] = time.perf_counter() - t
    gpu = torch.cuda.is_available() and not args.tiny
    backend = "ort-cuda" if gpu and cuda_available() else "ort-cpu"
    ours = Pipeline.from_package(pkg16 if gpu else pkg, backend=backend)
    graphed, graph_error = None, None
    if backend == "ort-cuda":
        try:  # not run anywhere before: a failure here is reported, not fatal to the rest of the check
            graphed = Pipeline.from_package(pkg16, backend=backend, cuda_graph=True)
        except Exception as exc:
            graph_error = f"{type(exc).__name__}: {exc}"[:500]
    dtype, device = (torch.float16, "cuda") if gpu else (torch.float32, "cpu")
    ref = StableDiffusionPipeline.from_pretrained(ckpt, torch_dtype=dtype).to(device)
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    size = ours.package.defaults["width"] if args.tiny else args.size
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        f = ours.package.vae_scale_factor
        latents = np.random.default_rng(batch).standard_normal((batch, 4, size // f, size // f), dtype=np.float32)

        def run_diffrt(pipe, batch=batch, latents=latents):
            return pipe("a photo", steps=args.steps, guidance_scale=7.5, scheduler="euler", seed=0, width=size, height=size,
                        num_images=batch, latents=latents).array

        def run_ref(batch=batch, latents=latents):
            with torch.no_grad():
                out = ref(["a photo"] * batch, num_inference_steps=args.steps, guidance_scale=7.5, width=size, height=size,
                          latents=torch.from_numpy(latents).to(device, dtype), output_type="np").images
            if gpu:
                torch.cuda.synchronize()
            return out

        impls = {"diffrt": lambda: run_diffrt(ours), "diffusers": run_ref}
        images = {name: fn() for name, fn in impls.items()}  # warm-up, and the images compared
        if graphed:
            try:
                images["diffrt_graph"] = run_diffrt(graphed)  # captures the UNet's graph for this shape
                impls["diffrt_graph"] = lambda g=graphed: run_diffrt(g)
            except Exception as exc:
                graph_error, graphed = f"{type(exc).__name__}: {exc}"[:500], None
        runs: dict[str, list[float]] = {name: [] for name in impls}
        order = list(impls)
        for i in range(args.runs):
            for name in order[i % len(order):] + order[:i % len(order)]:  # rotate, so machine noise hits each alike
                start = time.perf_counter()
                impls[name]()
                runs[name].append(time.perf_counter() - start)
        med = {k: float(np.median(v)) for k, v in runs.items()}
        row = {"batch": batch, "diffrt_s": med["diffrt"], "diffusers_s": med["diffusers"],
               "speedup": med["diffusers"] / med["diffrt"],
               "max_abs_diff": float(np.abs(images["diffrt"] - images["diffusers"]).max()), "runs": runs}
        if graphed:
            row.update(graph_s=med["diffrt_graph"], graph_speedup=med["diffusers"] / med["diffrt_graph"],
                       graph_max_abs_diff=float(np.abs(images["diffrt_graph"] - images["diffrt"]).max()))
        rows.append(row)
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": describe(), "backend": backend, "tiny": args.tiny,
              "size": size, "steps": args.steps, "scheduler": "euler", "guidance": 7.5, "timings": timings,
              "gpu_memory_used_mb": gpu_memory_used_mb(),  # the card's, both pipelines loaded
              "diffusers_peak_reserved_mb": torch.cuda.max_memory_reserved() / 2**20 if gpu else None,
              "cuda_graph_error": graph_error, "rows": rows,
              "total_s": time.perf_counter() - t0}
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    print(f"\n{report['machine']['gpu'] or report['machine']['cpu']} | {backend} vs diffusers {'fp16' if gpu else 'fp32'} | "
          f"{size}x{size}, {args.steps} steps")
    print("| batch | diffrt s | diffusers s | speedup | max |diff| | diffrt + CUDA graph s | speedup |")
    for r in rows:
        graph = f"{r['graph_s']:.3f} | {r['graph_speedup']:.2f}x" if "graph_s" in r else "- | -"
        print(f"| {r['batch']} | {r['diffrt_s']:.3f} | {r['diffusers_s']:.3f} | {r['speedup']:.2f}x | {r['max_abs_diff']:.3f} "
              f"| {graph} |")
    if graph_error:
        print(f"CUDA graphs failed: {graph_error.splitlines()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
