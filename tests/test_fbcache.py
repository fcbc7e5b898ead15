"""First-Block Cache for the DiT families: the graphs cut from a package's transformer, the cached loop against
diffusers' FirstBlockCacheConfig (FLUX), its per-stream bookkeeping, settings and refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import exported, make_tiny_flux_checkpoint, make_tiny_sd3_checkpoint, run_cli, with_cache_graphs

from diffrt.runtime.errors import UserError

diffusers = pytest.importorskip("diffusers")
SIZE = {"width": 64, "height": 64}


def with_fbcache(package, dest):
    return with_cache_graphs(package, dest, "fbcache")


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    checkpoint = make_tiny_flux_checkpoint(tmp_path_factory.mktemp("flux-fbc"))
    return checkpoint, with_fbcache(exported(checkpoint, tmp_path_factory, "flux"), tmp_path_factory.mktemp("fbc") / "flux")


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    package = exported(make_tiny_sd3_checkpoint(tmp_path_factory.mktemp("sd3-fbc"), t5=False), tmp_path_factory, "sd3")
    return package, with_fbcache(package, tmp_path_factory.mktemp("fbc") / "sd3")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def test_head_tail_and_out_in_turn_are_the_transformer(sd3):
    """The three graphs name the transformer's weight file (nothing copied); run in turn they give its output, and the
    tail reads the first block's streams (other values change its output)."""
    import onnxruntime as ort

    _, package = sd3
    entry = json.loads((package / "diffrt.json").read_text())["components"]["transformer"]["fbcache"]
    assert entry["check_max_rel_diff"] <= 1e-5 and set(entry["cut"]) == {"fbc_hidden_in", "fbc_hidden", "fbc_context",
                                                                         "fbc_hidden_last"}
    weights = sum(p.stat().st_size for p in (package / "transformer").glob("fbcache_*.onnx"))
    assert weights < (package / "transformer" / "model.onnx_data").stat().st_size / 2
    assert "First-Block Cache graphs (--cache fbcache[:T])" in run_cli("info", package).stdout

    def session(name):
        return ort.InferenceSession(str(package / "transformer" / name), providers=["CPUExecutionProvider"])

    whole, head, tail, out = (session(f) for f in ("model.onnx", "fbcache_head.onnx", "fbcache_tail.onnx", "fbcache_out.onnx"))
    rng = np.random.default_rng(5)
    feeds = {"hidden_states": rng.standard_normal((3, 16, 6, 10), dtype=np.float32), "timestep": np.full(3, 400, np.float32),
             "encoder_hidden_states": rng.standard_normal((3, 11, whole.get_inputs()[2].shape[2]), dtype=np.float32),
             "pooled_projections": rng.standard_normal((3, whole.get_inputs()[3].shape[1]), dtype=np.float32)}

    def own(s, extra):
        names = {i.name for i in s.get_inputs()}
        return {k: v for k, v in {**feeds, **extra}.items() if k in names}

    hidden_in, hidden, context = head.run(None, own(head, {}))
    last = tail.run(None, own(tail, {"fbc_hidden": hidden, "fbc_context": context}))[0]
    np.testing.assert_allclose(out.run(None, own(out, {"fbc_hidden_last": last}))[0], whole.run(None, feeds)[0], atol=1e-5)
    moved = tail.run(None, own(tail, {"fbc_hidden": hidden_in, "fbc_context": context}))[0]
    assert np.abs(moved - last).max() > 1e-3


@pytest.mark.parametrize("true_cfg, threshold", [(False, 0.5), (True, 0.4)])  # 0.4: one decision for both passes differs
def test_flux_equals_diffusers_first_block_cache(flux, true_cfg, threshold):
    """FLUX with --cache fbcache:T against diffusers' FluxPipeline with FirstBlockCacheConfig(threshold=T), torch
    seeds: the same steps skipped (fewer full steps than steps, an image unlike the exact one) and the same image;
    with true CFG the negatives decide apart, as diffusers' separate uncond pass does."""
    import torch
    from diffusers.hooks import FirstBlockCacheConfig

    from diffrt.runtime.pipeline import Pipeline

    checkpoint, package = flux
    ref = diffusers.FluxPipeline.from_pretrained(checkpoint)
    ref.set_progress_bar_config(disable=True)
    ref.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))  # before any call: diffusers' hooks need it so
    extra = {"negative_prompt": "blurry", "true_cfg_scale": 2.0} if true_cfg else {}
    pipe = Pipeline.from_package(package, backend="ort-cpu", cache=f"fbcache:{threshold}")
    ours = pipe("a red circle", steps=8, seed=0, rng="torch-cpu", **SIZE, **extra)
    theirs = ref("a red circle", num_inference_steps=8, generator=torch.Generator().manual_seed(0), output_type="np",
                 **SIZE, **extra).images
    exact = pipe("a red circle", steps=8, seed=0, rng="torch-cpu", cache="none", **SIZE, **extra)
    assert ours.settings["cache"] == f"fbcache:{threshold}" and 1 < ours.settings["full_transformer_steps"] < 8
    assert np.abs(ours.array - exact.array).max() > 1e-3
    assert np.abs(ours.array - theirs).max() <= 1e-3


def test_sd3_skips_blocks_and_a_tiny_threshold_is_exact(sd3):
    """SD3 (which diffusers' cache hooks do not take): a threshold no residual stays under computes every step and
    equals the plain package on ort-cpu and ov-cpu; a large one skips steps and stays near the exact image."""
    from diffrt.runtime.pipeline import Pipeline

    plain_package, package = sd3
    for backend, precision in (("ort-cpu", "auto"), ("ov-cpu", "fp32")):
        exact = Pipeline.from_package(plain_package, backend=backend, precision=precision)("a red circle", steps=8, seed=0, **SIZE)
        every = Pipeline.from_package(package, backend=backend, precision=precision, cache="fbcache:1e-9")
        result = every("a red circle", steps=8, seed=0, **SIZE)
        assert result.settings["full_transformer_steps"] == 8
        np.testing.assert_allclose(result.array, exact.array, atol=1e-5)
        skipping = every("a red circle", steps=8, seed=0, cache="fbcache:0.6", **SIZE)
        assert skipping.settings["full_transformer_steps"] < 8 and 0 < np.abs(skipping.array - exact.array).max()
        assert psnr(skipping.array, exact.array) > 25


def test_streams_stepped_together_decide_apart(sd3):
    """Requests sharing every transformer call (step batching), one caching hard, one exact, one guided: each makes
    the image it makes alone."""
    from diffrt.runtime.pipeline import Pipeline

    pipe = Pipeline.from_package(sd3[1], backend="ort-cpu", cache="fbcache:0.6")
    if not pipe.per_row_timesteps:
        pytest.skip("the transformer takes one timestep per call")
    asks = [("a red circle", 1, {}), ("a blue square", 2, {"cache": "none"}), ("a green bar", 3, {"guidance_scale": 4.0})]
    alone = [pipe(p, steps=7, seed=s, **SIZE, **kw) for p, s, kw in asks]
    streams = [pipe.begin(p, steps=7, seed=s, **SIZE, **kw) for p, s, kw in asks]
    while not all(s.done for s in streams):
        pipe.step(streams)
    for stream, one in zip(streams, alone):
        result = pipe.finish(stream)
        np.testing.assert_allclose(result.array, one.array, atol=1e-5)
        assert result.settings.get("full_transformer_steps") == one.settings.get("full_transformer_steps")
    assert alone[0].settings["full_transformer_steps"] < 7 and "cache" not in alone[1].settings


def test_generate_records_fbcache_and_remakes_it(sd3, tmp_path):
    from PIL import Image

    from diffrt.runtime.images import read_settings

    out = tmp_path / "cached.png"
    done = run_cli("generate", "a red circle", "--model", sd3[1], "--steps", "6", "--seed", "3", "-q", "--width", "64",
                   "--height", "64", "--backend", "ort-cpu", "--cache", "fbcache:0.6", "-o", out)
    assert done.returncode == 0, done.stderr
    assert read_settings(out)["cache"] == "fbcache:0.6"
    again = tmp_path / "again.png"
    assert run_cli("generate", "--from", out, "--model", sd3[1], "-q", "--backend", "ort-cpu", "-o", again).returncode == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))


@pytest.mark.parametrize("cache, says", [
    ("fbcache:fast", "T in fbcache:T is a number from 0 to 1"),
    ("fbcache:2", "T in fbcache:T is a number from 0 to 1"),
    ("deepcache", "--cache deepcache is DeepCache, for a unet; sd3 models have a transformer: use --cache fbcache"),
])
def test_bad_fbcache_settings_are_one_line(sd3, tmp_path, cache, says):
    done = run_cli("generate", "a red circle", "--model", sd3[1], "--steps", "2", "-q", "-o", tmp_path / "x.png",
                   "--cache", cache)
    assert done.returncode == 2 and says in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "x.png").exists()


def test_fbcache_refusals(sd3, tiny_package):
    from diffrt.runtime.pipeline import Pipeline

    plain_package, package = sd3
    with pytest.raises(UserError, match="has no First-Block Cache graphs; add them with `diffrt fbcache add PACKAGE`"):
        Pipeline.from_package(plain_package, backend="ort-cpu", cache="fbcache")
    with pytest.raises(UserError, match="needs the pipeline opened with First-Block Cache's graphs"):
        Pipeline.from_package(package, backend="ort-cpu")("x", steps=2, cache="fbcache", **SIZE)
    with pytest.raises(UserError, match="--fp32-fallback cannot be combined"):
        Pipeline.from_package(package, backend="ort-cpu", cache="fbcache", fp32_fallback=True)
    with pytest.raises(UserError, match="models have a unet: use --cache deepcache"):
        Pipeline.from_package(tiny_package, backend="ort-cpu", cache="fbcache")
    done = run_cli("fbcache", "add", tiny_package)
    assert done.returncode == 2 and "First-Block Cache skips a transformer's blocks" in done.stderr


def test_server_refuses_a_bad_fbcache_naming_the_field():
    from pydantic import ValidationError

    from diffrt.serve.schemas import OpenAIImageRequest

    assert OpenAIImageRequest(prompt="x", cache="fbcache:0.1").cache == "fbcache:0.1"
    with pytest.raises(ValidationError, match="cache"):
        OpenAIImageRequest(prompt="x", cache="fbcache:-1")
