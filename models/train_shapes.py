"""Train the bundled `shapes-tiny` model from scratch on this CPU: tokenizer, VAE, text encoder, UNet.

    python models/train_shapes.py --out models/build/shapes-checkpoint

writes a diffusers StableDiffusionPipeline folder; `diffrt export` turns it into the bundled package
(see models/shapes-tiny/README.md for the exact commands, settings and measured time).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from diffrt.models.shapes_data import held_out_scenes, read_image, render, sample_training_set
from diffrt.runtime.tokenizer import BOS, CLIP_SPLIT, EOS, byte_alphabet


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_tokenizer(captions: list[str], out: Path, vocab_size: int) -> CLIPTokenizer:
    """A CLIP-format BPE (vocab.json + merges.txt, CLIP's vocabulary order) trained on the captions."""
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, end_of_word_suffix="</w>", show_progress=False)
    tok.train_from_iterator(captions, trainer)
    merges = [tuple(m) if not isinstance(m, str) else tuple(m.split(" ")) for m in json.loads(tok.to_str())["model"]["merges"]]
    base = byte_alphabet()
    vocab: dict[str, int] = {}
    for token in base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + [BOS, EOS]:
        vocab.setdefault(token, len(vocab))
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), pad_token=EOS, model_max_length=77)


def build_t5_tokenizer(captions: list[str], out: Path, vocab_size: int = 300, max_length: int = 512):
    """A T5-format tokenizer (a `tokenizers` Unigram model with T5's normalizer and Metaspace pieces, </s> appended)
    trained on the captions and saved by transformers as T5TokenizerFast into out; returns it."""
    import transformers
    from tokenizers import decoders, processors

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.Nmt(), normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.train_from_iterator(captions, trainers.UnigramTrainer(vocab_size=vocab_size, unk_token="<unk>",
                                                              special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    fast = transformers.T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                        extra_ids=0, model_max_length=max_length)
    fast.save_pretrained(out)
    return fast


def vae_config(latent_channels: int) -> dict:
    """Scale factor 4 (16x16 latents): at 8, small shapes came back as blobs whatever the UNet did."""
    return dict(in_channels=3, out_channels=3, latent_channels=latent_channels, sample_size=64, layers_per_block=1, norm_num_groups=4,
                down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                block_out_channels=[16, 32, 64])


def unet_config(cross_dim: int, latent_channels: int) -> dict:
    """16x16 latents; cross-attention at 8x8 and 4x4 only, so a step costs about what the 8x8 UNet's did."""
    return dict(sample_size=16, in_channels=latent_channels, out_channels=latent_channels, layers_per_block=1, norm_num_groups=32,
                block_out_channels=[32, 64, 128, 128], cross_attention_dim=cross_dim, attention_head_dim=8,
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"])


def schedule_config(zero_snr: bool) -> dict:
    """SD's betas; with zero_snr, rescaled so the last step is pure noise (Lin et al. 2023), which needs v-prediction."""
    return dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                rescale_betas_zero_snr=zero_snr, prediction_type="v_prediction" if zero_snr else "epsilon")


def batches(n: int, batch: int, rng: np.random.Generator):
    while True:
        yield rng.integers(0, n, size=batch)


def train_vae(images: torch.Tensor, steps: int, batch: int, lr: float, latent_channels: int) -> AutoencoderKL:
    vae = AutoencoderKL(**vae_config(latent_channels))
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(1)
    t0 = time.time()
    for step, idx in zip(range(1, steps + 1), batches(len(images), batch, rng)):
        x = images[idx]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / post.mean[0].numel()
        loss = F.mse_loss(rec, x) + 1e-4 * kl
        cosine_step(opt, loss, lr, step, steps, warmup=100)
        if step % 100 == 0 or step == steps:
            log(f"vae step {step}/{steps} loss {loss.item():.5f} kl {kl.item():.2f} ({time.time() - t0:.0f} s)")
    return vae.eval()


def cosine_step(opt: torch.optim.Optimizer, loss: torch.Tensor, lr: float, step: int, steps: int, warmup: int) -> None:
    """One optimizer step at a linearly warmed-up, cosine-decayed learning rate."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    for g in opt.param_groups:
        g["lr"] = lr * min(1.0, step / warmup) * (0.5 + 0.5 * math.cos(math.pi * step / steps))
    opt.step()


def refine_decoder(vae: AutoencoderKL, images: torch.Tensor, steps: int, batch: int, lr: float) -> AutoencoderKL:
    """Train the decoder alone on the frozen encoder's latents: sharper images, same latent space for the UNet."""
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(3)
    t0 = time.time()
    for step, idx in zip(range(1, steps + 1), batches(len(images), batch, rng)):
        x = images[idx]
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        loss = F.mse_loss(vae.decode(z).sample, x)
        cosine_step(opt, loss, lr, step, steps, warmup=50)
        if step % 100 == 0 or step == steps:
            log(f"decoder step {step}/{steps} loss {loss.item():.5f} ({time.time() - t0:.0f} s)")
    return vae.eval()


@torch.no_grad()
def vae_readback(vae: AutoencoderKL, copies: int = 2) -> dict[str, float]:
    """What the evaluation reads off the VAE's own reconstructions of held-out scenes: the ceiling for any UNet."""
    scenes = held_out_scenes() * copies
    rng = np.random.default_rng(5)
    x = torch.from_numpy(np.stack([render(s, rng) for s in scenes])).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    rec = vae.decode(vae.encode(x).latent_dist.sample()).sample
    out = ((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    reads = [read_image(o) for o in out]
    return {"background": float(np.mean([r.background == s.background for r, s in zip(reads, scenes)])),
            "colour": float(np.mean([r.colour == s.colour for r, s in zip(reads, scenes)])),
            "shape": float(np.mean([r.shape == s.shape for r, s in zip(reads, scenes)]))}


@torch.no_grad()
def encode_all(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(images), 500):
        d = vae.encode(images[i:i + 500]).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def train_denoiser(mean: torch.Tensor, std: torch.Tensor, ids: torch.Tensor, empty_ids: torch.Tensor, vocab: int,
                   steps: int, batch: int, lr: float, log_every: int, curve: list,
                   offset_noise: float, zero_snr: bool, snapshot=None, snapshot_every: int = 0,
                   ) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """Epsilon prediction on the SD schedule, or v-prediction on zero-terminal-SNR betas (zero_snr).

    On SD's betas, 16x16 latents average the noise away, so the UNet reads the background colour off the noisy
    latent's mean even at t=950 and, sampling from pure noise, ignores the prompt's background. Offset noise (a
    per-image, per-channel constant added to the noise) drowns that leak; zero terminal SNR removes it.
    snapshot(step, unet, text) is called with the EMA weights every snapshot_every steps."""
    text_config = CLIPTextConfig(vocab_size=vocab, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab - 2,
                                 eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    text = CLIPTextModel(text_config)
    unet = UNet2DConditionModel(**unet_config(text_config.hidden_size, mean.shape[1]))
    noise_sched = DDPMScheduler(**schedule_config(zero_snr))
    params = list(unet.parameters()) + list(text.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    rng = np.random.default_rng(2)
    t0 = time.time()
    running = 0.0
    for step, idx in zip(range(1, steps + 1), batches(len(mean), batch, rng)):
        idx_t = torch.from_numpy(idx)
        latents = mean[idx_t] + std[idx_t] * torch.randn_like(mean[idx_t])
        cond = ids[idx_t].clone()
        drop = torch.from_numpy(rng.random(batch) < 0.1)
        cond[drop] = empty_ids
        noise = torch.randn_like(latents) + offset_noise * torch.randn(batch, latents.shape[1], 1, 1)
        t = torch.randint(0, 1000, (batch,))
        noisy = noise_sched.add_noise(latents, noise, t)
        hidden = text(cond).last_hidden_state
        pred = unet(noisy, t, hidden).sample
        loss = F.mse_loss(pred, noise_sched.get_velocity(latents, noise, t) if zero_snr else noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, step / 200) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_mul_(ema, decay)
            torch._foreach_add_(ema, [p.detach() for p in params], alpha=1 - decay)
        running += loss.item()
        if step % log_every == 0 or step == steps:
            avg = running / (log_every if step % log_every == 0 else step % log_every)
            running = 0.0
            curve.append({"step": step, "loss": avg, "seconds": round(time.time() - t0, 1)})
            log(f"unet step {step}/{steps} loss {avg:.4f} ({time.time() - t0:.0f} s)")
        if snapshot and step % snapshot_every == 0 and step < steps:
            live = [p.detach().clone() for p in params]
            with torch.no_grad():
                torch._foreach_copy_(params, ema)
            snapshot(step, unet.eval(), text.eval())
            with torch.no_grad():
                torch._foreach_copy_(params, live)
            unet.train()
            text.train()
    with torch.no_grad():
        torch._foreach_copy_(params, ema)
    return unet.eval(), text.eval()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "build" / "shapes-checkpoint")
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--vae-steps", type=int, default=2000)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--latent-channels", type=int, default=4,
                    help="8 reconstructs shapes better, but its UNet learnt them slower (model card)")
    ap.add_argument("--unet-steps", type=int, default=3800)
    ap.add_argument("--offset-noise", type=float, default=0.15)
    ap.add_argument("--zero-snr", action="store_true",
                    help="v-prediction on zero-terminal-SNR betas, sampled with trailing timesteps (instead of offset noise)")
    ap.add_argument("--snapshot-every", type=int, default=0, help="also save the EMA weights every N UNet steps (snapshot-N/)")
    ap.add_argument("--unet-batch", type=int, default=48)
    ap.add_argument("--vae-lr", type=float, default=2e-3)
    ap.add_argument("--refine-steps", type=int, default=1500, help="decoder-only steps after the VAE")
    ap.add_argument("--final-refine-steps", type=int, default=1500, help="decoder-only steps after the UNet")
    ap.add_argument("--vae-from", type=Path, help="take the tokenizer and trained VAE of this checkpoint; train the rest")
    ap.add_argument("--from", dest="resume", type=Path, help="only refine the decoder of this saved checkpoint")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    start = time.time()

    log(f"generating {args.images} captioned images")
    images_u8, captions = sample_training_set(args.images, seed=args.seed)
    images = torch.from_numpy(images_u8).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()

    if args.resume:
        pipe = StableDiffusionPipeline.from_pretrained(args.resume)
        log("VAE read-back before: " + ", ".join(f"{k} {v:.1%}" for k, v in vae_readback(pipe.vae.eval()).items()))
        refine_decoder(pipe.vae.train(), images, args.refine_steps, args.vae_batch, args.lr)
        readback = vae_readback(pipe.vae)
        log("VAE read-back after: " + ", ".join(f"{k} {v:.1%}" for k, v in readback.items()))
        pipe.save_pretrained(args.out)
        record = json.loads((args.resume / "training.json").read_text()) if (args.resume / "training.json").is_file() else {}
        record["refine"] = {"steps": args.refine_steps, "minutes": round((time.time() - start) / 60, 1), "from": str(args.resume),
                            "vae_readback": readback}
        (args.out / "training.json").write_text(json.dumps(record, indent=1))
        log(f"saved {args.out} after {(time.time() - start) / 60:.1f} min")
        return

    args.out.mkdir(parents=True, exist_ok=True)
    if args.vae_from:
        tokenizer = CLIPTokenizer.from_pretrained(args.vae_from / "tokenizer")
    else:
        tokenizer = build_tokenizer(captions, args.out / "tokenizer", vocab_size=600)
    tokenizer.save_pretrained(args.out / "tokenizer")
    ids = torch.tensor(tokenizer(captions, padding="max_length", max_length=77, truncation=True).input_ids)
    empty_ids = torch.tensor(tokenizer("", padding="max_length", max_length=77).input_ids)
    log(f"tokenizer: {len(tokenizer)} tokens")

    if args.vae_from:
        vae = AutoencoderKL.from_pretrained(args.vae_from / "vae").eval()
    else:
        vae = train_vae(images, args.vae_steps, args.vae_batch, args.vae_lr, args.latent_channels)
        vae = refine_decoder(vae.train(), images, args.refine_steps, args.vae_batch, args.lr)
    readback = vae_readback(vae)
    log("VAE reconstructions of held-out scenes read back as " + ", ".join(f"{k} {v:.1%}" for k, v in readback.items()))
    mean, std = encode_all(vae, images)
    scaling = vae.config.scaling_factor if args.vae_from else float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scaling)
    log(f"latents {tuple(mean.shape[1:])}, scaling factor {scaling:.4f}")

    def pipeline(unet: UNet2DConditionModel, text: CLIPTextModel) -> StableDiffusionPipeline:
        sched = schedule_config(args.zero_snr)
        scheduler = DDIMScheduler(**sched, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                  timestep_spacing="trailing" if args.zero_snr else "leading")
        return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def snapshot(step: int, unet: UNet2DConditionModel, text: CLIPTextModel) -> None:
        pipeline(unet, text).save_pretrained(args.out / f"snapshot-{step}")
        log(f"saved {args.out / f'snapshot-{step}'}")

    curve: list = []
    unet, text = train_denoiser(mean * scaling, std * scaling, ids, empty_ids, len(tokenizer), args.unet_steps,
                                args.unet_batch, args.lr, max(args.unet_steps // 60, 1), curve, args.offset_noise,
                                args.zero_snr, snapshot, args.snapshot_every)
    if args.final_refine_steps:  # same latent space, so the UNet is unaffected; a sharper decoder is all it changes
        vae = refine_decoder(vae.train(), images, args.final_refine_steps, args.vae_batch, args.lr)
        readback = vae_readback(vae)
        log("after the final refinement: " + ", ".join(f"{k} {v:.1%}" for k, v in readback.items()))
    pipeline(unet, text).save_pretrained(args.out)
    minutes = (time.time() - start) / 60
    (args.out / "training.json").write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                                        "minutes": round(minutes, 1), "vae_readback": readback,
                                                        "curve": curve}, indent=1))
    log(f"saved {args.out} after {minutes:.1f} min")


if __name__ == "__main__":
    main()
