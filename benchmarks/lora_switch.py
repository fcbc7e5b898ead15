"""Switching LoRAs on the full-size SD 1.5 architecture on the CPU: apply at run time vs re-export with the LoRA merged.

    python -m diffrt.benchmarks.lora_switch [--cache .cache/sd15] [--rank 32] [--size 512x512] [--steps 4]

Makes two random LoRAs (PEFT, rank --rank, the attention and feed-forward projections of the UNet and the text
encoder's attention) for the cached SD 1.5-shaped checkpoint (benchmarks/sd15.py), re-exports the package (so it
has its weight map), then times in one process: the first image, set_loras(A), the first image after, set_loras(B),
set_loras([]), and peak RSS; and, in a child process, `diffrt export --lora A` (what a re-export costs instead).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

from .sd15 import DEFAULT_CACHE, export_measured, make_checkpoint

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def make_lora(checkpoint: Path, path: Path, rank: int, seed: int) -> Path:
    """A random PEFT LoRA of the given rank for the checkpoint's UNet and text encoder, saved as diffusers saves one."""
    if path.is_file():
        return path
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(checkpoint / "unet")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=UNET_TARGETS, init_lora_weights="gaussian"))
    text = CLIPTextModel.from_pretrained(checkpoint / "text_encoder")
    text.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
                                init_lora_weights="gaussian"))
    StableDiffusionPipeline.save_lora_weights(path.parent, weight_name=path.name,
                                              unet_lora_layers=get_peft_model_state_dict(unet),
                                              text_encoder_lora_layers=get_peft_model_state_dict(text))
    return path


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def switch_times(package: Path, loras: list[Path], width: int, height: int, steps: int) -> dict:
    """Load, image, then each switch and the first image after it, in this process."""
    from diffrt.runtime.lora import LoraChoice
    from diffrt.runtime.pipeline import Pipeline

    image = lambda: pipe("a photo of a house", steps=steps, seed=1, width=width, height=height)  # noqa: E731
    load = time.perf_counter()
    pipe = Pipeline.from_package(package, backend="ort-cpu")
    out = {"load": time.perf_counter() - load, "image": timed(image), "image_again": timed(image),
           "peak_rss_before_switching_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    for label, chosen in (("A", [loras[0]]), ("B", [loras[1]]), ("A_cached", [loras[0]]), ("none", [])):
        out[f"apply_{label}"] = timed(lambda c=chosen: pipe.set_loras([LoraChoice(p, 0.8) for p in c]))
        out[f"image_after_{label}"] = timed(image)
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--size", default="512x512")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--no-reexport", action="store_true", help="skip timing the re-export with the LoRA merged")
    args = ap.parse_args(argv)
    from .machine import describe

    width, height = (int(v) for v in args.size.split("x"))
    checkpoint = make_checkpoint(args.cache / "checkpoint")
    loras = [make_lora(checkpoint, args.cache / f"lora-{k}.safetensors", args.rank, seed) for k, seed in (("a", 1), ("b", 2))]
    package = args.cache / "package-lora"
    if not (package / "unet" / "weights_map.json").is_file():
        print("exporting the package (with its weight map)", flush=True)
        plain = export_measured(checkpoint, package)
        print(f"export: {plain['seconds']} s, peak RSS {plain['peak_rss_gb']} GB", flush=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": describe(), "rank": args.rank, "size": args.size,
              "steps": args.steps, "lora_bytes": loras[0].stat().st_size}
    result["run_time"] = switch_times(package, loras, width, height, args.steps)
    print(json.dumps(result["run_time"], indent=1), flush=True)
    if not args.no_reexport:  # its peak RSS is at least this process's: children inherit the parent's high-water mark
        merged = export_measured(checkpoint, args.cache / "package-merged", ["--lora", f"{loras[0]}:0.8"])
        result["re_export"] = {k: merged[k] for k in ("seconds", "cpu_seconds", "peak_rss_gb")}
        print(f"re-export with the LoRA merged: {merged['seconds']} s, peak RSS {merged['peak_rss_gb']} GB", flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
