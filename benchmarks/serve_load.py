"""Load benchmark of `diffrt serve` on the loopback address, bounded in requests and time: closed loops at several
concurrencies and an open loop of Poisson arrivals, for no batching (--max-batch 1), request-level and step-level
batching.

    python -m diffrt.benchmarks.serve_load [--model DIR] [--requests 48] [--concurrency 1,4,16] [--rate auto] [--out DIR]

--rate auto runs every mode's open loop at the same rate, 80 % of request-level batching's best closed-loop
throughput (its capacity), after all closed loops: step-level and request-level batching compared at equal load.

Per run: images/s, latency p50/p90/p99, mean queue wait (the server's metric), errors, the server's peak RSS.
Writes serve_load.json, serve_load.md and serve_load.png to --out; prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .machine import describe

MODES = {"none": ["--batching", "request", "--max-batch", "1", "--max-wait-ms", "0"],
         "request": ["--batching", "request", "--max-batch", "8", "--max-wait-ms", "50"],
         "step": ["--batching", "step", "--max-batch", "8"]}
AUTO_LOAD = 0.8  # --rate auto: this fraction of request-level batching's capacity


def start_server(model: Path | None, mode: str) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "diffrt.runtime.cli", "serve", "--port", str(port), "--max-queue", "256", "--warm-up",
            *MODES[mode]]
    proc = subprocess.Popen(args + (["--model", str(model)] if model else []), stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180  # loading, and with --warm-up every batch size run once
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start")


CLIENTS = threading.local()


def client():
    """This thread's HTTP client, kept open as a real client keeps it (a new httpx client per request spends ~20 ms
    building its TLS context, which is the load generator's cost, not the server's)."""
    import httpx

    if not hasattr(CLIENTS, "client"):
        CLIENTS.client = httpx.Client(timeout=120)
    return CLIENTS.client


def one_request(url: str, seed: int, partial_images: int | None = None) -> tuple[float, int]:
    """One request's latency and status; with partial_images, streamed (OpenAI's `stream: true`), read to its
    completed event, and 200 only when that many partial images came first."""
    import httpx

    body = {"prompt": "a red circle on a blue background", "seed": seed}
    start = time.perf_counter()
    try:
        if partial_images is None:
            status = client().post(url + "/v1/images/generations", json=body).status_code
        else:
            body.update(stream=True, partial_images=partial_images)
            with client().stream("POST", url + "/v1/images/generations", json=body) as r:
                events = [line for line in r.iter_lines() if line.startswith("event: ")]
            done = events.count("event: image_generation.completed") == 1
            status = r.status_code if done and events.count("event: image_generation.partial_image") == partial_images else 0
    except httpx.HTTPError:
        status = 0
    return time.perf_counter() - start, status


def closed_loop(url: str, concurrency: int, requests: int, partial_images: int | None = None) -> list[tuple[float, int]]:
    """concurrency clients, each sending its next request when the last is answered (streamed with partial_images)."""
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda i: one_request(url, i, partial_images), range(requests)))


def open_loop(url: str, rate: float, requests: int, seed: int = 0) -> list[tuple[float, int]]:
    """Requests arriving as a Poisson process of `rate` per second, each on its own thread."""
    rng, results, threads = random.Random(seed), [], []
    lock = threading.Lock()

    def send(i: int) -> None:
        result = one_request(url, i)
        with lock:
            results.append(result)

    for i in range(requests):
        threads.append(threading.Thread(target=send, args=(i,)))
        threads[-1].start()
        time.sleep(rng.expovariate(rate))
    for t in threads:
        t.join(timeout=300)
    return results


BAD = [("{not json", 400), ({"prompt": "a cat", "steps": "many"}, 422), ({"prompt": "a cat", "scheduler": "heun++"}, 400),
       ({"prompt": "a cat", "size": "30x31"}, 400), ({"prompt": "a cat", "n": 99}, 422), ({"prompt": ""}, 422)]


def soak(url: str, pid: int, requests: int, concurrency: int = 4) -> dict:
    """requests mixing good ones (a third) and bad ones; every answer checked; the server's RSS after a warm-up
    tenth and at the end."""
    import httpx

    def ask(i: int) -> bool:
        if i % 3 == 0:
            r = httpx.post(url + "/v1/images/generations", json={"prompt": f"a red circle {i}", "seed": i, "steps": 2},
                           timeout=120)
            return r.status_code == 200 and r.json()["data"][0]["b64_json"].startswith("iVBOR")
        body, status = BAD[i % len(BAD)]
        r = httpx.post(url + "/v1/images/generations", timeout=60, headers={"content-type": "application/json"},
                       **({"json": body} if isinstance(body, dict) else {"content": body}))
        return r.status_code == status and "message" in r.json()["error"]

    def rss() -> float:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    warm = max(requests // 10, 1)
    with ThreadPoolExecutor(concurrency) as pool:
        first = list(pool.map(ask, range(warm)))
        after_warmup = rss()
        rest = list(pool.map(ask, range(warm, requests)))
    end = rss()
    checks = first + rest
    return {"requests": requests, "correct": sum(checks), "wrong": len(checks) - sum(checks),
            "rss_after_warmup_mb": after_warmup, "rss_end_mb": end, "rss_growth": end / after_warmup - 1}


def queue_wait(url: str) -> tuple[float, float]:
    """(sum, count) of the server's queue-wait histogram."""
    import httpx

    text, total, count = httpx.get(url + "/metrics").text, 0.0, 0.0
    for line in text.splitlines():
        if line.startswith("diffrt_queue_wait_seconds_sum"):
            total = float(line.split()[-1])
        elif line.startswith("diffrt_queue_wait_seconds_count"):
            count = float(line.split()[-1])
    return total, count


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def summarize(results: list[tuple[float, int]], wall: float, waited: tuple[float, float]) -> dict:
    ok = [lat for lat, status in results if status == 200]
    p = np.percentile(ok, [50, 90, 99]) if ok else [float("nan")] * 3
    return {"requests": len(results), "errors": len(results) - len(ok), "images_per_s": len(ok) / wall,
            "p50_s": float(p[0]), "p90_s": float(p[1]), "p99_s": float(p[2]), "mean_s": float(np.mean(ok)) if ok else None,
            "mean_queue_wait_s": waited[0] / waited[1] if waited[1] else None, "wall_s": wall}


def run_mode(model: Path | None, mode: str, concurrencies: list[int], requests: int, rate: float | None,
             soak_requests: int = 0, stream: tuple[int, int] | None = None) -> dict:
    proc, url = start_server(model, mode)
    try:
        if soak_requests:
            return {"soak": soak(url, proc.pid, soak_requests), "server_peak_rss_mb": peak_rss_mb(proc.pid)}
        closed_loop(url, 2, 4)  # warm-up (the server also ran every batch size before it said ready)
        runs = {}
        loads = [(f"c{c}", lambda c=c: closed_loop(url, c, max(requests, 2 * c))) for c in concurrencies]
        if rate:
            loads.append((f"poisson{rate:.3g}", lambda: open_loop(url, rate, requests)))
        if stream:  # the same closed loop with and without previews streamed, one after the other
            c, partial = stream
            loads += [(f"c{c}", lambda: closed_loop(url, c, max(requests, 2 * c))),
                      (f"c{c}-stream{partial}", lambda: closed_loop(url, c, max(requests, 2 * c), partial))]
        for name, load in loads:
            before = queue_wait(url)
            start = time.perf_counter()
            results = load()
            after = queue_wait(url)
            runs[name] = summarize(results, time.perf_counter() - start, (after[0] - before[0], after[1] - before[1]))
        runs["server_peak_rss_mb"] = peak_rss_mb(proc.pid)
        return runs
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def markdown(report: dict) -> str:
    direct = report.get("direct_pipeline_s")
    lines = [f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; model {report['model']}."
             + (f" The same request made by the pipeline in-process: {direct:.3f} s (median)." if direct else ""), "",
             "| batching | load | images/s | p50 s | p90 s | p99 s | mean queue wait s | errors |", "|---|---|---|---|---|---|---|---|"]
    for mode, runs in report["modes"].items():
        for name, r in runs.items():
            if isinstance(r, dict) and name != "soak":
                wait = f"{r['mean_queue_wait_s']:.3f}" if r["mean_queue_wait_s"] is not None else "-"
                lines.append(f"| {mode} | {name} | {r['images_per_s']:.2f} | {r['p50_s']:.3f} | {r['p90_s']:.3f} | "
                             f"{r['p99_s']:.3f} | {wait} | {r['errors']} |")
    for mode, runs in report["modes"].items():
        if "soak" in runs:
            s = runs["soak"]
            lines.append(f"Soak, batching {mode}: {s['requests']} requests (a third good), {s['correct']} answered correctly, "
                         f"{s['wrong']} wrong; server RSS {s['rss_after_warmup_mb']:.0f} MB after warm-up, "
                         f"{s['rss_end_mb']:.0f} MB at the end ({s['rss_growth']:+.1%})")
    for mode, runs in report["modes"].items():
        for name, r in runs.items():
            if "-stream" in name:
                plain = runs[name.split("-stream")[0]]
                lines.append(f"Previews streamed, batching {mode}, {name}: {r['images_per_s']:.2f} images/s against "
                             f"{plain['images_per_s']:.2f} unstreamed, a cost of {1 - r['images_per_s'] / plain['images_per_s']:.1%}")
    lines.append("")
    lines += [f"Server peak RSS, {mode}: {runs['server_peak_rss_mb']:.0f} MB" for mode, runs in report["modes"].items()]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for mode, runs in report["modes"].items():
        closed = [(int(k[1:]), r["images_per_s"]) for k, r in runs.items() if k.startswith("c") and k[1:].isdigit()]
        ax.plot(*zip(*closed), marker="o", label=f"batching: {mode}")
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("images / s")
    ax.set_xscale("log", base=2)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def capacity(runs: dict) -> float:
    """A mode's best closed-loop throughput (images/s)."""
    return max(r["images_per_s"] for k, r in runs.items() if k.startswith("c") and k[1:].isdigit())


def direct_seconds(model: Path | None, calls: int = 10) -> float:
    """Median seconds of the same request made by the pipeline in this process: what the server adds is measured
    against it."""
    from diffrt.runtime.pipeline import Pipeline

    pipe = Pipeline.from_package(model)
    times = []
    for i in range(calls + 1):
        start = time.perf_counter()
        pipe("a red circle on a blue background", seed=i)
        times.append(time.perf_counter() - start)
    del pipe  # its onnxruntime threads would compete with the server's on a small machine
    return float(np.median(times[1:]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="package folder (default: the bundled model)")
    ap.add_argument("--requests", type=int, default=48, help="requests per run (at least 2 per client)")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--rate", help="Poisson arrivals per second for an open-loop run, or auto: 80 %% of request-level "
                    "batching's capacity, the same for every mode (default: none)")
    ap.add_argument("--modes", default="none,request,step")
    ap.add_argument("--soak", type=int, default=0, help="instead: this many requests, good and bad mixed, every answer "
                    "checked, RSS growth after warm-up")
    ap.add_argument("--stream", metavar="C:N", help="also a closed loop of C clients streaming with partial_images N, "
                    "beside the same loop unstreamed: what previews cost (e.g. 16:2)")
    ap.add_argument("--out", type=Path, default=Path("serve-load-out"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    modes = args.modes.split(",")
    fixed = None if args.rate in (None, "auto") else float(args.rate)
    stream = tuple(int(v) for v in args.stream.split(":")) if args.stream else None
    if stream and len(stream) != 2:
        ap.error(f"--stream {args.stream}: give clients:partial_images, e.g. 16:2")
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": describe(), "model": str(args.model or "bundled"),
              "direct_pipeline_s": None if args.soak else direct_seconds(args.model),
              "modes": {m: run_mode(args.model, m, concurrencies, args.requests, fixed, args.soak, stream) for m in modes}}
    if args.rate == "auto" and not args.soak:
        rate = AUTO_LOAD * capacity(report["modes"].get("request") or max(report["modes"].values(), key=capacity))
        report["auto_rate"] = rate
        for m in modes:
            again = run_mode(args.model, m, [], args.requests, rate)
            peak = max(again.pop("server_peak_rss_mb"), report["modes"][m]["server_peak_rss_mb"])
            report["modes"][m].update(again, server_peak_rss_mb=peak)
    (args.out / "serve_load.json").write_text(json.dumps(report, indent=1))
    (args.out / "serve_load.md").write_text(markdown(report))
    if not args.soak:
        plot(report, args.out / "serve_load.png")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
