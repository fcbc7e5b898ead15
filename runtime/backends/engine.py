"""The engine seam: one graph behind `run(feeds) -> outputs`, with its inputs and outputs described one way on every
backend (a dynamic dimension is None, whatever the backend calls it)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

MAX_SHAPES = 8  # input shapes an engine keeps compiled graphs, device buffers or CUDA graphs for
DENOISERS = ("unet", "transformer")  # the components called every step (what CUDA graphs capture)


def dims(shape: Iterable[Any]) -> tuple[int | None, ...]:
    """A graph's dimensions with every dynamic one as None: onnxruntime names them (or gives None), OpenVINO gives
    None, TensorRT -1."""
    return tuple(d if isinstance(d, int) and d >= 0 else None for d in (int(d) if isinstance(d, np.integer) else d
                                                                         for d in shape))


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: name, dims (an int, or None for a dynamic axis) and numpy dtype."""

    name: str
    shape: tuple[int | None, ...]
    dtype: type

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", dims(self.shape))


class Engine(Protocol):
    """What every backend's engine implements: its graph's inputs and outputs, run, to_device and close."""

    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]

    def run(self, feeds: dict[str, Any], release: bool = False) -> dict[str, np.ndarray]:
        """The outputs; release: hand the host memory this call's activations held back at its end (a request's
        last call; a backend that keeps none ignores it)."""

    def to_device(self, array: np.ndarray) -> Any:
        """An input that stays the same over many calls (the text embeddings), in the form run takes fastest."""

    def close(self) -> None: ...
