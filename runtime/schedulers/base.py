"""The scheduler seam: config handling shared by every sampler."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from .parameterization import parameterization

COMMON_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}

# Config values this runtime does not implement: (key, value it must keep).
UNSUPPORTED = {"thresholding": False, "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
               "use_flow_sigmas": False, "timestep_type": "discrete", "interpolation_type": "linear", "variance_type": None}


class Scheduler:
    """A numpy sampler built from a diffusers scheduler config (same keys and defaults; unknown keys ignored)."""

    name: ClassVar[str]
    class_name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}
    prediction_types: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction")
    common: ClassVar[dict[str, Any]] = COMMON_DEFAULTS  # the config keys every sampler of its kind reads
    flow: ClassVar[bool] = False  # samples flow-matching models (sigmas from 1 to 0) rather than discrete-time ones
    stochastic: bool = False  # draws fresh noise from the request's generator while sampling

    def __init__(self, **config: Any) -> None:
        known = {**self.common, **self.defaults}
        self.config = {k: config.get(k, v) for k, v in known.items()}
        for key, ok in UNSUPPORTED.items():  # a sampler whose defaults name one of these keys implements it
            if key not in known and config.get(key) is not None and config[key] != ok:
                raise ValueError(f"{self.class_name}: {key}={config[key]!r} is not supported by diffrt; set it to {ok!r}")
        if self.config["prediction_type"] not in self.prediction_types:
            raise ValueError(f"{self.class_name}: prediction_type {self.config['prediction_type']!r} is not supported; "
                             f"use one of {', '.join(self.prediction_types)}")
        self.prediction = parameterization(self.config["prediction_type"])  # what the model's output is
        self.timesteps = np.zeros(0, np.int64)
        self.init_noise_sigma = 1.0
        self.index = 0  # the step the sampler is at (it owns its place in the loop); set_timesteps and begin set it

    def set_timesteps(self, num_inference_steps: int, image_seq_len: int | None = None) -> None:
        """The schedule for num_inference_steps; image_seq_len (the image's latent token count) is for schedules that
        depend on the image's size (FLUX's dynamic shift), which the others ignore."""
        raise NotImplementedError

    def scale_model_input(self, sample: np.ndarray) -> np.ndarray:
        """The model's input for the step the sampler is at."""
        return sample

    def step(self, model_output: np.ndarray, sample: np.ndarray, generator: np.random.Generator | None = None) -> np.ndarray:
        """The sample at the schedule's next point, from the model's output at this one; the sampler moves on."""
        out = self.update(model_output, sample, self.index, generator)
        self.index += 1
        return out.astype(np.float32, copy=False)

    def update(self, model_output: np.ndarray, sample: np.ndarray, i: int,
               generator: np.random.Generator | None) -> np.ndarray:
        """The step from schedule index i (what each sampler defines)."""
        raise NotImplementedError

    def add_noise(self, original: np.ndarray, noise: np.ndarray, index: int | None = None) -> np.ndarray:
        """original noised to the schedule's step `index` (default: where the sampler is), as img2img starts and
        inpainting keeps the known region: sqrt(alpha_bar) x + sqrt(1 - alpha_bar) noise."""
        acp = self.alphas_cumprod[int(self.timesteps[self.index if index is None else index])]
        return (acp**0.5 * original + (1 - acp) ** 0.5 * noise).astype(np.float32)

    def begin(self, index: int) -> None:
        """Start the schedule at step `index` (img2img), as diffusers' set_begin_index."""
        self.index = index

    @property
    def order(self) -> int:
        return 1

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def noise_like(x: np.ndarray, generator: np.random.Generator | None) -> np.ndarray:
    """Standard normal noise for ancestral samplers, from the pipeline's generator."""
    rng = generator if generator is not None else np.random.default_rng()
    return rng.standard_normal(x.shape, dtype=np.float32)
