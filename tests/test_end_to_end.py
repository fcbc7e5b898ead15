"""diffrt (numpy loop + onnxruntime) against diffusers' StableDiffusionPipeline on the same weights and latents."""

from __future__ import annotations

import numpy as np
import pytest

from diffrt.runtime.errors import UserError
from diffrt.runtime.families import timestep_feed
from diffrt.runtime.pipeline import Pipeline
from diffrt.runtime.schedulers import samplers_for

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from conftest import reference_pipeline, sampler_params, shared_noise, sizes_for, use_sampler  # noqa: E402

PROMPT, NEGATIVE = "a beautiful painting of a red house under the night sky", "ugly dark"
SIZES = ((32, 32), (40, 24))  # (width, height); 24/2 = 12 and 40/2 = 20 latents


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return reference_pipeline("StableDiffusionPipeline", tiny_checkpoint)


def run_reference(pipe, name, latents, steps, guidance, width, height, seed):
    extra = use_sampler(pipe, name)
    with shared_noise(seed), torch.no_grad():
        return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=guidance, width=width,
                    height=height, latents=torch.from_numpy(latents), output_type="np", **extra).images


@pytest.mark.parametrize("name", sampler_params(samplers_for(flow=False)))
def test_images_match_diffusers(name, reference, ours):
    steps = 4 if name == "lcm" else 6
    for guidance in (1.0, 7.5):
        for width, height in sizes_for(name, SIZES):
            seed = 7
            latents = np.random.default_rng(seed).standard_normal((1, 4, height // 2, width // 2), dtype=np.float32)
            theirs = run_reference(reference, name, latents, steps, guidance, width, height, seed)
            mine = ours(PROMPT, negative_prompt=NEGATIVE, steps=steps, guidance_scale=guidance, scheduler=name, seed=seed,
                        width=width, height=height, latents=latents)
            assert mine.array.shape == theirs.shape
            diff = np.abs(mine.array - theirs).max()
            assert diff <= 1e-3, f"{name} guidance {guidance} {width}x{height}: max |diff| {diff:.2e}"
            levels = np.abs(np.asarray(mine.images[0], np.int16) - (theirs[0] * 255).round().astype(np.int16)).max()
            assert levels <= 1, f"{name} guidance {guidance} {width}x{height}: uint8 images differ by {levels} levels"


def test_plain_prompt_syntax_reads_a_long_prompt_as_diffusers(reference, ours):
    """A weighted prompt over 75 tokens: prompt_syntax="plain" reads it as diffusers does (the brackets as text, cut
    at the encoder's 77 tokens with a warning) and gives diffusers' image; a1111 (the default) reads the weights and
    every chunk, so its image differs; the images record which."""
    long = ", ".join(["(a red:1.4) house under [the night] sky"] * 10)
    assert ours.chunk_count([long]) > 1 and ours.chunk_count([long], "plain") == 1
    latents = np.random.default_rng(3).standard_normal((1, 4, 16, 16), dtype=np.float32)
    use_sampler(reference, "ddim")
    with shared_noise(3), torch.no_grad():
        theirs = reference(long, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=7.5, width=32, height=32,
                           latents=torch.from_numpy(latents), output_type="np").images
    run = dict(negative_prompt=NEGATIVE, steps=4, guidance_scale=7.5, scheduler="ddim", seed=3,
               width=32, height=32, latents=latents)
    with pytest.warns(UserWarning, match="the text encoder takes 75: dropped"):
        plain = ours(long, prompt_syntax="plain", **run)
    a1111 = ours(long, **run)
    assert np.abs(plain.array - theirs).max() <= 1e-3
    assert np.abs(a1111.array - theirs).max() > 1e-2
    assert plain.settings["prompt_syntax"] == "plain" and a1111.settings["prompt_syntax"] == "a1111"
    with pytest.raises(UserError, match="prompt syntax must be one of a1111, plain, not 'compel'"):
        ours("a cat", prompt_syntax="compel")


def test_a_generation_request_is_the_same_call_as_its_settings(ours):
    """One typed request (from diffrt import GenerationRequest) or the same settings as keywords: the same images;
    diffusers' names for steps and images per prompt work, an unknown setting is refused naming the known ones."""
    from diffrt import GenerationRequest

    request = GenerationRequest("a cat", "blurry", steps=3, seed=5, scheduler="euler_a", guidance_scale=[4.0, 6.0],
                                num_images=2)
    a = ours(request)
    b = ours("a cat", negative_prompt="blurry", steps=3, seed=5, scheduler="euler_a", guidance_scale=[4.0, 6.0], num_images=2)
    assert np.array_equal(a.array, b.array) and a.guidances == [4.0, 6.0] and a.seeds == [5, 6]
    aliased = ours("a cat", num_inference_steps=3, num_images_per_prompt=2, seed=5)
    assert aliased.settings["steps"] == 3 and len(aliased.images) == 2
    with pytest.raises(TypeError, match=r"unknown setting\(s\) sampler; the settings are: .*scheduler"):
        ours("a cat", sampler="euler")


def test_same_seed_same_image_and_guidance_one_skips_uncond(ours, monkeypatch):
    a = ours("a cat", steps=3, seed=11, scheduler="euler_a")
    b = ours("a cat", steps=3, seed=11, scheduler="euler_a")
    c = ours("a cat", steps=3, seed=12, scheduler="euler_a")
    assert np.array_equal(a.array, b.array) and not np.array_equal(a.array, c.array)
    batches = []
    run = ours.unet.run
    monkeypatch.setattr(ours.unet, "run", lambda feeds: batches.append(len(feeds["sample"])) or run(feeds))
    ours("a cat", steps=2, seed=1, guidance_scale=1.0, num_images=2, scheduler="ddim")
    ours("a cat", steps=2, seed=1, guidance_scale=3.0, num_images=2, scheduler="ddim")
    assert batches == [2, 2, 4, 4]


def test_settings_reproduce_the_image(ours):
    first = ours("a dog in the garden", steps=4, num_images=2)
    s = first.settings
    again = ours(s["prompt"], negative_prompt=s["negative_prompt"], steps=s["steps"], guidance_scale=s["guidance_scale"],
                 scheduler=s["scheduler"], seed=s["seed"], width=s["width"], height=s["height"], num_images=s["num_images"])
    assert np.array_equal(first.array, again.array)


@pytest.mark.gpu
def test_ort_cuda_matches_cpu(tiny_package):
    """Runs wherever onnxruntime has its CUDA provider (onnxruntime-gpu and an NVIDIA GPU); skipped elsewhere."""
    from diffrt.runtime.backends.onnxruntime import cuda_available

    if not cuda_available():
        pytest.skip("onnxruntime's CUDA provider is not available here")
    gpu = Pipeline.from_package(tiny_package, backend="ort-cuda")
    assert gpu.backend == "ort-cuda"
    cpu = Pipeline.from_package(tiny_package, backend="ort-cpu")
    for guidance in (1.0, 7.5):
        a = gpu("a red house", steps=6, seed=3, guidance_scale=guidance, num_images=2)
        b = cpu("a red house", steps=6, seed=3, guidance_scale=guidance, num_images=2)
        assert np.abs(a.array - b.array).max() <= 1e-3
    assert Pipeline.from_package(tiny_package, backend="auto").backend == "ort-cuda"


@pytest.mark.gpu
def test_cuda_graph_replay_matches_cpu(tiny_package):
    """The UNet captured as CUDA graphs (one per shape) gives the CPU's images, across prompts, batches and sizes."""
    from diffrt.runtime.backends.onnxruntime import cuda_available

    if not cuda_available():
        pytest.skip("onnxruntime's CUDA provider is not available here")
    graphed = Pipeline.from_package(tiny_package, backend="ort-cuda", cuda_graph=True)
    cpu = Pipeline.from_package(tiny_package, backend="ort-cpu")
    for prompt, n, size in (("a red house", 1, 32), ("a blue car", 1, 32), ("a red house", 2, 32), ("a cat", 1, 40)):
        a = graphed(prompt, steps=5, seed=4, num_images=n, width=size, height=size)
        b = cpu(prompt, steps=5, seed=4, num_images=n, width=size, height=size)
        assert np.abs(a.array - b.array).max() <= 1e-3, (prompt, n, size)
    assert len(graphed.unet.buffers.shapes) == 3 and graphed.unet.buffers.captured == 3


@pytest.mark.gpu
def test_fp16_fused_attention_package_with_cuda_graphs(tiny_package, tmp_path):
    """The fp16 copy of the fused-attention package runs on CUDA, captured as CUDA graphs, within fp16's error of
    the fp32 package on the CPU."""
    from diffrt.export.precision import fp16_copy
    from diffrt.runtime.backends.onnxruntime import cuda_available

    if not cuda_available():
        pytest.skip("onnxruntime's CUDA provider is not available here")
    fp16 = fp16_copy(tiny_package, tmp_path / "fp16", log=lambda m: None)
    cpu = Pipeline.from_package(tiny_package, backend="ort-cpu")
    for graph in (False, True):
        gpu = Pipeline.from_package(fp16, backend="ort-cuda", cuda_graph=graph)
        a = gpu("a red house", steps=5, seed=4, num_images=2)
        assert np.abs(a.array - cpu("a red house", steps=5, seed=4, num_images=2).array).max() <= 2e-2
    assert gpu.unet.buffers.captured == 1


def unet_feeds(engine, rng, batch: int, side: int) -> dict:
    return {"sample": rng.standard_normal((batch, 4, side, side), dtype=np.float32),
            "timestep": timestep_feed(engine.inputs["timestep"], rng.uniform(0, 999), batch),
            "encoder_hidden_states": rng.standard_normal((batch, 77, 32), dtype=np.float32)}


def test_fixed_buffers_follow_new_inputs(tiny_package):
    """The bookkeeping a CUDA graph relies on, run on the CPU: buffers bound once per shape, refilled every call."""
    from diffrt.runtime.backends.onnxruntime import OrtEngine, ShapeBuffers

    engine = OrtEngine(tiny_package / "unet" / "model.onnx")
    cache = ShapeBuffers("cpu", graphs=True)
    rng = np.random.default_rng(0)
    for batch, side in ((2, 4), (2, 4), (1, 5), (2, 4)):
        feeds = unet_feeds(engine, rng, batch, side)
        want = engine.run(feeds)["out_sample"]
        got = cache.run(engine.session, engine.inputs, feeds)["out_sample"]
        assert np.array_equal(want, got)
    assert len(cache.shapes) == 2 and cache.captured == 2


def test_fixed_buffers_copy_a_frozen_input_once_and_a_new_one_always(tiny_package):
    from diffrt.runtime.backends.onnxruntime import OrtEngine, ShapeBuffers

    engine = OrtEngine(tiny_package / "unet" / "model.onnx")
    cache = ShapeBuffers("cpu", graphs=False)
    feeds = unet_feeds(engine, np.random.default_rng(1), 2, 4)
    text = engine.to_device(feeds["encoder_hidden_states"])
    assert not text.flags.writeable
    first = cache.run(engine.session, engine.inputs, {**feeds, "encoder_hidden_states": text})["out_sample"]
    assert np.array_equal(first, engine.run(feeds)["out_sample"])
    other = {**feeds, "encoder_hidden_states": feeds["encoder_hidden_states"][::-1].copy()}
    assert np.array_equal(cache.run(engine.session, engine.inputs, other)["out_sample"], engine.run(other)["out_sample"])
    assert np.array_equal(cache.run(engine.session, engine.inputs, {**feeds, "encoder_hidden_states": text})["out_sample"],
                          first)


def test_buffers_are_kept_for_a_bounded_number_of_shapes(tiny_package):
    """Past MAX_SHAPES shapes no new CUDA graph is captured and plain buffers make room, least recently used first."""
    from diffrt.runtime.backends.onnxruntime import MAX_SHAPES, OrtEngine, ShapeBuffers

    engine = OrtEngine(tiny_package / "unet" / "model.onnx")
    rng = np.random.default_rng(2)
    for graphs in (True, False):
        cache = ShapeBuffers("cpu", graphs=graphs)
        for side in range(2, MAX_SHAPES + 6):
            feeds = unet_feeds(engine, rng, 1, side)
            assert np.array_equal(cache.run(engine.session, engine.inputs, feeds)["out_sample"], engine.run(feeds)["out_sample"])
        assert len(cache.shapes) <= MAX_SHAPES + 1 and cache.captured == (MAX_SHAPES if graphs else 0)
        assert ((1, 4, MAX_SHAPES + 5, MAX_SHAPES + 5)) in [k[0] for k in cache.shapes]


def test_cuda_graph_needs_ort_cuda(tiny_package):
    with pytest.raises(UserError, match="ort-cuda"):
        Pipeline.from_package(tiny_package, backend="ort-cpu", cuda_graph=True)


def test_graph_cache_skips_optimization_on_later_loads(tiny_package, tmp_path):
    """The first load saves onnxruntime's optimized graphs; later loads use them and give the same image."""
    cache = tmp_path / "graphs"
    first = Pipeline.from_package(tiny_package, backend="ort-cpu", graph_cache=cache)("a red house", steps=3, seed=5)
    entries = sorted(p for p in cache.iterdir())
    assert len(entries) == 3 and all((p / "model.onnx").is_file() for p in entries)
    stamps = [(p / "model.onnx").stat().st_mtime_ns for p in entries]
    again = Pipeline.from_package(tiny_package, backend="ort-cpu", graph_cache=cache)("a red house", steps=3, seed=5)
    assert sorted(cache.iterdir()) == entries and [(p / "model.onnx").stat().st_mtime_ns for p in entries] == stamps
    plain = Pipeline.from_package(tiny_package, backend="ort-cpu")("a red house", steps=3, seed=5)
    assert np.array_equal(first.array, plain.array) and np.array_equal(again.array, plain.array)


def test_graph_cache_drops_a_damaged_entry(tiny_package, tmp_path):
    cache = tmp_path / "graphs"
    Pipeline.from_package(tiny_package, backend="ort-cpu", graph_cache=cache)
    for entry in cache.iterdir():
        (entry / "model.onnx").write_bytes(b"not a graph")
    out = Pipeline.from_package(tiny_package, backend="ort-cpu", graph_cache=cache)("a red house", steps=3, seed=5)
    plain = Pipeline.from_package(tiny_package, backend="ort-cpu")("a red house", steps=3, seed=5)
    assert np.array_equal(out.array, plain.array)
    assert all((e / "model.onnx").read_bytes() != b"not a graph" for e in cache.iterdir())


def test_graph_cache_that_cannot_be_written(tiny_package, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="graph cache .* cannot be written"):
        Pipeline.from_package(tiny_package, backend="ort-cpu", graph_cache=tmp_path / "file" / "graphs")


def test_each_image_has_its_own_seed_and_can_be_made_alone(ours):
    """Image i of a batch with seed s is the one-image result for seed s + i, for a stochastic sampler too."""
    batch = ours("a red house", steps=3, seed=40, num_images=3, scheduler="euler_a", guidance_scale=5.0)
    assert batch.seeds == [40, 41, 42] and [batch.image_settings(i)["seed"] for i in range(3)] == [40, 41, 42]
    for i in range(3):
        alone = ours("a red house", steps=3, seed=40 + i, scheduler="euler_a", guidance_scale=5.0)
        assert np.abs(alone.array[0] - batch.array[i]).max() <= 1e-5
    assert not np.array_equal(batch.array[0], batch.array[1])


def test_diffusers_style_arguments(ours):
    """A list of prompts, num_images_per_prompt, num_inference_steps, seed -1; the order is diffusers'."""
    out = ours(["a red house", "a blue car"], negative_prompt="ugly", num_inference_steps=2, num_images_per_prompt=2, seed=3)
    assert out.prompts == ["a red house", "a red house", "a blue car", "a blue car"] and out.settings["steps"] == 2
    assert out.seeds == [3, 4, 5, 6] and out.negatives == ["ugly"] * 4
    blue = ours("a blue car", negative_prompt="ugly", steps=2, seed=5)
    assert np.abs(blue.array[0] - out.array[2]).max() <= 1e-5
    random = ours("a cat", steps=1, seed=-1)
    assert 0 <= random.settings["seed"] < 2**32
    with pytest.raises(UserError, match="2 prompts but 3 negative prompts"):
        ours(["a", "b"], negative_prompt=["x", "y", "z"], steps=1)
    with pytest.raises(UserError, match="not valid UTF-8"):
        ours("a \udcff cat", steps=1)
    with pytest.raises(UserError, match="0 or more"):
        ours("a cat", steps=1, guidance_scale=-2)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp"])
def test_result_save_keeps_the_settings(ours, tmp_path, suffix):
    from diffrt.runtime.images import read_settings

    result = ours("a red house", negative_prompt="blur", steps=2, seed=9, num_images=2)
    paths = result.save(tmp_path / f"house{suffix}")
    assert [p.name for p in paths] == [f"house-0{suffix}", f"house-1{suffix}"]
    for i, path in enumerate(paths):
        settings = read_settings(path)
        assert (settings["prompt"], settings["negative_prompt"], settings["seed"]) == ("a red house", "blur", 9 + i)
    with pytest.raises(UserError, match="exists"):
        result.save(tmp_path / f"house{suffix}")
    folder = tmp_path / "out"
    folder.mkdir()
    assert [p.name for p in result.save(folder)] == ["00001-9.png", "00002-10.png"]
    assert [p.name for p in result.save(folder)] == ["00003-9.png", "00004-10.png"]


def test_guidance_per_image_equals_each_alone(ours):
    mixed = ours("a red house", steps=3, seed=60, num_images=3, guidance_scale=[7.5, 1.0, 3.0])
    assert [mixed.image_settings(i)["guidance_scale"] for i in range(3)] == [7.5, 1.0, 3.0]
    for i, g in enumerate((7.5, 1.0, 3.0)):
        alone = ours("a red house", steps=3, seed=60 + i, guidance_scale=g)
        assert np.abs(alone.array[0] - mixed.array[i]).max() <= 1e-4
    with pytest.raises(UserError, match="one per image"):
        ours("a red house", steps=1, num_images=2, guidance_scale=[2.0])


@pytest.mark.parametrize("name", ["euler", "euler_a", "dpmpp_2m_sde", "dpm2_a"])
def test_torch_cpu_seeds_give_diffusers_images(name, reference, ours):
    """rng torch-cpu: diffrt draws the starting latents and every sampler's noise as diffusers does from
    generator=torch.Generator().manual_seed(seed) (one generator per image, seed + i), with no noise shared by hand;
    several seeds and sizes, two images a call."""
    for seed, (width, height) in ((0, (32, 32)), (1234, (40, 24)), (2**40 + 3, (24, 40))):
        extra = use_sampler(reference, name)
        generators = [torch.Generator().manual_seed(seed + i) for i in range(2)]
        with torch.no_grad():
            theirs = reference(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=5, guidance_scale=7.5, width=width,
                               height=height, num_images_per_prompt=2, generator=generators, output_type="np", **extra).images
        mine = ours(PROMPT, negative_prompt=NEGATIVE, steps=5, guidance_scale=7.5, scheduler=name, seed=seed, width=width,
                    height=height, num_images=2, rng="torch-cpu")
        assert np.abs(mine.array - theirs).max() <= 1e-3, (name, seed)
        for i in range(2):
            levels = np.abs(np.asarray(mine.images[i], np.int16) - (theirs[i] * 255).round().astype(np.int16)).max()
            assert levels <= 1, (name, seed, i, levels)
    other = ours(PROMPT, negative_prompt=NEGATIVE, steps=5, guidance_scale=7.5, scheduler=name, seed=seed, width=width,
                 height=height, num_images=2)
    assert np.abs(other.array - mine.array).max() > 0.05  # numpy's draws are other draws: the test can tell them apart
    assert mine.settings["rng"] == "torch-cpu"
