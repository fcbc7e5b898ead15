"""One call's images on their way through the denoising loop: its scheduler, latents, text conditioning and noise,
and where it stands. The pipeline steps a list of streams with one UNet call, so a server can let a request join
others at the next step (step-level batching); a plain call is a list of one."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import UserError
from .generators import ImageGenerators
from .img2img import Inpainting
from .request import Request


class NonFiniteError(UserError):
    """A stage produced NaN or inf."""


class Cancelled(Exception):
    """A call given up before its last step (its step callback returned False, or its client went away)."""


def rescaled(guided: np.ndarray, text: np.ndarray, rescale: float) -> np.ndarray:
    """diffusers' rescale_noise_cfg: each row's guided prediction scaled to the prompt-only prediction's standard
    deviation (torch's unbiased one), blended with itself by `rescale`."""
    axes = tuple(range(1, guided.ndim))
    scaled = guided * (text.std(axis=axes, ddof=1, keepdims=True) / guided.std(axis=axes, ddof=1, keepdims=True))
    return (rescale * scaled + (1 - rescale) * guided).astype(np.float32)


@dataclass
class Stream:
    """A call between `Pipeline.begin` and `Pipeline.finish`. cond holds the UNet's text inputs as the engine takes
    them (negatives then prompts when guided), host_cond the same in host memory, for joining other streams'."""

    req: Request
    sched: Any
    timesteps: np.ndarray
    x: np.ndarray
    cond: dict[str, Any]
    host_cond: dict[str, np.ndarray]
    rng: ImageGenerators
    inpaint: Inpainting | None
    timings: dict[str, Any]
    clock: float  # when the call began (perf_counter)
    source: dict[str, Any] = field(default_factory=dict)  # image-to-image settings for the images' metadata
    i: int = 0  # steps done
    error: UserError | None = None  # what stopped this stream alone (its scheduler's NaN); finish raises it
    deep: np.ndarray | None = None  # DeepCache: the deep features of this stream's rows from its last full UNet step
    fbc: list[dict[str, Any]] | None = None  # First-Block Cache: per group of its rows, the residuals kept (fbcache.py)
    full_steps: int = 0  # step caching: how many of its steps ran the whole denoiser

    @property
    def total(self) -> int:
        return len(self.timesteps)

    @property
    def done(self) -> bool:
        return self.error is not None or self.i >= len(self.timesteps)

    @property
    def step_seconds(self) -> float:
        """Seconds the steps so far took (the denoiser's and ControlNets' calls, this stream's guidance and sampler)."""
        return float(sum(self.timings["unet"]) + sum(self.timings["scheduler"]) + sum(self.timings.get("controlnet", ())))

    def stop(self) -> None:
        """End the loop at the step reached: `finish` decodes the latents as they stand (A1111's interrupt)."""
        if not self.done:
            self.source["interrupted_at_step"] = self.i
            self.timesteps = self.timesteps[:self.i]

    @property
    def t(self) -> float:
        return self.timesteps[self.i]

    def rows(self) -> int:
        """The UNet rows this stream takes: each image, twice when guided."""
        return len(self.x) * (2 if self.req.guided else 1)

    def model_input(self) -> np.ndarray:
        """This step's UNet sample rows."""
        x = np.concatenate([self.x, self.x]) if self.req.guided else self.x
        model_in = self.sched.scale_model_input(x)
        return model_in if self.inpaint is None else self.inpaint.unet_input(model_in, self.req.guided)

    def advance(self, out: np.ndarray, unet_seconds: float, own_seconds: float) -> None:
        """Guidance on this stream's UNet rows, then its scheduler's step; own_seconds is what its input took."""
        start = time.perf_counter()
        n, req = len(self.x), self.req
        if req.guided:
            g = np.array(req.mix_scales, np.float32)[:, None, None, None]
            text_out, out = out[n:], np.where(g > 1, out[:n] + g * (out[n:] - out[:n]), out[n:])
            if req.guidance_rescale > 0:
                out = rescaled(out, text_out, req.guidance_rescale)
        x = self.sched.step(out, self.x, self.rng)
        if self.inpaint is not None:
            x = self.inpaint.blend(self.sched, x, last=self.i + 1 == self.total)
        if not np.isfinite(x).all():
            raise NonFiniteError(f"the {self.sched.name} scheduler's step made NaN or inf at step {self.i + 1} of "
                                 f"{self.total} (the UNet's output was finite); use fewer steps or another scheduler")
        self.x, self.i = x, self.i + 1
        self.timings["unet"].append(unet_seconds)
        self.timings["scheduler"].append(own_seconds + time.perf_counter() - start)


def joined_rows(streams: list[Stream]) -> tuple[list[np.ndarray], np.ndarray | float, list[float]]:
    """Every stream's UNet sample rows, the timestep (one value when all streams are at the same one, else one per
    row) and the seconds each stream's input took."""
    inputs, seconds = [], []
    for s in streams:
        start = time.perf_counter()
        inputs.append(s.model_input())
        seconds.append(time.perf_counter() - start)
    ts = [s.t for s in streams]
    if all(t == ts[0] for t in ts):
        return inputs, ts[0], seconds
    return inputs, np.concatenate([np.full(len(m), t, np.float64) for m, t in zip(inputs, ts)]), seconds


def check_joinable(streams: list[Stream]) -> None:
    """Streams share a UNet call only with the same latent size and text length (a server keys its batches by these)."""
    first = streams[0]
    for s in streams[1:]:
        if s.x.shape[1:] != first.x.shape[1:] or any(s.host_cond[k].shape[1:] != v.shape[1:] for k, v in first.host_cond.items()):
            raise UserError("requests of different sizes or text lengths cannot share a UNet call")
