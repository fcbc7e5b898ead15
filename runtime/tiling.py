"""Tiled VAE decoding and encoding as diffusers' AutoencoderKL does it after `enable_tiling()`: overlapping tiles run one
at a time, each tile's top and left overlap blended linearly into its neighbour's, so the VAE's activations are a tile's
whatever the image's size. Tile sides come from the VAE's config (its sample_size in pixels, that over the scale factor
in latents); the overlap is a quarter of a tile."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

OVERLAP = 0.25
MODES = ("auto", "on", "off")
AUTO_PIXELS = 1024 * 1024  # auto tiles images of more pixels than this (where a side passes a tile's)


@dataclass(frozen=True)
class Tiles:
    """Tile sides: `sample` pixels, `latent` latents."""

    sample: int
    latent: int

    @classmethod
    def of(cls, vae_config: dict) -> Tiles:
        side = vae_config.get("sample_size", 512)
        side = side[0] if isinstance(side, (list, tuple)) else side
        return cls(int(side), int(side / 2 ** (len(vae_config["block_out_channels"]) - 1)))

    def needed(self, mode: str, width: int, height: int) -> bool:
        """Whether an image of this size is decoded (or encoded) in tiles under mode: as diffusers, only where a side
        passes a tile's; auto does so above AUTO_PIXELS, where the VAE's full-size activations take gigabytes."""
        larger = width > self.sample or height > self.sample
        return larger and (mode == "on" or (mode == "auto" and width * height > AUTO_PIXELS))


def blend_v(a: np.ndarray, b: np.ndarray, extent: int) -> np.ndarray:
    """b's top rows faded in from a's bottom rows (in place, as diffusers does)."""
    extent = min(a.shape[2], b.shape[2], extent)
    for y in range(extent):
        b[:, :, y, :] = a[:, :, -extent + y, :] * (1 - y / extent) + b[:, :, y, :] * (y / extent)
    return b


def blend_h(a: np.ndarray, b: np.ndarray, extent: int) -> np.ndarray:
    """b's left columns faded in from a's right columns (in place)."""
    extent = min(a.shape[3], b.shape[3], extent)
    for x in range(extent):
        b[:, :, :, x] = a[:, :, :, -extent + x] * (1 - x / extent) + b[:, :, :, x] * (x / extent)
    return b


def tiled(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, tile: int, out_tile: int) -> np.ndarray:
    """run over x's tiles of side `tile` (a stride of three quarters of it), the outputs (of side `out_tile`) blended
    over a quarter of theirs and cropped to what each adds."""
    stride, extent = int(tile * (1 - OVERLAP)), int(out_tile * OVERLAP)
    limit = out_tile - extent
    rows = [[np.array(run(np.ascontiguousarray(x[:, :, i:i + tile, j:j + tile])), np.float32)
             for j in range(0, x.shape[3], stride)] for i in range(0, x.shape[2], stride)]
    joined = []
    for i, row in enumerate(rows):
        for j, part in enumerate(row):
            if i > 0:
                blend_v(rows[i - 1][j], part, extent)
            if j > 0:
                blend_h(row[j - 1], part, extent)
        joined.append(np.concatenate([part[:, :, :limit, :limit] for part in row], axis=3))
    return np.concatenate(joined, axis=2)


def decode(run: Callable[[np.ndarray], np.ndarray], latents: np.ndarray, tiles: Tiles) -> np.ndarray:
    """The VAE decoder's image of latents, tile by tile (diffusers' AutoencoderKL.tiled_decode)."""
    return tiled(run, latents, tiles.latent, tiles.sample)


def encode(run: Callable[[np.ndarray], np.ndarray], pixels: np.ndarray, tiles: Tiles) -> np.ndarray:
    """The VAE encoder's latent parameters (mean and log-variance) of pixels, tile by tile (AutoencoderKL's
    _tiled_encode)."""
    return tiled(run, pixels, tiles.sample, tiles.latent)
