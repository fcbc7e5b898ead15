"""TCD (Zheng et al. 2024): LCM's schedule; each step jumps to x0 and back to a lower noise level s, then adds fresh
noise up to the next timestep in the measure gamma (eta) sets."""

from __future__ import annotations

import numpy as np

from .base import noise_like
from .lcm import LCM

ETA = 0.3  # TCD's own default gamma; 0 makes it deterministic


class TCD(LCM):
    name = "tcd"
    class_name = "TCDScheduler"
    defaults = {**LCM.defaults, "timestep_spacing": "leading"}
    eta = ETA

    def update(self, model_output, sample, i, generator):
        t = int(self.timesteps[i])
        last = i == len(self.timesteps) - 1
        prev = 0 if last else int(self.timesteps[i + 1])
        s = int(np.floor((1 - self.eta) * prev))
        a_t, a_prev, a_s = self.alphas_cumprod[t], self.alphas_cumprod[prev], self.alphas_cumprod[s]
        x0, eps = self.prediction.x0_eps(model_output, sample, a_t**0.5, (1 - a_t) ** 0.5)
        noised = a_s**0.5 * x0 + (1 - a_s) ** 0.5 * eps
        if self.eta > 0 and not last:
            noised = (a_prev / a_s) ** 0.5 * noised + (1 - a_prev / a_s) ** 0.5 * noise_like(sample, generator)
        return noised
