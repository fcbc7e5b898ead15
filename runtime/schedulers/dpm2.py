"""DPM2 (Karras et al. 2022's second-order sampler after Lu et al.): a half step to the log-midpoint sigma, whose
slope then carries the whole step; two UNet calls a step."""

from __future__ import annotations

import numpy as np

from .euler import Euler
from .schedules import SPREAD, doubled, sigma_schedule, sigma_to_t, train_sigmas


def log_midpoint(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """exp(lerp(log a, log b, 0.5)) in float32, as torch's lerp computes it at weight 0.5 (b - (b - a) / 2)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        la, lb = np.log(a.astype(np.float32)), np.log(b.astype(np.float32))
        return np.exp(lb - (lb - la) * np.float32(0.5)).astype(np.float32)


class DPM2(Euler):
    name = "dpm2"
    class_name = "KDPM2DiscreteScheduler"
    defaults = {"timestep_spacing": "linspace", **SPREAD}

    @property
    def order(self) -> int:
        return 2

    def set_timesteps(self, num_inference_steps: int, image_seq_len: int | None = None) -> None:
        sched, timesteps = sigma_schedule(self.config, self.alphas_cumprod, num_inference_steps, round_karras=True)
        sigmas = np.concatenate([sched, [0.0]]).astype(np.float32)
        mid = log_midpoint(sigmas[1:], sigmas[:-1])  # between each sigma and the one before it
        self._set(sigmas, np.concatenate([[0.0], mid[:-1], [0.0]]).astype(np.float32), timesteps,
                  sigma_to_t(mid[:-1], np.log(train_sigmas(self.alphas_cumprod))))

    def _set(self, sigmas: np.ndarray, mids: np.ndarray, timesteps: np.ndarray, mid_timesteps: np.ndarray) -> None:
        """Lay out the per-step arrays with each midpoint's timestep before its step's next full one."""
        self.sigmas, self.mids = doubled(sigmas), doubled(mids)
        pairs = np.stack([mid_timesteps, timesteps[1:]], axis=-1).reshape(-1)
        self.timesteps = np.concatenate([timesteps[:1], pairs]).astype(np.float32)
        self.index = 0
        self.saved: np.ndarray | None = None  # the sample a step started from, while its midpoint call is pending
        self.init_noise_sigma = self.start_sigma()

    def scale_model_input(self, sample):
        i = self.index
        sigma = self.sigmas[i] if self.saved is None else self._sigmas_at(i, first=False)[1]
        return sample / ((sigma**2 + 1) ** 0.5)

    def _sigmas_at(self, i: int, first: bool) -> tuple[np.float32, np.float32]:
        """(the step's starting sigma, its midpoint sigma) for the call at index i, the first or the midpoint one."""
        return (self.sigmas[i], self.mids[i + 1]) if first else (self.sigmas[i - 1], self.mids[i])

    def _finish(self, start, slope, i: int, sigma, sample, generator):
        """The whole step from its starting sample along the midpoint's slope."""
        return start + slope * (self.sigmas[i] - sigma)

    def update(self, model_output, sample, i, generator):
        first = self.saved is None
        sigma, mid = self._sigmas_at(i, first)
        x0 = self.prediction.x0(model_output, sample, sigma if first else mid)
        if first:
            self.saved = sample
            return sample + (sample - x0) / sigma * (mid - sigma)
        start, self.saved = self.saved, None
        return self._finish(start, (sample - x0) / mid, i, sigma, sample, generator)
