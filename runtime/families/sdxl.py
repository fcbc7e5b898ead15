"""SDXL base and Turbo, in optimum's SDXL layout: two CLIP encoders (text_encoder_2 with a projection) whose
penultimate hidden states lie side by side, the second's pooled embedding, and six size / crop "time ids"."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backends.engine import Engine
from .base import Family


def hidden_count(encoder: Engine) -> int:
    """How many hidden_states.N outputs an SDXL encoder graph has (its layers and the embeddings)."""
    return sum(1 for name in encoder.outputs if name.startswith("hidden_states."))


class StableDiffusionXL(Family):
    name = "sdxl"
    encoders = ("text_encoder", "text_encoder_2")
    size_conditioning = True
    default_guidance = 5.0
    default_steps = 20
    zeros_for_empty_prompt = True

    def hidden_output(self, encoder: Engine, clip_skip: int) -> tuple[str, int | None]:
        """SDXL reads the penultimate layer; clip skip N (A1111's) reads N layers before the last (diffusers' N - 1)."""
        return f"hidden_states.{hidden_count(encoder) - 1 - clip_skip}", None

    def pooled_output(self, name: str) -> str | None:
        return "text_embeds" if name == "text_encoder_2" else None

    def layers(self, encoders: list[Engine]) -> int | None:
        return min(hidden_count(e) for e in encoders) - 1

    def conditioning(self, hidden: np.ndarray, pooled: np.ndarray | None, req: Any) -> dict[str, np.ndarray]:
        """Text states, pooled embeddings and time ids; with force_zeros_for_empty_prompt an empty negative prompt is
        zeros, as diffusers takes no negative prompt."""
        if self.package.force_zeros_for_empty_prompt and req.guided:
            empty = np.array([not n for n in req.negatives] + [False] * len(req.prompts))
            hidden[empty] = 0
            pooled[empty] = 0
        size = [*(req.original_size or (req.height, req.width)), *req.crops_coords_top_left, req.height, req.width]
        return {"encoder_hidden_states": hidden, "text_embeds": pooled,
                "time_ids": np.tile(np.array(size, np.float32), (len(hidden), 1))}

    def size_settings(self, req: Any) -> dict[str, Any]:
        """The size conditioning as an image's settings record it."""
        return {"original_size": list(req.original_size or (req.height, req.width)),
                "crops_coords_top_left": list(req.crops_coords_top_left)}
