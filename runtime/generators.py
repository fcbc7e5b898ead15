"""Random numbers per image: image i of a request with seed s draws exactly what a one-image request with seed s + i
draws (its initial latents, then the sampler's noise), as AUTOMATIC1111 numbers its batches, so any image of a
batch can be made again alone. Each image's numbers come from numpy's generator, or from one that draws what torch's
CPU or CUDA generator draws (rng.py)."""

from __future__ import annotations

import numpy as np

from .rng import source

MAX_SEED = 2**63 - 1


def random_seed() -> int:
    """A seed for a request that gave none (or -1)."""
    return int(np.random.SeedSequence().entropy % 2**32)


class ImageGenerators:
    """One generator per image (numpy, torch-cpu or torch-cuda); draws of shape (n, ...) take row i from image i's."""

    def __init__(self, seeds: list[int], kind: str = "numpy") -> None:
        self.seeds = seeds
        self.rngs = [source(kind, s) for s in seeds]

    def standard_normal(self, shape: tuple[int, ...], dtype=np.float64) -> np.ndarray:
        if shape[0] != len(self.rngs):
            raise ValueError(f"{len(self.rngs)} image generators cannot draw a batch of {shape[0]}")
        return np.stack([rng.standard_normal((1, *shape[1:]), dtype=dtype)[0] for rng in self.rngs])
