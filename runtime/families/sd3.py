"""Stable Diffusion 3 / 3.5: two CLIP encoders with projections (their penultimate hidden states side by side, their
pooled embeddings joined) and T5, whose states follow CLIP's on the sequence axis (CLIP's zero-padded to T5's width),
as diffusers' StableDiffusion3Pipeline.encode_prompt builds them; an MMDiT over 2x2 latent patches, a 16-channel VAE
with a shift, flow matching."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backends.engine import Engine
from .dit import TransformerFamily
from .sdxl import hidden_count

MAX_SEQUENCE_LENGTH = 256  # T5 tokens, diffusers' default for SD3


def text_width(hidden: np.ndarray, width: int) -> np.ndarray:
    """hidden zero-padded (or cut) on its last axis to width, as torch.nn.functional.pad with (0, width - own)."""
    own = hidden.shape[-1]
    if own >= width:
        return hidden[..., :width]
    return np.concatenate([hidden, np.zeros((*hidden.shape[:-1], width - own), hidden.dtype)], axis=-1)


class StableDiffusion3(TransformerFamily):
    name = "sd3"
    encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    optional = ("text_encoder_3",)  # diffusers' text_encoder_3=None: zeros take T5's place
    t5 = "text_encoder_3"
    default_guidance = 7.0
    max_t5_tokens = MAX_SEQUENCE_LENGTH
    settings = frozenset({"clip_skip"})

    @property
    def joint_width(self) -> int:
        """The transformer's text width (T5's), from the graph's recorded encoder_hidden_states dims."""
        inputs = self.package.manifest["components"][self.denoiser]["inputs"]
        return int(inputs["encoder_hidden_states"]["dims"][2])

    @classmethod
    def sequence_lengths(cls, clip: int, t5: int) -> dict[str, int]:
        """T5 reads max_sequence_length tokens; the transformer CLIP's then T5's."""
        return {cls.t5: t5, cls.denoiser: clip + t5}

    def tokenizers(self) -> list[Any]:
        from ..tokenizer import ClipTokenizer, T5Tokenizer

        clip = [ClipTokenizer.from_folder(self.package.root / name.replace("text_encoder", "tokenizer"),
                                          self.package.text_max_length) for name in self.encoders if name != self.t5]
        if self.t5 not in self.encoders:
            return clip
        return [*clip, T5Tokenizer.from_folder(self.package.root / "tokenizer_3", self.max_sequence_length)]

    def hidden_output(self, encoder: Engine, clip_skip: int) -> tuple[str, int | None]:
        """CLIP: the penultimate layer, or clip skip N's (A1111's numbering: diffusers' clip_skip N - 1); T5: its
        last state."""
        if "text_embeds" not in encoder.outputs:
            return "last_hidden_state", None
        return f"hidden_states.{hidden_count(encoder) - 1 - clip_skip}", None

    def pooled_output(self, name: str) -> str | None:
        return None if name == self.t5 else "text_embeds"

    def layers(self, encoders: list[Engine]) -> int | None:
        return min(hidden_count(e) for e in encoders if "text_embeds" in e.outputs) - 1

    def combine(self, hidden: list[np.ndarray]) -> np.ndarray:
        """CLIP-L | CLIP-G on the feature axis, padded to T5's width, then T5's states (zeros without T5) after them."""
        clip = np.concatenate(hidden[:2], axis=-1)
        t5 = hidden[2] if len(hidden) > 2 else np.zeros((len(clip), self.max_sequence_length, self.joint_width), np.float32)
        return np.concatenate([text_width(clip, t5.shape[-1]), t5], axis=1)

    def conditioning(self, hidden: np.ndarray, pooled: np.ndarray | None, req: Any) -> dict[str, np.ndarray]:
        return {"encoder_hidden_states": hidden, "pooled_projections": pooled}

    def denoiser_feeds(self, engine: Engine, sample: np.ndarray, t: float | np.ndarray,
                       cond: dict[str, Any]) -> dict[str, Any]:
        from .base import timestep_feed

        return {"hidden_states": sample.astype(engine.inputs["hidden_states"].dtype),
                "timestep": timestep_feed(engine.inputs["timestep"], t, len(sample)), **cond}
