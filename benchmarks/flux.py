"""FLUX.1-dev's architecture at full width with random weights and fewer blocks: export memory, per block.

    python -m diffrt.benchmarks.flux export [--double N --single M] [--t5 DIR] [--cache DIR] [--json FILE]
    python -m diffrt.benchmarks.flux blocks [--t5 DIR] [--cache DIR] [--json FILE]
    python -m diffrt.benchmarks.flux stage [--double N --single M] [--t5 DIR] [--cache DIR]

FLUX.1's transformer (12 B parameters: 19 double-stream and 38 single-stream blocks, 3072 wide) is 24 GB in
bfloat16, more than this machine's disk and memory allow beside T5-XXL. Its blocks are all alike, so `export`
builds the real widths (CLIP-L, T5-XXL's encoder, the 16-channel VAE, the transformer's embedders, norms and
projections) with N double and M single blocks and exports the whole checkpoint in a child process, reporting wall
time and peak RSS; `blocks` builds two such checkpoints (3 + 6 and 6 + 12 blocks) and measures the transformer's
streamed export alone (`stage`: the stage of `diffrt export` that writes it, in a process of its own, without the
check against PyTorch, which the full model skips for want of 48 GB), then extrapolates its peak RSS linearly in
the parameter count to the full 19 + 38 blocks. The other stages do not grow with the transformer's blocks.
--t5 reuses a saved T5-XXL encoder folder (SD3.5's text_encoder_3 is the same model) instead of building one.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from .sd3 import T5_XXL, VAE
from .sdxl import TEXT_ENCODER, clip_tokenizers, export_report, parse_with_export_args

DEFAULT_CACHE = Path(".cache") / "flux"
FULL_BLOCKS = (19, 38)
TRANSFORMER = dict(patch_size=1, in_channels=64, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                   pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_VAE = {**VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}
SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                 max_image_seq_len=4096)
CLASSES = {"text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
           "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
           "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
           "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}


def save_bf16(build, folder: Path) -> None:
    """Build a model with bfloat16 parameters (as the released checkpoint ships them) and save it."""
    import torch

    torch.set_default_dtype(torch.bfloat16)
    try:
        build().save_pretrained(folder)
    finally:
        torch.set_default_dtype(torch.float32)


def make_checkpoint(path: Path, double: int, single: int, t5: Path | None = None, seed: int = 0) -> Path:
    """A random-weight FluxPipeline folder at full width with `double` and `single` blocks (T5 linked from t5)."""
    if (path / "model_index.json").is_file():
        return path
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from diffrt.models.train_shapes import build_t5_tokenizer

    torch.manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    corpus = clip_tokenizers(path)
    shutil.rmtree(path / "tokenizer_2")  # FLUX's second tokenizer is T5's
    build_t5_tokenizer(corpus * 20, path / "tokenizer_2", vocab_size=200)
    clip = {k: v for k, v in TEXT_ENCODER.items() if k != "projection_dim"}
    save_bf16(lambda: CLIPTextModel(CLIPTextConfig(**clip)), path / "text_encoder")
    if t5 is not None:
        (path / "text_encoder_2").symlink_to(t5.resolve(), target_is_directory=True)
    else:
        save_bf16(lambda: T5EncoderModel(T5Config(**T5_XXL)), path / "text_encoder_2")
    save_bf16(lambda: AutoencoderKL(**FLUX_VAE), path / "vae")
    save_bf16(lambda: FluxTransformer2DModel(num_layers=double, num_single_layers=single, **TRANSFORMER), path / "transformer")
    FlowMatchEulerDiscreteScheduler(**SCHEDULER).save_pretrained(path / "scheduler")
    index = {"_class_name": "FluxPipeline", "_diffusers_version": "0.39.0", **CLASSES}
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def transformer_parameters(double: int, single: int) -> int:
    """The transformer's parameter count at these block counts (built without weights)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        model = FluxTransformer2DModel(num_layers=double, num_single_layers=single, **TRANSFORMER)
    return sum(p.numel() for p in model.parameters())


def stage(args) -> dict:
    """The transformer's stage of `diffrt export` alone in this process: seconds and this process's peak RSS."""
    import resource
    import tempfile
    import time

    from diffrt.export import ExportOptions
    from diffrt.export.checkpoint import open_checkpoint
    from diffrt.export.writer import _export_one

    ckpt = open_checkpoint(make_checkpoint(args.cache / "checkpoint", args.double, args.single, args.t5))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.cache) as dest:
        entry, _ = _export_one(ckpt, "transformer", Path(dest), ExportOptions(), lambda msg: None, {})
    return {"seconds": round(time.perf_counter() - start, 1), "weights": entry.get("weights", "fp32"),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def blocks(args) -> dict:
    """The transformer's stage at two block counts, each in a process of its own, and its peak RSS extrapolated
    linearly in the parameter count to the full model."""
    import subprocess
    import sys

    from .machine import describe

    runs = []
    for double, single in ((3, 6), (6, 12)):  # both past BIG_MODEL_BYTES, so both streamed as the full model is
        cache = args.cache / f"blocks-{double}-{single}"
        make_checkpoint(cache / "checkpoint", double, single, args.t5)  # here: building is not the stage's memory
        command = [sys.executable, "-m", "diffrt.benchmarks.flux", "--double", str(double), "--single", str(single),
                   "--cache", str(cache), *(["--t5", str(args.t5)] if args.t5 else []), "stage"]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        runs.append({"double": double, "single": single, "parameters": transformer_parameters(double, single), **result})
        print(f"{double} double + {single} single blocks ({runs[-1]['parameters'] / 1e9:.2f} B): "
              f"{result['seconds']} s, peak RSS {result['peak_rss_gb']} GB", flush=True)
    (a, b), full = runs, transformer_parameters(*FULL_BLOCKS)
    per_billion = (b["peak_rss_gb"] - a["peak_rss_gb"]) / ((b["parameters"] - a["parameters"]) / 1e9)
    predicted = b["peak_rss_gb"] + per_billion * (full - b["parameters"]) / 1e9
    print(f"peak RSS grows {per_billion:.3f} GB per billion parameters: the full {full / 1e9:.2f} B transformer's "
          f"export should peak near {predicted:.2f} GB", flush=True)
    return {"runs": runs, "full_parameters": full, "gb_per_billion": round(per_billion, 4),
            "predicted_full_peak_gb": round(predicted, 2), "machine": describe()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["export", "blocks", "stage"])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--double", type=int, default=2, help="double-stream blocks (export; FLUX.1 has 19)")
    ap.add_argument("--single", type=int, default=4, help="single-stream blocks (export; FLUX.1 has 38)")
    ap.add_argument("--t5", type=Path, help="a saved T5-XXL encoder folder to link instead of building one")
    ap.add_argument("--json", type=Path, help="write the measurement here")
    args = parse_with_export_args(ap, argv)
    if args.action == "stage":
        print(json.dumps(stage(args)))
        return
    if args.action == "blocks":
        result = blocks(args)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
        return
    label = f"FLUX.1-dev (full width, {args.double} double + {args.single} single blocks)"
    export_report(lambda path: make_checkpoint(path, args.double, args.single, args.t5), label, args)


if __name__ == "__main__":
    main()
