"""Euler ancestral: an Euler step down to sigma_down, then fresh noise up to the next sigma."""

from __future__ import annotations

from .base import noise_like
from .euler import Euler


class EulerAncestral(Euler):
    name = "euler_a"
    class_name = "EulerAncestralDiscreteScheduler"
    stochastic = True
    defaults = {"timestep_spacing": "linspace"}

    def update(self, model_output, sample, i, generator):
        sigma, sigma_to = self.sigmas[i], self.sigmas[i + 1]
        x0 = self.prediction.x0(model_output, sample, sigma)
        sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        prev = sample + (sample - x0) / sigma * (sigma_down - sigma)
        return prev + noise_like(sample, generator) * sigma_up
