"""DDPM (Ho et al. 2020): the posterior mean of the previous step plus fresh noise of the posterior's variance."""

from __future__ import annotations

import numpy as np

from .base import Scheduler, noise_like
from .schedules import alphas_cumprod, spaced_timesteps

VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large")


class DDPM(Scheduler):
    name = "ddpm"
    class_name = "DDPMScheduler"
    stochastic = True
    defaults = {"variance_type": "fixed_small", "clip_sample": True, "clip_sample_range": 1.0}
    prediction_types = ("epsilon", "v_prediction", "sample")

    def __init__(self, **config) -> None:
        super().__init__(**config)
        if self.config["variance_type"] not in VARIANCES:
            raise ValueError(f"DDPMScheduler: variance_type {self.config['variance_type']!r} is not supported by diffrt; "
                             f"use one of {', '.join(VARIANCES)}")
        self.alphas_cumprod = alphas_cumprod(self.config)

    def set_timesteps(self, num_inference_steps: int, image_seq_len: int | None = None) -> None:
        if num_inference_steps > self.config["num_train_timesteps"]:
            raise ValueError(f"DDPM takes at most num_train_timesteps={self.config['num_train_timesteps']} steps")
        self.timesteps = spaced_timesteps(self.config, num_inference_steps)
        self.index = 0

    def update(self, model_output, sample, i, generator):
        t = int(self.timesteps[i])
        prev_t = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else np.float32(1.0)
        alpha, beta = a_t / a_prev, 1 - a_t / a_prev
        x0, _ = self.prediction.x0_eps(model_output, sample, a_t**0.5, (1 - a_t) ** 0.5)
        if self.config["clip_sample"]:
            x0 = np.clip(x0, -self.config["clip_sample_range"], self.config["clip_sample_range"])
        prev = (a_prev**0.5 * beta / (1 - a_t)) * x0 + (alpha**0.5 * (1 - a_prev) / (1 - a_t)) * sample
        if t > 0:
            prev = prev + self._deviation(a_t, a_prev, beta) * noise_like(sample, generator)
        return prev

    def _deviation(self, a_t, a_prev, beta):
        """The noise's standard deviation by variance_type."""
        variance = max((1 - a_prev) / (1 - a_t) * beta, np.float32(1e-20))
        kind = self.config["variance_type"]
        if kind == "fixed_small_log":
            return np.exp(0.5 * np.log(variance))
        return (beta if kind == "fixed_large" else variance) ** 0.5
