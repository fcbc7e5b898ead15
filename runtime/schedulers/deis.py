"""DEIS (Zhang & Chen 2022), logrho multistep of order 1-3: the noise predictions of earlier steps integrated
exactly along the polynomial through them in log(sigma/alpha)."""

from __future__ import annotations

import numpy as np

from .base import Scheduler
from .schedules import SPREAD, alpha_sigma, alphas_cumprod, multistep_sigmas


def weight2(t, b, c):
    """Integral of the order-2 Lagrange basis through log b, log c, in log rho, up to rho t."""
    return t * (-np.log(c) + np.log(t) - 1) / (np.log(b) - np.log(c))


def weight3(t, b, c, d):
    """The same for order 3, through log b, log c, log d."""
    lt, lc, ld = np.log(t), np.log(c), np.log(d)
    return t * (lc * (ld - lt + 1) - ld * lt + ld + lt**2 - 2 * lt + 2) / ((np.log(b) - lc) * (np.log(b) - ld))


class DEIS(Scheduler):
    name = "deis"
    class_name = "DEISMultistepScheduler"
    defaults = {"solver_order": 2, "algorithm_type": "deis", "solver_type": "logrho", "lower_order_final": True,
                **SPREAD, "timestep_spacing": "linspace"}
    prediction_types = ("epsilon", "v_prediction", "sample")

    def __init__(self, **config) -> None:
        super().__init__(**config)
        c = self.config
        if c["algorithm_type"] != "deis" or c["solver_type"] != "logrho" or c["solver_order"] not in (1, 2, 3):
            raise ValueError(f"DEISMultistepScheduler: diffrt implements algorithm_type 'deis' with solver_type 'logrho' "
                             f"of order 1 to 3, not {c['algorithm_type']!r} {c['solver_type']!r} order {c['solver_order']}")
        self.alphas_cumprod = alphas_cumprod(c)

    def set_timesteps(self, num_inference_steps: int, image_seq_len: int | None = None) -> None:
        c = self.config
        sched, self.timesteps, least = multistep_sigmas(c, self.alphas_cumprod, num_inference_steps)
        self.sigmas = np.concatenate([sched, [least]]).astype(np.float32)
        self.index = 0
        self.outputs: list[np.ndarray] = []

    def update(self, model_output, sample, i, generator):
        c, n = self.config, len(self.timesteps)
        alpha_s0, sigma_s0 = alpha_sigma(self.sigmas[i])
        x0, _ = self.prediction.x0_eps(model_output, sample, alpha_s0, sigma_s0)
        self.outputs = [*self.outputs, (sample - alpha_s0 * x0) / sigma_s0][-c["solver_order"]:]
        short = c["lower_order_final"] and n < 15
        order = min(c["solver_order"], len(self.outputs), 1 if short and i == n - 1 else 3, 2 if short and i == n - 2 else 3)
        alpha_t, sigma_t = alpha_sigma(self.sigmas[i + 1])
        if order == 1:
            h = np.log(alpha_t) - np.log(sigma_t) - (np.log(alpha_s0) - np.log(sigma_s0))
            return alpha_t / alpha_s0 * sample - sigma_t * (np.exp(h) - 1.0) * self.outputs[-1]
        rho = [sigma_t / alpha_t] + [s / a for a, s in (alpha_sigma(self.sigmas[i - k]) for k in range(order))]
        t, s = rho[0], rho[1:]
        if order == 2:
            coefs = [weight2(t, s[0], s[1]) - weight2(s[0], s[0], s[1]), weight2(t, s[1], s[0]) - weight2(s[0], s[1], s[0])]
        else:
            coefs = [weight3(t, s[0], s[1], s[2]) - weight3(s[0], s[0], s[1], s[2]),
                     weight3(t, s[1], s[2], s[0]) - weight3(s[0], s[1], s[2], s[0]),
                     weight3(t, s[2], s[0], s[1]) - weight3(s[0], s[2], s[0], s[1])]
        total = sample / alpha_s0 + sum(w * m for w, m in zip(coefs, reversed(self.outputs[-order:])))
        return alpha_t * total
