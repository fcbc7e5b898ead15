"""Image-to-image against diffusers' StableDiffusionImg2ImgPipeline: same weights, image and noise, every scheduler."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffrt.runtime.errors import UserError
from diffrt.runtime.pipeline import Pipeline
from diffrt.runtime.schedulers import samplers_for

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from conftest import FAST_SAMPLERS, reference_pipeline, sampler_params, shared_noise, sizes_for, use_sampler  # noqa: E402

PROMPT = "a red house under the night sky"


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return reference_pipeline("StableDiffusionImg2ImgPipeline", tiny_checkpoint)


def picture(width: int, height: int, mode: str = "RGB") -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=2).astype(np.uint8)
    return Image.fromarray(rgb).convert(mode)


@pytest.mark.parametrize("name", sampler_params(samplers_for(flow=False)))
def test_img2img_matches_diffusers(name, reference, ours):
    steps = 4 if name == "lcm" else 6  # as text-to-image's parity test (DDIM's x0 clipping amplifies float noise by 8)
    for strength in (0.3, 0.75, 1.0):
        for width, height in sizes_for(name, ((32, 32), (40, 24))):
            image, seed = picture(width, height), 3
            extra = use_sampler(reference, name)
            with shared_noise(seed), torch.no_grad():
                theirs = reference(PROMPT, image=image, strength=strength, num_inference_steps=steps, guidance_scale=7.5,
                                   output_type="np", **extra).images
            mine = ours(PROMPT, image=image, strength=strength, steps=steps, guidance_scale=7.5, scheduler=name, seed=seed)
            diff = np.abs(mine.array - theirs).max()
            assert diff <= 1e-3, f"{name} strength {strength} {width}x{height}: max |diff| {diff:.2e}"
            levels = np.abs(np.asarray(mine.images[0], np.int16) - (theirs[0] * 255).round().astype(np.int16)).max()
            assert levels <= 1, f"{name} strength {strength} {width}x{height}: {levels} levels"


def test_img2img_torch_cpu_seed_gives_diffusers_image(reference, ours):
    """rng torch-cpu with a real torch generator on diffusers' side: the VAE encoder's sample, the start noise and
    the sampler's noise are all drawn as diffusers draws them."""
    for seed in (3, 99):
        extra = use_sampler(reference, "euler_a")
        with torch.no_grad():
            theirs = reference(PROMPT, image=picture(40, 24), strength=0.6, num_inference_steps=6, guidance_scale=7.5,
                               generator=torch.Generator().manual_seed(seed), output_type="np", **extra).images
        mine = ours(PROMPT, image=picture(40, 24), strength=0.6, steps=6, guidance_scale=7.5, scheduler="euler_a",
                    seed=seed, rng="torch-cpu")
        assert np.abs(mine.array - theirs).max() <= 1e-3, seed


def test_strength_sets_the_steps_run_and_any_image_mode_is_taken(ours, tmp_path, monkeypatch):
    """strength s runs int(steps * s) UNet steps (the random-weight VAE cannot show closeness to the input, so the
    count is what is checked); palette, grey, alpha and 16-bit images are converted."""
    calls = []
    run = ours.unet.run
    monkeypatch.setattr(ours.unet, "run", lambda feeds: calls.append(1) or run(feeds))
    for strength, expected in ((0.1, 2), (0.55, 11), (1.0, 20)):
        calls.clear()
        ours(PROMPT, image=picture(32, 32), strength=strength, steps=20, seed=1, scheduler="ddim")
        assert len(calls) == expected, strength
    for mode in ("RGBA", "L", "P", "I;16"):
        img = picture(32, 32, "L").convert("I;16") if mode == "I;16" else picture(32, 32, mode)
        path = tmp_path / f"in-{mode.replace(';', '')}.png"
        img.save(path)
        assert ours(PROMPT, image=path, strength=0.5, steps=2, seed=1).array.shape == (1, 32, 32, 3)


def test_img2img_bad_input(ours, tmp_path):
    with pytest.raises(UserError, match=r"33x32; its sides must be multiples of 2.*32 or 34.*--resize"):
        ours(PROMPT, image=picture(33, 32), steps=2)
    assert ours(PROMPT, image=picture(33, 32), steps=2, resize=True).array.shape == (1, 32, 32, 3)
    with pytest.raises(UserError, match="strength must be"):
        ours(PROMPT, image=picture(32, 32), strength=1.5, steps=2)
    with pytest.raises(UserError, match="leaves no step"):
        ours(PROMPT, image=picture(32, 32), strength=0.05, steps=4)
    (tmp_path / "not.png").write_text("hello")
    with pytest.raises(UserError, match="could not be read as an image"):
        ours(PROMPT, image=tmp_path / "not.png", steps=2)
    with pytest.raises(UserError, match="leave out width and height"):
        ours(PROMPT, image=picture(32, 32), width=64, steps=2)


def mask_picture(width: int, height: int) -> Image.Image:
    """White (repaint) over the right half and a block at the top left, black elsewhere."""
    m = np.zeros((height, width), np.uint8)
    m[:, width // 2:] = 255
    m[: height // 4, : width // 4] = 200
    return Image.fromarray(m, "L")


OTHER_SAMPLERS = tuple(n for n in samplers_for(flow=False) if n not in FAST_SAMPLERS)


@pytest.mark.parametrize("kind", ["blend", "nine"])
@pytest.mark.parametrize("samplers", [pytest.param(FAST_SAMPLERS, id="fast"),
                                      pytest.param(OTHER_SAMPLERS, id="others", marks=pytest.mark.slow)])
def test_inpainting_matches_diffusers(kind, samplers, tiny_checkpoint, tiny_package, tiny_inpaint_checkpoint,
                                      tiny_inpaint_package):
    """A 4-channel UNet (the known region blended back at every step) and a 9-channel inpainting UNet, against
    StableDiffusionInpaintPipeline: every scheduler (the fast lane's few, the full suite's others), strengths 0.3,
    0.75 and 1.0, two sizes, same noise."""
    checkpoint, package = (tiny_checkpoint, tiny_package) if kind == "blend" else (tiny_inpaint_checkpoint, tiny_inpaint_package)
    reference = reference_pipeline("StableDiffusionInpaintPipeline", checkpoint)
    ours = Pipeline.from_package(package, backend="ort-cpu")
    for name in samplers:
        steps = 4 if name == "lcm" else 6
        for strength in (0.3, 0.75, 1.0):
            for width, height in sizes_for(name, ((32, 32), (40, 24))):
                image, mask = picture(width, height), mask_picture(width, height)
                extra = use_sampler(reference, name)
                with shared_noise(5), torch.no_grad():
                    theirs = reference(PROMPT, image=image, mask_image=mask, strength=strength, num_inference_steps=steps,
                                       guidance_scale=7.5, height=height, width=width, output_type="np", **extra).images
                mine = ours(PROMPT, image=image, mask=mask, strength=strength, steps=steps, guidance_scale=7.5,
                            scheduler=name, seed=5)
                diff = np.abs(mine.array - theirs).max()
                assert diff <= 1e-3, f"{kind} {name} strength {strength} {width}x{height}: max |diff| {diff:.2e}"


def test_inpainting_bad_input(tiny_package, tiny_inpaint_package):
    ours = Pipeline.from_package(tiny_package, backend="ort-cpu")
    with pytest.warns(UserWarning, match="mask is 16x16 and the image 32x32: the mask was resized"):
        resized = ours(PROMPT, image=picture(32, 32), mask=mask_picture(16, 16), steps=2, seed=1)
    assert resized.settings["mode"] == "inpaint" and len(resized.settings["mask_sha256"]) == 12
    assert "Denoising strength: 0.8" in __import__("diffrt.runtime.images", fromlist=["x"]).parameters_text(resized.settings)
    with pytest.raises(UserError, match="needs an image"):
        ours(PROMPT, mask=mask_picture(32, 32), steps=2)
    with pytest.raises(UserError, match="inpainting model"):
        Pipeline.from_package(tiny_inpaint_package, backend="ort-cpu")(PROMPT, steps=2)


def test_a_package_without_vae_encoder_is_refused_in_one_line(tmp_path):
    from conftest import bundled_without

    with pytest.raises(UserError, match="has no VAE encoder, which image-to-image and inpainting need"):
        Pipeline.from_package(bundled_without(tmp_path / "pkg"), backend="ort-cpu")(PROMPT, image=picture(64, 64), steps=2)
