"""LMS: linear multistep over the k-diffusion sigmas, up to four earlier slopes, each weighted by the integral of
its Lagrange basis polynomial across the step (exact, where diffusers integrates numerically)."""

from __future__ import annotations

import numpy as np
from numpy.polynomial import Polynomial

from .euler import Euler
from .schedules import SPREAD, sigma_schedule

MAX_ORDER = 4


def lms_coefficient(sigmas: np.ndarray, order: int, i: int, j: int) -> float:
    """Weight of the slope taken j steps back, for the step from sigmas[i] to sigmas[i + 1]."""
    basis = Polynomial([1.0])
    for k in range(order):
        if k != j:
            basis = basis * Polynomial([-float(sigmas[i - k]), 1.0]) / float(sigmas[i - j] - sigmas[i - k])
    integral = basis.integ()
    return float(integral(float(sigmas[i + 1])) - integral(float(sigmas[i])))


class LMS(Euler):
    name = "lms"
    class_name = "LMSDiscreteScheduler"
    defaults = {"timestep_spacing": "linspace", **SPREAD}
    prediction_types = ("epsilon", "v_prediction", "sample")

    def set_timesteps(self, num_inference_steps: int, image_seq_len: int | None = None) -> None:
        sched, self.timesteps = sigma_schedule(self.config, self.alphas_cumprod, num_inference_steps)
        self.sigmas = np.concatenate([sched, [0.0]]).astype(np.float32)
        self.index = 0
        self.slopes: list[np.ndarray] = []
        self.init_noise_sigma = self.start_sigma()

    def update(self, model_output, sample, i, generator):
        sigma = self.sigmas[i]
        x0 = self.prediction.x0(model_output, sample, sigma)
        self.slopes = [*self.slopes, (sample - x0) / sigma][-MAX_ORDER:]
        order = min(i + 1, MAX_ORDER)
        coefficients = [lms_coefficient(self.sigmas, order, i, j) for j in range(order)]
        return sample + sum(c * s for c, s in zip(coefficients, reversed(self.slopes)))
