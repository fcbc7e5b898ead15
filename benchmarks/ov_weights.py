"""One graph on OpenVINO's CPU plugin with its weights as the package stores them, or compressed to int8 by NNCF
(weight-only, data-free): memory after compiling, seconds per call, and how far the output moves.

    pip install ".[nncf]"
    python -m diffrt.benchmarks.ov_weights GRAPH --input NAME=D0xD1x.. [--input ...] [--modes none,INT8_ASYM] [--json F]

Each mode runs in its own process (so each reads its own peak): read the ONNX graph, compress (unless none), fix the
input shapes, compile with the bf16 hint (f32 where the CPU has no bf16), drop the file's pages, then two calls on the
same random inputs (float inputs normal, integer-valued ones 500).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def memory_gb() -> dict[str, float]:
    """This process's resident, anonymous and peak memory in GB (from /proc/self/status)."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: int(status[key].split()[0]) / 2**20 for k, key in (("rss", "VmRSS"), ("anon", "RssAnon"), ("peak", "VmHWM"))}


def run_mode(graph: Path, shapes: dict[str, list[int]], mode: str, out: Path) -> dict:
    """One mode in this process; the last call's first output saved to out (.npy)."""
    from diffrt.runtime.backends.openvino import compute_precision, core, read_onnx
    from diffrt.runtime.mapped import drop_mapped_pages

    model, start = read_onnx(graph), time.perf_counter()
    if mode != "none":
        import nncf

        model = nncf.compress_weights(model, mode=getattr(nncf.CompressWeightsMode, mode))
    compress = time.perf_counter() - start
    model.reshape(shapes)
    start = time.perf_counter()
    hint = compute_precision("auto")
    compiled = core().compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": hint})
    compile_seconds = time.perf_counter() - start
    del model
    drop_mapped_pages(graph)
    compiled_memory = memory_gb()
    rng = np.random.default_rng(0)
    feeds = [np.full(s, 500, np.float32) if len(s) == 1 else rng.standard_normal(s, dtype=np.float32) for s in shapes.values()]
    calls = []
    for _ in range(2):
        start = time.perf_counter()
        result = compiled(feeds)
        calls.append(time.perf_counter() - start)
    np.save(out, next(iter(result.values())))
    return {"mode": mode, "precision": hint, "compress_seconds": compress, "compile_seconds": compile_seconds,
            "after_compile_gb": compiled_memory, "calls": calls, "end_gb": memory_gb()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("graph", type=Path)
    ap.add_argument("--input", action="append", required=True, help="NAME=D0xD1x... (every graph input)")
    ap.add_argument("--modes", default="none,INT8_ASYM", help="none and NNCF CompressWeightsMode names")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shapes = {name: [int(d) for d in dims.split("x")] for name, dims in (i.split("=", 1) for i in args.input)}
    if args.child:
        print(json.dumps(run_mode(args.graph, shapes, args.child, Path(f"/tmp/ov_weights-{args.child}.npy"))))
        return
    results = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, "-m", "diffrt.benchmarks.ov_weights", str(args.graph), *sum((["--input", i] for i in args.input), []),
               "--child", mode]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(results[-1], flush=True)
    reference = np.load(f"/tmp/ov_weights-{results[0]['mode']}.npy")
    for r in results[1:]:
        moved = np.load(f"/tmp/ov_weights-{r['mode']}.npy") - reference
        r["relative_l2_vs_first"] = float(np.linalg.norm(moved) / np.linalg.norm(reference))
        print(f"{r['mode']}: output moved {r['relative_l2_vs_first']:.2%} (relative L2) from {results[0]['mode']}'s")
    if args.json:
        from .machine import describe

        args.json.write_text(json.dumps({"machine": describe(), "graph": str(args.graph), "shapes": shapes,
                                         "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
