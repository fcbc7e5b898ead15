"""DDIM (Song et al. 2020), deterministic (eta = 0) as in diffusers' pipelines."""

from __future__ import annotations

import numpy as np

from .base import Scheduler
from .schedules import alphas_with_final, spaced_timesteps


class DDIM(Scheduler):
    name = "ddim"
    class_name = "DDIMScheduler"
    defaults = {"clip_sample": True, "clip_sample_range": 1.0, "set_alpha_to_one": True}
    prediction_types = ("epsilon", "v_prediction", "sample")

    def __init__(self, **config) -> None:
        super().__init__(**config)
        self.alphas_cumprod, self.final_alpha_cumprod = alphas_with_final(self.config)

    def set_timesteps(self, num_inference_steps: int, image_seq_len: int | None = None) -> None:
        self.num_inference_steps = num_inference_steps
        self.timesteps = spaced_timesteps(self.config, num_inference_steps)

    def update(self, model_output, sample, i, generator):
        t = int(self.timesteps[i])
        prev = t - self.config["num_train_timesteps"] // self.num_inference_steps
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        x0, eps = self.prediction.x0_eps(model_output, sample, a_t**0.5, (1 - a_t) ** 0.5)
        if self.config["clip_sample"]:
            r = self.config["clip_sample_range"]
            x0 = np.clip(x0, -r, r)
        return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
