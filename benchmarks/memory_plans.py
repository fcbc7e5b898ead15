"""Peak memory and time of one text-to-image request under each memory plan, each in its own process, with the peak
of each stage (prompt encoding, denoising, decoding) read apart (Linux resets a process's peak RSS through
/proc/self/clear_refs), beside the budget planner's prediction.

    python -m diffrt.benchmarks.memory_plans PACKAGE [--size 512x512] [--steps 20] [--backend ov-cpu]
        [--plans resident,sequential,sequential+tiled] [--repeat 2] [--json F]

A plan runs `--repeat` requests in one process (the first opens and compiles; later ones show what reopening costs
with the graph cache warm). Peaks are whole-process VmHWM in GB; times in seconds.
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


def run_plan(package: str, plan: str, size: tuple[int, int], steps: int, backend: str, repeat: int, cache: str) -> dict:
    """Every request's stage peaks and times under one plan, in this process."""
    from diffrt.runtime.budget import PLANS
    from diffrt.runtime.pipeline import Pipeline

    chosen = PLANS[plan]
    start = time.perf_counter()
    pipe = Pipeline.from_package(package, backend=backend, residency=chosen.residency, graph_cache=cache)
    record = {"plan": plan, "load_seconds": time.perf_counter() - start, "load_peak_gb": peak_gb(), "requests": []}
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package")
    ap.add_argument("--size", default="512x512")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--backend", default="ov-cpu")
    ap.add_argument("--plans", default="resident,sequential,sequential+tiled")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--cache", default="/tmp/diffrt-memory-plans-cache", help="graph cache folder (emptied first)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    size = tuple(int(v) for v in args.size.split("x"))
    if args.child:
        print(json.dumps(run_plan(args.package, args.child, size, args.steps, args.backend, args.repeat, args.cache)))
        return
    import shutil

    from diffrt.runtime.budget import predicted_peaks

    results = []
    for plan in args.plans.split(","):
        shutil.rmtree(args.cache, ignore_errors=True)
        cmd = [sys.executable, "-m", "diffrt.benchmarks.memory_plans", args.package, "--size", args.size, "--steps",
               str(args.steps), "--backend", args.backend, "--repeat", str(args.repeat), "--cache", args.cache, "--child", plan]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.exit(done.stderr[-2000:])
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    predicted = predicted_peaks(args.package, args.backend, size)
    print("predicted (GB):", {k: round(v / 2**30, 2) for k, v in predicted.items()})
    if args.json:
        from .machine import describe

        args.json.write_text(json.dumps({"machine": describe(), "package": args.package, "size": args.size, "steps": args.steps,
                                         "backend": args.backend, "results": results,
                                         "predicted_gb": {k: v / 2**30 for k, v in predicted.items()}}, indent=1) + "\n")


if __name__ == "__main__":
    main()
