"""DPM-Solver++ 2M (Lu et al. 2022), multistep, optionally over Karras sigmas; its SDE form (DPM++ 2M SDE) adds
fresh noise every step."""

from __future__ import annotations

import numpy as np

from .base import Scheduler, noise_like
from .schedules import (
    SPREAD,
    alpha_sigma,
    alphas_cumprod,
    first_index,
    multistep_spread,
    multistep_timesteps,
    spreads,
    train_sigmas,
)


class DPMSolverPP2M(Scheduler):
    name = "dpmpp_2m"
    class_name = "DPMSolverMultistepScheduler"
    defaults = {"solver_order": 2, "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "lower_order_final": True,
                "euler_at_final": False, **SPREAD, "use_lu_lambdas": False, "final_sigmas_type": "zero",
                "lambda_min_clipped": -float("inf"), "timestep_spacing": "linspace"}
    prediction_types = ("epsilon", "v_prediction", "sample")

    def __init__(self, **config) -> None:
        super().__init__(**config)
        c = self.config
        if c["algorithm_type"] not in ("dpmsolver++", "sde-dpmsolver++") or c["solver_order"] not in (1, 2):
            raise ValueError(f"DPMSolverMultistepScheduler: diffrt implements algorithm_type 'dpmsolver++' and "
                             f"'sde-dpmsolver++' with solver_order 1 or 2, not {c['algorithm_type']!r} order {c['solver_order']}")
        self.stochastic = c["algorithm_type"] == "sde-dpmsolver++"
        self.alphas_cumprod = alphas_cumprod(c)
        if c["rescale_betas_zero_snr"]:
            self.alphas_cumprod[-1] = 2**-24
        acp = self.alphas_cumprod
        self.lambda_t = np.log(np.sqrt(acp)) - np.log(np.sqrt(1 - acp))

    def set_timesteps(self, num_inference_steps: int, image_seq_len: int | None = None) -> None:
        c = self.config
        last = c["num_train_timesteps"] - int(np.searchsorted(self.lambda_t[::-1], c["lambda_min_clipped"]))
        timesteps = multistep_timesteps(c, num_inference_steps, last)  # only those above lambda_min_clipped
        sigmas = train_sigmas(self.alphas_cumprod)
        if spreads(c):
            sched, timesteps = multistep_spread(c, self.alphas_cumprod, num_inference_steps)
            if (c["use_karras_sigmas"] or c["use_lu_lambdas"]) and c["beta_schedule"] != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sched = np.interp(timesteps, np.arange(len(sigmas)), sigmas)
        last = float(sigmas[0]) if self.config["final_sigmas_type"] == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sched, [last]]).astype(np.float32)
        self.timesteps = timesteps.astype(np.int64)
        self.index = first_index(self.timesteps)
        self.previous: np.ndarray | None = None
        self.lower_order_nums = 0

    def add_noise(self, original, noise, index=None):
        alpha, sigma = alpha_sigma(self.sigmas[self.index if index is None else index])
        return (alpha * original + sigma * noise).astype(np.float32)

    def update(self, model_output, sample, i, generator):
        c, n = self.config, len(self.timesteps)
        final = i == n - 1 and (c["euler_at_final"] or (c["lower_order_final"] and n < 15) or c["final_sigmas_type"] == "zero")
        alpha_s0, sigma_s0 = alpha_sigma(self.sigmas[i])
        alpha_t, sigma_t = alpha_sigma(self.sigmas[i + 1])
        x0, _ = self.prediction.x0_eps(model_output, sample, alpha_s0, sigma_s0)
        with np.errstate(divide="ignore"):  # sigma 0 at a final "zero" step: h = inf, exp(-h) = 0, prev = x0
            h = (np.log(alpha_t) - np.log(sigma_t)) - (np.log(alpha_s0) - np.log(sigma_s0))
        sde = self.stochastic
        noise = noise_like(sample, generator) if sde else None
        d1 = None
        if not (c["solver_order"] == 1 or self.lower_order_nums < 1 or final):
            alpha_s1, sigma_s1 = alpha_sigma(self.sigmas[i - 1])
            h0 = (np.log(alpha_s0) - np.log(sigma_s0)) - (np.log(alpha_s1) - np.log(sigma_s1))
            d1 = (1.0 / (h0 / h)) * (x0 - self.previous)
        prev = self._sde_update(sample, x0, d1, noise, h, alpha_t, sigma_t, sigma_s0) if sde else \
            self._ode_update(sample, x0, d1, h, alpha_t, sigma_t, sigma_s0)
        self.previous = x0
        self.lower_order_nums = min(self.lower_order_nums + 1, c["solver_order"])
        return prev

    def _ode_update(self, sample, x0, d1, h, alpha_t, sigma_t, sigma_s0):
        prev = (sigma_t / sigma_s0) * sample - (alpha_t * (np.exp(-h) - 1.0)) * x0
        if d1 is None:
            return prev
        if self.config["solver_type"] == "midpoint":
            return prev - 0.5 * (alpha_t * (np.exp(-h) - 1.0)) * d1
        return prev + (alpha_t * ((np.exp(-h) - 1.0) / h + 1.0)) * d1

    def _sde_update(self, sample, x0, d1, noise, h, alpha_t, sigma_t, sigma_s0):
        decay = 1 - np.exp(-2.0 * h)
        prev = sigma_t / sigma_s0 * np.exp(-h) * sample + alpha_t * decay * x0
        if d1 is not None and self.config["solver_type"] == "midpoint":
            prev = prev + 0.5 * (alpha_t * decay) * d1
        elif d1 is not None:
            prev = prev + alpha_t * (decay / (-2.0 * h) + 1.0) * d1
        return prev + sigma_t * np.sqrt(1.0 - np.exp(-2 * h)) * noise
