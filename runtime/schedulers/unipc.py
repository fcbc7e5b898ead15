"""UniPC (Zhao et al. 2023): a multistep predictor of order 1-3, each step first corrected with the model output at
its end (B(h) = h for bh1, e^h - 1 for bh2)."""

from __future__ import annotations

import numpy as np

from .base import Scheduler
from .schedules import SPREAD, alpha_sigma, alphas_cumprod, multistep_sigmas


def log_snr(sigma):
    """lambda = log(alpha) - log(sigma_t) for a k-diffusion sigma (inf at sigma 0)."""
    alpha, sigma_t = alpha_sigma(sigma)
    with np.errstate(divide="ignore"):
        return np.log(alpha) - np.log(sigma_t)


def moments(rks: np.ndarray, hh, b_h, order: int) -> tuple[np.ndarray, np.ndarray]:
    """UniPC's linear system: R[k] = rks^k and b[k] = k! phi_{k+1}(hh) / B(h), k < order."""
    phi, factorial, r, b = np.expm1(hh) / hh - 1, 1, [], []
    for k in range(1, order + 1):
        r.append(np.power(rks, k - 1))
        b.append(phi * factorial / b_h)
        factorial *= k + 1
        phi = phi / hh - 1 / factorial
    return np.array(r, np.float32), np.array(b, np.float32)


class UniPC(Scheduler):
    name = "unipc"
    class_name = "UniPCMultistepScheduler"
    defaults = {"solver_order": 2, "solver_type": "bh2", "predict_x0": True, "lower_order_final": True,
                "disable_corrector": [], "solver_p": None, **SPREAD, "timestep_spacing": "linspace",
                "final_sigmas_type": "zero", "sigma_min": None, "sigma_max": None}
    prediction_types = ("epsilon", "v_prediction", "sample")

    def __init__(self, **config) -> None:
        super().__init__(**config)
        c = self.config
        if c["solver_type"] in ("midpoint", "heun", "logrho"):  # diffusers maps the other solvers' names so
            c["solver_type"] = "bh2"
        if c["solver_type"] not in ("bh1", "bh2") or c["solver_order"] not in (1, 2, 3) or c["solver_p"] is not None:
            raise ValueError(f"UniPCMultistepScheduler: diffrt implements solver_type bh1 or bh2 of order 1 to 3 without "
                             f"solver_p, not {c['solver_type']!r} order {c['solver_order']}")
        self.alphas_cumprod = alphas_cumprod(c)
        if c["rescale_betas_zero_snr"]:
            self.alphas_cumprod[-1] = 2**-24

    def set_timesteps(self, num_inference_steps: int, image_seq_len: int | None = None) -> None:
        c = self.config
        sched, self.timesteps, least = multistep_sigmas(c, self.alphas_cumprod, num_inference_steps)
        self.sigmas = np.concatenate([sched, [least if c["final_sigmas_type"] == "sigma_min" else 0.0]]).astype(np.float32)
        self.index = 0
        self.outputs: list[np.ndarray] = []
        self.last_sample: np.ndarray | None = None
        self.this_order = 1

    def update(self, model_output, sample, i, generator):
        c = self.config
        alpha, sigma = alpha_sigma(self.sigmas[i])
        x0, eps = self.prediction.x0_eps(model_output, sample, alpha, sigma)
        converted = x0 if c["predict_x0"] else eps
        if i > 0 and (i - 1) not in c["disable_corrector"] and self.last_sample is not None:
            sample = self._solve(self.last_sample, i, i - 1, self.this_order, converted)
        self.outputs = [*self.outputs, converted][-c["solver_order"]:]
        order = min(c["solver_order"], len(self.timesteps) - i) if c["lower_order_final"] else c["solver_order"]
        self.this_order = min(order, len(self.outputs))
        self.last_sample = sample
        if self.sigmas[i + 1] == 0:  # the last step, to sigma 0 (h infinite): its limit is the x0 prediction, where
            return x0  # diffusers' formula is NaN (bh1, noise form) or singular (order > 1)
        return self._solve(sample, i + 1, i, self.this_order)

    def _solve(self, x, t: int, s0: int, order: int, corrector_output=None):
        """The predictor from sigma index s0 to t (corrector_output None), or the corrector of that step given the
        model's output at t; the earlier outputs are those kept in self.outputs."""
        m0, lam_s0 = self.outputs[-1], log_snr(self.sigmas[s0])
        alpha_t, sigma_t = alpha_sigma(self.sigmas[t])
        alpha_s0, sigma_s0 = alpha_sigma(self.sigmas[s0])
        h = log_snr(self.sigmas[t]) - lam_s0
        rks = [(log_snr(self.sigmas[s0 - k]) - lam_s0) / h for k in range(1, order)]
        d1s = [(self.outputs[-(k + 1)] - m0) / rk for k, rk in zip(range(1, order), rks)]
        hh = -h if self.config["predict_x0"] else h
        b_h = hh if self.config["solver_type"] == "bh1" else np.expm1(hh)
        r, b = moments(np.array([*rks, 1.0], np.float32), hh, b_h, order)
        if self.config["predict_x0"]:
            base, scale = sigma_t / sigma_s0 * x - alpha_t * np.expm1(hh) * m0, alpha_t * b_h
        else:
            base, scale = alpha_t / alpha_s0 * x - sigma_t * np.expm1(hh) * m0, sigma_t * b_h
        if corrector_output is None:
            rhos = [0.5] if order == 2 else (np.linalg.solve(r[:-1, :-1], b[:-1]) if d1s else [])
            return base - scale * sum((rho * d for rho, d in zip(rhos, d1s)), np.float32(0))
        rhos = np.array([0.5], np.float32) if order == 1 else np.linalg.solve(r, b)
        corrected = sum((rho * d for rho, d in zip(rhos[:-1], d1s)), np.float32(0)) + rhos[-1] * (corrector_output - m0)
        return base - scale * corrected
