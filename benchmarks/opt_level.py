"""onnxruntime's graph optimization levels per component on the CPU: session creation and run time, side by side.

    python -m diffrt.benchmarks.opt_level PACKAGE [--size 512] [--runs 8] [--threads 2] [--json F]

For each component, a session at level EXTENDED (fusions) and one at ALL (fusions plus the CPU's NCHWc
convolution layouts, what diffrt uses), both held at once and run in turn on the same random inputs of an image of
--size (default the package's; batch 2 for the text encoder and UNet, as with guidance, 1 for the VAE decoder),
the order swapped every run so that machine noise hits both. Holding both needs twice the component's memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from diffrt.runtime.package import required

from .timing import interleaved

LEVELS = ("ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")


def random_feeds(session, latent: int, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for any component's session: named batch dims get `batch`, sequence 77, the rest `latent`."""
    from diffrt.runtime.backends.onnxruntime import ORT_DTYPES

    rng = np.random.default_rng(seed)
    feeds = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else batch if "batch" in str(d) else 77 if "sequence" in str(d) else latent
                 for d in i.shape]
        dtype = ORT_DTYPES.get(i.type, np.float32)
        if np.issubdtype(dtype, np.integer):
            feeds[i.name] = rng.integers(0, 100, shape).astype(dtype)
        elif i.name == "timestep":
            feeds[i.name] = np.full(shape, 500, dtype)
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def compare(model: Path, latent: int, batch: int, runs: int, threads: int | None) -> dict[str, dict]:
    """Per level: session creation seconds, and the run seconds of interleaved runs after one warm-up each."""
    import onnxruntime as ort

    from diffrt.runtime.backends.onnxruntime import session_options

    sessions, out = {}, {}
    for level in LEVELS:
        start = time.perf_counter()
        sessions[level] = ort.InferenceSession(str(model), session_options(threads, getattr(ort.GraphOptimizationLevel, level)),
                                               providers=["CPUExecutionProvider"])
        out[level] = {"load_s": time.perf_counter() - start, "runs_s": []}
    feeds = random_feeds(sessions[LEVELS[0]], latent, batch)
    for session in sessions.values():
        session.run(None, feeds)
    times = interleaved({level: (lambda s=s: s.run(None, feeds)) for level, s in sessions.items()}, runs)
    for level, r in out.items():
        r["runs_s"] = times[level]
        r["run_s"] = float(np.median(r["runs_s"]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package", type=Path)
    ap.add_argument("--size", type=int, help="image side in pixels (default: the package's)")
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    from diffrt.runtime.errors import UserError
    from diffrt.runtime.package import load_package

    try:
        pkg = load_package(args.package)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size = args.size or pkg.defaults["width"]
    rows = []
    for comp in required(pkg.family):
        batch = 1 if comp == "vae_decoder" else 2
        for level, r in compare(pkg.component(comp), size // pkg.vae_scale_factor, batch, args.runs, args.threads).items():
            rows.append({"component": comp, "level": level, **r})
            print(f"{comp} {level}: load {r['load_s']:.2f} s, run {r['run_s']:.3f} s", file=sys.stderr)
    print(f"{args.package}, {size}x{size}, median of {args.runs} interleaved runs")
    print("| component | level | session creation (s) | run (s) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['component']} | {r['level']} | {r['load_s']:.2f} | {r['run_s']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"package": str(args.package), "size": size, "runs": args.runs,
                                         "threads": args.threads, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
