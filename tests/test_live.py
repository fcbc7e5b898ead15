"""Live progress: the step callback and previews (Python), --preview (CLI), and over HTTP, as real clients meet them:
the OpenAI SDK's streamed images, A1111's progress / interrupt / options, and jobs with events and cancel."""

from __future__ import annotations

import base64
import json
import time
from io import BytesIO

import numpy as np
import pytest
from conftest import exported, make_tiny_flux_checkpoint, make_tiny_sd3_checkpoint, run_cli
from PIL import Image

from diffrt.runtime.pipeline import Pipeline
from diffrt.runtime.stream import Cancelled


def r2(pred: np.ndarray, ref: np.ndarray) -> float:
    """How much of ref's variance pred explains (1: all; 0: no better than ref's mean colour)."""
    return float(1 - ((pred - ref) ** 2).sum() / ((ref - ref.mean(axis=(0, 1, 2))) ** 2).sum())


def pooled(images: np.ndarray, factor: int) -> np.ndarray:
    """(n, H, W, 3) averaged over factor x factor blocks: what one latent pixel covers."""
    n, h, w, _ = images.shape
    return images.reshape(n, h // factor, factor, w // factor, factor, 3).mean(axis=(2, 4))


@pytest.fixture(scope="module")
def bundled():
    return Pipeline.from_package(None, backend="ort-cpu")


def as_array(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im, np.float32) / 255 for im in images])


def test_the_callback_sees_every_nth_step_and_the_last_and_can_cancel(bundled):
    seen = []
    result = bundled("a red circle", seed=2, steps=7, callback=lambda p: seen.append((p.step, p.total, p.latents.copy())),
                     callback_every=3)
    assert [(s, t) for s, t, _ in seen] == [(3, 7), (6, 7), (7, 7)]
    assert np.array_equal(seen[-1][2], result.latents)  # the latents as they stood after that step
    assert not np.array_equal(seen[0][2], seen[1][2])
    with pytest.raises(Cancelled, match="step 2 of 7"):
        bundled("a red circle", seed=2, steps=7, callback=lambda p: p.step < 2)
    again = bundled("a red circle", seed=2, steps=7)  # the pipeline is whole after a cancelled call
    assert np.array_equal(again.array, result.array)
    with pytest.raises(Exception, match="callback_every"):
        bundled("a red circle", callback=print, callback_every=0)


@pytest.mark.parametrize("decoder", ["linear map", "tiny decoder"])
def test_previews_look_like_the_image_they_become(decoder, bundled, tmp_path):
    """On prompts and seeds never decoded before: the preview of the final latents explains the final image's colours
    (the linear latent->RGB map, A1111's Approx cheap, most of them; the bundled tiny decoder nearly all), and each
    preview is closer to its own image than to another's; mid-way previews are the image's size and change as the
    image forms."""
    from conftest import bundled_without

    prompts = ["a purple star on a grey background", "a yellow triangle on a black background",
               "a red circle on a blue background", "a green square on a white background"]
    fresh = Pipeline.from_package(None, backend="ort-cpu")
    held_out = fresh(prompts, seed=103)
    previewing = bundled if decoder == "tiny decoder" else \
        Pipeline.from_package(bundled_without(tmp_path / "pkg", "tiny_vae_decoder"), backend="ort-cpu")
    mids = []
    previewing(prompts[::-1], seed=3, callback=lambda p: mids.append(as_array(p.preview())), callback_every=5)
    f = previewing.package.vae_scale_factor
    final = pooled(held_out.array, f)
    preview = pooled(as_array(previewing.preview(held_out.latents, *held_out.array.shape[2:0:-1])), f)
    assert r2(preview, final) > (0.35 if decoder == "linear map" else 0.9), r2(preview, final)
    own = [np.abs(preview[i] - final[i]).mean() for i in range(4)]
    other = [np.abs(preview[i] - final[(i + 1) % 4]).mean() for i in range(4)]
    assert all(a < b for a, b in zip(own, other)), (own, other)
    assert mids[0].shape == held_out.array.shape and not np.allclose(mids[0], mids[-1])


def test_the_latent_rgb_map_recovers_a_linear_decoder():
    """Least squares over both sets of latent pixels: a decoder that is linear per latent pixel is found exactly."""
    from diffrt.runtime.preview import LatentRGB

    rng = np.random.default_rng(0)
    weights = rng.normal(0, 0.3, (17, 3)).astype(np.float32)

    def decode(z: np.ndarray) -> np.ndarray:  # each latent pixel's colour over its 2x2 pixels
        rgb = np.einsum("nchw,cd->ndhw", z, weights[:-1]) + weights[-1][None, :, None, None]
        return rgb.repeat(2, axis=2).repeat(2, axis=3)

    fitted = LatentRGB(16)
    for kind in ("prior", "own"):
        z = rng.standard_normal((2, 16, 6, 5)).astype(np.float32)
        fitted.learn(z, decode(z), kind)
    assert fitted.has_prior and np.abs(fitted.weights - weights).max() < 1e-4
    z = rng.standard_normal((1, 16, 3, 4)).astype(np.float32)
    assert np.allclose(fitted(z), np.clip(decode(z)[:, :, ::2, ::2].transpose(0, 2, 3, 1) / 2 + 0.5, 0, 1), atol=1e-4)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_previews_of_16_channel_families(family, tmp_path_factory):
    """SD3 and FLUX (16 latent channels, a VAE shift; FLUX's transformer sees packed tokens) preview through the same
    map in the decoder's latent space: the image's size, one per image, and once the pipeline has decoded the image
    the map follows it better than the synthetic prior alone (with random VAE weights no linear map follows an
    image closely, so this is all a tiny model can show)."""
    make = make_tiny_sd3_checkpoint if family == "sd3" else make_tiny_flux_checkpoint
    package = exported(make(tmp_path_factory.mktemp(f"{family}-preview-ckpt")), tmp_path_factory, f"{family}-preview")
    fresh, pipe = (Pipeline.from_package(package, backend="ort-cpu") for _ in range(2))
    result = pipe(["a red cat", "a blue dog"], seed=3, steps=3, width=64, height=32)
    f = pipe.package.vae_scale_factor
    final = pooled(result.array, f)
    before = as_array(fresh.preview(result.latents, 64, 32))
    assert before.shape == result.array.shape and not np.allclose(before[0], before[1])
    assert r2(pooled(as_array(pipe.preview(result.latents, 64, 32)), f), final) > r2(pooled(before, f), final)


def test_cli_preview_file_is_rewritten_whole(tmp_path):
    out, preview = tmp_path / "out.png", tmp_path / "live.png"
    done = run_cli("generate", "a red circle", "--seed", "4", "--steps", "6", "-n", "2", "-o", str(out), "--preview",
                   str(preview), "--preview-every", "2")
    assert done.returncode == 0, done.stderr
    image = Image.open(preview)
    assert image.size == (2 * 64, 64)  # both images side by side
    assert "ETA" in done.stderr and not list(tmp_path.glob(".*.tmp"))
    for args, fragment in ((["--preview-every", "2"], "give --preview"), (["--preview", str(tmp_path / "p.gif")], ".png"),
                           (["--preview", "/sys/p.png"], "not writable"), (["--preview", str(tmp_path)], "a file")):
        bad = run_cli("generate", "a cat", "-o", str(tmp_path / "x.png"), *args)
        assert bad.returncode == 2 and fragment in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert not (tmp_path / "x.png").exists()


# ---- over HTTP: a real server, real clients -------------------------------------------------------------------------

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def live(tiny_package):
    from test_serve import Server

    srv = Server(tiny_package, "--max-batch", "4")
    yield srv
    srv.proc.send_signal(__import__("signal").SIGTERM)
    _, log = srv.proc.communicate(timeout=60)
    assert srv.proc.returncode == 0
    assert "Traceback" not in log and "Exception in ASGI" not in log, log[-3000:]


@pytest.fixture(scope="module")
def local(tiny_package):
    return Pipeline.from_package(tiny_package, backend="ort-cpu")


def decode(b64: str) -> Image.Image:
    return Image.open(BytesIO(base64.b64decode(b64)))


def pixels(b64: str) -> np.ndarray:
    return np.asarray(decode(b64).convert("RGB"), np.int16)


def alone(local, prompt: str, seed: int, **settings) -> np.ndarray:
    return np.asarray(local(prompt, seed=seed, **settings).images[0], np.int16)


def in_background(fn, *args, **kwargs):
    """Run fn in a thread; the returned function waits for and returns its result."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1)
    future = pool.submit(fn, *args, **kwargs)
    pool.shutdown(wait=False)
    return lambda: future.result(timeout=120)


def wait_for(check, seconds: float = 30.0):
    deadline = time.time() + seconds
    while time.time() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    raise TimeoutError("not reached in time")


def test_the_openai_sdk_streams_partial_images_then_the_image(live, local):
    """stream=True with partial_images=2: the official SDK's iterator yields two partial images (previews, the
    image's size, indexed 0 and 1) and then the completed image, which equals the unstreamed pipeline's."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    events = list(client.images.generate(model="tiny", prompt="a red house", size="64x64", stream=True, partial_images=2,
                                         extra_body={"seed": 6, "steps": 300}))
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], kinds
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    final = pixels(events[-1].b64_json)
    assert np.abs(final - alone(local, "a red house", 6, steps=300, width=64, height=64)).max() <= 1
    partial = pixels(events[0].b64_json)
    assert partial.shape == final.shape and np.abs(partial - final).mean() > 1
    quiet = list(client.images.generate(model="tiny", prompt="a red house", size="32x32", stream=True,
                                        extra_body={"seed": 6, "steps": 2}))
    assert [e.type for e in quiet] == ["image_generation.completed"]  # partial_images 0: the image alone
    with pytest.raises(openai.UnprocessableEntityError, match="partial_images"):
        client.images.generate(prompt="x", stream=True, partial_images=5)


def test_a1111_progress_has_a_preview_and_interrupt_answers_with_the_image_so_far(live):
    body = {"prompt": "a slow green tree", "seed": 3, "steps": 999, "width": 64, "height": 64}
    answer = in_background(httpx.post, live.url + "/sdapi/v1/txt2img", json=body, timeout=120)

    def running():
        p = httpx.get(live.url + "/sdapi/v1/progress").json()
        return p if p["progress"] > 0.01 and p["current_image"] else None

    p = wait_for(running)
    assert p["state"]["sampling_steps"] >= 999 and p["eta_relative"] > 0 and 0 < p["progress"] < 1
    assert decode(p["current_image"]).size == (64, 64)
    assert httpx.get(live.url + "/sdapi/v1/progress", params={"skip_current_image": True}).json()["current_image"] is None
    assert httpx.post(live.url + "/sdapi/v1/interrupt").json()["interrupted"] == 1
    r = answer()
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert 0 < info["interrupted_at_step"] < 999 and decode(r.json()["images"][0]).size == (64, 64)
    assert wait_for(lambda: httpx.get(live.url + "/sdapi/v1/progress").json()["state"]["job_count"] == 0 or None)


def test_a1111_options_apply_to_later_requests(live, local):
    options = httpx.get(live.url + "/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == "tiny" and options["CLIP_stop_at_last_layers"] == 1
    r = httpx.post(live.url + "/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2, "samples_format": "webp",
                                                         "show_progressbar": True})
    assert r.status_code == 200 and r.json()["ignored"] == ["show_progressbar"]
    try:
        body = {"prompt": "a green tree", "seed": 9, "steps": 3, "width": 32, "height": 32}
        out = httpx.post(live.url + "/sdapi/v1/txt2img", json=body, timeout=60).json()
        image = decode(out["images"][0])
        assert image.format == "WEBP"
        got = np.asarray(image.convert("RGB"), np.int16)
        two, one = alone(local, "a green tree", 9, steps=3, clip_skip=2), alone(local, "a green tree", 9, steps=3)
        assert np.abs(got - two).mean() < np.abs(got - one).mean()  # clip skip 2 applied (WebP is lossy)
        body["override_settings"] = {"CLIP_stop_at_last_layers": 1, "samples_format": "png"}
        out = httpx.post(live.url + "/sdapi/v1/txt2img", json=body, timeout=60).json()
        assert np.abs(pixels(out["images"][0]) - one).max() <= 1  # a request's override wins over the options
    finally:
        httpx.post(live.url + "/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1, "samples_format": "png"})
    bad = httpx.post(live.url + "/sdapi/v1/options", json={"sd_model_checkpoint": "sdxl-base"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "sd_model_checkpoint"
    bad = httpx.post(live.url + "/sdapi/v1/txt2img", json={"prompt": "x", "override_settings": {"sd_model_checkpoint": "v1-5"}})
    assert bad.status_code == 400 and "tiny" in bad.json()["error"]["message"]
    bad = httpx.post(live.url + "/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 0})
    assert bad.status_code == 422 and "CLIP_stop_at_last_layers" in bad.text
    assert httpx.get(live.url + "/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny"  # the refusals changed nothing
    assert httpx.get(live.url + "/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}
    assert httpx.get(live.url + "/sdapi/v1/cmd-flags").json()["api"] is True


def test_ignored_fields_are_listed_never_dropped_silently(live):
    body = {"prompt": "a red house", "seed": 1, "steps": 2, "size": "32x32", "quality": "hd", "style": "vivid",
            "background": "auto"}
    r = httpx.post(live.url + "/v1/images/generations", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["info"]["ignored"] == ["quality", "style"]
    del body["quality"], body["style"]
    assert "info" not in httpx.post(live.url + "/v1/images/generations", json=body, timeout=60).json()
    webuiapi_defaults = {"enable_hr": False, "denoising_strength": 0.7, "hr_scale": 2, "hr_upscaler": "Latent",
                         "styles": [], "subseed": -1, "subseed_strength": 0.0, "restore_faces": False, "tiling": False,
                         "eta": 1.0, "s_noise": 1, "send_images": True, "save_images": False, "alwayson_scripts": {},
                         "sampler_index": "Euler a", "override_settings_restore_afterwards": True}
    a1111 = {"prompt": "a tree", "seed": 1, "steps": 2, "width": 32, "height": 32, **webuiapi_defaults}
    info = json.loads(httpx.post(live.url + "/sdapi/v1/txt2img", json=a1111, timeout=60).json()["info"])
    assert info["ignored"] == [] and info["sampler_name"] == "Euler a"  # sampler_index read as sampler_name
    a1111.update(enable_hr=True, restore_faces=True, subseed=5, subseed_strength=0.3, override_settings={"eta_noise_seed_delta": 31337})
    info = json.loads(httpx.post(live.url + "/sdapi/v1/txt2img", json=a1111, timeout=60).json()["info"])
    assert info["ignored"] == ["denoising_strength", "enable_hr", "hr_scale", "hr_upscaler", "restore_faces", "subseed",
                               "subseed_strength", "override_settings.eta_noise_seed_delta"]
    r = httpx.post(live.url + "/v1/images/generations", json={"prompt": "x", "response_format": "url"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format" and "b64_json" in r.text


def test_jobs_answer_at_once_and_are_read_by_id(live, local):
    r = httpx.post(live.url + "/v1/jobs", json={"prompt": "a red house", "seed": 4, "steps": 3, "size": "32x32"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] in ("queued", "running") and job["id"].startswith("job-")
    done = wait_for(lambda: (lambda v: v if v["state"] == "succeeded" else None)(httpx.get(f"{live.url}/v1/jobs/{job['id']}").json()))
    assert np.abs(pixels(done["result"]["data"][0]["b64_json"]) - alone(local, "a red house", 4, steps=3)).max() <= 1
    r = httpx.post(live.url + "/v1/jobs", json={"prompt": "a tree", "seed": 2, "steps": 3, "width": 32, "height": 32,
                                                "sampler_name": "Euler a"})
    a1111 = wait_for(lambda: (lambda v: v if v["state"] == "succeeded" else None)(httpx.get(f"{live.url}/v1/jobs/{r.json()['id']}").json()))
    assert json.loads(a1111["result"]["info"])["sampler_name"] == "Euler a"  # an A1111 body gets A1111's answer
    assert np.abs(pixels(a1111["result"]["images"][0]) - alone(local, "a tree", 2, steps=3, scheduler="euler_a")).max() <= 1
    assert {j["id"] for j in httpx.get(live.url + "/v1/jobs").json()["data"]} >= {job["id"], r.json()["id"]}
    assert httpx.get(live.url + "/v1/jobs/job-nope").status_code == 404
    bad = httpx.post(live.url + "/v1/jobs", json={"prompt": "a cat", "steps": "many"})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "steps"
    bad = httpx.post(live.url + "/v1/jobs", json={"prompt": "a cat", "size": "33x32"})
    assert bad.status_code == 400 and "33" in bad.text  # refused before it is queued
    assert httpx.post(live.url + "/v1/jobs", params={"api": "comfy"}, json={"prompt": "x"}).status_code == 400


def test_job_events_stream_progress_and_previews_to_the_end(live):
    job = httpx.post(live.url + "/v1/jobs", json={"prompt": "a red house", "seed": 4, "steps": 200, "size": "64x64"}).json()
    seen = []
    with httpx.stream("GET", f"{live.url}/v1/jobs/{job['id']}/events", timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                seen.append(json.loads(line[6:]))
    steps = [s["step"] for s in seen if s["state"] == "running"]
    assert steps == sorted(steps) and len(set(steps)) > 2
    assert any(s.get("preview") for s in seen) and decode(next(s for s in seen if s.get("preview"))["preview"][0]).size == (64, 64)
    assert seen[-1]["state"] == "succeeded" and seen[-1]["result"]["data"]


def test_cancel_a_running_job_and_a_queued_one(live):
    running = httpx.post(live.url + "/v1/jobs", json={"prompt": "slow", "seed": 1, "steps": 999, "size": "64x64"})
    assert running.status_code == 202, running.text
    running = running.json()
    wait_for(lambda: httpx.get(f"{live.url}/v1/jobs/{running['id']}", params={"preview": False}).json()["step"] > 2)
    queued = httpx.post(live.url + "/v1/jobs", json={"prompt": "other size", "seed": 1, "steps": 5, "size": "32x64"}).json()
    view = httpx.get(f"{live.url}/v1/jobs/{queued['id']}").json()
    assert view["state"] == "queued" and view["queue_position"] == 0  # another size cannot join the running step
    assert httpx.delete(f"{live.url}/v1/jobs/{queued['id']}").json()["state"] == "cancelled"
    cancelled = httpx.delete(f"{live.url}/v1/jobs/{running['id']}").json()
    assert cancelled["state"] == "cancelled" and cancelled["step"] < 999
    assert wait_for(lambda: httpx.get(live.url + "/sdapi/v1/progress").json()["state"]["job_count"] == 0 or None, 5)
    assert httpx.post(live.url + "/v1/images/generations", json={"prompt": "a cat", "steps": 2}, timeout=60).status_code == 200


def test_a_client_that_goes_away_costs_one_log_line(live):
    """The work stops at the next step and the log says so in a line (the module's server is checked for
    tracebacks when it stops)."""
    with pytest.raises(httpx.TimeoutException):
        httpx.post(live.url + "/v1/images/generations", json={"prompt": "slow", "steps": 999, "size": "64x64"}, timeout=1.0)
    assert wait_for(lambda: httpx.get(live.url + "/sdapi/v1/progress").json()["state"]["job_count"] == 0 or None, 5)


def test_webuiapi_drives_txt2img_progress_interrupt_and_options(live, local):
    """AUTOMATIC1111's own Python client, unchanged: it probes the scripts when it connects, its txt2img (which sends
    every A1111 field at its default) equals the pipeline's image with nothing listed as ignored, and its progress,
    interrupt, options and model helpers work."""
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=live.port, sampler="Euler a", steps=3)
    result = api.txt2img(prompt="a green tree", seed=7, width=32, height=32, cfg_scale=5)
    want = alone(local, "a green tree", 7, steps=3, scheduler="euler_a", guidance_scale=5)
    assert np.abs(np.asarray(result.image.convert("RGB"), np.int16) - want).max() <= 1
    assert result.info["ignored"] == [] and result.info["sampler_name"] == "Euler a"
    assert api.util_get_current_model() == "tiny" and "Euler a" in api.util_get_sampler_names()
    api.util_set_model("tiny")  # what a front-end does when it connects: set the checkpoint it was told of
    assert api.get_cmd_flags()["api"] is True
    slow = in_background(api.txt2img, prompt="a slow tree", seed=7, width=64, height=64, steps=999)
    wait_for(lambda: api.get_progress()["state"]["sampling_step"] > 3)
    progress = api.get_progress()
    assert progress["current_image"] and 0 < progress["progress"] < 1
    api.interrupt()
    stopped = slow()
    assert 0 < stopped.info["interrupted_at_step"] < 999 and stopped.image.size == (64, 64)
    api.util_wait_for_ready(check_interval=0.1)


def test_the_web_page_shows_the_preview_progress_and_cancels(live):
    """Headless Chromium: a long job shows a live preview and its progress with the time left, Cancel stops it; a
    random seed's image is captioned with the seed actually used."""
    import re

    from conftest import browser_page

    with browser_page(live.url + "/") as page:
        page.fill("#steps", "999")
        page.fill("#width", "64")
        page.fill("#height", "64")
        page.click("#generate")
        page.wait_for_function("document.getElementById('preview').src.startsWith('data:image/png')", timeout=30_000)
        page.wait_for_function("/left/.test(document.getElementById('status').textContent)", timeout=30_000)
        page.click("#cancel")
        page.wait_for_function("/cancelled/.test(document.getElementById('status').textContent)", timeout=30_000)
        assert page.query_selector("#gallery img") is None and page.text_content("#error") == ""
        page.fill("#steps", "3")
        page.fill("#seed", "-1")
        page.click("#generate")
        page.wait_for_selector("#gallery img", timeout=60_000)
        caption = page.text_content("#gallery figcaption")
    seed = int(re.match(r"seed (\d+)", caption).group(1))
    assert seed >= 0


def source_image(size=(32, 32)) -> Image.Image:
    """A smooth colour field to start image-to-image from."""
    y, x = np.mgrid[0:size[1], 0:size[0]] / max(size)
    return Image.fromarray((np.stack([x, y, 1 - x], axis=-1) * 255).astype(np.uint8))


def test_openai_edits_run_image_to_image_and_inpainting(live, local, tmp_path):
    """The official SDK's images.edit: an image alone is image-to-image (strength 0.8); with a mask, its transparent
    pixels are repainted (OpenAI's convention), from noise by default; each equals the pipeline's own call."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    image = source_image()
    image.save(tmp_path / "in.png")
    with open(tmp_path / "in.png", "rb") as f:
        out = client.images.edit(image=f, prompt="a red house", extra_body={"seed": 4, "steps": 4})
    want = alone(local, "a red house", 4, steps=4, image=image, strength=0.8)
    assert np.abs(pixels(out.data[0].b64_json) - want).max() <= 1
    assert np.abs(want - alone(local, "a red house", 4, steps=4)).max() > 1  # the image mattered
    alpha = np.full((32, 32), 255, np.uint8)
    alpha[8:24, 8:24] = 0  # repaint the middle
    mask = Image.fromarray(np.dstack([np.zeros((32, 32, 3), np.uint8), alpha]), "RGBA")
    mask.save(tmp_path / "mask.png")
    with open(tmp_path / "in.png", "rb") as f, open(tmp_path / "mask.png", "rb") as m:
        out = client.images.edit(image=f, mask=m, prompt="a red house", n=2, extra_body={"seed": 4, "steps": 4})
    white = Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8))
    for i, item in enumerate(out.data):
        want = alone(local, "a red house", 4 + i, steps=4, image=image, mask=white, strength=1.0)
        assert np.abs(pixels(item.b64_json) - want).max() <= 1
    with open(tmp_path / "in.png", "rb") as f:
        events = list(client.images.edit(image=f, prompt="a red house", stream=True, partial_images=1,
                                         extra_body={"seed": 4, "steps": 200}))
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    r = httpx.post(live.url + "/v1/images/edits", data={"prompt": "x"}, files={"image": ("a.png", b"not a png")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"
    r = httpx.post(live.url + "/v1/images/edits", data={"prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"
    with open(tmp_path / "in.png", "rb") as f:
        r = httpx.post(live.url + "/v1/images/edits", data={"prompt": "x", "size": "64x64"}, files={"image": f})
    assert r.status_code == 400 and r.json()["error"]["param"] == "size"


def test_a1111_img2img_through_webuiapi(live, local):
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=live.port, sampler="Euler a", steps=3)
    image = source_image()
    out = api.img2img(images=[image], prompt="a green tree", seed=5, denoising_strength=0.6, width=32, height=32, cfg_scale=5)
    want = alone(local, "a green tree", 5, steps=3, scheduler="euler_a", guidance_scale=5, image=image, strength=0.6)
    assert np.abs(np.asarray(out.image.convert("RGB"), np.int16) - want).max() <= 1 and out.info["ignored"] == []
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))
    out = api.img2img(images=[image], mask_image=mask, prompt="a green tree", seed=5, denoising_strength=0.9, width=32,
                      height=32, cfg_scale=5, inpainting_fill=1, inpaint_full_res=False, mask_blur=0)
    want = alone(local, "a green tree", 5, steps=3, scheduler="euler_a", guidance_scale=5, image=image, mask=mask,
                 strength=0.9)
    assert np.abs(np.asarray(out.image.convert("RGB"), np.int16) - want).max() <= 1
    big = api.img2img(images=[image], prompt="a green tree", seed=5, width=64, height=64)  # resized to 64x64
    assert big.image.size == (64, 64)
    with pytest.raises(RuntimeError, match="inpainting_fill"):  # webuiapi's defaults: fill 0, full-res inpainting
        api.img2img(images=[image], mask_image=mask, prompt="a tree", width=32, height=32)
    bad = httpx.post(live.url + "/sdapi/v1/img2img", json={"prompt": "x", "init_images": ["bm90IGFuIGltYWdl"]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "init_images"


def server_rss_mb(srv) -> float:
    for line in open(f"/proc/{srv.proc.pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("keep", [False, True], ids=["default", "keep-memory"])
def test_the_servers_memory_comes_back_after_a_large_request(keep):
    """onnxruntime's CPU arena kept a request's activations for good (180 MB -> 4.6 GB on the bundled model at
    512x512): by default it shrinks after the request's last calls and the server's RSS returns near its idle
    figure; --keep-memory keeps the arena (and the memory), which shows the measurement tells them apart."""
    from test_serve import Server

    from diffrt.runtime.bundled import bundled_model

    srv = Server(bundled_model(), "--backend", "ort-cpu", *(["--keep-memory"] if keep else []))
    try:
        assert httpx.post(srv.url + "/v1/images/generations", json={"prompt": "a", "steps": 2}, timeout=60).status_code == 200
        idle = server_rss_mb(srv)
        r = httpx.post(srv.url + "/v1/images/generations", json={"prompt": "a", "steps": 2, "size": "384x384"}, timeout=300)
        assert r.status_code == 200
        grown = server_rss_mb(srv) - idle
    finally:
        srv.stop()
    print(f"grown {grown:.0f} MB")
    assert grown > 300 if keep else grown < 120, grown  # 384x384 on the bundled model: about 750 MB kept, 60 MB not
