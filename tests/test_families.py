"""Model families beside SD 1.x: SD 2.x (OpenCLIP-style GELU text encoder, `!` padding, v-prediction over
zero-terminal-SNR betas, trailing spacing, guidance_rescale) against diffusers' StableDiffusionPipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffrt.runtime.errors import UserError
from diffrt.runtime.pipeline import Pipeline

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from conftest import reference_pipeline, use_sampler  # noqa: E402

PROMPT, NEGATIVE = "a tall red house under a green sky", "blurry"


@pytest.fixture(scope="module")
def sd2(tiny_sd2_package):
    return Pipeline.from_package(tiny_sd2_package, backend="ort-cpu")


@pytest.mark.parametrize("name", ["ddim", *(pytest.param(n, marks=pytest.mark.slow) for n in ("dpmpp_2m", "unipc", "euler_a"))])
def test_sd2_images_match_diffusers(name, sd2, tiny_sd2_checkpoint, tiny_sd2_package):
    """v-prediction, zero terminal SNR, trailing spacing and `!` padding, with guidance_rescale 0 and 0.7, guidance
    1 and 7.5, two sizes, same latents (and noise) on both sides."""
    config = json.loads((tiny_sd2_package / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction" and config["rescale_betas_zero_snr"] is True
    assert sd2.tokenizer.pad_token == "!"
    pipe = reference_pipeline("StableDiffusionPipeline", tiny_sd2_checkpoint)
    for guidance, rescale in ((7.5, 0.0), (7.5, 0.7), (1.0, 0.0)):
        for width, height in ((32, 32), (40, 24)):
            latents = np.random.default_rng(5).standard_normal((1, 4, height // 2, width // 2), dtype=np.float32)
            extra = use_sampler(pipe, name)
            with torch.no_grad():
                theirs = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=5, guidance_scale=guidance,
                              guidance_rescale=rescale, width=width, height=height, latents=torch.from_numpy(latents),
                              generator=torch.Generator().manual_seed(5), output_type="np", **extra).images
            mine = sd2(PROMPT, negative_prompt=NEGATIVE, steps=5, guidance_scale=guidance, guidance_rescale=rescale,
                       scheduler=name, seed=5, width=width, height=height, latents=latents, rng="torch-cpu")
            diff = np.abs(mine.array - theirs).max()
            assert diff <= 1e-3, (name, guidance, rescale, width, height, diff)


def test_guidance_rescale_changes_the_image_and_is_checked(sd2):
    plain = sd2(PROMPT, steps=3, seed=1, scheduler="ddim", width=32, height=32)
    rescaled = sd2(PROMPT, steps=3, seed=1, scheduler="ddim", width=32, height=32, guidance_rescale=0.7)
    assert np.abs(plain.array - rescaled.array).max() > 1e-3 and rescaled.settings["guidance_rescale"] == 0.7
    with pytest.raises(UserError, match="guidance rescale must be a number from 0 to 1"):
        sd2(PROMPT, steps=2, guidance_rescale=1.5)
