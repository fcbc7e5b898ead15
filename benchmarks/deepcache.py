"""DeepCache's speed and quality against the exact path, interval by interval, in one run.

    python -m diffrt.benchmarks.deepcache PACKAGE [--backend ov-cpu] [--size 512x512] [--steps 20] [--scheduler euler]
                                         [--intervals 2,3,4,5] [--seeds 2] [--out DIR]

For each seed the exact image (the full UNet every step) and one image per interval N (`cache="deepcache:N"`) from the
same start noise, in turn (the order reversed every other seed); each cached image's PSNR and SSIM against the exact
one, and every call's seconds. The package needs `diffrt deepcache add`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from diffrt.runtime.doctor import psnr
from diffrt.runtime.pipeline import Pipeline

from .machine import describe

PROMPT = "a small red circle on a blue background, top left"


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM (Wang et al. 2004: Gaussian window sigma 1.5, K1 0.01, K2 0.03) of two [0, 1] images, per channel."""
    from scipy.ndimage import gaussian_filter

    c1, c2, values = 0.01 ** 2, 0.03 ** 2, []
    for k in range(a.shape[-1]):
        x, y = a[..., k].astype(np.float64), b[..., k].astype(np.float64)
        mx, my = gaussian_filter(x, 1.5), gaussian_filter(y, 1.5)
        vx = gaussian_filter(x * x, 1.5) - mx * mx
        vy = gaussian_filter(y * y, 1.5) - my * my
        cov = gaussian_filter(x * y, 1.5) - mx * my
        values.append(((2 * mx * my + c1) * (2 * cov + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))).mean())
    return float(np.mean(values))


def sweep(pipe: Pipeline, intervals: list[int], seeds: int, **settings: Any) -> list[dict[str, Any]]:
    """Every seed's exact and cached images, timed, with each cached one's PSNR and SSIM against the exact one."""
    rows = []
    for seed in range(seeds):
        names = ["none", *(f"deepcache:{n}" for n in intervals)]
        order = names if seed % 2 == 0 else names[::-1]
        made = {}
        for name in order:
            start = time.perf_counter()
            made[name] = pipe(PROMPT, seed=seed, cache=name, **settings)
            made[name].seconds = time.perf_counter() - start
        exact = made["none"].array[0]
        for name in names:
            r = made[name]
            rows.append({"seed": seed, "cache": name, "seconds": r.seconds, "unet_seconds": float(sum(r.timings["unet"])),
                         "full_unet_steps": r.settings.get("full_unet_steps", len(r.timings["unet"])),
                         "psnr": psnr(r.array[0], exact), "ssim": ssim(r.array[0], exact)})
    return rows


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| cache | full UNet steps | seconds (mean) | speed-up vs exact | PSNR vs exact (dB) | SSIM vs exact |",
             "|---|---|---|---|---|---|"]
    exact = np.mean([r["seconds"] for r in rows if r["cache"] == "none"])
    for name in dict.fromkeys(r["cache"] for r in rows):
        rs = [r for r in rows if r["cache"] == name]
        secs = float(np.mean([r["seconds"] for r in rs]))
        quality = ("-", "-") if name == "none" else (f"{np.mean([r['psnr'] for r in rs]):.1f}",
                                                     f"{np.mean([r['ssim'] for r in rs]):.4f}")
        lines.append(f"| {name} | {rs[0]['full_unet_steps']} | {secs:.2f} | {exact / secs:.2f} | {quality[0]} | {quality[1]} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package", type=Path)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--size", default="512x512")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--scheduler", default="euler")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--intervals", default="2,3,4,5")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("deepcache-out"))
    args = ap.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    intervals = [int(n) for n in args.intervals.split(",")]
    pipe = Pipeline.from_package(args.package, backend=args.backend, cache=f"deepcache:{intervals[0]}")
    settings = {"steps": args.steps, "scheduler": args.scheduler, "guidance_scale": args.guidance, "width": width,
                "height": height}
    pipe(PROMPT, seed=99, cache="none", **{**settings, "steps": 2})  # compile before timing
    rows = sweep(pipe, intervals, args.seeds, **settings)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": describe(), "package": str(args.package),
              "backend": pipe.backend, "precision": pipe.computes, "prompt": PROMPT, **settings, "rows": rows}
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    m = result["machine"]
    lines = [f"# DeepCache sweep, {result['date']}", "", f"{m['cpu']} ({', '.join(m.get('isa') or [])}), {m['cores']} cores; "
             f"{args.package} on {pipe.backend} ({pipe.computes}), {width}x{height}, {args.steps} {args.scheduler} steps, "
             f"guidance {args.guidance}, {args.seeds} seeds, interleaved", "", *table(rows)]
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
