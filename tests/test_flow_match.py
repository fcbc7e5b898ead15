"""FlowMatchEuler against diffusers' FlowMatchEulerDiscreteScheduler: sigmas, timesteps and every step of a trajectory
(same model outputs fed to both), for SD3's fixed shift, FLUX's dynamic shift from the image's token count and the
config's other spacings."""

from __future__ import annotations

import numpy as np
import pytest

from diffrt.runtime.request import make_checked_scheduler
from diffrt.runtime.schedulers import make_scheduler
from diffrt.runtime.schedulers.flow_match_euler import image_shift
from diffrt.runtime.schedulers.parameterization import parameterization

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000}
FLUX = {**FLOW, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
        "max_image_seq_len": 4096}
CONFIGS = {
    "sd3": ({**FLOW, "shift": 3.0}, False),
    "plain": (FLOW, False),
    "flux": (FLUX, True),  # FLUX's pipeline passes sigmas 1 .. 1/n and mu from the image's token count
    "flux-linear": ({**FLUX, "time_shift_type": "linear"}, True),
    "sd35-dynamic": ({**FLUX, "shift": 3.0, "base_image_seq_len": 256, "max_image_seq_len": 4096}, False),
    "karras": ({**FLOW, "shift": 3.0, "use_karras_sigmas": True}, False),
    "exponential": ({**FLOW, "shift": 3.0, "use_exponential_sigmas": True}, False),
    "terminal": ({**FLOW, "shift": 3.0, "shift_terminal": 0.02}, False),
}


def fake_velocity(sample: np.ndarray, t: float) -> np.ndarray:
    return (0.5 * sample + np.cos(sample * 1.3 + float(t) * 0.003)).astype(np.float32)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("steps", [1, 4, 28])
@pytest.mark.parametrize("tokens", [256, 1024, 4096])
def test_flow_match_euler_matches_diffusers_per_step(name, steps, tokens):
    config, flux_sigmas = CONFIGS[name]
    ours = make_scheduler("flow_euler", config)
    theirs = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    sigmas = np.linspace(1.0, 1 / steps, steps) if flux_sigmas else None
    mu = image_shift(ours.config, tokens) if config.get("use_dynamic_shifting") else None
    if name == "terminal" and steps == 1:  # diffusers stretches 0 / 0 into NaN there
        with pytest.raises(ValueError, match="shift_terminal needs at least 2 steps"):
            ours.set_timesteps(steps)
        return
    ours.set_timesteps(steps, image_seq_len=tokens, sigmas=sigmas)
    theirs.set_timesteps(steps, sigmas=None if sigmas is None else list(sigmas), mu=mu)
    np.testing.assert_allclose(ours.sigmas, theirs.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ours.timesteps, theirs.timesteps.numpy(), rtol=1e-6, atol=1e-4)
    x = np.random.default_rng(tokens + steps).standard_normal((2, 16, 8, 8)).astype(np.float32)
    x_theirs = torch.from_numpy(x)
    for t_ours, t_theirs in zip(ours.timesteps, theirs.timesteps):
        out = fake_velocity(x, t_ours)
        x = ours.step(out, x)
        x_theirs = theirs.step(torch.from_numpy(out), t_theirs, x_theirs).prev_sample
        scale = max(float(np.abs(x).max()), 1.0)
        assert np.abs(x - x_theirs.numpy()).max() / scale <= 1e-5, f"{name} steps={steps} tokens={tokens}"


def test_dynamic_shift_follows_the_image_size():
    """A larger image shifts its schedule further towards noise; image_shift is diffusers' calculate_shift."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = make_scheduler("flow_euler", FLUX)
    for tokens in (64, 256, 1000, 4096, 9000):
        assert image_shift(sched.config, tokens) == pytest.approx(calculate_shift(tokens, 256, 4096, 0.5, 1.15), rel=1e-12)
    middles = []
    for tokens in (256, 4096):
        sched.set_timesteps(10, image_seq_len=tokens)
        middles.append(sched.sigmas[5])
    assert middles[1] > middles[0]
    with pytest.raises(ValueError, match="needs the image's token count"):
        sched.set_timesteps(10)


def test_img2img_noise_is_the_flow_forward_process():
    ours = make_scheduler("flow_euler", {**FLOW, "shift": 3.0})
    theirs = diffusers.FlowMatchEulerDiscreteScheduler.from_config({**FLOW, "shift": 3.0})
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    x0, noise = (np.random.default_rng(s).standard_normal((1, 16, 8, 8)).astype(np.float32) for s in (1, 2))
    expected = theirs.scale_noise(torch.from_numpy(x0), theirs.timesteps[3:4], torch.from_numpy(noise)).numpy()
    np.testing.assert_allclose(ours.add_noise(x0, noise, 3), expected, rtol=1e-6, atol=1e-6)


def test_flow_and_discrete_samplers_are_not_mixed_up():
    """A flow model's config refuses the discrete samplers and a UNet model's refuses the flow one, naming those that fit;
    the flow schedule's timesteps run up to num_train_timesteps (1000)."""
    with pytest.raises(ValueError, match="euler scheduler cannot sample a flow-matching model.*flow_euler"):
        make_scheduler("euler", FLOW)
    with pytest.raises(ValueError, match="cannot sample a discrete-time model"):
        make_scheduler("flow_euler", {"_class_name": "EulerDiscreteScheduler"})
    assert type(make_scheduler(None, FLOW)).__name__ == "FlowMatchEuler"
    sched = make_checked_scheduler("flow_euler", FLUX, 20, image_seq_len=1024)
    assert sched.timesteps[0] == 1000


def test_parameterizations_invert_their_forward_process():
    """Each parameterization's x0 and eps reproduce the sample it was given: alpha x0 + sigma eps."""
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((2, 4, 4)), rng.standard_normal((2, 4, 4))
    alpha, sigma = 0.6, 0.8
    sample = alpha * x0 + sigma * eps
    outputs = {"epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "sample": x0}
    for name, output in outputs.items():
        got_x0, got_eps = parameterization(name).x0_eps(output, sample, alpha, sigma)
        np.testing.assert_allclose(got_x0, x0, atol=1e-12)
        np.testing.assert_allclose(got_eps, eps, atol=1e-12)
    flow_sigma = 0.3
    flow_sample = (1 - flow_sigma) * x0 + flow_sigma * eps
    np.testing.assert_allclose(parameterization("flow").x0(eps - x0, flow_sample, flow_sigma), x0, atol=1e-12)
    with pytest.raises(ValueError, match="prediction_type 'score'"):
        parameterization("score")
