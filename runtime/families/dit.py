"""What the flow-matching transformer families (SD3, FLUX.1) share: a `transformer` over 2x2 latent patches, T5
among their encoders, prompts read as diffusers reads them, their diffusers pipelines' img2img rounding, and no
LoRAs or inpainting yet."""

from __future__ import annotations

from typing import Any, ClassVar

from ..backends.engine import Engine
from .base import Family


class TransformerFamily(Family):
    denoiser = "transformer"
    denoiser_output = "out_hidden_states"
    patch = 2
    default_steps = 28
    prompt_syntaxes = ("plain",)
    exact_strength = True
    loras = False
    inpainting = False
    max_t5_tokens: ClassVar[int] = 256  # diffusers' default max_sequence_length for the family

    @classmethod
    def export_defaults(cls, denoiser_config: dict[str, Any]) -> dict[str, Any]:
        return {"max_sequence_length": cls.max_t5_tokens}

    @property
    def max_sequence_length(self) -> int:
        """T5's token count: the package's default max_sequence_length."""
        return int(self.package.defaults.get("max_sequence_length", self.max_t5_tokens))

    def takes_mask(self, engine: Engine) -> bool:
        return False
