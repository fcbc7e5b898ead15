"""Euler over a rectified-flow schedule (SD3, FLUX): diffusers' FlowMatchEulerDiscreteScheduler.

Sigmas run from 1 (pure noise) to 0; the model predicts the velocity, and each step is x + (sigma_next - sigma) * v.
The schedule is shifted towards noise, by a fixed `shift` (SD3's 3.0) or, with use_dynamic_shifting, by an amount
that grows with the image's token count (FLUX: mu from image_seq_len between base_shift and max_shift)."""

from __future__ import annotations

import math

import numpy as np

from .base import Scheduler
from .schedules import karras_sigmas

FLOW_DEFAULTS = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5,
                 "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096, "invert_sigmas": False,
                 "shift_terminal": None, "use_karras_sigmas": False, "use_exponential_sigmas": False,
                 "use_beta_sigmas": False, "time_shift_type": "exponential", "stochastic_sampling": False,
                 "prediction_type": "flow"}
FLOW_UNSUPPORTED = {"invert_sigmas": False, "use_beta_sigmas": False, "stochastic_sampling": False}


def image_shift(config: dict, image_seq_len: int) -> float:
    """mu for an image of image_seq_len tokens: linear from base_shift at base_image_seq_len to max_shift at
    max_image_seq_len (diffusers' calculate_shift)."""
    slope = (config["max_shift"] - config["base_shift"]) / (config["max_image_seq_len"] - config["base_image_seq_len"])
    return image_seq_len * slope + config["base_shift"] - slope * config["base_image_seq_len"]


def time_shift(config: dict, mu: float, t: np.ndarray) -> np.ndarray:
    """Sigmas moved towards noise by mu: exp(mu) / (exp(mu) + (1/t - 1)) or, linear, mu / (mu + (1/t - 1))."""
    scale = math.exp(mu) if config["time_shift_type"] == "exponential" else mu
    return scale / (scale + (1 / t - 1))


class FlowMatchEuler(Scheduler):
    name = "flow_euler"
    class_name = "FlowMatchEulerDiscreteScheduler"
    common = FLOW_DEFAULTS
    prediction_types = ("flow",)
    flow = True

    def __init__(self, **config) -> None:
        super().__init__(**{**config, "prediction_type": "flow"})
        for key, ok in FLOW_UNSUPPORTED.items():
            if self.config[key] != ok:
                raise ValueError(f"{self.class_name}: {key}={self.config[key]!r} is not supported by diffrt; set it to {ok!r}")
        n, shift = self.config["num_train_timesteps"], self.config["shift"]
        train = np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n)
        if not self.config["use_dynamic_shifting"]:
            train = shift * train / (1 + (shift - 1) * train)
        self.sigma_min, self.sigma_max = float(train[-1]), float(train[0])

    def set_timesteps(self, num_inference_steps: int, image_seq_len: int | None = None,
                      sigmas: np.ndarray | None = None) -> None:
        """The schedule for num_inference_steps; image_seq_len (the image's token count) sets the dynamic shift;
        sigmas, where given, replace the even spacing between the ends (FLUX's pipeline passes 1 .. 1/n)."""
        c = self.config
        if sigmas is None:
            n = c["num_train_timesteps"]
            sigmas = np.linspace(self.sigma_max * n, self.sigma_min * n, num_inference_steps) / n
        sigmas = np.asarray(sigmas, np.float64)
        if c["use_dynamic_shifting"]:
            if image_seq_len is None:
                raise ValueError(f"{self.class_name} with use_dynamic_shifting needs the image's token count")
            sigmas = time_shift(c, image_shift(c, image_seq_len), sigmas)
        else:
            sigmas = c["shift"] * sigmas / (1 + (c["shift"] - 1) * sigmas)
        if c["shift_terminal"]:
            if sigmas[-1] >= 1:
                raise ValueError(f"{self.class_name} with shift_terminal needs at least 2 steps")
            sigmas = 1 - (1 - sigmas) / ((1 - sigmas[-1]) / (1 - c["shift_terminal"]))
        if c["use_karras_sigmas"]:
            sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), num_inference_steps)
        elif c["use_exponential_sigmas"]:
            sigmas = np.exp(np.linspace(math.log(sigmas[0]), math.log(sigmas[-1]), num_inference_steps))
        sigmas = sigmas.astype(np.float32)
        self.timesteps = sigmas * np.float32(c["num_train_timesteps"])
        self.sigmas = np.concatenate([sigmas, np.zeros(1, np.float32)])
        self.index = 0

    def add_noise(self, original, noise, index=None):
        """The flow's forward process: (1 - sigma) x0 + sigma * noise (diffusers' scale_noise)."""
        sigma = self.sigmas[self.index if index is None else index]
        return (sigma * noise + (1 - sigma) * original).astype(np.float32)

    def update(self, model_output, sample, i, generator):
        return sample + (self.sigmas[i + 1] - self.sigmas[i]) * model_output
