"""Previews of the latents while they are denoised, and what a step callback is handed.

A preview is a linear map from each latent pixel's channels to its RGB (AUTOMATIC1111's "Approx cheap"), fitted by
least squares to the package's own VAE: each latent pixel against the mean of the decoded pixels it covers. Until
the pipeline has decoded images of its own, the map is fitted on first use to synthetic data (smooth colour images
through the VAE encoder, and random latents, decoded again); every image the pipeline decodes after that refines it
with latents of the kind previews show. It costs a matrix product per preview."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

TINY = "tiny_vae_decoder"  # a package's tiny decoder (TAESD), when it has one: previews come from it
FIT_LATENT_SIDE = 16  # latent pixels per side of the fitting images (128 pixels for a factor-8 VAE)
FIT_IMAGES = 8


@dataclass
class Progress:
    """What a step callback is handed after a step: steps done of total, the seconds the steps took, the latents as
    they stand (the sampler's, (n, C, h, w)), and preview(): the images they would make, computed when called."""

    step: int
    total: int
    elapsed: float
    latents: np.ndarray
    preview: Callable[[], list[Image.Image]]

    @property
    def eta(self) -> float:
        """Seconds the remaining steps should take at the rate so far."""
        return self.elapsed / max(self.step, 1) * (self.total - self.step)


def fitting_images(side: int, count: int = FIT_IMAGES, seed: int = 0) -> np.ndarray:
    """Colour fields in [-1, 1], (count, 3, side, side), from 4x4 grids: flat regions of the RGB cube's corners (the
    saturated colours, black and white of flat-shaded images) alternating with smooth blends of any colour."""
    rng = np.random.default_rng(seed)
    corners = np.array([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)], np.uint8) * 255
    images = []
    for k in range(count):
        flat = k % 2 == 0
        grid = corners[rng.integers(0, 8, (4, 4))] if flat else rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
        resample = Image.NEAREST if flat else Image.BILINEAR
        images.append(np.asarray(Image.fromarray(grid).resize((side, side), resample), np.float32))
    return (np.stack(images) / 127.5 - 1).transpose(0, 3, 1, 2)


def design(latents: np.ndarray) -> np.ndarray:
    """(n h w, C + 1): each latent pixel's channels and a 1."""
    n, c, h, w = latents.shape
    return np.concatenate([latents.transpose(0, 2, 3, 1).reshape(-1, c), np.ones((n * h * w, 1), np.float32)], axis=1)


def block_means(decoded: np.ndarray, h: int, w: int) -> np.ndarray:
    """(n h w, 3): decoded images (n, 3, H, W) averaged over the pixels each of the h x w latent pixels covers."""
    n, _, height, width = decoded.shape
    return decoded.reshape(n, 3, h, height // h, w, width // w).mean(axis=(3, 5)).transpose(0, 2, 3, 1).reshape(-1, 3)


class LatentRGB:
    """A linear latent->RGB map by least squares over two sets of latent pixels, whose sums are kept: the synthetic
    prior's and the pipeline's own decoded images' (the prior keeps a few images' content from pulling the map to
    their colours: on the bundled model it explains 0.45-0.50 of a held-out image's variance alone, 0.47-0.50 with
    four decoded images added, and four decoded images alone 0.16-0.25)."""

    def __init__(self, channels: int) -> None:
        size = channels + 1  # weights stay None until the sets hold enough latent pixels
        self.sums = {kind: [np.zeros((size, size)), np.zeros((size, 3)), 0] for kind in ("prior", "own")}
        self.weights: np.ndarray | None = None

    def learn(self, latents: np.ndarray, decoded: np.ndarray, kind: str = "own") -> None:
        """Add decoder-space latents (n, C, h, w) and what the decoder made of them (n, 3, H, W) in [-1, 1]."""
        x = design(latents.astype(np.float64))
        y = block_means(decoded.astype(np.float64), *latents.shape[2:])
        sums = self.sums[kind]
        sums[0] += x.T @ x
        sums[1] += x.T @ y
        sums[2] += len(x)
        own, prior = self.sums["own"], self.sums["prior"]
        xtx, xty, rows = own[0] + prior[0], own[1] + prior[1], own[2] + prior[2]
        if rows >= len(xtx):
            ridge = 1e-6 * np.trace(xtx) / len(xtx) * np.eye(len(xtx))
            self.weights = np.linalg.solve(xtx + ridge, xty).astype(np.float32)

    @property
    def has_prior(self) -> bool:
        return self.sums["prior"][2] > 0

    def __call__(self, latents: np.ndarray) -> np.ndarray:
        """Images in [0, 1], (n, h, w, 3), from decoder-space latents (n, C, h, w)."""
        rgb = np.einsum("nchw,cd->nhwd", latents.astype(np.float32), self.weights[:-1]) + self.weights[-1]
        return np.clip(rgb / 2 + 0.5, 0, 1)


def to_images(array: np.ndarray, width: int, height: int) -> list[Image.Image]:
    """Pillow images of the final image's size from (n, h, w, 3) floats in [0, 1]."""
    images = [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]
    return [im if im.size == (width, height) else im.resize((width, height), Image.BILINEAR) for im in images]


def strip(images: list[Image.Image]) -> Image.Image:
    """Images side by side in one (a preview file of several images)."""
    if len(images) == 1:
        return images[0]
    out = Image.new("RGB", (sum(im.width for im in images), max(im.height for im in images)))
    left = 0
    for im in images:
        out.paste(im, (left, 0))
        left += im.width
    return out
