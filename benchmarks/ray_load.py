"""Ray Serve against `diffrt serve` alone on this machine, side by side in one run, bounded in requests and time.

    python -m diffrt.benchmarks.ray_load [--model DIR] [--requests 24] [--concurrency 4] [--out DIR]

Three set-ups over the same model, each started here on 127.0.0.1 and stopped after its run: `diffrt serve` with all
cores; Ray Serve with one replica using all cores; Ray Serve with one replica per core (threads set so they do not
fight). For each: latency of requests sent one at a time (what Ray adds per request is the difference to `diffrt
serve`), then a closed loop at --concurrency: images/s and p50/p99. Writes ray_load.json and ray_load.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .machine import describe
from .serve_load import closed_loop, one_request

SETUPS = {"diffrt serve": [], "ray, 1 replica": ["--ray", "--replicas", "1"], "ray, 2 replicas": ["--ray", "--replicas", "2"]}


def start(model: Path | None, extra: list[str], threads: int) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "diffrt.runtime.cli", "serve", "--port", str(port), "--max-queue", "256",
            "--threads", str(threads), *extra] + (["--model", str(model)] if model else [])
    proc = subprocess.Popen(args, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"{' '.join(extra) or 'diffrt serve'} did not start")


def measure(url: str, requests: int, concurrency: int) -> dict:
    for i in range(2):  # warm-up: every replica's first call
        one_request(url, 1000 + i)
    alone = [one_request(url, 2000 + i)[0] for i in range(8)]
    start = time.perf_counter()
    results = closed_loop(url, concurrency, requests)
    wall = time.perf_counter() - start
    seconds = [s for s, status in results if status == 200]
    return {"sequential_p50_s": float(np.median(alone)), "images_per_s": len(seconds) / wall,
            "p50_s": float(np.percentile(seconds, 50)), "p99_s": float(np.percentile(seconds, 99)),
            "errors": sum(status != 200 for _, status in results)}


def run(model: Path | None, requests: int, concurrency: int) -> dict:
    cores = os.cpu_count() or 1
    rows = {}
    for name, extra in SETUPS.items():
        threads = max(cores // int(extra[-1]), 1) if "--replicas" in extra else cores
        proc, url = start(model, extra, threads)
        try:
            rows[name] = {"threads_per_replica": threads, **measure(url, requests, concurrency)}
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    base = rows["diffrt serve"]["sequential_p50_s"]
    for row in rows.values():
        row["added_per_request_ms"] = (row["sequential_p50_s"] - base) * 1000
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": describe(), "model": str(model or "bundled"),
            "requests": requests, "concurrency": concurrency, "rows": rows}


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"Machine: {m['cpu']} ({', '.join(m['isa']) or 'no AVX-512/AMX'}), {m['cores']} cores; model "
             f"{report['model']}; {report['requests']} requests at concurrency {report['concurrency']} per set-up.", "",
             "| set-up | threads/replica | one at a time p50 | added per request | images/s | p50 | p99 | errors |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in report["rows"].items():
        lines.append(f"| {name} | {r['threads_per_replica']} | {r['sequential_p50_s'] * 1000:.0f} ms | "
                     f"{r['added_per_request_ms']:+.1f} ms | {r['images_per_s']:.2f} | {r['p50_s'] * 1000:.0f} ms | "
                     f"{r['p99_s'] * 1000:.0f} ms | {r['errors']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ray-load"))
    args = parser.parse_args(argv)
    report = run(args.model, args.requests, args.concurrency)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ray_load.json").write_text(json.dumps(report, indent=1))
    (args.out / "ray_load.md").write_text(markdown(report) + "\n")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
