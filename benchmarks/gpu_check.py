"""One-GPU check, about 6 minutes on an H100/H200: the full-size SD 1.5 architecture (random weights) exported by
diffrt (fused attention), made fp16, and timed on onnxruntime CUDA (plain, and with the UNet replayed from CUDA
graphs) against diffusers on the same GPU, same latents, fp32 (TF32 on both sides) and fp16; each
implementation's GPU memory is read in a fresh process of its own.

    python -m diffrt.benchmarks.gpu_check --out $OUT              # on the GPU box (README, "GPU check")
    python -m diffrt.benchmarks.gpu_check --tiny --out /tmp/gc    # the same steps at toy size, on the CPU
    python -m diffrt.benchmarks.gpu_check --family sdxl --size 1024 --steps 20 --batches 1 --out $OUT   # SDXL

Working files go to --work (default: a temporary folder), only gpu_check.json and a short log to --out.
Prints a short table last.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .machine import describe, gpu_memory_used_mb
from .timing import interleaved

TINY = {"unet": dict(sample_size=8, block_out_channels=[32, 64], layers_per_block=1, cross_attention_dim=32,
                     down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                     attention_head_dim=8),
        "text": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
        "vae": dict(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                    up_block_types=["UpDecoderBlock2D"] * 2, sample_size=16)}
PROMPT = "a photo of a cat"


def prepare(work: Path, tiny: bool, timings: dict, family: str = "sd1") -> tuple[Path, Path, Path]:
    """Checkpoint, fp32 package (fused attention) and its fp16 copy (SDXL's VAE stays fp32), each timed."""
    from diffrt.export import ExportOptions, export_package
    from diffrt.export.precision import fp16_copy
    from diffrt.runtime.package import required

    from . import sd15, sdxl

    t = time.perf_counter()
    make = sdxl.make_checkpoint if family == "sdxl" else sd15.make_checkpoint
    ckpt = make(work / "checkpoint", overrides=(sdxl.TINY if family == "sdxl" else TINY) if tiny else None)
    timings["checkpoint_s"] = time.perf_counter() - t
    t = time.perf_counter()
    options = ExportOptions(components=required(family), check=False, overwrite=True)
    fp32 = export_package(ckpt, work / "fp32", options, log=lambda m: print(m, file=sys.stderr))
    timings["export_s"] = time.perf_counter() - t
    t = time.perf_counter()
    fp16 = fp16_copy(fp32, work / "fp16", log=lambda m: print(m, file=sys.stderr))
    timings["fp16_s"] = time.perf_counter() - t
    return ckpt, fp32, fp16


def load_diffusers(ckpt: Path, dtype_name: str, device: str):
    import torch
    from diffusers import DiffusionPipeline, EulerDiscreteScheduler

    torch.backends.cuda.matmul.allow_tf32 = True  # onnxruntime's CUDA provider uses TF32 for fp32 by default
    torch.backends.cudnn.allow_tf32 = True
    pipe = DiffusionPipeline.from_pretrained(ckpt, torch_dtype=getattr(torch, dtype_name)).to(device)  # SD or SDXL
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def runner(impl, size: int, steps: int, batch: int, latents: np.ndarray) -> Callable[[], np.ndarray]:
    """A call that makes `batch` images with impl (a diffrt Pipeline or a diffusers pipeline) and waits for them."""
    if hasattr(impl, "package"):
        return lambda: impl(PROMPT, steps=steps, guidance_scale=7.5, scheduler="euler", seed=0, width=size, height=size,
                            num_images=batch, latents=latents).array
    import torch

    def run() -> np.ndarray:
        with torch.no_grad():
            out = impl([PROMPT] * batch, num_inference_steps=steps, guidance_scale=7.5, width=size, height=size,
                       latents=torch.from_numpy(latents).to(impl.device, impl.unet.dtype), output_type="np").images
        if impl.device.type == "cuda":
            torch.cuda.synchronize()
        return out

    return run


def timed(fns: dict[str, Callable[[], np.ndarray]], runs: int) -> tuple[dict[str, float], dict[str, np.ndarray], dict]:
    """Median seconds per implementation (rotated run by run so machine noise hits each alike), the warm-up images,
    and the errors of implementations that failed (left out of the timings)."""
    images, errors = {}, {}
    for name, fn in list(fns.items()):
        try:
            images[name] = fn()
        except Exception as exc:  # reported beside the other figures, not fatal to them
            errors[name] = f"{type(exc).__name__}: {exc}"[:400]
            fns.pop(name)
    times = interleaved(fns, runs)
    return {k: float(np.median(v)) for k, v in times.items()}, images, errors


def compare(pipes: dict[str, dict], size: int, steps: int, batches: list[int], runs: int) -> list[dict]:
    """One row per precision and batch: each implementation's median seconds, and images against diffusers'."""
    rows = []
    for precision, impls in pipes.items():
        factor = impls["diffrt"].package.vae_scale_factor
        for batch in batches:
            latents = np.random.default_rng(batch).standard_normal((batch, 4, size // factor, size // factor), dtype=np.float32)
            fns = {name: runner(impl, size, steps, batch, latents) for name, impl in impls.items()}
            med, images, errors = timed(fns, runs)
            row = {"precision": precision, "batch": batch, "seconds": med, "errors": errors}
            if "diffusers" in images:
                row["max_abs_diff"] = {k: float(np.abs(v - images["diffusers"]).max()) for k, v in images.items()
                                       if k != "diffusers"}
                row["speedup"] = {k: med["diffusers"] / v for k, v in med.items() if k != "diffusers"}
            rows.append(row)
    return rows


def memory_probe(argv: list[str]) -> int:
    """In a fresh process: load one implementation, make one batch of images, print the GPU memory it holds."""
    impl, path, size, batch, steps = argv[0], Path(argv[1]), int(argv[2]), int(argv[3]), int(argv[4])
    before = gpu_memory_used_mb()
    if impl == "diffusers":
        import torch

        pipe = load_diffusers(path, "float16", "cuda")
    else:
        from diffrt.runtime.pipeline import Pipeline

        pipe = Pipeline.from_package(path, backend="ort-cuda", cuda_graph=impl.endswith("_graph"))
    latents = np.random.default_rng(0).standard_normal((batch, 4, size // 8, size // 8), dtype=np.float32)
    runner(pipe, size, steps, batch, latents)()
    report = {"impl": impl, "card_used_delta_mb": gpu_memory_used_mb() - before, "process_mb": process_gpu_mb()}
    if impl == "diffusers":
        report["torch_peak_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
    print(json.dumps(report))
    return 0


def process_gpu_mb() -> float | None:
    """This process's GPU memory as nvidia-smi lists it (None where it lists no processes, as in some VMs)."""
    import os

    proc = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        pid, _, used = line.partition(",")
        if pid.strip() == str(os.getpid()):
            return float(used)
    return None


def memory(fp16: Path, ckpt: Path, size: int, batch: int, steps: int, fused: Path | None = None) -> dict[str, dict]:
    """GPU memory of each implementation, each in a fresh process, one after the other."""
    found = {}
    impls = [("diffrt", fp16), ("diffrt_graph", fp16)] + ([("diffrt_fused", fused)] if fused else []) + [("diffusers", ckpt)]
    for impl, path in impls:
        proc = subprocess.run([sys.executable, "-m", "diffrt.benchmarks.gpu_check", "--memory-probe", impl, str(path),
                               str(size), str(batch), str(steps)], capture_output=True, text=True)
        lines = proc.stdout.strip().splitlines()
        found[impl] = json.loads(lines[-1]) if proc.returncode == 0 and lines else {"error": proc.stderr.strip()[-400:]}
    return found


def fused_package(fp32: Path, fp16: Path, work: Path, timings: dict) -> tuple[Path | None, dict]:
    """The fp16 package with onnxruntime's CUDA fusions of the UNet and VAE decoder (GroupNorm, NHWC convolutions, ...),
    timed; a failure is reported instead of ending the check."""
    from diffrt.export.cuda_fusions import cuda_fused_copy

    t = time.perf_counter()
    try:
        counts = cuda_fused_copy(fp32, fp16, work / "fp16-fused")
    except Exception as exc:
        return None, {"error": f"{type(exc).__name__}: {exc}"[:400]}
    timings["fused_s"] = time.perf_counter() - t
    return work / "fp16-fused", counts


def load_pipelines(fp32: Path, fp16: Path, ckpt: Path, gpu: bool, precisions: list[str],
                   fused: Path | None = None) -> tuple[dict[str, dict], dict]:
    """diffrt and diffusers per precision (fp16 on the GPU only); on the GPU also diffrt with CUDA graphs and with the
    CUDA-fused UNet and VAE decoder (failures are reported)."""
    from diffrt.runtime.pipeline import Pipeline

    backend, device = ("ort-cuda", "cuda") if gpu else ("ort-cpu", "cpu")
    pipes, errors = {}, {}
    if "fp32" in precisions:
        pipes["fp32"] = {"diffrt": Pipeline.from_package(fp32, backend=backend),
                         "diffusers": load_diffusers(ckpt, "float32", device)}
    if gpu and "fp16" in precisions:
        pipes["fp16"] = {"diffrt": Pipeline.from_package(fp16, backend=backend),
                         "diffusers": load_diffusers(ckpt, "float16", device)}
        variants = {"diffrt_graph": (fp16, True)}
        if fused:
            variants.update(diffrt_fused=(fused, False), diffrt_fused_graph=(fused, True))
        for name, (package, graph) in variants.items():
            try:
                pipes["fp16"][name] = Pipeline.from_package(package, backend=backend, cuda_graph=graph)
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {exc}"[:400]
    return pipes, errors


def print_table(report: dict) -> None:
    print(f"\n{report['machine']['gpu'] or report['machine']['cpu']} | {report['backend']} vs diffusers on the same device | "
          f"{report['size']}x{report['size']}, {report['steps']} Euler steps, guidance 7.5")
    print("| precision | batch | implementation | seconds | vs diffusers | max abs diff to diffusers |")
    print("|---|---|---|---|---|---|")
    for row in report["rows"]:
        for name, sec in row["seconds"].items():
            speed = row.get("speedup", {}).get(name)
            diff = row.get("max_abs_diff", {}).get(name)
            print(f"| {row['precision']} | {row['batch']} | {name} | {sec:.3f} | {f'{speed:.2f}x' if speed else '-'} | "
                  f"{f'{diff:.4f}' if diff is not None else '-'} |")
        for name, err in row["errors"].items():
            print(f"| {row['precision']} | {row['batch']} | {name} | failed: {err.splitlines()[0][:120]} | | |")
    for name, mem in report.get("gpu_memory_mb", {}).items():
        print(f"GPU memory, {name}: {json.dumps(mem)}")
    print(f"UNet fp16 graph, float shape arithmetic on the CPU: {report['cuda_graph_blockers'] or 'none'}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--memory-probe"]:
        return memory_probe(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, help="checkpoint and packages (default: a temporary folder)")
    ap.add_argument("--tiny", action="store_true", help="toy-size model on the CPU, to test this script")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--precisions", default="fp32,fp16", help="rows to time (fp16 on a GPU only)")
    ap.add_argument("--no-fused", action="store_true", help="skip the fp16 package with onnxruntime's CUDA fusions")
    ap.add_argument("--family", choices=("sd1", "sdxl"), default="sd1", help="SD 1.5's architecture or SDXL base's")
    args = ap.parse_args(argv)
    import torch

    from diffrt.export.cuda_ready import check_cuda_graph_ready
    from diffrt.runtime.backends.onnxruntime import cuda_available

    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="diffrt-gpu-check-"))
    t0, timings = time.perf_counter(), {}
    ckpt, fp32, fp16 = prepare(work, args.tiny, timings, args.family)
    gpu = torch.cuda.is_available() and cuda_available() and not args.tiny
    size = json.loads((fp32 / "diffrt.json").read_text())["defaults"]["width"] if args.tiny else args.size
    batches = [int(b) for b in args.batches.split(",")]
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": describe(), "family": args.family,
              "backend": "ort-cuda" if gpu else "ort-cpu",
              "size": size, "steps": args.steps, "scheduler": "euler", "guidance": 7.5, "tf32": "on for fp32, both sides",
              "cuda_graph_blockers": check_cuda_graph_ready(fp16 / "unet" / "model.onnx"), "timings": timings}
    fused = None
    if gpu and not args.no_fused and "fp16" in args.precisions:
        fused, report["fused_ops"] = fused_package(fp32, fp16, work, timings)
    if gpu:  # fresh processes, before this one holds any
        report["gpu_memory_mb"] = memory(fp16, ckpt, size, max(batches), 2, fused)
    pipes, report["load_errors"] = load_pipelines(fp32, fp16, ckpt, gpu, args.precisions.split(","), fused)
    report["rows"] = compare(pipes, size, args.steps, batches, args.runs)
    report["total_s"] = time.perf_counter() - t0
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
