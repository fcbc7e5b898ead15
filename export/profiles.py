"""TensorRT optimization profiles (min/opt/max per input) from a package's declared dims and the asked ranges.

Classifier-free guidance runs the text encoders and the denoiser on [uncond, cond], so their batch spans
images .. 2 x images; guidance off (scale <= 1) halves it, so the minimum stays the image count. Each component's
text length is its family's (CLIP's 77, T5's max_sequence_length, SD3's transformer both); FLUX's transformer takes
image tokens (latents packed 2x2) instead of a latent height and width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffrt.runtime.backends.engine import DENOISERS
from diffrt.runtime.control import CONTROL
from diffrt.runtime.errors import UserError


@dataclass(frozen=True)
class Span:
    lo: int
    opt: int
    hi: int

    def scaled(self, k: int) -> Span:
        return Span(self.lo * k, self.opt * k, self.hi * k)

    def pinned(self) -> Span:
        return Span(self.opt, self.opt, self.opt)


def parse_batch(text: str) -> Span:
    """'2' -> 2..2, '1-4' -> 1..4 (optimised for the low end: a latency service's usual request)."""
    try:
        parts = [int(p) for p in str(text).split("-")]
    except ValueError:
        raise UserError(f"--batch {text!r} is not N or N-M, e.g. 1 or 1-4") from None
    if len(parts) not in (1, 2) or min(parts) < 1 or parts[0] > parts[-1]:
        raise UserError(f"--batch {text!r} must be N or N-M with 1 <= N <= M")
    return Span(parts[0], parts[0], parts[-1])


def parse_size(text: str, multiple: int, default: int) -> tuple[Span, Span]:
    """(width, height) spans: 'WxH' is one size; 'A-B' is every square-or-not size from A to B, both sides.

    Range ends that are not multiples of the VAE factor are pulled inward to the nearest multiples."""
    text = str(text).lower()
    if "x" in text:
        try:
            w, h = (int(v) for v in text.split("x"))
        except ValueError:
            raise UserError(f"--size {text!r} is not WIDTHxHEIGHT, e.g. 512x512") from None
        for side in (w, h):
            if side < multiple or side % multiple:
                lo = max(multiple, side // multiple * multiple)
                raise UserError(f"--size {text}: {side} is not a multiple of {multiple}; use {lo} or {lo + multiple}")
        return Span(w, w, w), Span(h, h, h)
    try:
        a, b = (int(v) for v in text.split("-"))
    except ValueError:
        raise UserError(f"--size {text!r} is not WIDTHxHEIGHT or MIN-MAX, e.g. 512x512 or 256-1024") from None
    lo, hi = -(-a // multiple) * multiple, b // multiple * multiple
    lo = max(lo, multiple)
    if lo > hi:
        raise UserError(f"--size {text} holds no multiple of {multiple}; widen the range")
    opt = min(max(default, lo), hi) // multiple * multiple
    return Span(lo, opt, hi), Span(lo, opt, hi)


def residual_axes(h: Span, w: Span, f: int, levels: int = 6) -> dict[str, Span]:
    """ControlNet residuals' sides at each halving k of the latents (height_k, width_k): rounded up, as the UNet's
    strided convolutions give them."""
    def side(span: Span, k: int) -> Span:
        return Span(*(-(-(v // f) // 2 ** k) for v in (span.lo, span.opt, span.hi)))

    return {f"{axis}_{k}": side(span, k) for k in range(levels) for axis, span in (("height", h), ("width", w))}


def derive_profiles(manifest: dict[str, Any], batch: Span, width: Span, height: Span, static: bool = False,
                    guided: bool = True) -> dict[str, dict[str, dict[str, list[int]]]]:
    """{component: {input: {"min": dims, "opt": dims, "max": dims}}} for every component of the package."""
    from diffrt.runtime.families import family_class

    f = int(manifest["vae_scale_factor"])
    text_len = int(manifest["text_max_length"])
    channels = int(manifest.get("latent_channels", 4))
    family = family_class(manifest.get("family", "sd1"))
    lengths = family.sequence_lengths(text_len, int(manifest.get("max_sequence_length") or text_len))
    out: dict[str, dict[str, dict[str, list[int]]]] = {}
    for comp, entry in manifest["components"].items():
        if comp.startswith(("text_encoder", CONTROL)) or comp in DENOISERS:  # negatives and prompts together
            b = Span(batch.lo, batch.opt * (2 if guided else 1), batch.hi * 2)
            if static:
                b = b.pinned()
        else:
            b = batch.pinned() if static else batch
        w, h = (width.pinned(), height.pinned()) if static else (width, height)
        seq, p = lengths.get(comp, text_len), f * family.patch
        axes = {"batch_size": b, "sequence_length": Span(seq, seq, seq),
                "image_tokens": Span((h.lo // p) * (w.lo // p), (h.opt // p) * (w.opt // p), (h.hi // p) * (w.hi // p)),
                "height": Span(h.lo // f, h.opt // f, h.hi // f), "width": Span(w.lo // f, w.opt // f, w.hi // f),
                "latent_height": Span(h.lo // f, h.opt // f, h.hi // f), "latent_width": Span(w.lo // f, w.opt // f, w.hi // f),
                "sample_height": h, "sample_width": w,
                # optimum's names for the same axes
                "height_latent": Span(h.lo // f, h.opt // f, h.hi // f), "width_latent": Span(w.lo // f, w.opt // f, w.hi // f),
                "num_channels": Span(channels, channels, channels), "num_channels_latent": Span(channels, channels, channels),
                "image_height": h, "image_width": w, **residual_axes(h, w, f)}
        inputs = {}
        for name, spec in entry["inputs"].items():
            dims = []
            for d in spec["dims"]:
                if isinstance(d, int) and d > 0:
                    dims.append(Span(d, d, d))
                elif d in axes:
                    dims.append(axes[d])
                else:
                    raise UserError(f"{comp} input {name} has a dynamic axis {d!r} that diffrt build does not know; "
                                    "re-export the package with `diffrt export`")
            inputs[name] = {k: [getattr(s, a) for s in dims] for k, a in (("min", "lo"), ("opt", "opt"), ("max", "hi"))}
        out[comp] = inputs
    return out
