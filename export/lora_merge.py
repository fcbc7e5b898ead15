"""LoRAs merged into a checkpoint's weights before export (`diffrt export --lora FILE[:SCALE]`)."""

from __future__ import annotations

import torch

from diffrt.runtime.errors import UserError
from diffrt.runtime.lora import LoraChoice, WeightIndex, read_lora


def check_loras(choices: list[LoraChoice], components: tuple[str, ...]) -> None:
    """Every file readable and every layer for a component the checkpoint has, before any export work."""
    for choice in choices:
        for layer in read_lora(choice.path):
            if layer.component not in components:
                raise UserError(f"LoRA {choice.path.name} changes a {layer.component}, which this checkpoint does not "
                                "have: it was made for another model family")


def merge_loras(component: str, module: torch.nn.Module, choices: list[LoraChoice]) -> int:
    """Add each chosen LoRA's change (at its scale) to the module's weights; returns how many layers were merged."""
    params = dict(module.named_parameters())
    index = WeightIndex(params)
    merged = 0
    for choice in choices:
        for layer in read_lora(choice.path):
            if layer.component != component:
                continue
            name = index.find(layer)
            if name is None:
                raise UserError(f"LoRA {choice.path.name}: layer {component}.{layer.module} matches no weight of the "
                                "checkpoint: it was made for another model, or names layers in a form diffrt does not read")
            with torch.no_grad():
                p = params[name]
                p += torch.from_numpy(layer.delta(choice.scale, tuple(p.shape))).to(p.dtype)
            merged += 1
    return merged
