"""LCM (Luo et al. 2023): consistency-model steps with fresh noise between them."""

from __future__ import annotations

import numpy as np

from .base import Scheduler, noise_like
from .schedules import alphas_with_final


class LCM(Scheduler):
    name = "lcm"
    class_name = "LCMScheduler"
    stochastic = True
    defaults = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "original_inference_steps": 50,
                "clip_sample": False, "clip_sample_range": 1.0, "set_alpha_to_one": True, "timestep_scaling": 10.0}
    prediction_types = ("epsilon", "v_prediction", "sample")

    def __init__(self, **config) -> None:
        super().__init__(**config)
        self.alphas_cumprod, self.final_alpha_cumprod = alphas_with_final(self.config)

    def set_timesteps(self, num_inference_steps: int, image_seq_len: int | None = None) -> None:
        original = self.config["original_inference_steps"]
        if num_inference_steps > original:
            raise ValueError(f"LCM takes at most original_inference_steps={original} steps, not {num_inference_steps}")
        k = self.config["num_train_timesteps"] // original
        origin = (np.arange(1, original + 1) * k - 1)[::-1]
        picks = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
        self.timesteps = origin[picks].astype(np.int64)
        self.index = 0

    def update(self, model_output, sample, i, generator):
        t = int(self.timesteps[i])
        last = i == len(self.timesteps) - 1
        prev = t if last else int(self.timesteps[i + 1])
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        scaled = t * self.config["timestep_scaling"]
        c_skip = 0.25 / (scaled**2 + 0.25)
        c_out = scaled / (scaled**2 + 0.25) ** 0.5
        x0, _ = self.prediction.x0_eps(model_output, sample, a_t**0.5, (1 - a_t) ** 0.5)
        if self.config["clip_sample"]:
            x0 = np.clip(x0, -self.config["clip_sample_range"], self.config["clip_sample_range"])
        out = c_out * x0 + c_skip * sample
        if not last:
            out = a_prev**0.5 * out + (1 - a_prev) ** 0.5 * noise_like(sample, generator)
        return out
