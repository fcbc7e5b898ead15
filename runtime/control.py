"""ControlNet: control images steer a UNet through residuals that ControlNet graphs compute each step, scaled and
summed as diffusers' ControlNet pipelines (and MultiControlNetModel) do, then fed to the UNet's residual inputs.

A request's ControlInputs are checked once into Units (image prepared as diffusers' control image processor does);
each step `Controls.residuals` runs every active ControlNet once over the rows of every stream that uses it, so
requests with different control images share a step."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import UserError
from .img2img import as_rgb, open_image

CONTROL = "controlnet/"  # a ControlNet's component name in a package: controlnet/<name>
MODES = ("balanced", "prompt", "control")  # A1111's control_mode: Balanced, My prompt / ControlNet is more important
RESIZES = ("just", "crop", "fill")  # a control image of another shape: stretched (diffusers), cropped, or padded (A1111's)
MODULES = ("none", "canny")  # preprocessors: none (the image is the map), canny (OpenCV's edges, as A1111's module)
CANNY = (100, 200)  # A1111's default canny thresholds (low, high)


def residual_names(count: int) -> list[str]:
    """The UNet's residual inputs (and a ControlNet graph's outputs): each down-block output's, then the mid block's."""
    return [*down_names(count - 1), "mid_block_additional_residual"]


def down_names(count: int) -> list[str]:
    return [f"down_block_additional_residual_{i}" for i in range(count)]


@dataclass(frozen=True)
class ControlInput:
    """One ControlNet's part in a request: its name in the package, the control image (a path or a Pillow image),
    its scale, the fraction of the steps it acts in (None: the request's control_start / control_end), the
    preprocessor that makes the map from the image, A1111's control mode, canny's thresholds, and how an image of
    another shape is fitted: stretched (just, as diffusers does), scaled to cover and cropped, or scaled to fit and
    padded with black (fill)."""

    name: str
    image: Any
    scale: float = 1.0
    start: float | None = None
    end: float | None = None
    module: str = "none"
    mode: str = "balanced"
    thresholds: tuple[int, int] = CANNY
    resize: str = "just"

    @classmethod
    def parse(cls, spec: str) -> ControlInput:
        """The CLI's NAME:[MODULE=]IMAGE[:SCALE], e.g. `edges:photo.png:0.8` or `edges:canny=photo.jpg`."""
        name, sep, rest = spec.partition(":")
        if not sep or not name or not rest:
            raise UserError(f"--control {spec!r}: write NAME:IMAGE[:SCALE] (NAME: a ControlNet of the package; IMAGE: "
                            "its control map, or canny=PHOTO to make the map from a photo)")
        scale = 1.0
        head, colon, tail = rest.rpartition(":")
        if colon and head:
            try:
                scale, rest = float(tail), head
            except ValueError:
                pass
        module, eq, image = rest.partition("=")
        if eq and module in MODULES:
            return cls(name, image, scale, module=module)
        return cls(name, rest, scale)


@dataclass
class Unit:
    """A checked ControlInput as a stream runs it."""

    component: str
    image: np.ndarray  # (1, 3, H, W) float32 in [0, 1], at the request's size
    scale: float
    start: float
    end: float
    mode: str
    record: dict[str, Any]  # how the image's settings record it

    def weight(self, i: int, total: int) -> float:
        """Its scale at step i of total: diffusers' controlnet_keep (0 outside [start, end]) times the scale."""
        keep = 1.0 - float(i / total < self.start or (i + 1) / total > self.end)
        return self.scale * keep

    def factors(self, weight: float, count: int) -> np.ndarray:
        """Each residual's factor: the weight, ramped from the shallow residuals to the deep ones in guess mode
        (diffusers' logspace(-1, 0)) and A1111's "my prompt is more important" (0.825 per level)."""
        if self.mode == "control":
            ramp = np.logspace(-1, 0, count, dtype=np.float32)
        elif self.mode == "prompt":
            ramp = (0.825 ** np.arange(count - 1, -1, -1, dtype=np.float64)).astype(np.float32)
        else:
            ramp = np.ones(count, np.float32)
        return (ramp * np.float32(weight)).astype(np.float32)


def canny(image: Any, low: int = CANNY[0], high: int = CANNY[1]) -> Image.Image:
    """OpenCV's Canny edges of an image (white on black, RGB), as A1111's canny module makes them."""
    try:
        import cv2
    except ImportError:
        raise UserError('the canny preprocessor needs OpenCV: pip install "diffrt[control]"') from None
    if not (0 <= low <= high <= 1000):
        raise UserError(f"canny thresholds must be 0 <= low <= high <= 1000, not {low} and {high}")
    edges = cv2.Canny(as_rgb(open_image(image)), int(low), int(high))
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


def control_image(image: Any, module: str, width: int, height: int, thresholds: tuple[int, int] = CANNY,
                  resize: str = "just") -> np.ndarray:
    """The control map as diffusers' control image processor makes it: RGB, resized (Lanczos) to the image's size,
    in [0, 1] (not normalized), (1, 3, height, width) float32; made by the preprocessor first, and where its shape
    differs, cropped or padded to the image's first (resize crop, fill)."""
    from PIL import ImageOps

    pil = (canny(image, *thresholds) if module == "canny" else open_image(image)).convert("RGB")
    if resize == "crop":
        pil = ImageOps.fit(pil, (width, height), Image.Resampling.LANCZOS)
    elif resize == "fill":
        pil = ImageOps.pad(pil, (width, height), Image.Resampling.LANCZOS, color=(0, 0, 0))
    pil = pil.resize((width, height), Image.Resampling.LANCZOS)
    return (np.asarray(pil, np.float32) / 255.0).transpose(2, 0, 1)[None]


def check_units(inputs: list[ControlInput], available: list[str], width: int, height: int, start: float,
                end: float, guess: bool) -> list[Unit]:
    """Requests' control inputs checked (names, scales, windows, modes, images) and prepared, in one line each."""
    units = []
    for k, given in enumerate(inputs):
        if not isinstance(given, ControlInput):
            raise UserError(f"control[{k}] must be a ControlInput(name, image, scale), not {type(given).__name__}")
        if given.name not in available:
            have = ", ".join(available) if available else "none (add one with `diffrt controlnet add PACKAGE DIR`)"
            raise UserError(f"control[{k}]: this package has no ControlNet {given.name!r}; it has: {have}")
        if not isinstance(given.scale, (int, float)) or not math.isfinite(given.scale) or not -10 <= given.scale <= 10:
            raise UserError(f"control[{k}].scale must be a number in [-10, 10] (1 is the usual strength), not {given.scale!r}")
        s, e = start if given.start is None else given.start, end if given.end is None else given.end
        if not (isinstance(s, (int, float)) and isinstance(e, (int, float)) and 0 <= s < e <= 1):
            raise UserError(f"control[{k}]: start and end are fractions of the steps, 0 <= start < end <= 1 (not {s} and {e})")
        if given.module not in MODULES:
            raise UserError(f"control[{k}].module must be one of {', '.join(MODULES)}, not {given.module!r}")
        if given.resize not in RESIZES:
            raise UserError(f"control[{k}].resize must be one of {', '.join(RESIZES)}, not {given.resize!r}")
        mode = "control" if guess else given.mode
        if mode not in MODES:
            raise UserError(f"control[{k}].mode must be one of {', '.join(MODES)}, not {given.mode!r}")
        image = control_image(given.image, given.module, width, height, given.thresholds, given.resize)
        record = {"name": given.name, "scale": float(given.scale), "start": float(s), "end": float(e),
                  **({"module": given.module} if given.module != "none" else {}), **({"mode": mode} if mode != "balanced" else {}),
                  **({"resize": given.resize} if given.resize != "just" else {}),
                  **({"thresholds": list(given.thresholds)} if given.module == "canny" and tuple(given.thresholds) != CANNY else {}),
                  **({"image": str(Path(given.image).resolve())} if isinstance(given.image, (str, Path)) else {})}
        units.append(Unit(CONTROL + given.name, image, float(given.scale), float(s), float(e), mode, record))
    return units


# runs a ControlNet: (component, feeds) -> its outputs in residual order
Runner = Callable[[str, dict[str, Any]], list[np.ndarray]]


class Controls:
    """The residuals of one UNet call over streams' rows: each active ControlNet run once over the rows that use it
    (a stream's negatives and prompts, or in guess mode its prompts only), scaled per row and summed; zeros where none
    acts. residuals: the UNet's (channels, halvings) per residual input."""

    def __init__(self, residuals: list[tuple[int, int]], inputs: Callable[[str], dict[str, Any]], run: Runner) -> None:
        self.shapes, self.inputs, self.run = residuals, inputs, run
        self.names = residual_names(len(residuals))
        self._zeros: tuple[tuple[int, int, int], dict[str, np.ndarray]] | None = None

    def zeros(self, rows: int, height: int, width: int) -> dict[str, np.ndarray]:
        """Zero residuals (no ControlNet acting), made once per shape: the engine skips copying the same arrays."""
        if self._zeros is None or self._zeros[0] != (rows, height, width):
            self._zeros = ((rows, height, width), {
                n: np.zeros((rows, c, -(-height // 2 ** k), -(-width // 2 ** k)), np.float32)
                for n, (c, k) in zip(self.names, self.shapes)})
        return self._zeros[1]

    def residuals(self, streams: list[Any], sample: np.ndarray, t: float | np.ndarray,
                  host_cond: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The UNet's residual inputs for this step's rows (sample: the UNet's sample rows, t: its timestep(s))."""
        groups: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        offset = 0
        for s in streams:
            n, guided = len(s.x), s.req.guided
            for unit in s.req.control:
                weight = unit.weight(s.i, s.total)
                if weight == 0:
                    continue
                half = guided and unit.mode == "control"  # guess mode: the prompts' rows only
                rows = np.arange(offset + (n if half else 0), offset + (2 * n if guided else n))
                groups.setdefault(unit.component, []).append(
                    (rows, np.repeat(unit.image, len(rows), axis=0), unit.factors(weight, len(self.names))))
            offset += s.rows()
        if not groups:
            return self.zeros(len(sample), *sample.shape[2:])
        total = {n: np.zeros_like(z) for n, z in self.zeros(len(sample), *sample.shape[2:]).items()}
        for component, parts in groups.items():
            rows = np.concatenate([p[0] for p in parts])
            outs = self.run(component, self.feeds(component, rows, sample, t, host_cond,
                                                  np.concatenate([p[1] for p in parts])))
            start = 0
            for part_rows, _, factors in parts:
                for name, out, factor in zip(self.names, outs, factors):
                    total[name][part_rows] += out[start:start + len(part_rows)].astype(np.float32) * factor
                start += len(part_rows)
        return total

    def feeds(self, component: str, rows: np.ndarray, sample: np.ndarray, t: float | np.ndarray,
              host_cond: dict[str, np.ndarray], images: np.ndarray) -> dict[str, Any]:
        """A ControlNet's inputs for some of the UNet's rows: their latents (without an inpainting UNet's mask
        channels), timestep(s), text conditioning and control images."""
        from .families import timestep_feed

        specs = self.inputs(component)
        feeds = {k: v[rows] for k, v in host_cond.items() if k in specs}
        feeds["sample"] = sample[rows, :specs["sample"].shape[1] or sample.shape[1]]
        feeds["timestep"] = timestep_feed(specs["timestep"], t if np.ndim(t) == 0 else np.asarray(t)[rows], len(rows))
        feeds["controlnet_cond"] = images
        return {k: v.astype(specs[k].dtype) if isinstance(v, np.ndarray) else v for k, v in feeds.items()}
