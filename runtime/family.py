"""Model family adapters: how a family's graphs are fed and read, kept out of the shared denoising loop.

SD 1.x and 2.x (and custom models of that shape) have one CLIP text encoder whose last hidden state conditions a
UNet taking (sample, timestep, encoder_hidden_states), and a VAE decoder taking latents already divided by the
scaling factor. SDXL's second encoder, pooled embeddings and time ids will be an adapter of their own."""

from __future__ import annotations

from typing import Any

import numpy as np

from .engines import Engine, TensorSpec
from .errors import UserError


def timestep_feed(spec: TensorSpec, t: float, batch: int) -> np.ndarray:
    """The timestep in the dtype and rank the UNet graph declares: a scalar, [1], or one per batch row."""
    value = np.asarray(round(float(t)) if np.issubdtype(spec.dtype, np.integer) else t, dtype=spec.dtype)
    if len(spec.shape) == 0:
        return value
    n = spec.shape[0] if isinstance(spec.shape[0], int) else batch
    return np.full((n,), value, dtype=value.dtype)


class StableDiffusion:
    """SD 1.x / 2.x: optimum's input and output names."""

    text_output = "last_hidden_state"
    unet_output = "out_sample"
    vae_output = "sample"
    encoder_output = "latent_parameters"

    def text_feeds(self, encoder: Engine, ids: np.ndarray) -> dict[str, Any]:
        return {"input_ids": ids.astype(encoder.inputs["input_ids"].dtype)}

    def unet_feeds(self, unet: Engine, sample: np.ndarray, t: float, text: Any) -> dict[str, Any]:
        return {"sample": sample.astype(unet.inputs["sample"].dtype),
                "timestep": timestep_feed(unet.inputs["timestep"], t, len(sample)), "encoder_hidden_states": text}

    def vae_feeds(self, decoder: Engine, latents: np.ndarray) -> dict[str, Any]:
        return {"latent_sample": latents.astype(decoder.inputs["latent_sample"].dtype)}

    def encoder_feeds(self, encoder: Engine, pixels: np.ndarray) -> dict[str, Any]:
        return {"sample": pixels.astype(encoder.inputs["sample"].dtype)}


def adapter_for(family: str) -> StableDiffusion:
    """The adapter for a package's family (diffrt.json's "family")."""
    if family == "sdxl":
        raise UserError("SDXL packages are not supported by this diffrt yet; use an SD 1.x or 2.x package")
    return StableDiffusion()
