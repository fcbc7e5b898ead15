"""Train the bundled model's tiny decoder (a diffusers AutoencoderTiny, TAESD's architecture at this model's size) to
imitate its VAE decoder, and add it to the package: previews then come from it, and `--decoder tiny` works out of the box.

    python models/train_tiny_decoder.py [--package models/shapes-tiny] [--images 6000] [--steps 1000]

The targets are the package's own VAE decoder's images of latents its encoder makes from the training renders, and of
those latents part-noised as the sampler holds them mid-way (a preview decodes those): the tiny decoder learns the
decoder it stands in for, and the package's own images do not change.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderTiny

from diffrt.export.tiny_vae import add_tiny_vae
from diffrt.export.writer import file_hashes
from diffrt.models.shapes_data import sample_training_set
from diffrt.runtime.pipeline import Pipeline

HERE = Path(__file__).resolve().parent
CONFIG = dict(in_channels=3, out_channels=3, encoder_block_out_channels=(32, 32, 32), decoder_block_out_channels=(48, 48, 48),
              num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(2, 1, 1), latent_channels=4, upsampling_scaling_factor=2)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pairs(pipe: Pipeline, count: int, seed: int, batch: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """(sampler latents, the VAE decoder's images of them in [-1, 1]) for count renders: their encoded means, and for
    every other one the mean mixed with noise at a random step of the schedule (x_t scaled back to unit variance)."""
    images, _ = sample_training_set(count, seed)
    rng = np.random.default_rng(seed)
    latents, decoded = [], []
    scale = np.float32(pipe.package.vae_scaling_factor)
    for start in range(0, count, batch):
        pixels = images[start:start + batch].transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
        params = pipe._encoder().run({"sample": pixels})["latent_parameters"]
        z = params[:, :pipe.package.latent_channels] * scale
        noisy = rng.random(len(z)) < 0.5
        a = rng.uniform(0.3, 1.0, (len(z), 1, 1, 1)).astype(np.float32)  # sqrt(alpha_bar) of a mid-way step
        z = np.where(noisy[:, None, None, None], a * z + np.sqrt(1 - a**2) * rng.standard_normal(z.shape, dtype=np.float32), z)
        latents.append(z)
        decoded.append(pipe.vae_decoder.run({"latent_sample": z / scale})["sample"])
    return np.concatenate(latents), np.concatenate(decoded)


def train(tiny: AutoencoderTiny, latents: np.ndarray, targets: np.ndarray, steps: int, batch: int, lr: float) -> float:
    """The decoder fitted to the VAE decoder's images (L1 + MSE); returns the last hundred steps' mean MSE."""
    opt = torch.optim.AdamW(tiny.decoder.parameters(), lr=lr, weight_decay=0.0)
    z, y = torch.from_numpy(latents), torch.from_numpy(targets).clamp(-1, 1)
    gen = torch.Generator().manual_seed(0)
    recent, start = [], time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(z), (batch,), generator=gen)
        out = tiny.decode(z[idx]).sample
        mse = F.mse_loss(out, y[idx])
        loss = mse + 0.5 * F.l1_loss(out, y[idx])
        opt.zero_grad()
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, step / 100) * (0.5 + 0.5 * np.cos(np.pi * step / steps))
        opt.step()
        recent = (recent + [mse.item()])[-100:]
        if step % 250 == 0 or step == steps:
            log(f"step {step}/{steps} mse {np.mean(recent):.5f} ({time.time() - start:.0f} s)")
    return float(np.mean(recent))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", type=Path, default=HERE / "shapes-tiny")
    ap.add_argument("--images", type=int, default=6000)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--out", type=Path, default=HERE / "build" / "tiny-decoder")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    begun = time.time()
    pipe = Pipeline.from_package(args.package, backend="ort-cpu")
    latents, targets = pairs(pipe, args.images, seed=1)
    held_latents, held_targets = pairs(pipe, 500, seed=2)
    log(f"{len(latents)} pairs made ({time.time() - begun:.0f} s)")
    tiny = AutoencoderTiny(**CONFIG)
    train_mse = train(tiny.train(), latents, targets, args.steps, args.batch, args.lr)
    with torch.no_grad():
        held = F.mse_loss(tiny.eval().decode(torch.from_numpy(held_latents)).sample,
                          torch.from_numpy(held_targets).clamp(-1, 1)).item()
    psnr = 10 * np.log10(4.0 / held)  # images span [-1, 1]
    log(f"held-out pairs: MSE {held:.5f}, PSNR {psnr:.1f} dB against the VAE decoder")
    tiny.save_pretrained(args.out)
    add_tiny_vae(args.package, args.out, log=log)
    record = {"images": args.images, "steps": args.steps, "batch": args.batch, "train_mse": round(train_mse, 5),
              "held_out_mse": round(held, 5), "held_out_psnr_db": round(psnr, 1),
              "parameters": sum(p.numel() for p in tiny.decoder.parameters()),
              "minutes": round((time.time() - begun) / 60, 1)}
    (args.package / "card" / "tiny_decoder.json").write_text(json.dumps(record, indent=1) + "\n")
    manifest = json.loads((args.package / "diffrt.json").read_text())  # a shipped manifest names no path of this machine
    manifest["components"]["tiny_vae_decoder"]["source"] = "models/train_tiny_decoder.py"
    manifest["files"] = file_hashes(args.package)  # the card's new file too
    (args.package / "diffrt.json").write_text(json.dumps(manifest, indent=1) + "\n")
    log(json.dumps(record))


if __name__ == "__main__":
    main()
