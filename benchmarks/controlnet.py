"""ControlNet at full size: the SD 1.5 architecture and a ControlNet made from its UNet, random weights (their zero
convolutions drawn too, so the residuals are not zeros).

    python -m diffrt.benchmarks.controlnet prepare [--cache DIR]   # checkpoint, ControlNet, both packages (cached)
    python -m diffrt.benchmarks.controlnet unet [--size 512] [--calls 5] [--json F]

`unet` times what a package with ControlNets costs when none runs: the plain UNet graph against the residual-taking one
fed zero residuals, call by call interleaved, on ort-cpu and ov-cpu. The per-step cost of a running ControlNet against
diffusers' ControlNet pipeline is `diffrt bench PACKAGE --control canny:MAP --baseline diffusers,diffusers-bf16`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from .machine import describe
from .sd15 import DEFAULT_CACHE, export_measured, make_checkpoint, prepare_package


def make_controlnet(checkpoint: Path, folder: Path, seed: int = 1) -> Path:
    """A ControlNetModel from the checkpoint's UNet, its zero-initialized weights drawn at random (cached)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    net = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(checkpoint / "unet"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.abs().max() > 0:
                p.normal_(0, 0.02)
    net.save_pretrained(folder)
    return folder


def prepare(cache: Path) -> dict:
    """The plain package, a ControlNet and the package that has it (exports timed, peak RSS measured)."""
    plain, checkpoint = prepare_package(cache)
    net = make_controlnet(make_checkpoint(cache / "checkpoint"), cache / "canny")
    control = cache / "package-control"
    measured = {}
    if not (control / "diffrt.json").is_file():
        measured = export_measured(checkpoint, control, ["--controlnet", str(net)])
    return {"plain": str(plain), "control": str(control), "controlnet": str(net), "export": measured}


def unet_feeds(pipe, size: int, residuals: bool) -> dict[str, np.ndarray]:
    """A guided batch-1 step's UNet inputs at size x size (with zero residuals for a ControlNet-taking UNet)."""
    rng = np.random.default_rng(0)
    side = size // pipe.package.vae_scale_factor
    feeds = {"sample": rng.standard_normal((2, 4, side, side), dtype=np.float32),
             "timestep": np.full(2, 500, pipe.unet.inputs["timestep"].dtype),
             "encoder_hidden_states": rng.standard_normal((2, 77, 768), dtype=np.float32)}
    return {**feeds, **(pipe.controls.zeros(2, side, side) if residuals else {})}


def time_unets(cache: Path, size: int, calls: int) -> dict:
    """Seconds per UNet call, plain against zero-fed residual-taking, interleaved, per backend."""
    from diffrt.runtime.pipeline import Pipeline

    out = {}
    for backend in ("ort-cpu", "ov-cpu"):
        pipes = {"plain": Pipeline.from_package(cache / "package", backend=backend),
                 "residual inputs, zeros": Pipeline.from_package(cache / "package-control", backend=backend)}
        feeds = {k: unet_feeds(p, size, k != "plain") for k, p in pipes.items()}
        seconds: dict[str, list[float]] = {k: [] for k in pipes}
        for k, p in pipes.items():  # warm-up
            p.unet.run(feeds[k])
        for i in range(calls):
            for k in (list(pipes) if i % 2 == 0 else list(pipes)[::-1]):
                start = time.perf_counter()
                pipes[k].unet.run(feeds[k])
                seconds[k].append(time.perf_counter() - start)
        out[backend] = {k: {"median": float(np.median(v)), "all": [round(x, 4) for x in v]} for k, v in seconds.items()}
        out[backend]["ratio"] = out[backend]["residual inputs, zeros"]["median"] / out[backend]["plain"]["median"]
        print(backend, {k: round(v["median"], 3) for k, v in out[backend].items() if k != "ratio"},
              f"ratio {out[backend]['ratio']:.3f}", flush=True)
        for p in pipes.values():
            p.close()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["prepare", "unet"])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--json", type=Path, help="write the measurement here")
    args = ap.parse_args(argv)
    result = {"machine": describe(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.action == "prepare":
        result["prepare"] = prepare(args.cache)
        print(json.dumps(result["prepare"].get("export", {}).get("peak_rss_gb")), flush=True)
    else:
        result.update(size=args.size, calls=args.calls, unet=time_unets(args.cache, args.size, args.calls))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
