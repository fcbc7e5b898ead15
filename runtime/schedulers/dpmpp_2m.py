"""DPM-Solver++ 2M (Lu et al. 2022), multistep, optionally over Karras sigmas."""

from __future__ import annotations

import numpy as np

from .base import Scheduler
from .schedules import alphas_cumprod, first_index, karras_sigmas, sigma_to_t, spaced_timesteps, train_sigmas, x0_eps


def alpha_sigma(sigma):
    alpha = 1 / (sigma**2 + 1) ** 0.5
    return alpha, sigma * alpha


class DPMSolverPP2M(Scheduler):
    name = "dpmpp_2m"
    class_name = "DPMSolverMultistepScheduler"
    defaults = {"solver_order": 2, "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "lower_order_final": True,
                "euler_at_final": False, "use_karras_sigmas": False, "final_sigmas_type": "zero",
                "lambda_min_clipped": -float("inf"), "timestep_spacing": "linspace"}
    prediction_types = ("epsilon", "v_prediction", "sample")

    def __init__(self, **config) -> None:
        super().__init__(**config)
        c = self.config
        if c["algorithm_type"] != "dpmsolver++" or c["solver_order"] not in (1, 2):
            raise ValueError(f"DPMSolverMultistepScheduler: diffrt implements algorithm_type 'dpmsolver++' with solver_order "
                             f"1 or 2, not {c['algorithm_type']!r} order {c['solver_order']}")
        self.alphas_cumprod = alphas_cumprod(c)
        if c["rescale_betas_zero_snr"]:
            self.alphas_cumprod[-1] = 2**-24
        acp = self.alphas_cumprod
        self.lambda_t = np.log(np.sqrt(acp)) - np.log(np.sqrt(1 - acp))

    def _timesteps(self, n: int) -> np.ndarray:
        """The shared spacings over the timesteps above lambda_min_clipped; linspace and leading space n + 1 points
        and drop the last, as diffusers' DPM-Solver does."""
        c = self.config
        last = c["num_train_timesteps"] - int(np.searchsorted(self.lambda_t[::-1], c["lambda_min_clipped"]))
        if c["timestep_spacing"] == "trailing":
            return spaced_timesteps(c, n, last=last)
        return spaced_timesteps(c, n + 1, last=last)[:-1]

    def set_timesteps(self, num_inference_steps: int) -> None:
        timesteps = self._timesteps(num_inference_steps)
        sigmas = train_sigmas(self.alphas_cumprod)
        if self.config["use_karras_sigmas"]:
            sched = karras_sigmas(float(sigmas[0]), float(sigmas[-1]), num_inference_steps)
            timesteps = sigma_to_t(sched, np.log(sigmas))
            if self.config["beta_schedule"] != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sched = np.interp(timesteps, np.arange(len(sigmas)), sigmas)
        last = float(sigmas[0]) if self.config["final_sigmas_type"] == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sched, [last]]).astype(np.float32)
        self.timesteps = timesteps.astype(np.int64)
        self.next_index = first_index(self.timesteps)
        self.previous: np.ndarray | None = None
        self.lower_order_nums = 0

    def add_noise(self, original, noise, timestep):
        alpha, sigma = alpha_sigma(self.sigmas[self.step_index(timestep)])
        return (alpha * original + sigma * noise).astype(np.float32)

    def step(self, model_output, timestep, sample, generator=None):
        c, i, n = self.config, self.step_index(timestep), len(self.timesteps)
        final = i == n - 1 and (c["euler_at_final"] or (c["lower_order_final"] and n < 15) or c["final_sigmas_type"] == "zero")
        alpha_s0, sigma_s0 = alpha_sigma(self.sigmas[i])
        alpha_t, sigma_t = alpha_sigma(self.sigmas[i + 1])
        x0, _ = x0_eps(model_output, sample, alpha_s0, sigma_s0, c["prediction_type"])
        with np.errstate(divide="ignore"):  # sigma 0 at a final "zero" step: h = inf, exp(-h) = 0, prev = x0
            h = (np.log(alpha_t) - np.log(sigma_t)) - (np.log(alpha_s0) - np.log(sigma_s0))
        first_order = c["solver_order"] == 1 or self.lower_order_nums < 1 or final
        prev = (sigma_t / sigma_s0) * sample - (alpha_t * (np.exp(-h) - 1.0)) * x0
        if not first_order:
            alpha_s1, sigma_s1 = alpha_sigma(self.sigmas[i - 1])
            h0 = (np.log(alpha_s0) - np.log(sigma_s0)) - (np.log(alpha_s1) - np.log(sigma_s1))
            d1 = (1.0 / (h0 / h)) * (x0 - self.previous)
            if c["solver_type"] == "midpoint":
                prev = prev - 0.5 * (alpha_t * (np.exp(-h) - 1.0)) * d1
            else:
                prev = prev + (alpha_t * ((np.exp(-h) - 1.0) / h + 1.0)) * d1
        self.previous = x0
        self.lower_order_nums = min(self.lower_order_nums + 1, c["solver_order"])
        self.next_index = i + 1
        return prev.astype(np.float32)
