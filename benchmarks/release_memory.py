"""What handing host memory back at the end of each request costs: onnxruntime's CPU arena kept, and shrunk after a
request's last denoiser and decoder calls (`diffrt serve`'s default, `Pipeline(release_memory=True)`), side by side,
each in a fresh process, on the bundled model (or --model) at a few sizes.

    python -m diffrt.benchmarks.release_memory [--model DIR] [--sizes 64:20,256:4,512:4] [--runs 3] [--json FILE]

Per size (WIDTH:STEPS, square): the median seconds of --runs calls after one warm-up, and the process's RSS before
the first call and after the last.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from .machine import describe


def child(model: str | None, release: bool, side: int, steps: int, runs: int) -> dict:
    """One process: the pipeline with the arena kept or not, timed at one size."""
    from diffrt.runtime.pipeline import Pipeline

    def rss_mb() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20

    pipe = Pipeline.from_package(model, backend="ort-cpu", release_memory=release)
    idle = rss_mb()
    times = []
    for i in range(runs + 1):
        start = time.perf_counter()
        pipe("a red circle on a blue background", seed=i, width=side, height=side, steps=steps)
        times.append(time.perf_counter() - start)
    times = sorted(times[1:])
    return {"median_s": round(times[len(times) // 2], 3), "idle_rss_mb": round(idle), "after_rss_mb": round(rss_mb())}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="package folder (default: the bundled model)")
    ap.add_argument("--sizes", default="64:20,256:4,512:4", help="SIDE:STEPS, comma-separated")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)  # release:side:steps, run in this process
    args = ap.parse_args(argv)
    if args.child:
        release, side, steps = args.child.split(":")
        print(json.dumps(child(args.model, release == "1", int(side), int(steps), args.runs)))
        return
    rows = []
    for size in args.sizes.split(","):
        side, steps = (int(v) for v in size.split(":"))
        row = {"side": side, "steps": steps}
        for release in (False, True):
            command = [sys.executable, "-W", "ignore", "-m", "diffrt.benchmarks.release_memory", "--runs", str(args.runs),
                       "--child", f"{int(release)}:{side}:{steps}", *(["--model", args.model] if args.model else [])]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            row["released" if release else "kept"] = json.loads(out.splitlines()[-1])
        row["cost"] = round(row["released"]["median_s"] / row["kept"]["median_s"] - 1, 3)
        rows.append(row)
        k, r = row["kept"], row["released"]
        print(f"{side}x{side}, {steps} steps: arena kept {k['median_s']} s (RSS after {k['after_rss_mb']} MB), "
              f"handed back {r['median_s']} s (RSS after {r['after_rss_mb']} MB): {row['cost']:+.1%}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": describe(), "model": args.model or "bundled", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
