"""DeepCache: the graphs cut from a package's UNet, the cached sampling loop, its settings and its refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli, with_cache_graphs

from diffrt.runtime.errors import UserError


def with_deepcache(package, dest):
    return with_cache_graphs(package, dest, "deepcache")


@pytest.fixture(scope="module")
def cached_package(tiny_package, tmp_path_factory):
    return with_deepcache(tiny_package, tmp_path_factory.mktemp("deepcache") / "tiny")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def test_shallow_branch_equals_the_full_unet_on_its_own_features(cached_package):
    """The shallow graph over the full graph's kept features gives the full graph's output (at a size and batch the
    add-time check did not use); over other features it does not, so the features are what it reads."""
    import onnxruntime as ort

    entry = json.loads((cached_package / "diffrt.json").read_text())["components"]["unet"]["deepcache"]
    assert entry["check_max_abs_diff"] <= 1e-5
    assert "unet: fp32, attention mha, DeepCache graphs (--cache deepcache[:N])" in run_cli("info", cached_package).stdout
    full = ort.InferenceSession(str(cached_package / entry["full"]), providers=["CPUExecutionProvider"])
    shallow = ort.InferenceSession(str(cached_package / entry["shallow"]), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    feeds = {"sample": rng.standard_normal((3, 4, 24, 16), dtype=np.float32),
             "timestep": np.array([321], np.int64) if "int" in full.get_inputs()[1].type else np.array([321.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((3, 77, 32), dtype=np.float32)}
    feeds = {k: v.astype(np.float32) if k == "timestep" and "float" in full.get_inputs()[1].type else v for k, v in feeds.items()}
    out, feature = full.run(None, feeds)
    takes = {i.name for i in shallow.get_inputs()}
    assert "deep_features" in takes and takes < {*feeds, "deep_features"}
    again = shallow.run(None, {**{k: v for k, v in feeds.items() if k in takes}, "deep_features": feature})[0]
    np.testing.assert_allclose(again, out, atol=1e-5)
    other = shallow.run(None, {**{k: v for k, v in feeds.items() if k in takes}, "deep_features": feature[::-1].copy()})[0]
    assert np.abs(other - out).max() > 1e-3


def test_cached_generation_is_close_and_exact_stays_exact(tiny_package, cached_package):
    from diffrt.runtime.pipeline import Pipeline

    plain = Pipeline.from_package(tiny_package, backend="ort-cpu")
    cached = Pipeline.from_package(cached_package, backend="ort-cpu", cache="deepcache:2")
    settings = {"steps": 9, "seed": 4, "width": 64, "height": 48, "guidance_scale": 6.0, "scheduler": "ddim"}
    reference = plain("a red circle", **settings)
    exact = cached("a red circle", cache="none", **settings)
    np.testing.assert_array_equal(exact.array, reference.array)  # the full graph's output is the UNet's own
    assert "cache" not in exact.settings
    result = cached("a red circle", **settings)
    assert result.settings["cache"] == "deepcache:2" and result.settings["full_unet_steps"] == 5
    assert 0 < np.abs(result.array - reference.array).max()
    every3 = cached("a red circle", cache="deepcache:3", **settings)
    assert every3.settings["full_unet_steps"] == 3 and not np.array_equal(every3.array, result.array)


def test_bundled_model_cached_stays_near_its_exact_image(tmp_path):
    """On a trained model (the bundled one) a full step every 2 keeps the image: PSNR against the exact image far
    above another seed's (the tiny random UNet's features change too much between steps to say anything)."""
    from diffrt.runtime.bundled import bundled_model
    from diffrt.runtime.pipeline import Pipeline

    pipe = Pipeline.from_package(with_deepcache(bundled_model(), tmp_path / "bundled"), backend="ort-cpu",
                                 cache="deepcache:2")
    exact = pipe("a red circle on a blue background, top left", steps=20, seed=1, cache="none")
    cached = pipe("a red circle on a blue background, top left", steps=20, seed=1)
    other = pipe("a red circle on a blue background, top left", steps=20, seed=2, cache="none")
    assert cached.settings["full_unet_steps"] == 10
    assert psnr(cached.array, exact.array) > 21 > psnr(other.array, exact.array) + 6  # measured 23.6 and 11.1


def test_streams_stepped_together_keep_their_own_features(cached_package):
    """Two cached calls sharing every UNet call (step batching) make the images each makes alone: the kept features
    are split and joined row for row."""
    from diffrt.runtime.pipeline import Pipeline

    pipe = Pipeline.from_package(cached_package, backend="ort-cpu", cache="deepcache:3")
    if not pipe.per_row_timesteps:
        pytest.skip("the tiny UNet takes one timestep per call")
    alone = [pipe(p, steps=7, seed=s, width=64, height=64) for p, s in (("a red circle", 1), ("a blue square", 2))]
    streams = [pipe.begin(p, steps=7, seed=s, width=64, height=64) for p, s in (("a red circle", 1), ("a blue square", 2))]
    while not all(s.done for s in streams):
        pipe.step(streams)
    for stream, one in zip(streams, alone):
        np.testing.assert_allclose(pipe.finish(stream).array, one.array, atol=1e-5)


def test_fp16_package_takes_deepcache(fp16_package, tmp_path):
    from diffrt.runtime.pipeline import Pipeline

    package = with_deepcache(fp16_package, tmp_path / "fp16")
    pipe = Pipeline.from_package(package, backend="ort-cpu", cache="deepcache")
    result = pipe("a red circle", steps=6, seed=0, width=64, height=64, scheduler="ddim")
    exact = pipe("a red circle", steps=6, seed=0, width=64, height=64, scheduler="ddim", cache="none")
    assert result.settings["full_unet_steps"] == 2 and 0 < np.abs(result.array - exact.array).max()
    assert psnr(result.array, exact.array) > 12


def test_deepcache_on_openvino(cached_package):
    pytest.importorskip("openvino")
    from diffrt.runtime.pipeline import Pipeline

    pipe = Pipeline.from_package(cached_package, backend="ov-cpu", precision="fp32", cache="deepcache:2")
    result = pipe("a red circle", steps=6, seed=0, width=64, height=64, scheduler="ddim")
    exact = pipe("a red circle", steps=6, seed=0, width=64, height=64, scheduler="ddim", cache="none")
    assert result.settings["full_unet_steps"] == 3 and 0 < np.abs(result.array - exact.array).max()
    assert psnr(result.array, exact.array) > 12


@pytest.mark.parametrize("args, says", [
    (["--cache", "deepcache"], "has no DeepCache graphs; add them with `diffrt deepcache add PACKAGE`"),
    (["--cache", "fastest"], "unknown cache 'fastest'"),
    (["--cache", "deepcache:0"], "N in deepcache:N is a whole number of steps from 1 to 50"),
])
def test_generate_refuses_bad_cache_in_one_line(tiny_package, tmp_path, args, says):
    done = run_cli("generate", "a red circle", "--model", tiny_package, "--steps", "2", "-q", "-o", tmp_path / "x.png",
                   *args)
    assert done.returncode == 2 and says in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_generate_records_the_cache_and_remakes_it(cached_package, tmp_path):
    from diffrt.runtime.images import read_settings

    out = tmp_path / "cached.png"
    done = run_cli("generate", "a red circle", "--model", cached_package, "--steps", "4", "--seed", "3", "-q",
                   "--backend", "ort-cpu", "--cache", "deepcache:2", "-o", out)
    assert done.returncode == 0, done.stderr
    assert read_settings(out)["cache"] == "deepcache:2"
    again = tmp_path / "again.png"
    assert run_cli("generate", "--from", out, "--model", cached_package, "-q", "--backend", "ort-cpu", "-o", again).returncode == 0
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))


def test_cache_refusals(cached_package, tiny_package):
    from diffrt.runtime.pipeline import Pipeline

    plain = Pipeline.from_package(cached_package, backend="ort-cpu")
    with pytest.raises(UserError, match="needs the pipeline opened with DeepCache's graphs"):
        plain("a red circle", steps=2, cache="deepcache:2")
    with pytest.raises(UserError, match="--fp32-fallback cannot be combined"):
        Pipeline.from_package(cached_package, backend="ort-cpu", cache="deepcache", fp32_fallback=True)


def test_deepcache_refuses_a_transformer(tmp_path):
    """SD3 and FLUX have no UNet: adding the graphs and asking for the cache are both refused in one line."""
    pytest.importorskip("diffusers")
    from conftest import exported, make_tiny_sd3_checkpoint

    class Factory:
        def mktemp(self, name):
            path = tmp_path / name
            path.mkdir()
            return path

    package = exported(make_tiny_sd3_checkpoint(tmp_path / "ckpt", t5=False), Factory(), "sd3")
    done = run_cli("deepcache", "add", package)
    assert done.returncode == 2 and "have a transformer, not a UNet" in done.stderr
    done = run_cli("generate", "x", "--model", package, "--cache", "deepcache", "-q", "-o", tmp_path / "x.png")
    assert done.returncode == 2 and "models have a transformer: use --cache fbcache" in done.stderr


def test_server_refuses_a_bad_cache_naming_the_field():
    from pydantic import ValidationError

    from diffrt.serve.schemas import OpenAIImageRequest

    assert OpenAIImageRequest(prompt="x", cache="deepcache:4").cache == "deepcache:4"
    with pytest.raises(ValidationError, match="cache"):
        OpenAIImageRequest(prompt="x", cache="deepcache:fast")


def test_server_with_deepcache_serves_cached_and_exact_requests(cached_package):
    """`diffrt serve --cache deepcache:2`: a request without cache is cached (as the pipeline makes it), one with
    "cache": "none" is exact; the OpenAI SDK sends the field; a server started without --cache refuses it naming it."""
    pytest.importorskip("fastapi")
    import base64
    from io import BytesIO

    from PIL import Image
    from test_serve import Server

    from diffrt.runtime.pipeline import Pipeline

    local = Pipeline.from_package(cached_package, backend="ort-cpu", cache="deepcache:2")
    srv = Server(cached_package, "--cache", "deepcache:2")
    try:
        body = {"prompt": "a red house", "seed": 5, "steps": 6, "size": "32x32"}
        for cache in (None, "none"):
            r = srv.post("/v1/images/generations", {**body, **({"cache": cache} if cache else {})})
            assert r.status_code == 200, r.text
            got = np.asarray(Image.open(BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).convert("RGB"), np.int16)
            expected = local("a red house", seed=5, steps=6, width=32, height=32, cache=cache).images[0]
            assert np.abs(got - np.asarray(expected, np.int16)).max() <= 1, cache
        bad = srv.post("/v1/images/generations", {**body, "cache": "deepcache:x"})
        assert bad.status_code == 422 and "cache" in bad.text
    finally:
        assert srv.stop() == 0
    plain = Server(cached_package)
    try:
        r = plain.post("/v1/images/generations", {"prompt": "a red house", "steps": 2, "size": "32x32", "cache": "deepcache"})
        assert r.status_code == 400 and "needs the pipeline opened with DeepCache's graphs" in r.text
    finally:
        assert plain.stop() == 0


def test_quantizing_drops_the_float_graphs_and_they_are_cut_again(cached_package, tmp_path):
    """A quantized copy does not keep DeepCache's graphs cut from the float UNet (they would run its float weights);
    `deepcache add` cuts them from the quantized UNet, through its Casts."""
    from diffrt.export.precision import QuantizeOptions, quantize_package
    from diffrt.runtime.package import load_package

    out = tmp_path / "fp16"
    quantize_package(cached_package, out, QuantizeOptions(precision="fp16", steps=4, gate_seeds=1), log=lambda m: None)
    package = load_package(out)
    assert "deepcache" not in package.manifest["components"]["unet"] and not (out / "unet" / "deepcache_full.onnx").exists()
    assert run_cli("deepcache", "add", out).returncode == 0
    assert load_package(out, hashes=True).manifest["components"]["unet"]["deepcache"]["check_max_abs_diff"] < 1e-2
