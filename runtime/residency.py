"""Sequential residency: a stage's engine is opened when the stage starts and closed when another stage opens, so the
text encoders are gone before the denoising loop and the VAE decoder comes after it; the process holds one stage's
weights at a time instead of all of them, for the time it takes to open each again (per request; a backend's
compiled-graph cache makes that an import instead of a compile)."""

from __future__ import annotations

import ctypes
import gc
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .backends.engine import Engine, TensorSpec

MODES = ("resident", "sequential")
DENOISING = "denoising"  # the group of the denoiser and its ControlNets, which run together every step


def trim_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc; elsewhere nothing is done)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):
            pass


class Shelf:
    """Which group of stages has its engines open; opening an engine of another group closes the open ones first."""

    def __init__(self) -> None:
        self.open: list[StageEngine] = []
        self.load_seconds = 0.0  # spent opening engines again, over the pipeline's life

    def make_room(self, engine: StageEngine) -> None:
        others = [e for e in self.open if e.group != engine.group]
        for other in others:
            other.release()
        if others:
            trim_heap()

    def opened(self, engine: StageEngine, seconds: float) -> None:
        self.open.append(engine)
        self.load_seconds += seconds


class StageEngine:
    """A stage's engine opened when first run (or its inputs read) and closed when a stage of another group opens; its
    inputs and outputs stay known while it is closed."""

    def __init__(self, name: str, group: str, opener: Callable[[], Engine], shelf: Shelf) -> None:
        self.name, self.group, self._opener, self._shelf = name, group, opener, shelf
        self._engine: Engine | None = None
        self._specs: tuple[dict[str, TensorSpec], dict[str, TensorSpec]] | None = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._shelf.make_room(self)
            start = time.perf_counter()
            self._engine = self._opener()
            self._specs = (self._engine.inputs, self._engine.outputs)
            self._shelf.opened(self, time.perf_counter() - start)
        return self._engine

    @property
    def inputs(self) -> dict[str, TensorSpec]:
        return self._specs[0] if self._specs else self.engine.inputs

    @property
    def outputs(self) -> dict[str, TensorSpec]:
        return self._specs[1] if self._specs else self.engine.outputs

    def run(self, feeds: dict[str, Any], release: bool = False) -> dict[str, np.ndarray]:
        return self.engine.run(feeds, release)

    def to_device(self, array: np.ndarray) -> Any:
        return self.engine.to_device(array)

    def release(self) -> None:
        """Close the engine (it opens again on its next use)."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None
            if self in self._shelf.open:
                self._shelf.open.remove(self)

    close = release
