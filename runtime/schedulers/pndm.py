"""PNDM (Liu et al. 2022): Runge-Kutta warm-up then linear multistep, the SD 1.5 default."""

from __future__ import annotations

import numpy as np

from .base import Scheduler
from .schedules import alphas_with_final, spaced_timesteps


class PNDM(Scheduler):
    name = "pndm"
    class_name = "PNDMScheduler"
    defaults = {"skip_prk_steps": False, "set_alpha_to_one": False}

    def __init__(self, **config) -> None:
        super().__init__(**config)
        self.alphas_cumprod, self.final_alpha_cumprod = alphas_with_final(self.config)

    def set_timesteps(self, num_inference_steps: int, image_seq_len: int | None = None) -> None:
        self.num_inference_steps = n = num_inference_steps
        ts = spaced_timesteps(self.config, n)[::-1].copy()  # ascending
        if self.config["skip_prk_steps"]:
            self.prk_timesteps = np.array([], np.int64)
            plms = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1]
        else:
            half = self.config["num_train_timesteps"] // n // 2
            prk = ts[-4:].repeat(2) + np.tile(np.array([0, half]), 4)
            self.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].copy()
            plms = ts[:-3][::-1]
        self.timesteps = np.concatenate([self.prk_timesteps, plms]).astype(np.int64)
        self.ets: list[np.ndarray] = []
        self.counter = 0
        self.cur_model_output = 0.0
        self.cur_sample: np.ndarray | None = None

    def update(self, model_output, sample, i, generator):
        """PNDM counts its own calls (its warm-up does not start over with img2img's later start, as in diffusers)."""
        if self.counter < len(self.prk_timesteps) and not self.config["skip_prk_steps"]:
            return self._step_prk(model_output, int(self.timesteps[i]), sample)
        return self._step_plms(model_output, int(self.timesteps[i]), sample)

    def _step_prk(self, model_output, timestep, sample):
        c = self.counter
        diff = 0 if c % 2 else self.config["num_train_timesteps"] // self.num_inference_steps // 2
        prev = timestep - diff
        timestep = int(self.prk_timesteps[c // 4 * 4])
        if c % 4 == 0:
            self.cur_model_output = self.cur_model_output + model_output / 6
            self.ets.append(model_output)
            self.cur_sample = sample
        elif c % 4 in (1, 2):
            self.cur_model_output = self.cur_model_output + model_output / 3
        else:
            model_output = self.cur_model_output + model_output / 6
            self.cur_model_output = 0.0
        cur = self.cur_sample if self.cur_sample is not None else sample
        self.counter += 1
        return self._prev_sample(cur, timestep, prev, model_output)

    def _step_plms(self, model_output, timestep, sample):
        ratio = self.config["num_train_timesteps"] // self.num_inference_steps
        prev = timestep - ratio
        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:
            prev, timestep = timestep, timestep + ratio
        e = self.ets
        if len(e) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(e) == 1 and self.counter == 1:
            model_output = (model_output + e[-1]) / 2
            sample, self.cur_sample = self.cur_sample, None
        elif len(e) == 2:
            model_output = (3 * e[-1] - e[-2]) / 2
        elif len(e) == 3:
            model_output = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
        else:
            model_output = (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4]) / 24
        self.counter += 1
        return self._prev_sample(sample, timestep, prev, model_output)

    def _prev_sample(self, sample, timestep, prev, model_output):
        a_t = self.alphas_cumprod[timestep]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        b_t, b_prev = 1 - a_t, 1 - a_prev
        model_output = self.prediction.x0_eps(model_output, sample, a_t**0.5, b_t**0.5)[1]  # as eps
        coeff = (a_prev / a_t) ** 0.5
        denom = a_t * b_prev**0.5 + (a_t * b_t * a_prev) ** 0.5
        return (coeff * sample - (a_prev - a_t) * model_output / denom).astype(np.float32)
