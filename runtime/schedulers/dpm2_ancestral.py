"""DPM2 ancestral: DPM2's midpoint step down to sigma_down, then fresh noise up to the next sigma."""

from __future__ import annotations

import numpy as np

from .base import noise_like
from .dpm2 import DPM2, log_midpoint
from .schedules import doubled, sigma_schedule, sigma_to_t, train_sigmas


class DPM2Ancestral(DPM2):
    name = "dpm2_a"
    class_name = "KDPM2AncestralDiscreteScheduler"
    stochastic = True

    def set_timesteps(self, num_inference_steps: int, image_seq_len: int | None = None) -> None:
        """sigma_down is next^2 / sigma: diffusers takes it as sqrt(next^2 - up^2), equal in exact arithmetic, but near
        sigma 0 that difference cancels all but a few bits (sigma 14.6 to 0.029: 1 part in 250 000 is left), so
        diffusers' midpoint timestep there is its float32 rounding (0.0096 where the exact value is 0)."""
        sched, timesteps = sigma_schedule(self.config, self.alphas_cumprod, num_inference_steps, round_karras=True)
        sigmas = np.concatenate([sched, [0.0]]).astype(np.float32)
        following = np.concatenate([sigmas[1:], [0.0]]).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            up = (following**2 * (sigmas**2 - following**2) / sigmas**2) ** 0.5
            down = following**2 / sigmas  # diffusers' sqrt(next^2 - up^2), without its cancellation (see below)
        down[-1] = 0.0
        mids = log_midpoint(sigmas, down)
        mids[-2:] = 0.0
        self.ups, self.downs = doubled(np.nan_to_num(up)), doubled(down)
        self._set(sigmas, mids, timesteps, sigma_to_t(mids[:-2], np.log(train_sigmas(self.alphas_cumprod))))

    def _sigmas_at(self, i: int, first: bool) -> tuple[np.float32, np.float32]:
        return (self.sigmas[i], self.mids[i]) if first else (self.sigmas[i - 1], self.mids[i - 1])

    def _finish(self, start, slope, i: int, sigma, sample, generator):
        """Down to sigma_down along the midpoint's slope, then fresh noise up to the next sigma."""
        return start + slope * (self.downs[i - 1] - sigma) + noise_like(sample, generator) * self.ups[i - 1]
