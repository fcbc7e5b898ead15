"""Tiled VAE decode and encode against diffusers' AutoencoderKL with enable_tiling(): same tiles, overlaps and blending."""

from __future__ import annotations

import numpy as np
import pytest

from diffrt.runtime.errors import UserError
from diffrt.runtime.tiling import Tiles

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from conftest import reference_pipeline, run_cli  # noqa: E402

PROMPT = "a red house under the night sky"
# the tiny VAE's tiles: 32 pixels (its sample_size), 16 latents; these sizes take 1x2 up to 3x4 tiles, edges ragged
SIZES = [(64, 32), (72, 56), (96, 80), (40, 100)]


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    pipe = reference_pipeline("StableDiffusionPipeline", tiny_checkpoint)
    pipe.vae.enable_tiling()
    return pipe


def test_tiles_follow_the_vae_config(ours):
    assert ours.tiles == Tiles(32, 16)
    assert Tiles.of({"sample_size": 1024, "block_out_channels": [128, 256, 512, 512]}) == Tiles(1024, 128)
    assert Tiles.of({"sample_size": [768, 768], "block_out_channels": [128, 256, 512, 512]}) == Tiles(768, 96)
    sd15 = Tiles(512, 64)
    assert not sd15.needed("auto", 1024, 1024) and sd15.needed("auto", 1536, 1024)  # auto: above 1024x1024 pixels
    assert sd15.needed("on", 768, 512) and not sd15.needed("on", 512, 512) and not sd15.needed("off", 4096, 4096)


@pytest.mark.parametrize("width,height", SIZES)
def test_tiled_decode_and_encode_equal_diffusers(ours, reference, width, height):
    """The package's VAE graphs run tile by tile equal diffusers' tiled_decode and _tiled_encode, and differ from the
    whole-image run (so tiling did happen)."""
    rng = np.random.default_rng(width * height)
    latents = rng.standard_normal((1, 4, height // 2, width // 2), dtype=np.float32)
    pixels = rng.uniform(-1, 1, (1, 3, height, width)).astype(np.float32)
    with torch.no_grad():
        decoded = reference.vae.decode(torch.from_numpy(latents)).sample.numpy()
        moments = reference.vae._encode(torch.from_numpy(pixels)).numpy()
    timings: dict = {}
    mine = ours._decode(latents * np.float32(ours.package.vae_scaling_factor), timings, tiles=ours.tiles)
    assert np.abs(mine - np.clip(decoded / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)).max() <= 1e-4
    whole = ours._decode(latents * np.float32(ours.package.vae_scaling_factor), timings)
    assert np.abs(mine - whole).max() > 1e-3
    from diffrt.runtime import tiling

    run = lambda p: ours._encoder().run({"sample": p})["latent_parameters"]  # noqa: E731
    assert np.abs(tiling.encode(run, pixels, ours.tiles) - moments).max() <= 1e-4


def test_images_with_tiling_on_equal_diffusers_with_enable_tiling(ours, reference):
    for width, height in SIZES[1:3]:
        with torch.no_grad():
            theirs = reference(PROMPT, num_inference_steps=4, guidance_scale=7.5, width=width, height=height,
                               generator=torch.Generator().manual_seed(5), output_type="np").images
        mine = ours(PROMPT, steps=4, guidance_scale=7.5, width=width, height=height, seed=5, rng="torch-cpu",
                    scheduler="pndm", vae_tiling="on")
        assert np.abs(mine.array - theirs).max() <= 1e-3, (width, height)
        assert mine.settings["vae_tiled"] and mine.settings["vae_tiling"] == "on"
    untiled = ours(PROMPT, steps=4, guidance_scale=7.5, width=width, height=height, seed=5, rng="torch-cpu", scheduler="pndm")
    assert "vae_tiled" not in untiled.settings  # auto: 96x80 is far below 1024x1024
    assert np.abs(untiled.array - mine.array).max() > 1e-3


def test_img2img_and_inpainting_with_tiling_equal_diffusers(ours, tiny_checkpoint):
    from PIL import Image

    y, x = np.mgrid[0:80, 0:96]
    image = Image.fromarray(np.stack([x * 2, y * 3, (x + y) % 256], 2).astype(np.uint8))
    mask = Image.fromarray(((x > 30) & (y > 20)).astype(np.uint8) * 255)
    inpaint = {"mask_image": mask, "width": 96, "height": 80}
    for cls, extra in (("StableDiffusionImg2ImgPipeline", {}), ("StableDiffusionInpaintPipeline", inpaint)):
        pipe = reference_pipeline(cls, tiny_checkpoint)
        pipe.vae.enable_tiling()
        with torch.no_grad():
            theirs = pipe(PROMPT, image=image, strength=0.7, num_inference_steps=5, guidance_scale=7.5,
                          generator=torch.Generator().manual_seed(2), output_type="np", **extra).images
        mine = ours(PROMPT, image=image, strength=0.7, steps=5, guidance_scale=7.5, seed=2, rng="torch-cpu",
                    scheduler="pndm", vae_tiling="on", mask=extra.get("mask_image"))
        assert np.abs(mine.array - theirs).max() <= 1e-3, cls


def test_bad_tiling_mode(ours, tiny_package, tmp_path):
    with pytest.raises(UserError, match="VAE tiling must be one of auto, on, off, not 'sometimes'"):
        ours(PROMPT, steps=1, vae_tiling="sometimes")
    r = run_cli("generate", "x", "--model", str(tiny_package), "--vae-tiling", "always", "-o", str(tmp_path / "a.png"))
    assert r.returncode == 2 and "--vae-tiling" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("generate", "x", "--model", str(tiny_package), "--steps", "2", "--width", "72", "--height", "56",
                "--vae-tiling", "on", "-q", "-o", str(tmp_path / "b.png"))
    assert r.returncode == 0, r.stderr
    from diffrt.runtime.images import read_settings

    assert read_settings(tmp_path / "b.png")["vae_tiled"] is True
