"""The bundled shapes-tiny model: found without --model, small, and its images follow the prompt."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffrt.models.shapes_data import Scene, read_image, render
from diffrt.runtime.bundled import bundled_model
from diffrt.runtime.pipeline import Pipeline

MODELS = Path(__file__).resolve().parent.parent / "models"
CASES = [  # prompt, seed, expected (background, colour, shape)
    ("a red circle on a blue background", 1, ("blue", "red", "circle")),
    ("a large yellow square on a black background, center", 2, ("black", "yellow", "square")),
    ("a small white triangle on a green background, top left", 3, ("green", "white", "triangle")),
]


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_package(None, backend="ort-cpu")


def test_bundled_model_is_the_default_and_small(pipe):
    assert pipe.package.root == bundled_model() and pipe.package.name == "shapes-tiny"
    tracked = sum(p.stat().st_size for p in MODELS.rglob("*") if p.is_file() and "build" not in p.parts
                  and "__pycache__" not in p.parts)
    assert tracked < 20 * 2**20, f"models/ holds {tracked / 2**20:.1f} MiB"


@pytest.mark.parametrize("prompt, seed, expected", CASES)
def test_background_follows_the_prompt(pipe, prompt, seed, expected):
    assert read_image(np.asarray(pipe(prompt, seed=seed).images[0])).background == expected[0]


def test_red_circle_on_blue(pipe):
    """Colours right for every seed; the shape for most (6 of 8 here: seeds 1 and 2 give rounded squares)."""
    readings = [read_image(np.asarray(pipe("a red circle on a blue background", seed=seed).images[0])) for seed in range(8)]
    assert all((r.background, r.colour) == ("blue", "red") for r in readings), readings
    assert sum(r.shape == "circle" for r in readings) >= 6, readings


@pytest.mark.parametrize("prompt, seed, expected", CASES[1:])
def test_shape_colour_follows_the_prompt(pipe, prompt, seed, expected):
    reading = read_image(np.asarray(pipe(prompt, seed=seed).images[0]))
    assert reading.colour == expected[1], reading


def test_bundled_manifest_names_no_path_of_the_machine_that_made_it():
    import json

    text = (bundled_model() / "diffrt.json").read_text()
    assert "/work/" not in text and "/tmp/" not in text and "/home/" not in text
    assert json.loads(text)["source"]["checkpoint"] == "shapes-checkpoint-fp16w"


def scene_image(colour: str, background: str, shape: str = "circle") -> Image.Image:
    return Image.fromarray(render(Scene(shape, colour, background, "large", "center"), np.random.default_rng(0)))


def test_img2img_repaints_a_red_circle_blue(pipe):
    """The bundled model's VAE encoder: a red circle at strength 0.8 under a blue circle's prompt reads back blue on
    the same background; at strength 0.3 under its own prompt it stays what it was."""
    red = scene_image("red", "white")
    for seed in range(4):
        blue = read_image(np.asarray(pipe("a blue circle on a white background", image=red, strength=0.8, seed=seed).images[0]))
        assert (blue.colour, blue.background) == ("blue", "white"), (seed, blue)
        kept = read_image(np.asarray(pipe("a red circle on a white background", image=red, strength=0.3, seed=seed).images[0]))
        assert (kept.colour, kept.background, kept.shape) == ("red", "white", "circle"), (seed, kept)


def test_inpainting_repaints_only_the_mask(pipe):
    """A green square on yellow, its middle masked and repainted under a magenta circle's prompt: magenta inside the
    mask, the yellow border kept."""
    image = scene_image("green", "yellow", "square")
    mask = np.zeros((64, 64), np.uint8)
    mask[12:52, 12:52] = 255
    out = np.asarray(pipe("a magenta circle on a yellow background", image=image, mask=Image.fromarray(mask), strength=1.0,
                          seed=1).images[0])
    reading = read_image(out)
    assert (reading.colour, reading.background) == ("magenta", "yellow"), reading
    border = np.asarray(image).astype(int)[:6], out.astype(int)[:6]
    assert np.abs(border[0] - border[1]).mean() < 12


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """The bundled model's fp16 and int8 packages, as `diffrt quantize` makes them (each refused under its gates)."""
    pytest.importorskip("onnx")
    from diffrt.export.precision import QuantizeOptions, quantize_package

    out = tmp_path_factory.mktemp("bundled-quantized")
    return {p: (out / p, quantize_package(bundled_model(), out / p, QuantizeOptions(precision=p), log=lambda m: None))
            for p in ("fp16", "int8")}


@pytest.mark.slow
def test_int8_bundled_model_passes_its_gates_and_follows_the_prompt(quantized):
    """`diffrt quantize --precision int8` on the bundled model: 22 dB against float32 on onnxruntime and on OpenVINO
    (int8 with bf16 or fp32 for the rest, by the CPU), and its images still read as the prompt says."""
    from diffrt.runtime.backends.openvino import openvino_available
    from diffrt.runtime.trust import cpu_kind

    out, gates = quantized["int8"]
    assert gates["passed"] and gates["psnr_db_min"] >= 22 and gates["images"] == 8 and gates["cpu_kind"] == cpu_kind()
    backend = "ov-cpu" if openvino_available() else "ort-cpu"
    if backend == "ov-cpu":
        assert gates["ov-cpu"]["psnr_db_min"] >= 22 and gates["ov-cpu"]["computes"].startswith("int8+")
    int8 = Pipeline.from_package(out, backend=backend)
    for prompt, seed, expected in CASES:
        reading = read_image(np.asarray(int8(prompt, seed=seed).images[0]))
        assert (reading.background, reading.colour) == expected[:2], (prompt, reading)


@pytest.mark.slow
def test_every_precision_on_every_cpu_backend(quantized):
    """fp32, fp16 and int8 packages of the bundled model on ort-cpu and, where installed, ov-cpu, each backend named:
    images within the path's gate (trust.gate_db of what it computed) against float32 on the gate prompts (4 steps,
    as doctor's bf16 check was measured on AMX; a broken path, such as signed int8 without AMX, fails at any count)."""
    from diffrt.runtime.backends.openvino import openvino_available
    from diffrt.runtime.doctor import GATE_PROMPTS, psnr
    from diffrt.runtime.trust import gate_db

    backends = ["ort-cpu"] + ["ov-cpu"] * openvino_available()
    reference = Pipeline.from_package(None, backend="ort-cpu")
    want = {p: reference(p, seed=0, steps=4).array for p in GATE_PROMPTS[:2]}
    packages = {"fp32": bundled_model(), "fp16": quantized["fp16"][0], "int8": quantized["int8"][0]}
    seen = set()
    for precision, package in packages.items():
        for backend in backends:
            pipe = Pipeline.from_package(package, backend=backend)
            for prompt, array in want.items():
                got = pipe(prompt, seed=0, steps=4)
                assert got.settings["precision"].startswith("bf16" if precision == "fp32" and pipe.precision == "bf16"
                                                            else precision)
                low = psnr(got.array, array)
                assert low >= gate_db(got.settings["precision"]), (precision, backend, prompt, low)
            seen.add((precision, backend))
    assert len(seen) == 3 * len(backends)


def test_bundled_controlnet_places_the_shape_where_its_edge_map_has_it(pipe, tmp_path):
    """The bundled ControlNet (models/train_controlnet.py) steers position, which the prompt cannot (the model ignores
    position words): held-out scenes prompted without them land at the edge map's position."""
    from diffrt.models.shapes_data import POSITIONS, held_out_scenes, read_position
    from diffrt.runtime.control import ControlInput

    assert pipe.package.controlnets() == ["edges"]
    rng = np.random.default_rng(3)
    scenes = [s for s in held_out_scenes() if s.position != "center"][:8]
    hits = {"with": 0, "without": 0}
    for i, scene in enumerate(scenes):
        photo = tmp_path / f"scene-{i}.png"
        Image.fromarray(render(scene, rng)).save(photo)
        prompt = scene.caption(with_position=False)
        steered = pipe(prompt, seed=i, control=[ControlInput("edges", str(photo), module="canny")])
        hits["with"] += read_position(np.asarray(steered.images[0])) == scene.position
        hits["without"] += read_position(np.asarray(pipe(prompt, seed=i).images[0])) == scene.position
    assert {s.position for s in scenes} == set(POSITIONS) - {"center"}
    assert hits["with"] >= 7 and hits["without"] <= 4, hits
