"""Train the bundled model's VAE encoder against its shipped decoder and add it to the package (image-to-image and
inpainting need one; the training checkpoint of shapes-tiny, whose encoder made the UNet's latents, is not kept).

    python models/train_encoder.py [--package models/shapes-tiny] [--pairs 4000]

The encoder learns to invert the package itself: the shipped pipeline makes images from training captions, and the
encoder is taught each image's final latents (a Gaussian fitted by its likelihood, so the spread it reports is its
own error). The decoder, UNet and text encoder are not touched: the package's text-to-image output stays the same.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from diffrt.export import ExportOptions
from diffrt.export.checkpoint import open_checkpoint
from diffrt.export.writer import write_package
from diffrt.models.shapes_data import held_out_scenes, read_image, render, sample_training_set
from diffrt.runtime.pipeline import Pipeline

HERE = Path(__file__).resolve().parent


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sample_pairs(pipe: Pipeline, count: int, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """count (image, latents) pairs of the package's own making: uint8 images (as a PNG holds them), NCHW, and the
    final latents over the VAE's scaling factor (what its encoder's mean should be)."""
    _, captions = sample_training_set(count, seed)
    images, latents = [], []
    for start in range(0, count, batch):
        result = pipe(captions[start:start + batch], seeds=list(range(seed + start, seed + min(start + batch, count))))
        images.append(np.stack([np.asarray(im) for im in result.images]).transpose(0, 3, 1, 2))
        latents.append(result.latents / np.float32(pipe.package.vae_scaling_factor))
        if (start // batch) % 25 == 0:
            log(f"pairs {start + len(result.images)}/{count}")
    return np.concatenate(images), np.concatenate(latents)


def pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).float().div(127.5).sub(1.0)


def train(vae: AutoencoderKL, images: np.ndarray, latents: np.ndarray, steps: int, batch: int, lr: float) -> None:
    """The encoder and quant conv fitted to the pairs by Gaussian likelihood (mean and log-variance)."""
    params = list(vae.encoder.parameters()) + list(vae.quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    x_all, z_all = pixels(images), torch.from_numpy(latents)
    rng = np.random.default_rng(1)
    t0 = time.time()
    for step in range(1, steps + 1):
        idx = torch.from_numpy(rng.integers(0, len(x_all), batch))
        x, z = x_all[idx], z_all[idx]
        flip = bool(rng.integers(2))  # the scenes are symmetric left to right; so are latents of a mirrored image
        if flip:
            x, z = x.flip(-1), z.flip(-1)
        mean, logvar = vae.quant_conv(vae.encoder(x)).chunk(2, dim=1)
        loss = F.gaussian_nll_loss(mean, z, logvar.clamp(-30, 20).exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, step / 100) * (0.5 + 0.5 * math.cos(math.pi * step / steps))
        opt.step()
        if step % 200 == 0 or step == steps:
            log(f"encoder step {step}/{steps} nll {loss.item():.4f} mse {F.mse_loss(mean, z).item():.5f} "
                f"({time.time() - t0:.0f} s)")
    vae.eval()


def readback(pipe: Pipeline, vae: AutoencoderKL, copies: int = 2) -> dict[str, float]:
    """What the evaluation reads off held-out scenes encoded by the new encoder and decoded by the shipped decoder."""
    scenes = held_out_scenes() * copies
    rng = np.random.default_rng(5)
    images = np.stack([render(s, rng) for s in scenes]).transpose(0, 3, 1, 2)
    with torch.no_grad():
        mean = vae.quant_conv(vae.encoder(pixels(images))).chunk(2, dim=1)[0].numpy()
    decoded = pipe._decode(mean * np.float32(pipe.package.vae_scaling_factor), {})
    reads = [read_image((d * 255).round().astype(np.uint8)) for d in decoded]
    return {key: float(np.mean([getattr(r, key) == getattr(s, key) for r, s in zip(reads, scenes)]))
            for key in ("background", "colour", "shape")}


def add_to_package(vae: AutoencoderKL, package: Path) -> None:
    """Export the encoder (float16-rounded weights stored as float16, like the rest of the package) into package."""
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(p.half().float())
    work = Path(tempfile.mkdtemp())
    try:
        ckpt = work / "checkpoint"
        ckpt.mkdir()
        shutil.copy(package / "model_index.json", ckpt / "model_index.json")
        for folder in ("scheduler", "tokenizer"):
            shutil.copytree(package / folder, ckpt / folder)
        for folder in ("text_encoder", "unet"):
            (ckpt / folder).mkdir()
            shutil.copy(package / folder / "config.json", ckpt / folder / "config.json")
        vae.save_pretrained(ckpt / "vae")
        out = work / "package"
        out.mkdir()
        made = write_package(open_checkpoint(ckpt), out, ExportOptions(components=("vae_encoder",), weights_fp16=True),
                             log, "shapes-tiny")  # the package check wants every component: this adds one
        shutil.rmtree(package / "vae_encoder", ignore_errors=True)
        shutil.copytree(out / "vae_encoder", package / "vae_encoder")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    manifest = json.loads((package / "diffrt.json").read_text())
    manifest["components"]["vae_encoder"] = made["components"]["vae_encoder"]
    manifest["files"].update({k: v for k, v in made["files"].items() if k.startswith("vae_encoder/")})
    (package / "diffrt.json").write_text(json.dumps(manifest, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", type=Path, default=HERE / "shapes-tiny")
    ap.add_argument("--pairs", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    start = time.time()
    pipe = Pipeline.from_package(args.package, backend="ort-cpu", threads=args.threads)
    images, latents = sample_pairs(pipe, args.pairs, 16, seed=10_000 + args.seed)
    log(f"{len(images)} pairs made ({time.time() - start:.0f} s); latent std {latents.std():.3f}")
    vae = AutoencoderKL.from_config(json.loads((args.package / "vae_decoder" / "config.json").read_text()))
    train(vae, images, latents, args.steps, args.batch, args.lr)
    scores = readback(pipe, vae)
    log("held-out scenes through the new encoder and the shipped decoder: "
        + ", ".join(f"{k} {v:.1%}" for k, v in scores.items()))
    pipe.close()
    add_to_package(vae, args.package)
    log(f"vae_encoder added to {args.package} after {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
