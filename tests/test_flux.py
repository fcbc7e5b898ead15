"""FLUX.1: tiny random dev (guidance-distilled) and schnell checkpoints exported and run, against diffusers'
FluxPipeline and FluxImg2ImgPipeline on the same seeds (torch-cpu noise, drawn unpacked and packed as diffusers does)."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from conftest import exported, make_tiny_flux_checkpoint, run_cli  # noqa: E402
from test_sd3 import assert_equal_images, theirs  # noqa: E402

PROMPT = "a red cat on a green mat"


@pytest.fixture(scope="module", params=["dev", pytest.param("schnell", marks=pytest.mark.slow)])
def flux(request, tmp_path_factory):
    """(checkpoint, package, diffusers pipeline, diffrt pipeline) of one FLUX.1 variant."""
    from diffrt.runtime.pipeline import Pipeline

    root = tmp_path_factory.mktemp(f"flux-{request.param}")
    checkpoint = make_tiny_flux_checkpoint(root, guidance=request.param == "dev")
    package = exported(checkpoint, tmp_path_factory, f"flux-{request.param}")
    ours = Pipeline.from_package(package, backend="ort-cpu")
    return request.param, checkpoint, package, reference(diffusers.FluxPipeline, checkpoint, ours), ours


def reference(cls, checkpoint, ours):
    """The diffusers pipeline, called with the package's T5 length (schnell's 256, which its model card passes)."""
    return partial(cls.from_pretrained(checkpoint), max_sequence_length=ours.family.max_sequence_length)


def test_package_records_the_family(flux):
    variant, _, package, _, ours = flux
    m = json.loads((package / "diffrt.json").read_text())
    assert m["family"] == "flux" and m["latent_channels"] == 16 and m["vae_shift_factor"] == pytest.approx(0.1159)
    assert m["defaults"]["max_sequence_length"] == (512 if variant == "dev" else 256)
    assert ("guidance" in m["components"]["transformer"]["inputs"]) == (variant == "dev")
    assert ours.family.guidance == ("embedded" if variant == "dev" else "none")


@pytest.mark.parametrize("width, height, guidance", [(48, 32, 3.5), (32, 64, 1.0), (64, 64, 6.0)])
def test_images_equal_diffusers(flux, width, height, guidance):
    """Packed tokens and their ids, dynamic shift from the image's token count, FLUX's own sigmas, the guidance input
    (dev); several sizes and aspect ratios."""
    _, _, _, reference, ours = flux
    expected = theirs(reference, PROMPT, steps=4, width=width, height=height, seed=3, guidance_scale=guidance)
    given = {"guidance_scale": guidance} if ours.family.guidance == "embedded" else {}
    got = ours(PROMPT, steps=4, width=width, height=height, seed=3, rng="torch-cpu", **given)
    assert_equal_images(got.array, expected)


def test_two_images_with_their_own_guidance(flux):
    """Two images in one transformer call, each from its own seed (dev: each with its own guidance input)."""
    variant, _, _, reference, ours = flux
    if variant != "dev":
        pytest.skip("schnell takes no guidance")
    got = ours(PROMPT, steps=3, width=32, height=32, seed=7, rng="torch-cpu", num_images=2, guidance_scale=[2.0, 5.0])
    for i, guidance in enumerate((2.0, 5.0)):
        expected = theirs(reference, PROMPT, steps=3, width=32, height=32, seed=7 + i, guidance_scale=guidance)
        assert_equal_images(got.array[i:i + 1], expected)


def test_true_cfg_with_a_negative_prompt_equals_diffusers(flux):
    """diffusers' true_cfg_scale: the negative prompt's rows beside the prompt's, mixed as CFG, over the distilled
    guidance input (dev); a negative prompt without it is as diffusers treats it, unused."""
    _, _, _, reference, ours = flux
    expected = theirs(reference, PROMPT, steps=3, width=48, height=32, seed=4, negative_prompt="a blue dog",
                      true_cfg_scale=2.5)
    got = ours(PROMPT, steps=3, width=48, height=32, seed=4, rng="torch-cpu", negative_prompt="a blue dog",
               true_cfg_scale=2.5)
    assert_equal_images(got.array, expected)
    assert got.settings["true_cfg_scale"] == 2.5
    plain = ours(PROMPT, steps=3, width=48, height=32, seed=4, rng="torch-cpu", negative_prompt="a blue dog")
    assert_equal_images(plain.array, theirs(reference, PROMPT, steps=3, width=48, height=32, seed=4))


def test_rows_at_different_steps_and_guidance_share_a_transformer_call(flux):
    """Step-level batching: a request joins another mid-way, each row with its own timestep (and, on dev, its own
    guidance input); each equals its call alone."""
    variant, _, _, _, ours = flux
    calls = [dict(prompt="a cat", seed=1), dict(prompt="a dog", seed=2)]
    if variant == "dev":
        calls[0]["guidance_scale"], calls[1]["guidance_scale"] = 2.0, 6.0
    alone = [ours(steps=4, width=32, height=32, **c).array for c in calls]
    first = ours.begin(steps=4, width=32, height=32, **calls[0])
    ours.step([first])
    second = ours.begin(steps=4, width=32, height=32, **calls[1])
    while not (first.done and second.done):
        ours.step([s for s in (first, second) if not s.done])
    for stream, want in zip((first, second), alone):
        assert np.abs(ours.finish(stream).array - want).max() <= 1e-5


def test_img2img_equals_diffusers(flux):
    from PIL import Image

    _, checkpoint, _, _, ours = flux
    image = Image.fromarray((np.random.default_rng(0).random((32, 48, 3)) * 255).astype(np.uint8))
    img2img = reference(diffusers.FluxImg2ImgPipeline, checkpoint, ours)
    for strength in (0.7, 0.3):  # FluxImg2ImgPipeline's own default guidance is 7, FluxPipeline's (the package's) 3.5
        expected = theirs(img2img, PROMPT, steps=4, image=image, strength=strength, seed=2, width=48, height=32,
                          guidance_scale=3.5)
        got = ours(PROMPT, steps=4, image=image, strength=strength, seed=2, rng="torch-cpu")
        assert_equal_images(got.array, expected)


def test_refusals(flux, tmp_path):
    """What FLUX does not take, each refused in one line: clip skip, guidance rescale, A1111's prompt syntax, a size
    off the 2x2 packing grid, and on schnell a guidance scale; SD's families refuse true CFG."""
    from diffrt.runtime.errors import UserError

    variant, _, package, _, ours = flux
    with pytest.raises(UserError, match="take no clip skip"):
        ours("a cat", steps=2, clip_skip=2)
    with pytest.raises(UserError, match="take no guidance rescale"):
        ours("a cat", steps=2, guidance_rescale=0.5)
    with pytest.raises(UserError, match="read prompts as diffusers does"):
        ours("a cat", steps=2, prompt_syntax="a1111")
    with pytest.raises(UserError, match=f"multiple of {ours.family.size_multiple}"):
        ours("a cat", steps=2, width=34, height=32)
    if variant == "schnell":
        with pytest.raises(UserError, match="takes no guidance scale"):
            ours("a cat", steps=2, guidance_scale=3.5)
        result = run_cli("generate", "--model", str(package), "a cat", "--steps", "1", "--guidance", "3.5",
                         "--backend", "ort-cpu", "-o", str(tmp_path / "x.png"))
        assert result.returncode == 2 and "takes no guidance scale" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_served_with_the_openai_sdk(flux):
    """`diffrt serve` on FLUX: the OpenAI SDK's request (guidance and true CFG in its extra body) gets the pipeline's
    image; /v1/models says what guidance_scale means; a schnell server refuses a guidance scale with a 400."""
    openai = pytest.importorskip("openai")
    httpx = pytest.importorskip("httpx")
    from test_serve import Server, decode

    variant, _, package, _, ours = flux
    server = Server(package, "--max-wait-ms", "200")
    try:
        model = httpx.get(server.url + "/v1/models").json()
        assert model["data"][0]["family"] == "flux"
        assert model["data"][0]["guidance"].startswith("guidance-distilled" if variant == "dev" else "none")
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        extra = {"seed": 5, "steps": 3, "negative_prompt": "a blue dog", "true_cfg_scale": 2.0}
        if variant == "dev":
            extra["guidance_scale"] = 4.0
        got = client.images.generate(model=model["data"][0]["id"], prompt=PROMPT, size="48x32", extra_body=extra)
        want = ours(PROMPT, width=48, height=32, **{k: v for k, v in extra.items() if k != "steps"}, steps=3)
        assert np.abs(decode(got.data[0].b64_json) - np.asarray(want.images[0], np.int16)).max() == 0
        if variant == "schnell":
            bad = server.post("/v1/images/generations", {"prompt": "a cat", "size": "32x32", "guidance_scale": 3.5})
            assert bad.status_code == 400 and "takes no guidance scale" in bad.text
    finally:
        assert server.stop() == 0


def test_openvino_equals_diffusers(flux):
    """The same package on OpenVINO's CPU plugin (in float32) gives diffusers' image too."""
    pytest.importorskip("openvino")
    from diffrt.runtime.pipeline import Pipeline

    _, _, package, reference, ours = flux
    pipe = Pipeline.from_package(package, backend="ov-cpu", precision="fp32")
    given = {"guidance_scale": 4.0} if ours.family.guidance == "embedded" else {}
    expected = theirs(reference, PROMPT, steps=3, width=48, height=32, seed=6, **given)
    got = pipe(PROMPT, steps=3, width=48, height=32, seed=6, rng="torch-cpu", **given)
    assert_equal_images(got.array, expected)


def test_tensorrt_profiles(flux):
    """diffrt build's profiles for FLUX (no TensorRT needed): image tokens for the packed latents and their ids, T5's
    length for the text and its ids, a batch doubled only as far as true CFG may ask."""
    pytest.importorskip("onnx")
    from diffrt.export.profiles import parse_batch, parse_size
    from diffrt.export.trt_build import package_profiles
    from diffrt.runtime.package import load_package

    variant, _, package, _, ours = flux
    pkg = load_package(package)
    t5 = ours.family.max_sequence_length
    p = package_profiles(pkg, parse_batch("1"), *parse_size("64x32", 4, 64))
    tokens = (32 // 4) * (64 // 4)
    assert p["transformer"]["hidden_states"] == {"min": [1, tokens, 64], "opt": [1, tokens, 64], "max": [2, tokens, 64]}
    assert p["transformer"]["img_ids"]["opt"] == [tokens, 3] and p["transformer"]["txt_ids"]["opt"] == [t5, 3]
    assert p["transformer"]["encoder_hidden_states"]["max"] == [2, t5, 48]
    assert p["text_encoder_2"]["input_ids"]["opt"] == [1, t5] and p["text_encoder"]["input_ids"]["opt"] == [1, 77]
    assert ("guidance" in p["transformer"]) == (variant == "dev")
