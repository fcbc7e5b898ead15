"""SD 1.x and 2.x (and custom models of that shape): one CLIP text encoder whose last (or clip-skipped) hidden state
conditions a UNet taking (sample, timestep, encoder_hidden_states), in optimum's input and output names."""

from __future__ import annotations

from ..backends.engine import Engine
from .base import Family

LAYER_STATES = "layer_states"  # diffrt's SD text encoder output: every layer through the final norm (CLIP skip)


class StableDiffusion(Family):
    name = "sd"

    def hidden_output(self, encoder: Engine, clip_skip: int) -> tuple[str, int | None]:
        return ("last_hidden_state", None) if clip_skip == 1 else (LAYER_STATES, -clip_skip)

    def layers(self, encoders: list[Engine]) -> int | None:
        spec = encoders[0].outputs.get(LAYER_STATES)
        return None if spec is None else spec.shape[1]
