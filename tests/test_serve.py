"""`diffrt serve` as clients meet it: a real server on 127.0.0.1 (a free port), real HTTP clients (httpx, the OpenAI
SDK), its images against the pipeline's, batching, limits and bad input. Every server is started and stopped here."""

from __future__ import annotations

import base64
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO

import numpy as np
import pytest
from PIL import Image

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from diffrt.runtime.pipeline import Pipeline  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, package, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        backend = [] if "--backend" in args else ["--backend", "ort-cpu"]  # the images are compared with ort-cpu's
        self.proc = subprocess.Popen([sys.executable, "-m", "diffrt.runtime.cli", "serve", "--model", str(package),
                                      "--port", str(self.port), *backend, *args], stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None, self.proc.stderr.read()
            time.sleep(0.2)
        raise TimeoutError("the server did not become healthy in 60 s")

    def post(self, route: str, body, **kwargs) -> httpx.Response:
        if isinstance(body, (dict, list)):
            return httpx.post(self.url + route, json=body, timeout=120, **kwargs)
        return httpx.post(self.url + route, content=body, timeout=120, headers={"content-type": "application/json"}, **kwargs)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(tiny_package):
    srv = Server(tiny_package, "--max-wait-ms", "400", "--max-batch", "4")
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def request_server(tiny_package):
    srv = Server(tiny_package, "--batching", "request", "--max-wait-ms", "400", "--max-batch", "4")
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def local(tiny_package):
    return Pipeline.from_package(tiny_package, backend="ort-cpu")


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(BytesIO(base64.b64decode(b64))).convert("RGB"), np.int16)


def alone(local, prompt: str, seed: int, **settings) -> np.ndarray:
    return np.asarray(local(prompt, seed=seed, **settings).images[0], np.int16)


def test_openai_images_equal_the_pipelines(server, local):
    r = server.post("/v1/images/generations", {"prompt": "a red house", "n": 2, "seed": 11, "steps": 3, "size": "32x32"})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert len(data) == 2
    for i, item in enumerate(data):
        assert np.abs(decode(item["b64_json"]) - alone(local, "a red house", 11 + i, steps=3)).max() <= 1
    assert httpx.get(server.url + "/v1/models").json()["data"][0]["id"] == "tiny"
    long = ", ".join(["(a red:1.4) house under [the night] sky"] * 10)  # over 75 tokens, weights written in
    for syntax in ("plain", "a1111"):
        r = server.post("/v1/images/generations", {"prompt": long, "seed": 3, "steps": 3, "size": "32x32",
                                                   "prompt_syntax": syntax})
        assert r.status_code == 200, r.text
        expected = alone(local, long, 3, steps=3, prompt_syntax=syntax)
        assert np.abs(decode(r.json()["data"][0]["b64_json"]) - expected).max() <= 1, syntax
    bad = server.post("/v1/images/generations", {"prompt": "a cat", "prompt_syntax": "compel"})
    assert bad.status_code == 422 and "prompt_syntax" in bad.text


def test_the_openai_sdk_gets_images(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    result = client.images.generate(model="tiny", prompt="a blue car", n=1, size="32x32",
                                     extra_body={"seed": 4, "steps": 2, "output_format": "webp"})
    image = Image.open(BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert image.format == "WEBP" and image.size == (32, 32)


def test_a1111_txt2img_and_its_lists(server, local):
    body = {"prompt": "a green tree", "negative_prompt": "blur", "seed": 20, "sampler_name": "Euler a", "steps": 3,
            "cfg_scale": 5, "width": 32, "height": 32, "batch_size": 2, "n_iter": 2, "restore_faces": False}
    r = server.post("/sdapi/v1/txt2img", body)
    assert r.status_code == 200, r.text
    out = r.json()
    info = json.loads(out["info"])
    assert len(out["images"]) == 4 and info["all_seeds"] == [20, 21, 22, 23] and info["sampler_name"] == "Euler a"
    third = alone(local, "a green tree", 22, negative_prompt="blur", scheduler="euler_a", steps=3, guidance_scale=5)
    assert np.abs(decode(out["images"][2]) - third).max() <= 1
    assert "Seed: 22" in info["infotexts"][2]
    names = [s["name"] for s in httpx.get(server.url + "/sdapi/v1/samplers").json()]
    assert {"Euler a", "DPM++ 2M Karras", "DDIM"} <= set(names) and "Flow Euler" not in names  # a UNet model's samplers
    assert httpx.get(server.url + "/sdapi/v1/sd-models").json()[0]["model_name"] == "tiny"
    assert httpx.get(server.url + "/sdapi/v1/progress").json()["state"]["sampling_step"] == 0


def test_a1111_sampler_and_schedule_type_sent_apart(server, local):
    """A1111 1.9+ clients send sampler_name "DPM++ 2M" and scheduler "Karras" apart: the image is DPM++ 2M Karras's
    (not plain DPM++ 2M's), and Exponential works the same way; /sdapi/v1/schedulers lists the types."""
    for schedule, short in (("Karras", "dpmpp_2m_karras"), ("Exponential", "dpmpp_2m_exponential"), ("Automatic", "dpmpp_2m")):
        body = {"prompt": "a green tree", "seed": 9, "sampler_name": "DPM++ 2M", "scheduler": schedule, "steps": 4,
                "width": 32, "height": 32}
        r = server.post("/sdapi/v1/txt2img", body)
        assert r.status_code == 200, r.text
        want = alone(local, "a green tree", 9, steps=4, scheduler=short)
        assert np.abs(decode(r.json()["images"][0]) - want).max() <= 1, schedule
    assert np.abs(want - alone(local, "a green tree", 9, steps=4, scheduler="dpmpp_2m_karras")).max() > 1
    labels = [s["label"] for s in httpx.get(server.url + "/sdapi/v1/schedulers").json()]
    assert labels == ["Automatic", "Uniform", "Karras", "Exponential"]


def test_the_rng_of_both_apis(server, local):
    """OpenAI's body takes diffrt's rng; A1111's takes override_settings.randn_source (CPU, GPU, NV), as A1111 does;
    each image equals the pipeline's with that rng, and the infotext names the source. Long, weighted prompts with
    BREAK and clip skip go through as well."""
    r = server.post("/v1/images/generations", {"prompt": "a red house", "seed": 5, "steps": 3, "size": "32x32",
                                               "scheduler": "dpmpp_2m_sde", "rng": "torch-cpu"})
    assert r.status_code == 200, r.text
    want = alone(local, "a red house", 5, steps=3, scheduler="dpmpp_2m_sde", rng="torch-cpu")
    assert np.abs(decode(r.json()["data"][0]["b64_json"]) - want).max() <= 1
    assert np.abs(want - alone(local, "a red house", 5, steps=3, scheduler="dpmpp_2m_sde")).max() > 1
    body = {"prompt": "a green tree", "seed": 8, "sampler_name": "DPM2 a", "steps": 2, "width": 32, "height": 32,
            "override_settings": {"randn_source": "NV"}}
    r = server.post("/sdapi/v1/txt2img", body)
    assert r.status_code == 200, r.text
    want = alone(local, "a green tree", 8, steps=2, scheduler="dpm2_a", rng="torch-cuda")
    assert np.abs(decode(r.json()["images"][0]) - want).max() <= 1
    assert "RNG: GPU" in json.loads(r.json()["info"])["infotexts"][0]
    long = ", ".join(["a (tall:1.3) [grey] house"] * 20) + " BREAK a dog"
    r = server.post("/v1/images/generations", {"prompt": long, "seed": 2, "steps": 2, "size": "32x32", "clip_skip": 2})
    assert r.status_code == 200, r.text
    assert np.abs(decode(r.json()["data"][0]["b64_json"]) - alone(local, long, 2, steps=2, clip_skip=2)).max() <= 1
    bad = server.post("/v1/images/generations", {"prompt": "x", "rng": "mersenne"})
    assert bad.status_code == 422 and "rng" in bad.text


def test_concurrent_requests_are_batched_and_each_equals_its_request_alone(request_server, local):
    """Four at once, one of them a prompt of two 75-token chunks: that one is batched only with prompts as long (the
    others' embeddings would be filled out to its length), and each image equals its request made alone."""
    def prompt(seed: int) -> str:
        return " ".join(["a long cat"] * 30) if seed == 33 else f"a cat number {seed}"

    def ask(seed: int) -> httpx.Response:
        return request_server.post("/v1/images/generations", {"prompt": prompt(seed), "seed": seed, "steps": 4})

    assert httpx.get(request_server.url + "/health").json()["batching"] == "request"
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(ask, (31, 32, 33, 34)))
    for seed, r in zip((31, 32, 33, 34), responses):
        assert r.status_code == 200, r.text
        assert np.abs(decode(r.json()["data"][0]["b64_json"]) - alone(local, prompt(seed), seed, steps=4)).max() <= 1
    metrics = httpx.get(request_server.url + "/metrics").text
    batched = [line for line in metrics.splitlines() if line.startswith("diffrt_batch_images_bucket") and 'le="1.0"' in line]
    count = [line for line in metrics.splitlines() if line.startswith("diffrt_batch_images_count")]
    assert float(batched[0].split()[-1]) < float(count[0].split()[-1])  # some pipeline call made more than one image
    assert 'diffrt_requests_total{route="/v1/images/generations",status="200"}' in metrics


@pytest.mark.parametrize("route, body, status, fragment", [
    ("/v1/images/generations", "{not json", 400, "not valid JSON"),
    ("/v1/images/generations", {"prompt": "a cat", "steps": "many"}, 422, "steps"),
    ("/v1/images/generations", {"prompt": "a cat", "n": 99}, 422, "n:"),
    ("/v1/images/generations", {"prompt": ""}, 422, "prompt"),
    ("/v1/images/generations", {"prompt": "a cat", "size": "33x32"}, 400, "width 33 is not a multiple of 2"),
    ("/v1/images/generations", {"prompt": "a cat", "size": "big"}, 422, "WIDTHxHEIGHT"),
    ("/v1/images/generations", {"prompt": "a cat", "model": "sdxl"}, 400, "is not served here"),
    ("/v1/images/generations", {"prompt": "a cat", "response_format": "url"}, 400, "b64_json"),
    ("/v1/images/generations", '{"prompt": "a \\udcff cat"}', 422, "prompt: Input should be a valid string"),  # lone surrogate
    ("/sdapi/v1/txt2img", {"prompt": "a cat", "sampler_name": "Heun++"}, 400, "unknown scheduler 'Heun++'"),
    ("/sdapi/v1/txt2img", {"prompt": "a cat", "sampler_name": "Euler", "scheduler": "Align Your Steps"}, 400,
     "unknown schedule type 'Align Your Steps'"),
    ("/sdapi/v1/txt2img", {"prompt": "a cat", "sampler_name": "DDIM", "scheduler": "Karras"}, 400, "DDIM has no Karras schedule"),
    ("/sdapi/v1/txt2img", {"prompt": "a cat", "override_settings": {"randn_source": "TPU"}}, 422, "randn_source"),
    ("/sdapi/v1/txt2img", {"prompt": "a cat", "override_settings": {"CLIP_stop_at_last_layers": 9}}, 400, "clip skip 9 is more than"),
    ("/sdapi/v1/txt2img", {"prompt": "a cat", "steps": 1000, "sampler_name": "DDIM"}, 400, "at most 999"),
    ("/sdapi/v1/txt2img", {"prompt": "a cat", "cfg_scale": -1}, 422, "cfg_scale"),
    ("/sdapi/v1/txt2img", [1, 2], 422, "body"),
])
def test_bad_requests_get_a_json_error_and_the_server_goes_on(server, route, body, status, fragment):
    r = server.post(route, body)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]["message"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_a_too_large_body_is_refused(server):
    r = server.post("/v1/images/generations", {"prompt": "a" * 10, "negative_prompt": "x" * 33_000_000})
    assert r.status_code == 413 and "bytes" in r.json()["error"]["message"]


@pytest.mark.slow
def test_api_key_and_queue_limit(tiny_package):
    srv = Server(tiny_package, "--api-key", "sesame", "--max-queue", "1", "--max-wait-ms", "0")
    try:
        assert srv.post("/v1/images/generations", {"prompt": "a cat", "steps": 1}).status_code == 401
        wrong = {"Authorization": "Bearer sesame2"}  # compared in constant time (hmac.compare_digest)
        assert srv.post("/v1/images/generations", {"prompt": "a cat", "steps": 1}, headers=wrong).status_code == 401
        assert httpx.get(srv.url + "/health").status_code == 200  # open to load balancers
        auth = {"Authorization": "Bearer sesame"}

        def ask(_: int) -> httpx.Response:
            return srv.post("/v1/images/generations", {"prompt": "a cat", "steps": 300, "size": "64x64"}, headers=auth)

        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(ask, range(4)))
        statuses = [r.status_code for r in responses]
        assert 200 in statuses and 429 in statuses, statuses
        assert all(r.headers.get("retry-after") for r in responses if r.status_code == 429)
    finally:
        assert srv.stop() == 0


def test_it_says_where_it_listens_and_refuses_sizes_it_cannot_make(tiny_package):
    """The first line names the URL, the model, the backend and the batching; a size of 0 is refused (not taken for
    the default), one past the largest side names the largest that works."""
    srv = Server(tiny_package)
    try:
        banner = srv.proc.stderr.readline()
        while not banner.startswith("diffrt serve:"):  # import-time notices may come first
            assert banner, "the server ended its stderr without saying where it listens"
            banner = srv.proc.stderr.readline()
        assert f"http://127.0.0.1:{srv.port}/" in banner and str(tiny_package) in banner and "ort-cpu" in banner
        for size, message in (("0x0", "width 0 is not a multiple"), ("64x0", "height 0 is not a multiple"),
                              ("100000x64", "use 4096")):
            r = srv.post("/v1/images/generations", {"prompt": "a cat", "steps": 1, "size": size})
            assert r.status_code == 400 and message in r.text, (size, r.text)
    finally:
        assert srv.stop() == 0


def test_metrics_label_requests_by_route_template(server):
    """Unknown paths (even 200 of them, under /v1 or not) count under one label; known routes under their template."""
    for i in range(100):
        httpx.get(f"{server.url}/v1/nothing-{i}")
        httpx.get(f"{server.url}/elsewhere/{i}")
    httpx.get(server.url + "/v1/models")
    lines = [line for line in httpx.get(server.url + "/metrics").text.splitlines()
             if line.startswith("diffrt_requests_total{")]
    routes = {line.split('route="')[1].split('"')[0] for line in lines}
    assert "unmatched" in routes and "/v1/models" in routes and len(routes) < 10, routes


def test_bad_model_is_refused_before_serving(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "diffrt.runtime.cli", "serve", "--model", str(tmp_path / "nowhere"),
                           "--port", str(free_port())], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_progress_stream_and_a_client_that_goes_away(server):
    """The SSE stream reports step i of n while a request runs; when its client disconnects, the work stops at the
    next step instead of running its 999 steps."""
    import threading

    def impatient():
        try:
            httpx.post(server.url + "/v1/images/generations", timeout=2.0,
                       json={"prompt": "a slow cat", "steps": 999, "size": "64x64", "seed": 1})
        except httpx.TimeoutException:
            pass

    client = threading.Thread(target=impatient)
    client.start()
    seen = []
    with httpx.stream("GET", server.url + "/v1/progress/stream", timeout=30) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                state = json.loads(line[6:])
                seen.append(state)
                if state["step"] > 5 or len(seen) > 200:
                    break
    assert any(s["step"] > 0 and s["total"] >= 999 for s in seen), seen[-3:]  # UNet calls (PNDM makes one more)
    client.join()
    gone = time.time()
    while httpx.get(server.url + "/sdapi/v1/progress").json()["state"]["job_count"] and time.time() - gone < 20:
        time.sleep(0.1)
    idle_after = time.time() - gone
    assert idle_after < 3, f"the abandoned request still ran {idle_after:.1f} s after its client left"
    assert server.post("/v1/images/generations", {"prompt": "a cat", "steps": 2}).status_code == 200


@pytest.mark.slow
def test_load_benchmark_at_toy_size(tiny_package, tmp_path):
    pytest.importorskip("matplotlib")
    from diffrt.benchmarks.serve_load import main

    assert main(["--model", str(tiny_package), "--requests", "4", "--concurrency", "1,2", "--rate", "20",
                 "--stream", "2:2", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "serve_load.json").read_text())
    for mode in ("none", "request", "step"):
        runs = report["modes"][mode]
        assert runs["c2"]["errors"] == 0 and runs["c2"]["images_per_s"] > 0 and runs["poisson20"]["requests"] == 4
        assert runs["c2-stream2"]["errors"] == 0  # every streamed answer had its two previews and its image
        assert runs["server_peak_rss_mb"] > 0
    assert "Previews streamed, batching step, c2-stream2" in (tmp_path / "serve_load.md").read_text()
    assert (tmp_path / "serve_load.png").stat().st_size > 0 and "| request | c2 |" in (tmp_path / "serve_load.md").read_text()


def test_the_web_page_in_a_real_browser(server):
    """Headless Chromium (Debian's package) opens /, types a prompt, clicks Generate and finds the image."""
    from conftest import browser_page

    with browser_page(server.url + "/") as page:
        page.wait_for_function("document.querySelectorAll('#sampler option').length > 1")
        page.fill("#prompt", "a green tree in the city")
        page.fill("#steps", "3")
        page.fill("#seed", "5")
        page.select_option("#sampler", "Euler a")
        page.click("#generate")
        page.wait_for_selector("#gallery img", timeout=60_000)
        src = page.get_attribute("#gallery img", "src")
        caption = page.text_content("#gallery figcaption")
        assert page.text_content("#error") == ""
    assert src.startswith("data:image/png;base64,")
    image = Image.open(BytesIO(base64.b64decode(src.split(",", 1)[1])))
    assert image.size == (32, 32) and '"seed":5' in caption and "Euler a" in caption


@pytest.mark.slow
def test_soak_at_toy_size_checks_every_answer(tiny_package, tmp_path):
    from diffrt.benchmarks.serve_load import main

    assert main(["--model", str(tiny_package), "--soak", "18", "--modes", "request", "--out", str(tmp_path)]) == 0
    soak = json.loads((tmp_path / "serve_load.json").read_text())["modes"]["request"]["soak"]
    assert soak["correct"] == 18 and soak["wrong"] == 0 and soak["rss_end_mb"] > 0


@pytest.mark.parametrize("batching", ["request", "step"])
def test_requests_with_different_guidance_share_a_batch(batching, request_server, server, local):
    """Guidance is per image in a batch (1 or less: no guidance for that image), each equal to its request alone."""
    def ask(case):
        seed, guidance = case
        body = {"prompt": "a red house", "seed": seed, "steps": 3, "guidance_scale": guidance}
        return (request_server if batching == "request" else server).post("/v1/images/generations", body)

    cases = [(51, 7.5), (52, 1.0), (53, 3.0), (54, 0.0)]
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(ask, cases))
    for (seed, guidance), r in zip(cases, responses):
        assert r.status_code == 200, r.text
        want = alone(local, "a red house", seed, steps=3, guidance_scale=guidance)
        assert np.abs(decode(r.json()["data"][0]["b64_json"]) - want).max() <= 1, guidance


def test_a_request_joins_a_running_one_at_its_next_step(server, local):
    """Step-level batching (the tiny package's UNet takes one timestep per row): a short request sent while a long
    one denoises runs beside it and is answered first; both images equal their requests made alone, and the
    progress stream shows both jobs at their own steps."""
    long = {"prompt": "a slow red house", "seed": 61, "steps": 300, "scheduler": "euler"}
    short = {"prompt": "a quick blue cat", "seed": 62, "steps": 30, "scheduler": "dpmpp_2m", "guidance_scale": 3.0}
    assert httpx.get(server.url + "/health").json()["batching"] == "step"
    answered = {}

    def ask(name, body):
        answered[name] = (server.post("/v1/images/generations", body), time.time())

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(ask, "long", long)
        both = None
        with httpx.stream("GET", server.url + "/v1/progress/stream", timeout=60) as stream:
            for line in stream.iter_lines():
                state = json.loads(line[6:]) if line.startswith("data: ") else {}
                if state.get("step", 0) >= 10 and "short" not in answered and both is None:
                    pool.submit(ask, "short", short)
                    both = []
                if both is not None and len(state.get("jobs", [])) == 2:
                    both = state["jobs"]
                    break
        first.result()
    assert both and {j["total"] for j in both} == {300, 30} and len({j["step"] for j in both}) == 2, both
    assert answered["short"][1] < answered["long"][1]
    for name, body in (("long", long), ("short", short)):
        r = answered[name][0]
        assert r.status_code == 200, r.text
        settings = {k: v for k, v in body.items() if k not in ("prompt", "seed")}
        want = alone(local, body["prompt"], body["seed"], **settings)
        assert np.abs(decode(r.json()["data"][0]["b64_json"]) - want).max() <= 1, name


def test_step_batching_is_refused_for_a_unet_with_one_timestep_per_call(tmp_path):
    """A package whose manifest declares a scalar timestep: `--batching step` is refused before serving."""
    from diffrt.runtime.bundled import bundled_model

    old = tmp_path / "old"
    shutil.copytree(bundled_model(), old)
    manifest = json.loads((old / "diffrt.json").read_text())
    manifest["components"]["unet"]["inputs"]["timestep"]["dims"] = []
    (old / "diffrt.json").write_text(json.dumps(manifest))
    done = subprocess.run([sys.executable, "-m", "diffrt.runtime.cli", "serve", "--model", str(old), "--batching", "step",
                           "--port", str(free_port())], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "timestep_rows" in done.stderr and "Traceback" not in done.stderr, done.stderr
