"""Session creation with and without the optimized-graph cache (`--graph-cache`), each in a fresh process.

    python -m diffrt.benchmarks.session_load PACKAGE [--component unet] [--cache DIR] [--threads 2]

Times three loads of one component: plain (onnxruntime optimizes the graph), first with the cache (optimizes and
saves), second with the cache (loads the saved graph, no optimization); then checks the cached session's output
equals the plain one's on the same inputs. Prints a markdown table; --json writes the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from diffrt.benchmarks.bench import run_fresh
from diffrt.benchmarks.opt_level import random_feeds


def load(model: Path, cache: Path | None, threads: int) -> dict:
    """Session creation time in a fresh process, and that process's peak RSS."""
    graph_cache = f"Path({str(cache)!r})" if cache else "None"
    fresh = run_fresh(
        "import time\nfrom pathlib import Path\nfrom diffrt.runtime.backends.onnxruntime import OrtEngine\nstart = time.perf_counter()\n"
        f"OrtEngine(Path({str(model)!r}), 'ort-cpu', {threads}, graph_cache={graph_cache})\n"
        "print('SECONDS', time.perf_counter() - start)")
    if fresh.proc.returncode:
        raise RuntimeError(f"loading {model} failed: {fresh.proc.stderr.strip()}")
    return {"seconds": fresh.value("SECONDS"), "peak_rss_mb": fresh.peak_rss_mb}


def same_outputs(model: Path, cache: Path, threads: int) -> float:
    """Max |difference| between a plain session and one from the cache on the same random inputs."""
    import numpy as np

    from diffrt.runtime.backends.onnxruntime import OrtEngine

    plain, cached = OrtEngine(model, "ort-cpu", threads), OrtEngine(model, "ort-cpu", threads, graph_cache=cache)
    feeds = random_feeds(plain.session, latent=8, batch=2)
    a, b = plain.run(feeds), cached.run(feeds)
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package", type=Path)
    ap.add_argument("--component", default="unet")
    ap.add_argument("--cache", type=Path, help="cache folder (default: a fresh temporary one)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    model = args.package / args.component / "model.onnx"
    cache = args.cache or Path(tempfile.mkdtemp(prefix="diffrt-graphs-"))
    rows = {"plain": load(model, None, args.threads), "cache, first (optimize + save)": load(model, cache, args.threads),
            "cache, later (saved graph)": load(model, cache, args.threads)}
    diff = same_outputs(model, cache, args.threads)
    print(f"{model}, {args.threads} threads; outputs plain vs cached: max |diff| {diff:.3g}")
    print("| load | seconds | peak RSS (MB) |\n|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"model": str(model), "threads": args.threads, "loads": rows, "max_abs_diff": diff},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
