"""Euler (Karras et al. 2022, Algorithm 2 without churn) over the k-diffusion sigma schedule."""

from __future__ import annotations

import numpy as np

from .base import Scheduler
from .schedules import SPREAD, alphas_cumprod, first_index, sigma_schedule


class Euler(Scheduler):
    name = "euler"
    class_name = "EulerDiscreteScheduler"
    defaults = {"timestep_spacing": "linspace", **SPREAD, "sigma_min": None, "sigma_max": None,
                "final_sigmas_type": "zero"}

    def __init__(self, **config) -> None:
        super().__init__(**config)
        self.alphas_cumprod = alphas_cumprod(self.config)
        if self.config["rescale_betas_zero_snr"]:
            self.alphas_cumprod[-1] = 2**-24

    def set_timesteps(self, num_inference_steps: int, image_seq_len: int | None = None) -> None:
        sched, timesteps = sigma_schedule(self.config, self.alphas_cumprod, num_inference_steps)
        last = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5 if self.config.get("final_sigmas_type") == "sigma_min" else 0
        self.sigmas = np.concatenate([sched, [last]]).astype(np.float32)
        self.timesteps = timesteps
        self.index = first_index(self.timesteps)
        self.init_noise_sigma = self.start_sigma()

    def start_sigma(self) -> float:
        """The initial noise's scale: the largest sigma (or its DDPM-sample scale for leading spacing)."""
        top = self.sigmas.max()
        return top if self.config["timestep_spacing"] in ("linspace", "trailing") else (top**2 + 1) ** 0.5

    def add_noise(self, original, noise, index=None):
        return (original + noise * self.sigmas[self.index if index is None else index]).astype(np.float32)

    def scale_model_input(self, sample):
        return sample / ((self.sigmas[self.index] ** 2 + 1) ** 0.5)

    def update(self, model_output, sample, i, generator):
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x0 = self.prediction.x0(model_output, sample, sigma)
        return sample + (sample - x0) / sigma * (sigma_next - sigma)
