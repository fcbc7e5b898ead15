"""Prompt adherence of a shapes model package on the held-out attribute combinations.

    python -m diffrt.models.evaluate_shapes [--model DIR] [--seeds 4] [--cache deepcache:N] [--json OUT] [--grid OUT.png]

Generates one image per held-out (shape, colour, background) and seed, reads it back with plain image
statistics (diffrt.models.shapes_data.read_image) and prints the share read correctly. Runtime only: no torch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from diffrt.models.shapes_data import held_out_scenes, read_image
from diffrt.runtime.pipeline import Pipeline

TARGETS = {"background": 0.95, "colour": 0.90, "shape": 0.75}


def evaluate(pipe: Pipeline, seeds: int, steps: int | None = None, scheduler: str | None = None,
             guidance: float | None = None) -> dict:
    scores = {k: 0 for k in TARGETS}
    rows, images = [], []
    start = time.perf_counter()
    for scene in held_out_scenes():
        prompt = scene.caption()
        for seed in range(seeds):
            result = pipe(prompt, seed=seed, steps=steps, scheduler=scheduler, guidance_scale=guidance)
            image = np.asarray(result.images[0])
            reading = read_image(image)
            hits = {"background": reading.background == scene.background, "colour": reading.colour == scene.colour,
                    "shape": reading.shape == scene.shape}
            for k, v in hits.items():
                scores[k] += int(v)
            rows.append({"prompt": prompt, "seed": seed, "read": reading.__dict__, **hits})
            images.append(image)
    n = len(rows)
    return {"images": n, "scores": {k: v / n for k, v in scores.items()}, "targets": TARGETS,
            "settings": {k: v for k, v in result.settings.items() if k in ("steps", "scheduler", "guidance_scale", "model")},
            "seconds": round(time.perf_counter() - start, 1), "rows": rows, "_images": images}


def grid(images: list[np.ndarray], columns: int) -> Image.Image:
    rows = [np.concatenate(images[i:i + columns], axis=1) for i in range(0, len(images) - columns + 1, columns)]
    return Image.fromarray(np.concatenate(rows, axis=0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="package folder (default: the bundled model)")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--scheduler")
    ap.add_argument("--guidance", type=float)
    ap.add_argument("--cache", help="step caching, deepcache[:N] (the package needs `diffrt deepcache add`)")
    ap.add_argument("--json", type=Path, help="write the full results here")
    ap.add_argument("--grid", type=Path, help="write a PNG grid of the generated images here")
    args = ap.parse_args(argv)
    pipe = Pipeline.from_package(args.model, backend="ort-cpu", cache=args.cache)
    report = evaluate(pipe, args.seeds, args.steps, args.scheduler, args.guidance)
    report["cache"] = args.cache
    images = report.pop("_images")
    if args.grid:
        grid(images, columns=args.seeds * 4).save(args.grid)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{report['images']} images of held-out combinations, {report['settings']}, {report['seconds']} s")
    ok = True
    for k, v in report["scores"].items():
        met = v >= TARGETS[k]
        ok &= met
        print(f"  {k:<10} {v:6.1%}  (target {TARGETS[k]:.0%}) {'ok' if met else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
