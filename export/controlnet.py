"""ControlNets in a package: diffusers' ControlNetModel exported as `controlnet/<name>`, a graph that gives the UNet's
residuals (one per down-block output, and the mid block's) for a control image, and the UNet exported to take them.

The ControlNet's graph gives its residuals unscaled (conditioning scale 1, no guess-mode ramp): the runtime scales and
sums them (runtime/control.py), so one graph serves every scale, mode and combination of ControlNets."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from diffrt.runtime.control import CONTROL, residual_names
from diffrt.runtime.errors import UserError
from diffrt.runtime.package import MANIFEST, load_package

from .checkpoint import Checkpoint

SAME_AS_UNET = ("cross_attention_dim", "block_out_channels", "layers_per_block", "addition_embed_type")


def control_name(folder: Path) -> str:
    """The name a ControlNet goes by in the package: its folder's name, in letters, digits, '.', '_' and '-'."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(folder).resolve().name).strip("-.")
    if not name:
        raise UserError(f"cannot name a ControlNet after the folder {folder}; rename the folder")
    return name


def controlnet_config(folder: Path) -> dict[str, Any]:
    """The ControlNetModel config in folder, refused in one line where it is not one."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise UserError(f"{folder} has no config.json; give the folder of a diffusers ControlNetModel")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("_class_name") != "ControlNetModel":
        raise UserError(f"{folder} holds a {config.get('_class_name') or 'model of no known class'}, not a diffusers "
                        "ControlNetModel (SD 1.x/2.x or SDXL ControlNets)")
    return config


def check_fits(config: dict[str, Any], unet: dict[str, Any], vae_factor: int, folder: Path) -> None:
    """A ControlNet must mirror the UNet's down path and take control images at the VAE's enlargement."""
    for key in SAME_AS_UNET:
        mine, theirs = config.get(key), unet.get(key)
        if key == "layers_per_block" and isinstance(theirs, list):
            theirs = theirs[0] if len(set(theirs)) == 1 else theirs
        if (mine or None) != (theirs or None):
            raise UserError(f"the ControlNet {folder} has {key} {mine}, the package's UNet {theirs}: it was trained for "
                            "another base model (an SD 1.5 ControlNet needs an SD 1.x UNet, an SDXL one an SDXL UNet)")
    factor = 2 ** (len(config.get("conditioning_embedding_out_channels", (16, 32, 96, 256))) - 1)
    if factor != vae_factor:
        raise UserError(f"the ControlNet {folder} takes control images at {factor}x its latents, this model's VAE "
                        f"enlarges {vae_factor}x; it was made for another model")


def residual_shapes(unet: dict[str, Any], height: int, width: int) -> list[tuple[int, int, int]]:
    """(channels, height, width) of each down-block residual, then the mid block's, for latents of height x width."""
    channels = list(unet["block_out_channels"])
    layers = unet.get("layers_per_block", 2)
    layers = layers if isinstance(layers, list) else [layers] * len(channels)
    shapes = [(channels[0], height, width)]
    for i, (c, n) in enumerate(zip(channels, layers)):
        shapes += [(c, height, width)] * n
        if i + 1 < len(channels):
            height, width = -(-height // 2), -(-width // 2)
            shapes.append((c, height, width))
    return [*shapes, (channels[-1], height, width)]


def residual_halvings(unet: dict[str, Any]) -> list[list[int]]:
    """[channels, halvings of the latents] of each residual input: what the runtime's zero residuals are made from."""
    return [[c, (256 // h).bit_length() - 1] for c, h, _ in residual_shapes(unet, 256, 256)]


def control_count(unet: dict[str, Any]) -> int:
    """How many residuals (down blocks' and the mid block's) a UNet of this config takes."""
    return len(residual_shapes(unet, 8, 8))


def residual_inputs(unet: dict[str, Any], batch: int, height: int, width: int, gen: torch.Generator) -> tuple:
    """Random residuals for a UNet traced or checked with ControlNet inputs."""
    return tuple(torch.randn(batch, *shape, generator=gen) * 0.5 for shape in residual_shapes(unet, height, width))


class ControlNetGraph(torch.nn.Module):
    """(sample, timestep, text, control image[, SDXL's pooled text and time ids]) -> every residual, unscaled."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, *added):
        extra = {"added_cond_kwargs": {"text_embeds": added[0], "time_ids": added[1]}} if added else {}
        down, mid = self.model(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                               return_dict=False, **extra)
        return (*down, mid)


def control_outputs(unet: dict[str, Any]) -> list[str]:
    """The ControlNet graph's output names: the residual input names of the UNet (runtime/control.py)."""
    return residual_names(control_count(unet))


def with_controlnets(ckpt: Checkpoint, folders: list[Path]) -> list[str]:
    """Record each ControlNet folder in the checkpoint (checked against its UNet); their component names."""
    from .graphs import vae_scale_factor

    if ckpt.denoiser != "unet":
        raise UserError(f"ControlNets are for SD 1.x/2.x and SDXL UNets; this is a {ckpt.family} checkpoint")
    names = []
    for folder in folders:
        config = controlnet_config(folder)
        check_fits(config, ckpt.denoiser_config, vae_scale_factor(ckpt), folder)
        name = CONTROL + control_name(folder)
        if name in ckpt.configs:
            raise UserError(f"two ControlNets are named {name[len(CONTROL):]}; rename one of the folders")
        ckpt.configs[name], ckpt.controlnets[name] = config, Path(folder)
        names.append(name)
    ckpt.control_inputs = True
    return names


def add_controlnet(package_dir: Path, folder: Path, checkpoint: Path | None = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Export the ControlNet in folder into the package, checked against PyTorch; a UNet without residual inputs is
    exported again from the checkpoint it came from (or `checkpoint`) so that it takes them."""
    from ..runtime.files import ordinary_mode
    from . import ExportOptions
    from .checkpoint import open_checkpoint
    from .writer import _check, _export_one, copy_config, file_hashes

    package_dir = Path(package_dir)
    package = load_package(package_dir)
    if package.denoiser != "unet":
        raise UserError(f"ControlNets are for SD 1.x/2.x and SDXL UNets; {package_dir} is a {package.family} package")
    manifest = json.loads((package_dir / MANIFEST).read_text(encoding="utf-8"))
    source = checkpoint or manifest.get("source", {}).get("checkpoint")
    if not source or not Path(source).is_dir():
        raise UserError(f"the checkpoint {package_dir} was exported from ({source or 'not recorded'}) is not here; give "
                        "it with --checkpoint (its UNet is needed to check the ControlNet against)")
    ckpt = open_checkpoint(source)
    (name,) = with_controlnets(ckpt, [folder])
    retake = ["unet"] if not package.takes_control() else []
    if retake and package.precision("unet") != "fp32":
        raise UserError(f"this package's UNet takes no ControlNet residuals and is {package.precision('unet')}: add the "
                        "ControlNet to the float32 package it was quantized from, then quantize again")
    # stored as the package's UNet is (float16 weights stay float16)
    options = ExportOptions(components=(*retake, name), weights_fp16=manifest["components"]["unet"].get("weights") == "fp16")
    with tempfile.TemporaryDirectory(dir=package_dir, prefix=".controlnet.") as staging:
        entries = {}
        for comp in options.components:
            modules: dict[str, Any] = {}
            step = (lambda msg, comp=comp: log(f"{comp}: {msg}"))
            entry, loaded = _export_one(ckpt, comp, Path(staging), options, step, modules)
            entry["check"] = _check(ckpt, comp, Path(staging) / comp / "model.onnx", modules, loaded, True, step)
            copy_config(ckpt, Path(staging), comp)
            entries[comp] = entry
        for comp in entries:
            shutil.rmtree(package_dir / comp, ignore_errors=True)
            (package_dir / comp).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(Path(staging) / comp), str(package_dir / comp))
            for path in (package_dir / comp, *(package_dir / comp).iterdir()):  # a package is an ordinary folder
                path.chmod(ordinary_mode(0o777 if path.is_dir() else 0o666))
    manifest["components"].update(entries)
    manifest["files"] = file_hashes(package_dir)
    (package_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return entries[name]
