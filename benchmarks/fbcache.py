"""What a First-Block Cache step costs beside a full one, on a DiT package with the graphs (`diffrt fbcache add`).

    python -m diffrt.benchmarks.fbcache PACKAGE [--backend ov-cpu] [--size 512x512] [--steps 4] [--threshold 1] [--json F]

One pipeline opened with the graphs: a warm-up image, then an image whose every step runs head, tail and out
(threshold 1e-9: a full step) and one at --threshold, each step's transformer seconds recorded. With random weights
how many steps a threshold skips says nothing of a real model (its residuals barely settle); what carries over is the
cost of a skipped step (head and out) against a full one, from which the speed-up follows for any share skipped.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def measure(package: Path, backend: str, width: int, height: int, steps: int, threshold: float) -> dict:
    from diffrt.runtime.pipeline import Pipeline

    from .machine import describe

    pipe = Pipeline.from_package(package, backend=backend, cache="fbcache:1e-9")
    settings = {"steps": steps, "seed": 0, "width": width, "height": height}
    pipe("a photo of a red house", **settings)  # compiles head, tail and out at this size
    runs = {}
    for label, cache in (("full", "fbcache:1e-9"), ("cached", f"fbcache:{threshold:g}")):
        start = time.perf_counter()
        result = pipe("a photo of a red house", cache=cache, **settings)
        runs[label] = {"seconds": time.perf_counter() - start, "step_seconds": list(result.timings["unet"]),
                       "full_steps": result.settings["full_transformer_steps"]}
    full = sorted(runs["full"]["step_seconds"])[len(runs["full"]["step_seconds"]) // 2]
    cached = runs["cached"]
    skipped = sorted(cached["step_seconds"])[:steps - cached["full_steps"]]
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": describe(), "package": str(package), "backend": backend,
              "precision": pipe.computes, "size": f"{width}x{height}", "threshold": threshold, "runs": runs,
              "full_step_seconds": full}
    if skipped:
        report["skipped_step_seconds"] = sum(skipped) / len(skipped)
        report["skipped_over_full"] = report["skipped_step_seconds"] / full
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package", type=Path)
    ap.add_argument("--backend", default="ov-cpu")
    ap.add_argument("--size", default="512x512")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threshold", type=float, default=1.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    report = measure(args.package, args.backend, width, height, args.steps, args.threshold)
    print(f"full step {report['full_step_seconds']:.2f} s; at threshold {args.threshold:g}: "
          f"{report['runs']['cached']['full_steps']} of {args.steps} steps full"
          + (f", a skipped step {report['skipped_step_seconds']:.2f} s ({report['skipped_over_full']:.3f} of a full one)"
             if "skipped_step_seconds" in report else ""), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
