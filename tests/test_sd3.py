"""Stable Diffusion 3: a tiny random SD3 checkpoint exported and run, against diffusers' StableDiffusion3Pipeline and
StableDiffusion3Img2ImgPipeline on the same seeds (torch-cpu noise)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from conftest import exported, make_tiny_sd3_checkpoint, run_cli  # noqa: E402

PROMPT = "a red cat on a green mat"


@pytest.fixture(scope="module")
def sd3_checkpoint(tmp_path_factory):
    return make_tiny_sd3_checkpoint(tmp_path_factory.mktemp("sd3"))


@pytest.fixture(scope="module")
def sd3_package(sd3_checkpoint, tmp_path_factory):
    return exported(sd3_checkpoint, tmp_path_factory, "sd3")


@pytest.fixture(scope="module")
def reference(sd3_checkpoint):
    return diffusers.StableDiffusion3Pipeline.from_pretrained(sd3_checkpoint)


@pytest.fixture(scope="module")
def ours(sd3_package):
    from diffrt.runtime.pipeline import Pipeline

    return Pipeline.from_package(sd3_package, backend="ort-cpu")


def assert_equal_images(got: np.ndarray, expected: np.ndarray) -> None:
    """max |Δ| ≤ 1e-3 in float, uint8 within 2 levels."""
    assert np.abs(got - expected).max() <= 1e-3
    assert np.abs(np.round(got * 255).astype(int) - np.round(expected * 255).astype(int)).max() <= 2


def theirs(pipe, prompt, **settings) -> np.ndarray:
    """diffusers' images, image i from a generator seeded seed + i (as diffrt seeds each image)."""
    seed, count = settings.pop("seed"), settings.get("num_images_per_prompt", 1)
    settings["num_inference_steps"] = settings.pop("steps")
    generators = [torch.Generator().manual_seed(seed + i) for i in range(count)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipe(prompt, generator=generators, output_type="np", **settings).images


def test_package_records_the_family(sd3_package):
    m = json.loads((sd3_package / "diffrt.json").read_text())
    assert m["family"] == "sd3" and m["latent_channels"] == 16 and m["vae_shift_factor"] == pytest.approx(0.0609)
    assert m["defaults"]["scheduler"] == "flow_euler" and m["defaults"]["max_sequence_length"] == 256
    assert m["defaults"]["guidance_scale"] == 7.0 and m["defaults"]["steps"] == 28
    assert set(m["components"]) == {"text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_decoder",
                                    "vae_encoder"}
    assert (sd3_package / "tokenizer_3" / "tokenizer.json").is_file()


@pytest.mark.parametrize("width, height, settings", [
    (48, 32, {"guidance_scale": 5.0}),
    (32, 64, {"guidance_scale": 1.0}),  # no guidance: the prompt's rows alone
    (40, 40, {"guidance_scale": 4.0, "negative_prompt": "a blue dog"}),
    (64, 24, {"guidance_scale": 6.0, "num_images_per_prompt": 2}),
])
def test_images_equal_diffusers(ours, reference, width, height, settings):
    expected = theirs(reference, PROMPT, steps=4, width=width, height=height, seed=3, **settings)
    settings["num_images"] = settings.pop("num_images_per_prompt", 1)
    got = ours(PROMPT, steps=4, width=width, height=height, seed=3, rng="torch-cpu", **settings)
    assert got.array.shape == expected.shape
    assert_equal_images(got.array, expected)


def test_long_t5_prompt_is_cut_as_diffusers_cuts_it(ours, reference):
    """A prompt longer than CLIP's 77 tokens and T5's max_sequence_length (here 40): both cut with a warning."""
    long = " ".join(["a small red cat sitting on a green mat under the night sky"] * 12)
    expected = theirs(reference, long, steps=3, width=32, height=32, seed=1, guidance_scale=5.0, max_sequence_length=40)
    from dataclasses import replace

    from diffrt.runtime.pipeline import Pipeline

    pipe = Pipeline(replace(ours.package, defaults={**ours.package.defaults, "max_sequence_length": 40}), backend="ort-cpu")
    with pytest.warns(UserWarning, match="dropped"):
        got = pipe(long, steps=3, width=32, height=32, seed=1, rng="torch-cpu", guidance_scale=5.0)
    assert_equal_images(got.array, expected)


@pytest.mark.slow
def test_without_t5_equals_diffusers_without_it(tmp_path_factory):
    """A checkpoint saved with text_encoder_3=None: the package has no T5 and zeros take its place, as in diffusers."""
    from diffrt.runtime.pipeline import Pipeline

    checkpoint = make_tiny_sd3_checkpoint(tmp_path_factory.mktemp("sd3-no-t5"), t5=False)
    package = exported(checkpoint, tmp_path_factory, "sd3-no-t5")
    assert not (package / "text_encoder_3").exists()
    reference = diffusers.StableDiffusion3Pipeline.from_pretrained(checkpoint, text_encoder_3=None, tokenizer_3=None)
    pipe = Pipeline.from_package(package, backend="ort-cpu")
    expected = theirs(reference, PROMPT, steps=3, width=48, height=32, seed=5, guidance_scale=5.0, negative_prompt="dog")
    got = pipe(PROMPT, steps=3, width=48, height=32, seed=5, rng="torch-cpu", guidance_scale=5.0, negative_prompt="dog")
    assert_equal_images(got.array, expected)


def test_img2img_equals_diffusers(ours, sd3_checkpoint, tmp_path):
    """Flow matching's scale_noise start, and diffusers' own strength rounding for SD3 (0.7 of 4 steps skips 1 and
    runs 3, where its SD pipelines run 2; 0.3 runs 1)."""
    from PIL import Image

    image = Image.fromarray((np.random.default_rng(0).random((32, 48, 3)) * 255).astype(np.uint8))
    reference = diffusers.StableDiffusion3Img2ImgPipeline.from_pretrained(sd3_checkpoint)
    for strength in (0.7, 0.3):
        expected = theirs(reference, PROMPT, steps=4, image=image, strength=strength, seed=2, guidance_scale=5.0,
                          width=48, height=32)
        got = ours(PROMPT, steps=4, image=image, strength=strength, seed=2, rng="torch-cpu", guidance_scale=5.0)
        assert_equal_images(got.array, expected)


def test_rows_at_different_steps_share_a_transformer_call(ours):
    """Step-level batching: the transformer takes one timestep per row, so a request joins another mid-way and each
    equals its call alone."""
    alone = [ours("a cat", steps=4, seed=1, width=32, height=32).array,
             ours("a dog", steps=4, seed=2, width=32, height=32).array]
    first = ours.begin("a cat", steps=4, seed=1, width=32, height=32)
    ours.step([first])
    second = ours.begin("a dog", steps=4, seed=2, width=32, height=32)
    while not (first.done and second.done):
        ours.step([s for s in (first, second) if not s.done])
    for stream, want in zip((first, second), alone):
        assert np.abs(ours.finish(stream).array - want).max() <= 1e-5


def test_refusals(ours, sd3_package, tmp_path):
    """What SD3 does not take, each refused in one line: A1111's prompt syntax, a discrete-time sampler, a size off
    the 2x2 patch grid (naming the nearest sizes), a mask, a LoRA."""
    from PIL import Image

    from diffrt.runtime.errors import UserError

    with pytest.raises(UserError, match="read prompts as diffusers does"):
        ours("a (cat:1.2)", steps=2, prompt_syntax="a1111")
    with pytest.raises(UserError, match="cannot sample a flow-matching model.*flow_euler"):
        ours("a cat", steps=2, scheduler="dpmpp_2m")
    multiple = ours.family.size_multiple
    with pytest.raises(UserError, match=f"multiple of {multiple}"):
        ours("a cat", steps=2, width=multiple * 8 + 2, height=32)
    with pytest.raises(UserError, match="inpainting on sd3 models is not built yet"):
        ours("a cat", steps=2, image=Image.new("RGB", (32, 32)), mask=Image.new("L", (32, 32), 255))
    result = run_cli("generate", "--model", str(sd3_package), "a cat", "--steps", "2", "--width", "34", "--backend",
                     "ort-cpu", "-o", str(tmp_path / "x.png"))
    assert result.returncode == 2 and "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    from safetensors.numpy import save_file

    save_file({"lora_unet_x.lora_down.weight": np.zeros((4, 8), np.float32)}, str(tmp_path / "x.safetensors"))
    result = run_cli("generate", "--model", str(sd3_package), "a cat", "--steps", "2", "--lora", str(tmp_path / "x.safetensors"),
                     "--backend", "ort-cpu", "-o", str(tmp_path / "y.png"))
    assert result.returncode == 2 and "LoRAs on sd3 models are not supported" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_openvino_equals_diffusers(sd3_package, reference):
    """The same package on OpenVINO's CPU plugin (in float32) gives diffusers' image too."""
    pytest.importorskip("openvino")
    from diffrt.runtime.pipeline import Pipeline

    pipe = Pipeline.from_package(sd3_package, backend="ov-cpu", precision="fp32")
    expected = theirs(reference, PROMPT, steps=3, width=48, height=32, seed=6, guidance_scale=5.0, negative_prompt="a dog")
    got = pipe(PROMPT, steps=3, width=48, height=32, seed=6, rng="torch-cpu", guidance_scale=5.0, negative_prompt="a dog")
    assert_equal_images(got.array, expected)


def test_tensorrt_profiles(sd3_package):
    """diffrt build's profiles for SD3 (no TensorRT needed): CLIP's 77 tokens, T5's 256, the transformer's 77 + 256,
    the CFG-doubled batch, latents on the 2x2 patch grid."""
    pytest.importorskip("onnx")
    from diffrt.export.profiles import parse_batch, parse_size
    from diffrt.export.trt_build import package_profiles
    from diffrt.runtime.package import load_package

    pkg = load_package(sd3_package)
    p = package_profiles(pkg, parse_batch("1-2"), *parse_size("64x32", 4, 64))
    assert p["text_encoder"]["input_ids"] == {"min": [1, 77], "opt": [2, 77], "max": [4, 77]}
    assert p["text_encoder_3"]["input_ids"]["max"] == [4, 256]
    assert p["transformer"]["hidden_states"] == {"min": [1, 16, 16, 32], "opt": [2, 16, 16, 32], "max": [4, 16, 16, 32]}
    assert p["transformer"]["encoder_hidden_states"]["opt"] == [2, 77 + 256, 96]
    assert p["transformer"]["pooled_projections"]["max"] == [4, 80]


@pytest.mark.slow
def test_streamed_export_keeps_16_bit_weights(sd3_checkpoint, tmp_path, monkeypatch):
    """A model over the size threshold is exported without being loaded: traced on a weightless copy, each weight
    read from the checkpoint's files as it is written, in the dtype stored there (T5 in bf16, the transformer in fp16
    stay so, behind a Cast); every graph still passes its check, and the images equal diffusers' (weights upcast)."""
    import shutil

    from diffrt.export import ExportOptions, export_package, writer
    from diffrt.runtime.pipeline import Pipeline

    half = tmp_path / "half"
    shutil.copytree(sd3_checkpoint, half)
    for folder, cls, dtype in (("text_encoder_3", "T5EncoderModel", torch.bfloat16),
                               ("transformer", "SD3Transformer2DModel", torch.float16)):
        library = __import__("transformers" if folder.startswith("text") else "diffusers")
        getattr(library, cls).from_pretrained(sd3_checkpoint / folder, torch_dtype=dtype).save_pretrained(half / folder)
    monkeypatch.setattr(writer, "BIG_MODEL_BYTES", 0)
    logs = []
    package = export_package(half, tmp_path / "pkg", ExportOptions(), log=logs.append)
    manifest = json.loads((package / "diffrt.json").read_text())
    assert sum("weights read from the files" in line for line in logs) >= 4
    assert manifest["components"]["text_encoder_3"]["weights"] == "bf16"
    assert manifest["components"]["transformer"]["weights"] == "fp16"
    assert all(c["check"]["passed"] for c in manifest["components"].values())
    reference = diffusers.StableDiffusion3Pipeline.from_pretrained(half, torch_dtype=torch.float32)
    expected = theirs(reference, PROMPT, steps=3, width=48, height=32, seed=3, guidance_scale=5.0)
    got = Pipeline.from_package(package, backend="ort-cpu")(PROMPT, steps=3, width=48, height=32, seed=3,
                                                             rng="torch-cpu", guidance_scale=5.0)
    assert_equal_images(got.array, expected)
    # --weights-fp32: the same values written as float32 (no Casts), the same images on ov-cpu
    import onnx

    wide = export_package(half, tmp_path / "wide", ExportOptions(weights_fp32=True), log=lambda m: None)
    components = json.loads((wide / "diffrt.json").read_text())["components"]
    assert "weights" not in components["transformer"] and "weights" not in components["text_encoder_3"]
    graph = onnx.load(str(wide / "transformer" / "model.onnx"), load_external_data=False).graph
    assert {t.data_type for t in graph.initializer} <= {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}
    assert not any(n.op_type == "Cast" and n.name.endswith("__cast") for n in graph.node)
    for backend in ("ort-cpu", "ov-cpu"):
        settings = {"steps": 3, "width": 48, "height": 32, "seed": 3, "guidance_scale": 5.0}
        narrow = Pipeline.from_package(package, backend=backend, precision="auto" if backend == "ort-cpu" else "fp32")
        widened = Pipeline.from_package(wide, backend=backend, precision="auto" if backend == "ort-cpu" else "fp32")
        np.testing.assert_allclose(widened(PROMPT, **settings).array, narrow(PROMPT, **settings).array, atol=1e-5)
