"""A diffusers SD 1.x/2.x folder written as one original (CompVis / ldm) checkpoint file, as stable-diffusion.cpp and
A1111 load models: the UNet under model.diffusion_model., the VAE under first_stage_model., the CLIP text encoder
under cond_stage_model.transformer. (SD 1.x's layout; the renaming is the reverse of the one diffusers applies when it
loads such a file, which the tests check by loading the written file back with diffusers).

    python -m diffrt.benchmarks.ldm_checkpoint CHECKPOINT OUT.safetensors"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_block(name: str, layers: int, attention_up: set[int]) -> tuple[str, str] | None:
    """A diffusers UNet block path (down_blocks.i.resnets.j. ...) as the ldm one (input_blocks.n.m.), and the rest."""
    per = layers + 1  # ldm blocks per level: the resnets, then a downsampler (down) / the resnets (up)
    rules = [(r"down_blocks\.(\d)\.resnets\.(\d)\.", lambda i, j: f"input_blocks.{per * i + j + 1}.0."),
             (r"down_blocks\.(\d)\.attentions\.(\d)\.", lambda i, j: f"input_blocks.{per * i + j + 1}.1."),
             (r"down_blocks\.(\d)\.downsamplers\.0\.conv\.()", lambda i, _: f"input_blocks.{per * (i + 1)}.0.op."),
             (r"up_blocks\.(\d)\.resnets\.(\d)\.", lambda i, j: f"output_blocks.{per * i + j}.0."),
             (r"up_blocks\.(\d)\.attentions\.(\d)\.", lambda i, j: f"output_blocks.{per * i + j}.1."),
             (r"up_blocks\.(\d)\.upsamplers\.0\.()",  # after the level's last resnet (and its attention, if any)
              lambda i, _: f"output_blocks.{per * i + layers}.{2 if i in attention_up else 1}."),
             (r"mid_block\.attentions\.0\.()()", lambda *_: "middle_block.1."),
             (r"mid_block\.resnets\.(\d)\.()", lambda j, _: f"middle_block.{2 * j}.")]
    for pattern, target in rules:
        m = re.match(pattern, name)
        if m:
            return target(*(int(g) if g else 0 for g in m.groups())), name[m.end():]
    return None


def unet_name(name: str, layers: int, attention_up: set[int]) -> str:
    """One diffusers UNet tensor's ldm name (without the prefix)."""
    for ours, theirs in UNET_TOP.items():
        if name.startswith(ours + "."):
            return theirs + name[len(ours):]
    block = unet_block(name, layers, attention_up)
    if block is None:
        raise ValueError(f"no ldm name for UNet tensor {name}")
    prefix, rest = block
    if ".resnets." in name:
        first, _, tail = rest.partition(".")
        if first in ("norm1", "conv1", "time_emb_proj", "norm2", "conv2", "conv_shortcut"):
            rest = RESNET[first] + "." + tail
    return prefix + rest


def vae_name(name: str, levels: int) -> str:
    """One diffusers VAE tensor's ldm name (without the prefix)."""
    name = name.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    name = re.sub(r"mid_block\.attentions\.0\.", "mid.attn_1.", name)
    name = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", name)
    name = re.sub(r"encoder\.down_blocks\.(\d)\.resnets\.(\d)\.", r"encoder.down.\1.block.\2.", name)
    name = re.sub(r"encoder\.down_blocks\.(\d)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", name)
    name = re.sub(r"decoder\.up_blocks\.(\d)\.resnets\.(\d)\.",
                  lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.", name)
    name = re.sub(r"decoder\.up_blocks\.(\d)\.upsamplers\.0\.",
                  lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", name)
    if ".attn_1." in name:
        for ours, theirs in VAE_ATTENTION.items():
            name = name.replace(f".attn_1.{ours}.", f".attn_1.{theirs}.")
    return name


def read(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def convert(checkpoint: Path) -> dict[str, np.ndarray]:
    """Every tensor of the UNet, VAE and text encoder under its ldm name."""
    import json

    unet_config = json.loads((checkpoint / "unet" / "config.json").read_text())
    vae_config = json.loads((checkpoint / "vae" / "config.json").read_text())
    layers = unet_config["layers_per_block"]
    attention_up = {i for i, t in enumerate(unet_config["up_block_types"]) if "CrossAttn" in t}
    out = {f"model.diffusion_model.{unet_name(k, layers, attention_up)}": v
           for k, v in read(checkpoint / "unet" / "diffusion_pytorch_model.safetensors").items()}
    levels = len(vae_config["block_out_channels"])
    for k, v in read(checkpoint / "vae" / "diffusion_pytorch_model.safetensors").items():
        conv = ".attn_1." in vae_name(k, levels) and v.ndim == 2  # ldm's VAE attention is 1x1 convolutions
        out[f"first_stage_model.{vae_name(k, levels)}"] = v[:, :, None, None] if conv else v
    for k, v in read(checkpoint / "text_encoder" / "model.safetensors").items():
        out[f"cond_stage_model.transformer.{k}"] = v
    return out


def write_single_file(checkpoint: Path, out: Path) -> Path:
    from safetensors.numpy import save_file

    save_file(convert(checkpoint), str(out))
    return out


if __name__ == "__main__":
    print(write_single_file(Path(sys.argv[1]), Path(sys.argv[2])))
