"""What a model predicts, as one object per kind, so samplers never branch on prediction_type: each converts a model
output into the clean sample x0 (and the noise eps) at a noise level (stable-diffusion.cpp's denoiser shape).

Discrete-time models' samples are alpha * x0 + sigma * eps (k-diffusion's samples divide by alpha: x0 + sigma * eps);
flow-matching models' are (1 - sigma) * x0 + sigma * noise, and they predict the velocity noise - x0."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Parameterization:
    """A prediction type; subclasses give x0_eps, and x0 at a k-diffusion sigma follows from it."""

    name: str

    def x0_eps(self, output, sample, alpha, sigma):
        """(x0, eps) from a model output where sample = alpha * x0 + sigma * eps."""
        raise NotImplementedError

    def x0(self, output, sample, sigma):
        """x0 from a model output at a sampler's sigma: k-diffusion's (the sample is x0 + sigma * eps) for discrete-time
        models, the flow's own for flow models."""
        raise NotImplementedError


class Epsilon(Parameterization):
    def x0_eps(self, output, sample, alpha, sigma):
        return (sample - sigma * output) / alpha, output

    def x0(self, output, sample, sigma):
        return sample - sigma * output


class VPrediction(Parameterization):
    """v = alpha * eps - sigma * x0 (Salimans & Ho 2022)."""

    def x0_eps(self, output, sample, alpha, sigma):
        return alpha * sample - sigma * output, alpha * output + sigma * sample

    def x0(self, output, sample, sigma):
        return output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)


class Sample(Parameterization):
    """The model predicts x0 itself."""

    def x0_eps(self, output, sample, alpha, sigma):
        return output, (sample - alpha * output) / sigma

    def x0(self, output, sample, sigma):
        return output


class Flow(Parameterization):
    """Rectified flow (SD3, FLUX): sample = (1 - sigma) x0 + sigma * noise, the model predicts v = noise - x0."""

    def x0_eps(self, output, sample, alpha, sigma):
        return sample - sigma * output, sample + alpha * output

    def x0(self, output, sample, sigma):
        return sample - sigma * output


PARAMETERIZATIONS = {p.name: p for p in (Epsilon("epsilon"), VPrediction("v_prediction"), Sample("sample"), Flow("flow"))}


def parameterization(prediction_type: str) -> Parameterization:
    """The object for a diffusers prediction_type (and "flow" for flow-matching models)."""
    if prediction_type not in PARAMETERIZATIONS:
        raise ValueError(f"prediction_type {prediction_type!r} is not supported; use one of {', '.join(PARAMETERIZATIONS)}")
    return PARAMETERIZATIONS[prediction_type]
