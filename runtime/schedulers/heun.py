"""Heun (Karras et al. 2022, Algorithm 2 without churn): an Euler step, then its slope averaged with the slope at its
end; two UNet calls a step, each with its own timestep in the schedule."""

from __future__ import annotations

import numpy as np

from .euler import Euler
from .schedules import SPREAD, doubled, sigma_schedule


class Heun(Euler):
    name = "heun"
    class_name = "HeunDiscreteScheduler"
    defaults = {"timestep_spacing": "linspace", **SPREAD, "clip_sample": False, "clip_sample_range": 1.0}
    prediction_types = ("epsilon", "v_prediction", "sample")

    @property
    def order(self) -> int:
        return 2

    def set_timesteps(self, num_inference_steps: int, image_seq_len: int | None = None) -> None:
        sched, timesteps = sigma_schedule(self.config, self.alphas_cumprod, num_inference_steps)
        sigmas = np.concatenate([sched, [0.0]]).astype(np.float32)
        self.sigmas = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
        self.timesteps = doubled(timesteps)[:-1]
        self.index = 0
        self.first_half: tuple | None = None  # (slope, dt, sample) of the Euler step awaiting its correction
        self.init_noise_sigma = self.start_sigma()

    def update(self, model_output, sample, i, generator):
        first = self.first_half is None
        sigma, sigma_next = (self.sigmas[i], self.sigmas[i + 1]) if first else (self.sigmas[i - 1], self.sigmas[i])
        x0 = self.prediction.x0(model_output, sample, sigma if first else sigma_next)
        if self.config["clip_sample"]:
            x0 = np.clip(x0, -self.config["clip_sample_range"], self.config["clip_sample_range"])
        if first:
            slope = (sample - x0) / sigma
            self.first_half = (slope, sigma_next - sigma, sample)
            return sample + slope * (sigma_next - sigma)
        slope, dt, start = self.first_half
        self.first_half = None
        return start + ((slope + (sample - x0) / sigma_next) / 2) * dt
