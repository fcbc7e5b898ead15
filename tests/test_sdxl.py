"""SDXL (two text encoders, pooled embeddings, size/crop time ids, force_zeros_for_empty_prompt) against diffusers'
StableDiffusionXLPipeline and StableDiffusionXLImg2ImgPipeline on a tiny random checkpoint, and the package's layout
against optimum's."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffrt.runtime.errors import UserError
from diffrt.runtime.pipeline import Pipeline
from diffrt.runtime.schedulers import samplers_for

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from conftest import make_tiny_sdxl_checkpoint, reference_pipeline, use_sampler  # noqa: E402

PROMPT, NEGATIVE = "a tall red house under a green sky", "blurry dark"


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_package):
    return Pipeline.from_package(tiny_sdxl_package, backend="ort-cpu")


@pytest.fixture(scope="module")
def reference(tiny_sdxl_checkpoint):
    return reference_pipeline("StableDiffusionXLPipeline", tiny_sdxl_checkpoint)


def theirs_and_mine(pipe, ours, name: str, guidance: float, size: tuple[int, int], negative: str | None = NEGATIVE,
                    seed: int = 5, **conditioning) -> tuple[np.ndarray, np.ndarray]:
    """The same request through diffusers and diffrt from the same latents; stochastic samplers draw from
    torch.Generator().manual_seed(seed) on one side and its numpy reproduction on the other."""
    width, height = size
    latents = np.random.default_rng(seed).standard_normal((1, 4, height // 2, width // 2), dtype=np.float32)
    extra = use_sampler(pipe, name)
    with torch.no_grad():
        theirs = pipe(PROMPT, negative_prompt=negative, num_inference_steps=4, guidance_scale=guidance, width=width,
                      height=height, latents=torch.from_numpy(latents), generator=torch.Generator().manual_seed(seed),
                      output_type="np", **conditioning, **extra).images
    mine = ours(PROMPT, negative_prompt=negative or "", steps=4, guidance_scale=guidance, scheduler=name, seed=seed,
                width=width, height=height, latents=latents, rng="torch-cpu", **conditioning)
    return theirs, mine.array


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "ddim", "euler_a"])
def test_sdxl_images_match_diffusers(name, sdxl, reference):
    """Guidance 0 and 5, two sizes, two (original size, crop) settings, same latents and noise on both sides."""
    for guidance in (0.0, 5.0):
        for size in ((32, 32), (48, 32)):
            for conditioning in ({}, {"original_size": (96, 64), "crops_coords_top_left": (8, 16)}):
                theirs, mine = theirs_and_mine(reference, sdxl, name, guidance, size, **conditioning)
                diff = np.abs(mine - theirs).max()
                assert diff <= 1e-3, (name, guidance, size, conditioning, diff)
                assert np.abs(np.round(mine * 255) - np.round(theirs * 255)).max() <= 1


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) for n in samplers_for(flow=False)
                                  if n not in ("euler", "dpmpp_2m", "ddim", "euler_a")])
def test_every_other_sampler_matches_diffusers_on_sdxl(name, sdxl, reference):
    theirs, mine = theirs_and_mine(reference, sdxl, name, 5.0, (32, 32))
    assert np.abs(mine - theirs).max() <= 1e-3, name


def test_empty_negative_is_zeros_and_a_negative_is_encoded(sdxl, reference):
    """force_zeros_for_empty_prompt: no negative prompt means zero embeddings (diffusers' negative_prompt=None); a
    negative prompt goes through both encoders; the two images differ."""
    assert sdxl.package.force_zeros_for_empty_prompt
    theirs, mine = theirs_and_mine(reference, sdxl, "euler", 5.0, (32, 32), negative=None)
    assert np.abs(mine - theirs).max() <= 1e-3
    _, with_negative = theirs_and_mine(reference, sdxl, "euler", 5.0, (32, 32))
    assert np.abs(mine - with_negative).max() > 1e-3


def test_conditioning_reaches_the_unet(sdxl):
    """The time ids and pooled embeddings are not ignored: another original size or crop gives another image."""
    plain = sdxl(PROMPT, steps=2, seed=3, width=32, height=32)
    for other in ({"original_size": (128, 128)}, {"crops_coords_top_left": (0, 16)}):
        changed = sdxl(PROMPT, steps=2, seed=3, width=32, height=32, **other)
        assert np.abs(changed.array - plain.array).max() > 1e-3, other
    assert changed.settings["crops_coords_top_left"] == [0, 16] and changed.settings["original_size"] == [32, 32]


def test_clip_skip_matches_diffusers(sdxl, tiny_sdxl_checkpoint):
    """A1111's clip skip 2 is diffusers' clip_skip=1 (SDXL counts from the penultimate layer in both). Compared without
    guidance: diffusers' SDXL applies clip_skip to the prompt only and always takes the negative's penultimate layer;
    diffrt applies it to both, as A1111 does."""
    pipe = reference_pipeline("StableDiffusionXLPipeline", tiny_sdxl_checkpoint)
    latents = np.random.default_rng(2).standard_normal((1, 4, 16, 16), dtype=np.float32)
    with torch.no_grad():
        theirs = pipe(PROMPT, num_inference_steps=3, guidance_scale=0.0, width=32, height=32,
                      latents=torch.from_numpy(latents), clip_skip=1, output_type="np").images
    mine = sdxl(PROMPT, steps=3, guidance_scale=0.0, width=32, height=32, latents=latents, scheduler="euler", clip_skip=2)
    plain = sdxl(PROMPT, steps=3, guidance_scale=0.0, width=32, height=32, latents=latents, scheduler="euler")
    assert np.abs(mine.array - theirs).max() <= 1e-3 and np.abs(plain.array - theirs).max() > 1e-3
    with pytest.raises(UserError, match="more than the text encoder's 4 layers"):
        sdxl(PROMPT, steps=1, clip_skip=5)


@pytest.mark.slow
def test_turbo_one_step_no_guidance(tmp_path_factory):
    """SDXL-Turbo's settings: trailing Euler a, one to four steps, guidance 0."""
    from diffrt.export import export_package

    root = tmp_path_factory.mktemp("turbo")
    checkpoint = make_tiny_sdxl_checkpoint(root, turbo=True)
    package = export_package(checkpoint, root / "pkg", log=lambda msg: None)
    ours = Pipeline.from_package(package, backend="ort-cpu")
    pipe = reference_pipeline("StableDiffusionXLPipeline", checkpoint)
    for steps in (1, 4):
        latents = np.random.default_rng(steps).standard_normal((1, 4, 16, 16), dtype=np.float32)
        with torch.no_grad():
            theirs = pipe(PROMPT, num_inference_steps=steps, guidance_scale=0.0, width=32, height=32,
                          latents=torch.from_numpy(latents), generator=torch.Generator().manual_seed(steps),
                          output_type="np").images
        mine = ours(PROMPT, steps=steps, guidance_scale=0.0, width=32, height=32, latents=latents, seed=steps,
                    rng="torch-cpu")
        assert mine.settings["scheduler"] == "euler_a"
        assert np.abs(mine.array - theirs).max() <= 1e-3, steps


def test_img2img_matches_diffusers(sdxl, tiny_sdxl_checkpoint):
    from PIL import Image

    pipe = reference_pipeline("StableDiffusionXLImg2ImgPipeline", tiny_sdxl_checkpoint)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8))
    for name, strength in (("euler", 0.6), ("dpmpp_2m", 0.9)):
        extra = use_sampler(pipe, name)
        with torch.no_grad():
            theirs = pipe(PROMPT, image=image, strength=strength, negative_prompt=NEGATIVE, num_inference_steps=5,
                          guidance_scale=5.0, generator=torch.Generator().manual_seed(4), output_type="np",
                          **extra).images
        mine = sdxl(PROMPT, image=image, strength=strength, negative_prompt=NEGATIVE, steps=5, guidance_scale=5.0,
                    scheduler=name, seed=4, rng="torch-cpu")
        assert np.abs(mine.array - theirs).max() <= 1e-3, name


def test_package_is_in_optimums_sdxl_layout(tiny_sdxl_package):
    """optimum's names: text_encoder_2, tokenizer_2, hidden_states.N outputs, the UNet's text_embeds and time_ids."""
    manifest = json.loads((tiny_sdxl_package / "diffrt.json").read_text())
    assert manifest["family"] == "sdxl" and manifest["force_zeros_for_empty_prompt"] is True
    io = manifest["components"]
    assert list(io["text_encoder_2"]["outputs"])[:3] == ["text_embeds", "last_hidden_state", "hidden_states.0"]
    assert list(io["text_encoder"]["outputs"])[:3] == ["last_hidden_state", "pooler_output", "hidden_states.0"]
    assert list(io["unet"]["inputs"]) == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert (tiny_sdxl_package / "tokenizer_2" / "vocab.json").is_file()


def test_size_conditioning_is_checked(sdxl, ours):
    with pytest.raises(UserError, match="original size .* must be two whole numbers"):
        sdxl(PROMPT, steps=1, original_size=(0, 64))
    with pytest.raises(UserError, match="crop top-left .* must be two whole numbers"):
        sdxl(PROMPT, steps=1, crops_coords_top_left=(1.5, 0))
    with pytest.raises(UserError, match="apply to SDXL models only"):
        ours(PROMPT, steps=1, original_size=(64, 64))


@pytest.mark.slow
def test_optimum_round_trips(tiny_sdxl_checkpoint, tiny_sdxl_package, sdxl, tmp_path):
    """optimum's ORTStableDiffusionXLPipeline runs diffrt's package, and diffrt runs optimum's SDXL export: the same
    image from the same latents each way."""
    optimum = pytest.importorskip("optimum.onnxruntime", reason="optimum-onnx is not installed")
    from optimum.exporters.onnx import main_export

    latents = np.random.default_rng(3).standard_normal((1, 4, 16, 16), dtype=np.float32)
    pipe = optimum.ORTStableDiffusionXLPipeline.from_pretrained(tiny_sdxl_package)
    theirs = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=5.0, width=32, height=32,
                  latents=torch.from_numpy(latents), output_type="np").images
    mine = sdxl(PROMPT, negative_prompt=NEGATIVE, steps=4, guidance_scale=5.0, width=32, height=32, latents=latents,
                scheduler="euler")
    assert np.abs(mine.array - theirs).max() <= 1e-3
    main_export(str(tiny_sdxl_checkpoint), output=tmp_path / "opt", task="text-to-image", do_validation=False)
    theirs_package = Pipeline.from_package(tmp_path / "opt", backend="ort-cpu")
    assert theirs_package.package.family == "sdxl" and theirs_package.package.force_zeros_for_empty_prompt
    again = theirs_package(PROMPT, negative_prompt=NEGATIVE, steps=4, guidance_scale=5.0, width=32, height=32,
                           latents=latents, scheduler="euler")
    assert np.abs(again.array - mine.array).max() <= 1e-4


def test_tensorrt_profiles_cover_both_encoders_and_the_extra_unet_inputs(tiny_sdxl_package):
    from diffrt.export.profiles import Span
    from diffrt.export.trt_build import package_profiles
    from diffrt.runtime.package import load_package

    profiles = package_profiles(load_package(tiny_sdxl_package), Span(1, 1, 2), Span(32, 32, 64), Span(32, 32, 64))
    assert profiles["text_encoder_2"]["input_ids"] == {"min": [1, 77], "opt": [2, 77], "max": [4, 77]}
    assert profiles["unet"]["text_embeds"] == {"min": [1, 24], "opt": [2, 24], "max": [4, 24]}
    assert profiles["unet"]["time_ids"] == {"min": [1, 6], "opt": [2, 6], "max": [4, 6]}


@pytest.mark.slow
def test_fp16_package_keeps_the_vae_that_overflows_in_float16(tiny_sdxl_package, tmp_path):
    """The SDXL VAE's config says force_upcast: `diffrt quantize --precision fp16` keeps both VAE graphs float32 and
    converts the rest; the fp16 package's image stays close to the fp32 one."""
    from diffrt.export.precision import QuantizeOptions, quantize_package

    quantize_package(tiny_sdxl_package, tmp_path / "fp16", QuantizeOptions(precision="fp16"), log=lambda m: None)
    manifest = json.loads((tmp_path / "fp16" / "diffrt.json").read_text())
    precisions = {c: e["precision"] for c, e in manifest["components"].items()}
    assert precisions == {"text_encoder": "fp16", "text_encoder_2": "fp16", "unet": "fp16", "vae_decoder": "fp32",
                          "vae_encoder": "fp32"}
    half = Pipeline.from_package(tmp_path / "fp16", backend="ort-cpu")(PROMPT, steps=3, seed=1)
    full = Pipeline.from_package(tiny_sdxl_package, backend="ort-cpu")(PROMPT, steps=3, seed=1)
    assert np.abs(half.array - full.array).max() < 0.05 and half.array.std() > 0.01


def test_server_serves_sdxl_with_its_size_conditioning(tiny_sdxl_package, sdxl):
    """`diffrt serve` on an SDXL package: the OpenAI body's original_size / crops_coords_top_left reach the UNet (the
    image equals the pipeline's with them); an out-of-range crop is a 400."""
    pytest.importorskip("fastapi")
    import base64
    from io import BytesIO

    from PIL import Image
    from test_serve import Server

    server = Server(tiny_sdxl_package, "--max-wait-ms", "0")
    try:
        body = {"prompt": PROMPT, "steps": 3, "seed": 2, "size": "32x32", "original_size": [96, 64],
                "crops_coords_top_left": [8, 16]}
        response = server.post("/v1/images/generations", body)
        assert response.status_code == 200, response.text
        served = np.asarray(Image.open(BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))))
        mine = sdxl(PROMPT, steps=3, seed=2, width=32, height=32, original_size=(96, 64), crops_coords_top_left=(8, 16))
        assert np.abs(served.astype(int) - np.asarray(mine.images[0])).max() <= 1
        plain = sdxl(PROMPT, steps=3, seed=2, width=32, height=32)
        assert np.abs(served.astype(int) - np.asarray(plain.images[0])).max() > 1
        bad = server.post("/v1/images/generations", {**body, "crops_coords_top_left": [-1, 0]})
        assert bad.status_code == 400 and "crop top-left" in bad.json()["error"]["message"]
    finally:
        assert server.stop() == 0
