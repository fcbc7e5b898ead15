"""The SD 1.5 architecture at full size with random weights (speed and memory do not depend on the values).

    python -m diffrt.benchmarks.sd15 export [--cache DIR]     # build, export with diffrt, report time and peak RSS

The checkpoint and its package are cached under --cache (default .cache/sd15) for the benchmarks.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_CACHE = Path(".cache") / "sd15"

TEXT_ENCODER = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280, 1280],
            down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            cross_attention_dim=768, attention_head_dim=8)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
           block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.18215)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1,
                 set_alpha_to_one=False)


def make_checkpoint(path: Path, seed: int = 0, overrides: dict[str, dict] | None = None) -> Path:
    """Save a random-weight SD 1.5-shaped StableDiffusionPipeline at path (about 4.3 GB in float32).

    overrides: {"unet" | "text" | "vae": config keys} replacing SD 1.5's, e.g. for a toy-size test."""
    if (path / "model_index.json").is_file():
        return path
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffrt.models.train_shapes import build_tokenizer

    torch.manual_seed(seed)
    words = "a photo of the red blue green cat dog house tree city night painting portrait".split()
    tokenizer = build_tokenizer([" ".join(words[i:] + words[:i]) for i in range(len(words))], path / "tok-build", 600)
    o = overrides or {}
    pipe = StableDiffusionPipeline(vae=AutoencoderKL(**{**VAE, **o.get("vae", {})}),
                                   text_encoder=CLIPTextModel(CLIPTextConfig(**{**TEXT_ENCODER, **o.get("text", {})})),
                                   tokenizer=tokenizer, unet=UNet2DConditionModel(**{**UNET, **o.get("unet", {})}),
                                   scheduler=PNDMScheduler(**SCHEDULER),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def prepare_package(cache: Path = DEFAULT_CACHE) -> tuple[Path, Path]:
    """The SD 1.5-shaped checkpoint and its diffrt package, made once and cached."""
    ckpt = make_checkpoint(cache / "checkpoint")
    package = cache / "package"
    if not (package / "diffrt.json").is_file():
        export_measured(ckpt, package)
    return package, ckpt


def export_measured(checkpoint: Path, out: Path, extra: list[str] | None = None) -> dict:
    """Run `diffrt export` in a child process; its wall time, CPU time and peak RSS (the child's ru_maxrss)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "diffrt.runtime.cli", "export", str(checkpoint), str(out), "--overwrite",
                           *(extra or [])], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(proc.stderr)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1), "peak_rss_gb": round(after.ru_maxrss / 2**20, 2),
            "log": proc.stderr.strip().splitlines()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["export"])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--json", type=Path, help="write the measurement here")
    args = ap.parse_args(argv)
    t = time.perf_counter()
    ckpt = make_checkpoint(args.cache / "checkpoint")
    print(f"checkpoint ready in {time.perf_counter() - t:.0f} s: {ckpt}", flush=True)
    result = export_measured(ckpt, args.cache / "package")
    params = json.loads((args.cache / "package" / "diffrt.json").read_text())["components"]
    print("\n".join(result["log"]))
    print(f"export of the full-size SD 1.5 architecture: {result['seconds']} s wall, {result['cpu_seconds']} s CPU, "
          f"peak RSS {result['peak_rss_gb']} GB")
    if args.json:
        args.json.write_text(json.dumps({**result, "components": {k: v.get("check") for k, v in params.items()}}, indent=1))


if __name__ == "__main__":
    main()
