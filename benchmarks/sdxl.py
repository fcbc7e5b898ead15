"""The SDXL base architecture at full size with random weights (speed and memory do not depend on the values).

    python -m diffrt.benchmarks.sdxl export [--cache DIR]    # build, export with diffrt, report time and peak RSS

The checkpoint (float16 safetensors, as SDXL's fp16 variant ships) and its package are cached under --cache
(default .cache/sdxl). Each component is built and saved alone, so building never holds the whole model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .sd15 import export_measured

DEFAULT_CACHE = Path(".cache") / "sdxl"

TEXT_ENCODER = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
TEXT_ENCODER_2 = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                      num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280],
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=[5, 10, 20],
            use_linear_projection=True, transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=1024, layers_per_block=2,
           block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.13025, force_upcast=True)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                 timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False)


def make_checkpoint(path: Path, seed: int = 0) -> Path:
    """Save a random-weight SDXL-base-shaped StableDiffusionXLPipeline folder at path (about 7 GB in float16)."""
    if (path / "model_index.json").is_file():
        return path
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffrt.models.train_shapes import build_tokenizer

    torch.manual_seed(seed)
    words = "a photo of the red blue green cat dog house tree city night painting portrait".split()
    corpus = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    for folder, pad in (("tokenizer", None), ("tokenizer_2", "!")):
        tokenizer = build_tokenizer(corpus, path / f"{folder}-build", 600)
        tokenizer.pad_token = pad or tokenizer.pad_token
        tokenizer.save_pretrained(path / folder)
    builders = {"text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER)),
                "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_2)),
                "vae": lambda: AutoencoderKL(**VAE), "unet": lambda: UNet2DConditionModel(**UNET)}
    for folder, build in builders.items():
        print(f"building {folder}", flush=True)
        build().half().save_pretrained(path / folder)
    EulerDiscreteScheduler(**SCHEDULER).save_pretrained(path / "scheduler")
    classes = {"text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
               "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
               "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
               "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    index = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.39.0",
             "force_zeros_for_empty_prompt": True, **classes}
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["export"])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--json", type=Path, help="write the measurement here")
    ap.add_argument("export_args", nargs="*", help="more `diffrt export` options, after --")
    args = ap.parse_args(argv)
    t = time.perf_counter()
    ckpt = make_checkpoint(args.cache / "checkpoint")
    print(f"checkpoint ready in {time.perf_counter() - t:.0f} s: {ckpt}", flush=True)
    result = export_measured(ckpt, args.cache / "package", args.export_args)
    components = json.loads((args.cache / "package" / "diffrt.json").read_text())["components"]
    print("\n".join(result["log"]))
    print(f"export of the full-size SDXL architecture: {result['seconds']} s wall, {result['cpu_seconds']} s CPU, "
          f"peak RSS {result['peak_rss_gb']} GB")
    if args.json:
        args.json.write_text(json.dumps({**result, "components": {k: {"check": v.get("check"), "made_by": v["made_by"],
                                                                      "seconds": v["seconds"]} for k, v in components.items()}},
                                        indent=1))


if __name__ == "__main__":
    main()
