"""The SD3.5-medium architecture at full size with random weights (memory and speed do not depend on the values).

    python -m diffrt.benchmarks.sd3 export [--cache DIR] [--no-t5] [--json FILE] [-- more diffrt export options]
    python -m diffrt.benchmarks.sd3 bench [--cache DIR] [--size 512x512 --steps 2 --runs 1 --impls ...] [--json FILE]

Builds SD3.5-medium's configs (MMDiT 2.5 B parameters with q/k RMS norms and dual attention, CLIP-L and CLIP-G with
projections, T5-XXL's encoder 4.8 B, the 16-channel VAE) with random weights saved in bfloat16 as the released
checkpoint ships them, one component at a time (building never holds the whole model), then runs `diffrt export`
in a child process and reports its wall time and peak RSS. The checkpoint and package are cached under --cache
(default .cache/sd3). --no-t5 leaves T5-XXL out (diffusers' text_encoder_3=None: zeros of T5's shape take its place,
so the transformer's work per step is the same); bench runs diffrt and diffusers each in its own process, one after
another (`diffrt.benchmarks.sdxl`'s bench), FlowMatch Euler with guidance 5.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .sdxl import TEXT_ENCODER, TEXT_ENCODER_2, bench, child, clip_tokenizers, export_report, parse_with_export_args

DEFAULT_CACHE = Path(".cache") / "sd3"
SCHEDULER, GUIDANCE = "flow_euler", 5.0
TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128)
VAE = dict(in_channels=3, out_channels=3, latent_channels=16, sample_size=1024, layers_per_block=2,
           block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
           use_post_quant_conv=False)
CLASSES = {"text_encoder": ["transformers", "CLIPTextModelWithProjection"],
           "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
           "text_encoder_3": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
           "tokenizer_2": ["transformers", "CLIPTokenizer"], "tokenizer_3": ["transformers", "T5TokenizerFast"],
           "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
           "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}


def make_checkpoint(path: Path, seed: int = 0, t5: bool = True) -> Path:
    """Save a random-weight SD3.5-medium-shaped StableDiffusion3Pipeline folder at path (about 16 GB in bfloat16, 6.4 GB
    without T5)."""
    if (path / "model_index.json").is_file():
        return path
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from diffrt.models.train_shapes import build_t5_tokenizer

    torch.manual_seed(seed)
    corpus = clip_tokenizers(path)
    if t5:
        build_t5_tokenizer(corpus * 20, path / "tokenizer_3", vocab_size=200)
    builders = {"text_encoder": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER)),
                "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_2)),
                **({"text_encoder_3": lambda: T5EncoderModel(T5Config(**T5_XXL))} if t5 else {}),
                "vae": lambda: AutoencoderKL(**VAE), "transformer": lambda: SD3Transformer2DModel(**TRANSFORMER)}
    for folder, build in builders.items():
        print(f"building {folder}", flush=True)
        torch.set_default_dtype(torch.bfloat16)  # made in bfloat16: T5-XXL would take 19 GB in float32
        try:
            build().save_pretrained(path / folder)
        finally:
            torch.set_default_dtype(torch.float32)
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(path / "scheduler")
    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.39.0", **CLASSES,
             **({} if t5 else {"text_encoder_3": [None, None], "tokenizer_3": [None, None]})}
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["export", "bench", "child"])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--no-t5", action="store_true", help="(export) build the checkpoint without T5-XXL")
    ap.add_argument("--json", type=Path, help="write the measurement here")
    ap.add_argument("--size", default="512x512", help="WIDTHxHEIGHT (bench)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--impls", default="diffrt-ov-bf16,diffusers-bf16")
    ap.add_argument("--impl", help="(child) the implementation this process runs")
    ap.add_argument("--interleave", action="store_true", help="(bench) all loaded at once, timed image by image in turn")
    args = parse_with_export_args(ap, argv)
    if args.action == "child":
        width, height = (int(v) for v in args.size.split("x"))
        print(json.dumps(child(args.impl, args.cache, width, height, args.steps, args.runs, SCHEDULER, GUIDANCE)))
    elif args.action == "bench":
        result = bench(args, "diffrt.benchmarks.sd3", SCHEDULER, GUIDANCE)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
    else:
        export_report(lambda path: make_checkpoint(path, t5=not args.no_t5), "SD3.5-medium", args)


if __name__ == "__main__":
    main()
