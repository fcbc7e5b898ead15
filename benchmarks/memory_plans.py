"""Peak memory and time of one text-to-image request under each memory plan, each in its own process, with the peak
of each stage (prompt encoding, denoising, decoding) read apart (Linux resets a process's peak RSS through
/proc/self/clear_refs), beside the budget planner's prediction.

    python -m diffrt.benchmarks.memory_plans PACKAGE[:PLAN/PLAN][,PACKAGE...] [--size 512x512] [--steps 20] [--backend ov-cpu]
        [--plans resident,sequential] [--repeat 2] [--diffusers CHECKPOINT] [--rounds 1] [--json F]

Every package under every plan, then diffusers (fp32 and bf16, the VAE tiled, no offloading) on the checkpoint the
packages came from, each in its own process, round after round. A process runs `--repeat` requests (the first opens
and compiles; later ones show what reopening costs per request). Peaks are whole-process VmHWM in GB; times in
seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def peak_gb(reset: bool = True) -> float:
    """This process's peak RSS since the last reset, in GB; reset starts a new peak from the current RSS."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    peak = int(status["VmHWM"].split()[0]) / 2**20
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    return peak


def stage_peak(pipe) -> float:
    """The peak since the last reset; under sequential residency the stage's engines are closed first (the next stage
    would close them anyway) so that the next stage's peak starts from what it holds itself."""
    if pipe.shelf is not None:
        from diffrt.runtime.residency import trim_heap

        for engine in list(pipe.shelf.open):
            engine.release()
        trim_heap()
    return peak_gb()


def run_plan(package: str, plan: str, size: tuple[int, int], steps: int, backend: str, repeat: int, cache: str | None) -> dict:
    """Every request's stage peaks and times under one plan, in this process."""
    from diffrt.runtime.budget import PLANS
    from diffrt.runtime.pipeline import Pipeline

    chosen = PLANS[plan]
    start = time.perf_counter()
    pipe = Pipeline.from_package(package, backend=backend, residency=chosen.residency, graph_cache=cache)
    record = {"package": package, "plan": plan, "load_seconds": time.perf_counter() - start, "load_peak_gb": peak_gb(), "requests": []}
    for i in range(repeat):
        begun = time.perf_counter()
        stream = pipe.begin("a photograph of a lighthouse on a cliff", width=size[0], height=size[1], steps=steps,
                            seed=i, vae_tiling="on" if chosen.tiled else "auto")
        encode_peak = stage_peak(pipe)
        while not stream.done:
            pipe.step([stream])
        denoise_peak = stage_peak(pipe)
        result = pipe.finish(stream)
        record["requests"].append({"seconds": time.perf_counter() - begun, "encode_peak_gb": encode_peak,
                                   "denoise_peak_gb": denoise_peak, "decode_peak_gb": stage_peak(pipe),
                                   "unet_seconds": sum(result.timings["unet"]), "load": result.timings.get("load"),
                                   "vae_decode": result.timings["vae_decode"]})
    return record


def run_diffusers(checkpoint: str, dtype: str, size: tuple[int, int], steps: int, repeat: int) -> dict:
    """diffusers' pipeline for the checkpoint (SD or SDXL) on the CPU in dtype with enable_vae_tiling(), timed and its peak read."""
    import torch
    from diffusers import DiffusionPipeline

    start = time.perf_counter()
    pipe = DiffusionPipeline.from_pretrained(checkpoint, torch_dtype=getattr(torch, {"fp32": "float32"}.get(dtype, "bfloat16")),
                                                   safety_checker=None)
    pipe.enable_vae_tiling()
    record = {"package": f"diffusers {dtype}", "plan": "vae tiling", "load_seconds": time.perf_counter() - start,
              "load_peak_gb": peak_gb(), "requests": []}
    for i in range(repeat):
        begun = time.perf_counter()
        pipe("a photograph of a lighthouse on a cliff", width=size[0], height=size[1], num_inference_steps=steps,
             generator=torch.Generator().manual_seed(i))
        record["requests"].append({"seconds": time.perf_counter() - begun, "peak_gb": peak_gb()})
    return record


def table(results: list[dict]) -> list[str]:
    """A markdown table: per run, each request's seconds (and what reopening engines took), the whole process's peak
    (load included) and the prediction."""
    lines = ["| package | plan | request 1 s | request 2 s (of which opening) | peak GB (whole process) | predicted GB |",
             "|---|---|---|---|---|---|"]
    for r in results:
        reqs = r["requests"]
        peaks = [r["load_peak_gb"], *(v for q in reqs for k, v in q.items() if k.endswith("peak_gb"))]
        later = (f"{reqs[1]['seconds']:.1f}" + (f" ({reqs[1]['load']:.1f})" if reqs[1].get("load") else "")) if len(reqs) > 1 else "-"
        predicted = f"{r['predicted_gb']:.2f}" if "predicted_gb" in r else "-"
        lines.append(f"| {Path(r['package']).name} | {r['plan']} | {reqs[0]['seconds']:.1f} | {later} | {max(peaks):.2f} | {predicted} |")
    return lines


def child(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-m", "diffrt.benchmarks.memory_plans", *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("packages", help="package folders, comma-separated (PACKAGE:PLAN/PLAN: only those plans for it)")
    ap.add_argument("--size", default="512x512")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--backend", default="ov-cpu")
    ap.add_argument("--plans", default="resident,sequential")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--diffusers", metavar="CHECKPOINT", help="also diffusers on this checkpoint")
    ap.add_argument("--diffusers-dtypes", default="fp32,bf16", help="diffusers' dtypes (default %(default)s)")
    ap.add_argument("--cache", help="a graph cache folder (default none)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    size = tuple(int(v) for v in args.size.split("x"))
    if args.child:
        run = (run_diffusers(args.packages, args.child.split(":")[1], size, args.steps, args.repeat)
               if args.child.startswith("diffusers:") else
               run_plan(args.packages, args.child, size, args.steps, args.backend, args.repeat, args.cache))
        print(json.dumps(run))
        return
    from diffrt.runtime.budget import predicted_peaks

    common = ["--size", args.size, "--steps", str(args.steps), "--backend", args.backend, "--repeat", str(args.repeat),
              *(["--cache", args.cache] if args.cache else [])]
    results = []
    for _ in range(args.rounds):
        for entry in args.packages.split(","):
            package, _, own = entry.partition(":")  # PACKAGE:plan/plan runs those plans only
            predicted = predicted_peaks(package, args.backend, size)
            for plan in own.split("/") if own else args.plans.split(","):
                results.append({**child([package, *common, "--child", plan]), "predicted_gb": predicted[plan] / 2**30})
                print(json.dumps(results[-1]), flush=True)
        for dtype in args.diffusers_dtypes.split(",") if args.diffusers else ():
            results.append(child([args.diffusers, *common, "--child", f"diffusers:{dtype}"]))
            print(json.dumps(results[-1]), flush=True)
    print("\n".join(table(results)))
    if args.json:
        from .machine import describe

        args.json.write_text(json.dumps({"machine": describe(), "size": args.size, "steps": args.steps,
                                         "backend": args.backend, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
