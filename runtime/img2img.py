"""Image-to-image: an input image in any mode as the VAE encoder's input, and the part of the schedule that
`strength` keeps, as diffusers' StableDiffusionImg2ImgPipeline does."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import UserError
from .request import nearest_sizes


def open_image(image: Any) -> Image.Image:
    """A Pillow image from an image or a path, refused in one line when it cannot be read."""
    if isinstance(image, Image.Image):
        return image
    try:
        with Image.open(Path(image)) as opened:
            opened.load()
            return opened.copy()
    except (OSError, ValueError) as exc:
        raise UserError(f"{image} could not be read as an image ({exc}); give a PNG, JPEG or WebP file") from None


def as_rgb(image: Image.Image) -> np.ndarray:
    """uint8 RGB pixels from any mode: palette, grey, alpha (dropped, as diffusers does), 16-bit grey (scaled)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        grey = np.asarray(image, np.float64)
        scale = 65535.0 if grey.max() > 255 else 255.0
        grey = np.clip(grey / scale * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.asarray(image.convert("RGB"), np.uint8)


def image_input(image: Any, multiple: int, resize: bool = False) -> np.ndarray:
    """(1, 3, H, W) float32 in [-1, 1]. A side that is not a multiple of the VAE factor is refused, naming the nearest
    sizes, or (resize) the image is scaled down to the nearest multiples below, as diffusers does."""
    pil = open_image(image)
    w, h = pil.size
    if w % multiple or h % multiple:
        if not resize:
            raise UserError(f"the image is {w}x{h}; its sides must be multiples of {multiple}: crop or scale it to "
                            f"{nearest_sizes(w, multiple)} x {nearest_sizes(h, multiple)}, or pass --resize")
        w, h = max(multiple, w // multiple * multiple), max(multiple, h // multiple * multiple)
        pil = pil.resize((w, h), Image.Resampling.LANCZOS)
    pixels = as_rgb(pil).astype(np.float32) / 255.0
    return (pixels * 2.0 - 1.0).transpose(2, 0, 1)[None]


def strength_timesteps(sched, steps: int, strength: float, exact: bool = False) -> tuple[np.ndarray, int]:
    """The timesteps left after skipping the first (1 - strength) of a `steps` schedule, and where they start. The
    steps kept are steps * strength rounded down (diffusers' SD and SDXL pipelines), or with exact, the steps skipped
    are steps * (1 - strength) rounded down (its SD3 and FLUX pipelines)."""
    if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not 0 < strength <= 1:
        raise UserError(f"strength must be a number above 0 and at most 1, not {strength!r}")
    kept = steps - int(max(steps - min(steps * strength, steps), 0)) if exact else min(int(steps * strength), steps)
    if kept < 1:
        raise UserError(f"strength {strength:g} with {steps} steps leaves no step to run; raise --strength or --steps")
    start = (steps - kept) * sched.order
    sched.begin(start)
    return sched.timesteps[start:], start


def latents_from(parameters: np.ndarray, scaling: float, rng, shift: float = 0.0) -> np.ndarray:
    """A sample of the encoder's latent distribution (mean, log-variance halves), shifted and scaled for the sampler."""
    mean, logvar = np.split(parameters.astype(np.float32), 2, axis=1)
    std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
    sample = mean + std * rng.standard_normal(mean.shape, dtype=np.float32)
    return (np.float32(scaling) * (sample - np.float32(shift) if shift else sample)).astype(np.float32)


def blurred(mask: Any, radius: float) -> Any:
    """The mask image, its edge blurred by radius pixels (Gaussian) where asked."""
    if radius <= 0:
        return mask
    from PIL import ImageFilter

    return open_image(mask).convert("L").filter(ImageFilter.GaussianBlur(radius))


def mask_input(mask: Any, width: int, height: int) -> np.ndarray:
    """(1, 1, H, W) float32 of 0 and 1 (white = repaint), binarized at half grey as diffusers does; a mask of another
    size is resized to the image's, with a warning."""
    import warnings

    pil = open_image(mask)
    if pil.size != (width, height):
        warnings.warn(f"the mask is {pil.size[0]}x{pil.size[1]} and the image {width}x{height}: the mask was resized to "
                      "the image's size", stacklevel=3)
        pil = pil.convert("L").resize((width, height), Image.Resampling.NEAREST)
    grey = as_rgb(pil)[:, :, 0] if pil.mode.startswith("I") else np.asarray(pil.convert("L"))
    return (grey.astype(np.float32) / 255.0 >= 0.5).astype(np.float32)[None, None]


@dataclass
class Inpainting:
    """What the loop needs to repaint only the mask: the mask at latent size, the masked image's latents (a 9-channel
    inpainting UNet takes both as extra input channels), or, for an ordinary UNet, the image's latents and the noise
    with which the known region is put back at every step."""

    mask: np.ndarray  # (n, 1, h, w), 1 = repaint
    masked: np.ndarray | None  # (n, C, h, w), for a 9-channel UNet
    image_latents: np.ndarray | None  # (n, C, h, w), for a 4-channel UNet
    noise: np.ndarray

    def unet_input(self, scaled: np.ndarray, guided: bool) -> np.ndarray:
        if self.masked is None:
            return scaled
        extra = np.concatenate([self.mask, self.masked], axis=1)
        return np.concatenate([scaled, np.concatenate([extra, extra]) if guided else extra], axis=1)

    def blend(self, sched, x: np.ndarray, last: bool) -> np.ndarray:
        """An ordinary UNet's step kept only inside the mask; outside, the image's latents noised to the step the
        sampler is now at (as they are after the last one)."""
        if self.image_latents is None:
            return x
        known = self.image_latents if last else sched.add_noise(self.image_latents, self.noise)
        return ((1 - self.mask) * known + self.mask * x).astype(np.float32)
