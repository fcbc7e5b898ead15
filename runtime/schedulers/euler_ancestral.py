"""Euler ancestral: an Euler step down to sigma_down, then fresh noise up to the next sigma."""

from __future__ import annotations

import numpy as np

from .base import noise_like
from .euler import Euler


class EulerAncestral(Euler):
    name = "euler_a"
    class_name = "EulerAncestralDiscreteScheduler"
    stochastic = True
    defaults = {"timestep_spacing": "linspace"}

    def step(self, model_output, timestep, sample, generator=None):
        i = self.step_index(timestep)
        sigma, sigma_to = self.sigmas[i], self.sigmas[i + 1]
        x0 = self.prediction.x0(model_output, sample, sigma)
        sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        prev = sample + (sample - x0) / sigma * (sigma_down - sigma)
        self.next_index = i + 1
        return (prev + noise_like(sample, generator) * sigma_up).astype(np.float32)
