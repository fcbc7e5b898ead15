"""The SDXL base architecture at full size with random weights (speed and memory do not depend on the values).

    python -m diffrt.benchmarks.sdxl export [--cache DIR]    # build, export with diffrt, report time and peak RSS
    python -m diffrt.benchmarks.sdxl bench [--size 512x512 --steps 4 --runs 2 --impls ...]

bench runs each implementation in its own child process, one after another in one run (diffrt's fp32 SDXL and
diffusers' each hold about 14 GB: both at once would not fit in 24 GB), and reports per-stage times and peak RSS.

The checkpoint (float16 safetensors, as SDXL's fp16 variant ships) and its package are cached under --cache
(default .cache/sdxl). Each component is built and saved alone, so building never holds the whole model.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
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


TINY = {"unet": dict(sample_size=16, block_out_channels=[32, 64], layers_per_block=1, cross_attention_dim=64,
                     down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
                     attention_head_dim=[2, 4], transformer_layers_per_block=[1, 1], addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=32 + 6 * 8),
        "text": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
        "text_2": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
        "vae": dict(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                    up_block_types=["UpDecoderBlock2D"] * 2, sample_size=32)}


def clip_tokenizers(path: Path) -> list[str]:
    """Two CLIP tokenizers learnt on a small corpus, saved in path/tokenizer and path/tokenizer_2 (the second padding
    with `!`, as SDXL's and SD3's second encoder does); returns the corpus."""
    from diffrt.models.train_shapes import build_tokenizer

    words = "a photo of the red blue green cat dog house tree city night painting portrait".split()
    corpus = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    for folder, pad in (("tokenizer", None), ("tokenizer_2", "!")):
        tokenizer = build_tokenizer(corpus, path / f"{folder}-build", 600)
        tokenizer.pad_token = pad or tokenizer.pad_token
        tokenizer.save_pretrained(path / folder)
    return corpus


def make_checkpoint(path: Path, seed: int = 0, overrides: dict[str, dict] | None = None) -> Path:
    """Save a random-weight SDXL-base-shaped StableDiffusionXLPipeline folder at path (about 7 GB in float16).

    overrides: {"unet" | "text" | "text_2" | "vae": config keys} replacing SDXL's, e.g. for a toy-size test."""
    if (path / "model_index.json").is_file():
        return path
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    clip_tokenizers(path)
    o = overrides or {}
    builders = {"text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**{**TEXT_ENCODER, **o.get("text", {})})),
                "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**{**TEXT_ENCODER_2,
                                                                                      **o.get("text_2", {})})),
                "vae": lambda: AutoencoderKL(**{**VAE, **o.get("vae", {})}),
                "unet": lambda: UNet2DConditionModel(**{**UNET, **o.get("unet", {})})}
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


IMPLS = {"diffrt-ort": ("diffrt", "ort-cpu"), "diffrt-ov-bf16": ("diffrt", "ov-cpu"), "diffrt-ov-fp32": ("diffrt", "ov-cpu"),
         "diffrt-ov-int8-weights": ("diffrt", "ov-cpu"), "diffusers": ("diffusers", "float32"),
         "diffusers-bf16": ("diffusers", "bfloat16")}
PACKAGES = {"diffrt-ov-int8-weights": "package-int8-weights"}  # made by `diffrt quantize PACKAGE OUT --precision int8-weights`


def child(impl: str, cache: Path, width: int, height: int, steps: int, runs: int, scheduler: str = "euler",
          guidance: float = 5.0) -> dict:
    """One implementation in this process: load, one warm-up image, then runs timed images (per stage); runs 0: one
    timed image each time the parent asks on stdin (bench --interleave)."""
    import numpy as np

    from .bench import BenchConfig, Diffusers, run_diffrt

    kind, where = IMPLS[impl]
    vae = json.loads((cache / "checkpoint" / "vae" / "config.json").read_text())
    channels, factor = vae["latent_channels"], 2 ** (len(vae["block_out_channels"]) - 1)
    cfg = BenchConfig(package=cache / "package", steps=steps, width=width, height=height, prompt="a photo of a red house")
    start = time.perf_counter()
    if kind == "diffrt":
        from diffrt.runtime.pipeline import Pipeline

        pipe = Pipeline.from_package(cache / PACKAGES.get(impl, "package"), backend=where,
                                     precision="fp32" if impl.endswith("fp32") else "auto")
        precision = pipe.precision
        run = lambda lat: run_diffrt(pipe, cfg, scheduler, steps, guidance, lat, width, height)  # noqa: E731
    else:
        ref = Diffusers(cache / "checkpoint", None, "cpu", where)
        precision = where
        run = lambda lat: ref(cfg, scheduler, steps, guidance, lat, width, height)  # noqa: E731
    load = time.perf_counter() - start
    latents = np.random.default_rng(0).standard_normal((1, channels, height // factor, width // factor), dtype=np.float32)
    run(latents)
    timed = lambda: {k: v for k, v in run(latents).items() if k != "pixels"}  # noqa: E731 (the images stay here)
    records = [timed() for _ in range(runs)]
    if not runs:  # interleaved: one timed image per `run` line, said when done, until another line
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            if line.strip() != "run":
                break
            records.append(timed())
            print(json.dumps({"done": len(records)}), flush=True)
    return {"impl": impl, "precision": precision, "load_seconds": load, "records": records,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def bench(args, module: str = "diffrt.benchmarks.sdxl", scheduler: str = "euler", guidance: float = 5.0) -> dict:
    """Every asked implementation in its own child process (running `module`'s child action), in turn or, with
    args.interleave, all loaded at once and timed image by image in alternation; the machine and settings with the
    results."""
    from .machine import describe

    width, height = (int(v) for v in args.size.split("x"))
    impls = args.impls.split(",")
    results = interleaved(args, module, impls) if getattr(args, "interleave", False) else \
        [one_after_another(args, module, impl) for impl in impls]
    for r in results:
        if "error" in r:
            print(f"{r['impl']}: failed: {r['error']}", flush=True)
            continue
        totals = [x["total"] for x in r["records"]]
        print(f"{r['impl']} ({r['precision']}): load {r['load_seconds']:.1f} s, image {min(totals):.1f} s (best of "
              f"{len(totals)}), peak RSS {r['peak_rss_gb']:.1f} GB", flush=True)
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": describe(), "width": width, "height": height,
            "steps": args.steps, "guidance_scale": guidance, "scheduler": scheduler,
            "interleaved": bool(getattr(args, "interleave", False)), "results": results}


def child_command(args, module: str, impl: str, runs: int) -> list[str]:
    return [sys.executable, "-m", module, "child", "--impl", impl, "--cache", str(args.cache), "--size", args.size,
            "--steps", str(args.steps), "--runs", str(runs)]


def one_after_another(args, module: str, impl: str) -> dict:
    """One implementation's child run to the end: its result, or its error."""
    print(f"{impl}: running", flush=True)
    proc = subprocess.run(child_command(args, module, impl, args.runs), capture_output=True, text=True)
    if proc.returncode:
        return {"impl": impl, "error": proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def interleaved(args, module: str, impls: list[str]) -> list[dict]:
    """Each implementation loaded in its own child (one after another, each warmed up), then args.runs rounds of one
    timed image each in turn: a machine whose speed drifts slows every implementation alike. They are all in memory
    together (each child's peak RSS is its own)."""
    import tempfile

    children: dict[str, subprocess.Popen] = {}
    try:
        for impl in impls:
            print(f"{impl}: loading", flush=True)
            log = tempfile.TemporaryFile("w+")
            children[impl] = subprocess.Popen(child_command(args, module, impl, 0), stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE, stderr=log, text=True)
            if not children[impl].stdout.readline():
                children[impl].wait()
                log.seek(0)
                raise SystemExit(f"{impl} failed to load: {(log.read().strip().splitlines() or ['?'])[-1]}")
        for round_ in range(args.runs):
            for impl, proc in children.items():
                proc.stdin.write("run\n")
                proc.stdin.flush()
                if not proc.stdout.readline():
                    raise SystemExit(f"{impl} stopped in round {round_ + 1}")
            print(f"round {round_ + 1} of {args.runs} done", flush=True)
    except BaseException:
        for proc in children.values():  # none left holding its model's memory
            proc.kill()
        raise
    return [json.loads(proc.communicate("stop\n")[0].strip().splitlines()[-1]) for proc in children.values()]


def export_report(make: Callable[[Path], Path], label: str, args) -> None:
    """Build the full-size checkpoint (make), export it in a child, print the log, time and peak RSS, and write them
    with each component's check, exporter and stored weights to args.json."""
    from .machine import describe

    t = time.perf_counter()
    ckpt = make(args.cache / "checkpoint")
    print(f"checkpoint ready in {time.perf_counter() - t:.0f} s: {ckpt}", flush=True)
    result = export_measured(ckpt, args.cache / "package", args.export_args)
    components = json.loads((args.cache / "package" / "diffrt.json").read_text())["components"]
    print("\n".join(result["log"]))
    print(f"export of the full-size {label} architecture: {result['seconds']} s wall, {result['cpu_seconds']} s CPU, "
          f"peak RSS {result['peak_rss_gb']} GB")
    if args.json:
        summary = {k: {"check": v.get("check"), "made_by": v["made_by"], "weights": v.get("weights", "fp32"),
                       "seconds": v["seconds"]} for k, v in components.items()}
        args.json.write_text(json.dumps({**result, "machine": describe(), "export_args": args.export_args,
                                         "components": summary}, indent=1))


def parse_with_export_args(ap: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The benchmark's options, and after `--` more `diffrt export` options (args.export_args); split by hand because
    Python 3.11's argparse refuses `--` after a positional that took nothing."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    ap.epilog = "more `diffrt export` options may follow --"
    args = ap.parse_args(argv[:cut])
    args.export_args = argv[cut + 1:]
    return args


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["export", "bench", "child"])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--json", type=Path, help="write the measurement here")
    ap.add_argument("--size", default="512x512", help="WIDTHxHEIGHT (bench)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--impls", default="diffrt-ort,diffusers,diffusers-bf16,diffrt-ov-bf16")
    ap.add_argument("--impl", choices=list(IMPLS), help="(child) the implementation this process runs")
    ap.add_argument("--interleave", action="store_true", help="(bench) all loaded at once, timed image by image in turn")
    args = parse_with_export_args(ap, argv)
    if args.action == "child":
        width, height = (int(v) for v in args.size.split("x"))
        print(json.dumps(child(args.impl, args.cache, width, height, args.steps, args.runs)))
        return
    if args.action == "bench":
        result = bench(args)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
        return
    export_report(make_checkpoint, "SDXL", args)

if __name__ == "__main__":
    main()
