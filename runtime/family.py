"""Model family adapters: which text encoders a family runs, how their outputs become the UNet's text inputs, and how
each graph is fed, kept out of the shared denoising loop.

SD 1.x and 2.x (and custom models of that shape) have one CLIP text encoder whose last hidden state conditions a UNet
taking (sample, timestep, encoder_hidden_states). SDXL runs two encoders, takes each one's penultimate hidden state
side by side, and also feeds the UNet the second encoder's pooled (projected) embedding and six size/crop "time ids".
Both VAE decoders take latents already divided by the scaling factor."""

from __future__ import annotations

from typing import Any

import numpy as np

from .backends.engine import Engine, TensorSpec
from .errors import UserError

PER_ROW_FIX = ("make it take one per row with `python -m diffrt.export.timestep_rows PACKAGE`, or re-export the package "
               "with `diffrt export`")
LAYER_STATES = "layer_states"  # diffrt's SD text encoder output: every layer through the final norm (CLIP skip)


def timestep_feed(spec: TensorSpec, t: float | np.ndarray, batch: int) -> np.ndarray:
    """The timestep in the dtype and rank the UNet graph declares: a scalar, [1], or one per batch row. t is one
    value, or one per row (rows at different steps), which only a graph taking one per row can be given."""
    value = np.asarray(t, np.float64)
    value = (value.round() if np.issubdtype(spec.dtype, np.integer) else value).astype(spec.dtype)
    if value.ndim:
        if len(spec.shape) != 1 or isinstance(spec.shape[0], int):
            raise UserError(f"this UNet takes one timestep per call, so rows at different steps cannot share one; {PER_ROW_FIX}")
        return value
    if len(spec.shape) == 0:
        return value
    n = spec.shape[0] if isinstance(spec.shape[0], int) else batch
    return np.full((n,), value, dtype=value.dtype)


class StableDiffusion:
    """SD 1.x / 2.x: optimum's input and output names."""

    encoders = ("text_encoder",)
    patch = 1  # latent pixels per side of one token of the denoiser's sequence (FLUX packs 2x2)
    unet_output = "out_sample"
    vae_output = "sample"
    encoder_output = "latent_parameters"

    def image_seq_len(self, width: int, height: int, vae_factor: int) -> int:
        """How many latent tokens an image of this size is (what flow schedules shift by)."""
        return (height // vae_factor // self.patch) * (width // vae_factor // self.patch)

    def hidden_output(self, encoder: Engine, clip_skip: int) -> tuple[str, int | None]:
        """The encoder output holding the hidden state that clip_skip picks, and its layer index there (None: it is
        the output itself)."""
        return ("last_hidden_state", None) if clip_skip == 1 else (LAYER_STATES, -clip_skip)

    def pooled_output(self, name: str) -> str | None:
        """The output the UNet takes pooled from (the last encoder's), None where the family takes none."""
        return None

    def layers(self, encoders: list[Engine]) -> int | None:
        """How far back clip skip may go (None: the graphs have no per-layer output)."""
        spec = encoders[0].outputs.get(LAYER_STATES)
        return None if spec is None else spec.shape[1]

    def conditioning(self, hidden: np.ndarray, pooled: np.ndarray | None, sizes: np.ndarray) -> dict[str, Any]:
        """The UNet's text inputs (besides sample and timestep) for a batch of embedded prompts."""
        return {"encoder_hidden_states": hidden}

    def text_feeds(self, encoder: Engine, ids: np.ndarray) -> dict[str, Any]:
        return {"input_ids": ids.astype(encoder.inputs["input_ids"].dtype)}

    def unet_feeds(self, unet: Engine, sample: np.ndarray, t: float, cond: dict[str, Any]) -> dict[str, Any]:
        return {"sample": sample.astype(unet.inputs["sample"].dtype),
                "timestep": timestep_feed(unet.inputs["timestep"], t, len(sample)), **cond}

    def vae_feeds(self, decoder: Engine, latents: np.ndarray) -> dict[str, Any]:
        return {"latent_sample": latents.astype(decoder.inputs["latent_sample"].dtype)}

    def encoder_feeds(self, encoder: Engine, pixels: np.ndarray) -> dict[str, Any]:
        return {"sample": pixels.astype(encoder.inputs["sample"].dtype)}


def hidden_count(encoder: Engine) -> int:
    """How many hidden_states.N outputs an SDXL encoder graph has (its layers and the embeddings)."""
    return sum(1 for name in encoder.outputs if name.startswith("hidden_states."))


class StableDiffusionXL(StableDiffusion):
    """SDXL base and Turbo, in optimum's SDXL layout (text_encoder_2, hidden_states.N, text_embeds, time_ids)."""

    encoders = ("text_encoder", "text_encoder_2")

    def hidden_output(self, encoder: Engine, clip_skip: int) -> tuple[str, int | None]:
        """SDXL reads the penultimate layer; clip skip N (A1111's) reads N layers before the last (diffusers' N - 1)."""
        return f"hidden_states.{hidden_count(encoder) - 1 - clip_skip}", None

    def pooled_output(self, name: str) -> str | None:
        return "text_embeds" if name == "text_encoder_2" else None

    def layers(self, encoders: list[Engine]) -> int | None:
        return min(hidden_count(e) for e in encoders) - 1

    def conditioning(self, hidden: np.ndarray, pooled: np.ndarray | None, sizes: np.ndarray) -> dict[str, Any]:
        return {"encoder_hidden_states": hidden, "text_embeds": pooled, "time_ids": sizes}


def adapter_for(family: str) -> StableDiffusion:
    """The adapter for a package's family (diffrt.json's "family")."""
    return StableDiffusionXL() if family == "sdxl" else StableDiffusion()
