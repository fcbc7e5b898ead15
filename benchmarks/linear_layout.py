"""What a graph's matrix-product weight layout costs OpenVINO: one component compiled and called on ov-cpu with its
weights stored [in, out] and [out, in] behind Transposes (export/linear_layout.py), each in a fresh process, the two
runs alternating; the graph is re-laid in place between them and left as it was found (not to be run beside anything
that reads the package).

    python -m diffrt.benchmarks.linear_layout PACKAGE transformer \\
        --shapes hidden_states=2x16x64x64,timestep=2,encoder_hidden_states=2x333x4096,pooled_projections=2x2048

Reports per layout: compile seconds, call seconds, the process's peak RSS and the anonymous memory held after the
calls (the compiled model's own)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def parse_shapes(text: str) -> dict[str, list[int]]:
    """name=2x16x64x64,timestep=2 as {name: [2, 16, 64, 64], timestep: [2]}."""
    shapes = {}
    for part in text.split(","):
        name, _, dims = part.partition("=")
        shapes[name.strip()] = [int(d) for d in dims.split("x")]
    return shapes


def status_gb(key: str) -> float:
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(key))
    return int(line.split()[1]) / 1e6


def child(graph: Path, shapes: dict[str, list[int]], calls: int) -> dict:
    """One process: compile graph on ov-cpu (bf16 where the CPU has it) and call it."""
    from diffrt.runtime.backends.openvino import OvEngine, compute_precision

    rng = np.random.default_rng(0)
    engine = OvEngine(graph, precision=compute_precision("auto"))
    feeds = {name: rng.standard_normal(shapes[name]).astype(spec.dtype) for name, spec in engine.inputs.items()}
    start = time.perf_counter()
    engine.run(feeds)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        engine.run(feeds)
        times.append(time.perf_counter() - start)
    return {"first_call_s": round(compile_s, 2), "call_s": [round(t, 3) for t in times],
            "peak_rss_gb": round(status_gb("VmHWM:"), 3), "anon_after_gb": round(status_gb("RssAnon:"), 3)}


def layout(graph: Path) -> str:
    import onnx

    from diffrt.export.linear_layout import FLOATS, transposed_weights

    model = onnx.load(str(graph), load_external_data=False)
    inits = {t.name for t in model.graph.initializer if t.data_type in FLOATS}
    return "out_in" if transposed_weights(model.graph, inits) else "in_out"


def main(argv: list[str] | None = None) -> int:
    from diffrt.export.linear_layout import in_out, out_in
    from diffrt.runtime.optimized import cpu_name

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", type=Path)
    parser.add_argument("component")
    parser.add_argument("--shapes", required=True)
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="alternations of the two layouts")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    graph = args.package / args.component / "model.onnx"
    found, original = layout(graph), graph.read_bytes()  # the weights' round trip is exact, the graph's names may not be
    flip = {"out_in": in_out, "in_out": out_in}
    runs: dict[str, list] = {"in_out": [], "out_in": []}
    try:
        for _ in range(args.rounds):
            for _ in range(2):
                current = layout(graph)
                done = subprocess.run([sys.executable, "-m", "diffrt.benchmarks.linear_layout", "child", str(graph),
                                       args.shapes, str(args.calls)], capture_output=True, text=True, check=True)
                runs[current].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(current, runs[current][-1], flush=True)
                flip[current](graph)
    finally:
        if layout(graph) != found:
            flip[layout(graph)](graph)
        graph.write_bytes(original)
    report = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "graph": str(graph), "shapes": args.shapes,
              "runs": runs}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        print(json.dumps(child(Path(sys.argv[2]), parse_shapes(sys.argv[3]), int(sys.argv[4]))))
        sys.exit(0)
    sys.exit(main())
