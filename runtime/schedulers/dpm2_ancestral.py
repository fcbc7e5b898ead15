"""DPM2 ancestral: DPM2's midpoint step down to sigma_down, then fresh noise up to the next sigma."""

from __future__ import annotations

import numpy as np

from .base import noise_like
from .dpm2 import DPM2, log_midpoint
from .schedules import doubled, sigma_schedule, sigma_to_t, train_sigmas, x0_at_sigma


class DPM2Ancestral(DPM2):
    name = "dpm2_a"
    class_name = "KDPM2AncestralDiscreteScheduler"
    stochastic = True

    def set_timesteps(self, num_inference_steps: int) -> None:
        sched, timesteps = sigma_schedule(self.config, self.alphas_cumprod, num_inference_steps, round_karras=True)
        sigmas = np.concatenate([sched, [0.0]]).astype(np.float32)
        following = np.concatenate([sigmas[1:], [0.0]]).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            up = (following**2 * (sigmas**2 - following**2) / sigmas**2) ** 0.5
            down = (following**2 - up**2) ** 0.5
        down[-1] = 0.0
        mids = log_midpoint(sigmas, down)
        mids[-2:] = 0.0
        self.ups, self.downs = doubled(np.nan_to_num(up)), doubled(down)
        self._set(sigmas, mids, timesteps, sigma_to_t(mids[:-2], np.log(train_sigmas(self.alphas_cumprod))))

    def _mid(self, i: int) -> np.float32:
        return self.mids[i - 1]

    def step(self, model_output, timestep, sample, generator=None):
        i = self.step_index(timestep)
        first = self.saved is None
        sigma, mid = (self.sigmas[i], self.mids[i]) if first else (self.sigmas[i - 1], self.mids[i - 1])
        x0 = x0_at_sigma(model_output, sample, sigma if first else mid, self.config["prediction_type"])
        self.next_index = i + 1
        if first:
            self.saved = sample
            return (sample + (sample - x0) / sigma * (mid - sigma)).astype(np.float32)
        start, self.saved = self.saved, None
        prev = start + (sample - x0) / mid * (self.downs[i - 1] - sigma)
        return (prev + noise_like(sample, generator) * self.ups[i - 1]).astype(np.float32)
