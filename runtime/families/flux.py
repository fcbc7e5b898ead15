"""FLUX.1 (dev and schnell): CLIP's pooled embedding and T5's states condition a transformer over latents packed
2x2 into tokens, with rotary position ids for the image's tokens (row, column) and the text's (zeros), as diffusers'
FluxPipeline builds them; FLUX.1-dev takes the guidance scale as an input (guidance-distilled: one batch, no CFG),
schnell takes none. The sampler's latents stay unpacked (batch, 16, h, w): noise is drawn as diffusers draws it, and
only the transformer's feeds and output are packed."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backends.engine import Engine
from .base import timestep_feed
from .dit import TransformerFamily

MAX_SEQUENCE_LENGTH = 512  # T5 tokens, diffusers' default for FLUX.1-dev (schnell's pipeline is asked for 256)


def pack(latents: np.ndarray) -> np.ndarray:
    """(b, c, h, w) -> (b, h/2 * w/2, c * 4): each 2x2 patch a token, channels then the patch's rows and columns."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


def unpack(tokens: np.ndarray, h: int, w: int) -> np.ndarray:
    """pack's inverse for latents of h x w."""
    b, _, d = tokens.shape
    return tokens.reshape(b, h // 2, w // 2, d // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def image_ids(h: int, w: int) -> np.ndarray:
    """(h/2 * w/2, 3) float32: each token's (0, row, column)."""
    ids = np.zeros((h // 2, w // 2, 3), np.float32)
    ids[..., 1] = np.arange(h // 2)[:, None]
    ids[..., 2] = np.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


class Flux(TransformerFamily):
    name = "flux"
    encoders = ("text_encoder", "text_encoder_2")
    guidance = "embedded"  # dev's; a package whose transformer takes no guidance input (schnell) has "none"
    default_guidance = 3.5
    max_t5_tokens = MAX_SEQUENCE_LENGTH
    settings = frozenset({"true_cfg_scale"})

    def __init__(self, package) -> None:
        super().__init__(package)
        inputs = package.manifest.get("components", {}).get(self.denoiser, {}).get("inputs", {})
        self.guidance = "embedded" if "guidance" in inputs else "none"  # FLUX.1-dev takes it, schnell does not

    @classmethod
    def export_defaults(cls, denoiser_config: dict[str, Any]) -> dict[str, Any]:
        """FLUX.1-schnell (no guidance input) reads 256 T5 tokens, as its model card's pipeline call asks."""
        return {"max_sequence_length": MAX_SEQUENCE_LENGTH if denoiser_config.get("guidance_embeds") else 256}

    @classmethod
    def sequence_lengths(cls, clip: int, t5: int) -> dict[str, int]:
        return {"text_encoder_2": t5, cls.denoiser: t5}

    def sigmas(self, steps: int) -> np.ndarray:
        """FluxPipeline's schedule before the dynamic shift: 1 down to 1 / steps."""
        return np.linspace(1.0, 1 / steps, steps)

    def tokenizers(self) -> list[Any]:
        from ..tokenizer import ClipTokenizer, T5Tokenizer

        return [ClipTokenizer.from_folder(self.package.root / "tokenizer", self.package.text_max_length),
                T5Tokenizer.from_folder(self.package.root / "tokenizer_2", self.max_sequence_length)]

    def hidden_output(self, encoder: Engine, clip_skip: int) -> tuple[str, int | None]:
        """T5's states (CLIP's hidden states are read but unused: FLUX takes CLIP's pooled embedding alone)."""
        return "last_hidden_state", None

    def pooled_output(self, name: str) -> str | None:
        return "pooler_output" if name == "text_encoder" else None

    def combine(self, hidden: list[np.ndarray]) -> np.ndarray:
        return hidden[-1]

    def conditioning(self, hidden: np.ndarray, pooled: np.ndarray | None, req: Any) -> dict[str, np.ndarray]:
        cond = {"encoder_hidden_states": hidden, "pooled_projections": pooled}
        if self.guidance == "embedded":
            cond["guidance"] = np.array(req.guidances * (2 if req.guided else 1), np.float32)  # negatives' rows too
        return cond

    def denoise(self, engine: Engine, run, x: np.ndarray, t: float | np.ndarray, cond: dict[str, Any],
                extras: dict[str, Any] | None = None) -> np.ndarray:
        """The transformer on x packed into tokens, its output unpacked; its timestep is the sigma (t / 1000)."""
        h, w = x.shape[2:]
        feeds = {"hidden_states": pack(x).astype(engine.inputs["hidden_states"].dtype),
                 "timestep": timestep_feed(engine.inputs["timestep"], np.asarray(t, np.float64) / 1000, len(x)),
                 "img_ids": image_ids(h, w), "txt_ids": np.zeros((self.max_sequence_length, 3), np.float32), **cond}
        return unpack(run({**feeds, **(extras or {})}), h, w)
