"""diffrt's service on Ray Serve: a local Ray cluster started by the test (2 CPUs, this machine only), the same routes
as `diffrt serve` answering from two model replicas, a replica killed under load, and the one-command CLI."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")
from ray import serve  # noqa: E402
from test_serve import Server, alone, decode, free_port  # noqa: E402

from diffrt.runtime.pipeline import Pipeline  # noqa: E402
from diffrt.serve.ray_app import app  # noqa: E402


def test_the_cli_runs_it_in_one_command_and_stops_cleanly(tiny_package, tmp_path):
    """`diffrt serve --ray` starts its own local cluster, answers, and shuts it down on SIGTERM with exit 0."""
    server = Server(tiny_package, "--ray", "--replicas", "1", "--max-wait-ms", "10")
    try:
        health = httpx.get(server.url + "/health").json()
        assert health["status"] == "ok" and health["model"] == "tiny"
        r = server.post("/v1/images/generations", {"prompt": "a red house", "seed": 1, "steps": 2, "size": "32x32"})
        assert r.status_code == 200, r.text
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("args, message", [(["--replicas", "2"], "--replicas is a Ray Serve option; add --ray"),
                                           (["--ray", "--replicas", "2", "--autoscale", "1-2"], "not both"),
                                           (["--ray", "--autoscale", "3-1"], "MIN-MAX with 1 <= MIN <= MAX")])
def test_bad_ray_options(tiny_package, args, message):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "diffrt.runtime.cli", "serve", "--model", str(tiny_package), *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def cluster(tiny_package):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app({"model": str(tiny_package), "backend": "ort-cpu", "replicas": 2, "threads": 1, "max_wait_ms": 100,
                   "timeout_s": 60}),
              name="diffrt", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def local(tiny_package):
    return Pipeline.from_package(tiny_package, backend="ort-cpu")


def replicas() -> set[int]:
    """PIDs of the model replicas that answer (asked through Ray's router until both have been seen)."""
    handle = serve.get_deployment_handle("Replica", app_name="diffrt")
    pids: set[int] = set()
    for _ in range(40):
        pids.add(handle.describe.remote().result(timeout_s=30)["pid"])
        if len(pids) == 2:
            break
    return pids


def running() -> int:
    """Model replicas Ray Serve reports as running."""
    states = serve.status().applications["diffrt"].deployments["Replica"].replica_states
    return states.get("RUNNING", 0)


def test_the_routes_answer_as_diffrt_serve(cluster, local):
    health = httpx.get(cluster + "/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny" and health["backend"] == "ort-cpu"
    r = httpx.post(cluster + "/v1/images/generations", json={"prompt": "a red house", "n": 2, "seed": 11, "steps": 3,
                                                             "size": "32x32"}, timeout=60)
    assert r.status_code == 200, r.text
    for i, item in enumerate(r.json()["data"]):
        assert np.abs(decode(item["b64_json"]) - alone(local, "a red house", 11 + i, steps=3)).max() <= 1
    body = {"prompt": "a green tree", "seed": 20, "sampler_name": "Euler a", "steps": 3, "width": 32, "height": 32,
            "batch_size": 2}
    out = httpx.post(cluster + "/sdapi/v1/txt2img", json=body, timeout=60).json()
    assert json.loads(out["info"])["all_seeds"] == [20, 21]
    second = alone(local, "a green tree", 21, scheduler="euler_a", steps=3)
    assert np.abs(decode(out["images"][1]) - second).max() <= 1
    bad = httpx.post(cluster + "/v1/images/generations", json={"prompt": "a cat", "scheduler": "heun++"}, timeout=60)
    assert bad.status_code == 400 and "unknown scheduler 'heun++'" in bad.json()["error"]["message"]
    invalid = httpx.post(cluster + "/v1/images/generations", json={"prompt": "a cat", "n": 99}, timeout=60)
    assert invalid.status_code == 422 and invalid.json()["error"]["param"] == "n"
    assert httpx.get(cluster + "/sdapi/v1/sd-models").json()[0]["model_name"] == "tiny"
    metrics = httpx.get(cluster + "/metrics").text
    assert 'diffrt_requests_total{route="/v1/images/generations",status="200"}' in metrics
    assert len(replicas()) == 2 and running() == 2


def test_a_replica_killed_under_load(cluster):
    """Kill one replica's process while 16 requests run 4 at a time: every request answers (200, or a retryable 503
    with Retry-After) well inside its timeout, none hangs, and Ray brings the replica back."""
    def ask(seed: int) -> tuple[int, float, dict]:
        start = time.time()
        r = httpx.post(cluster + "/v1/images/generations", json={"prompt": f"a boat {seed}", "seed": seed, "steps": 8},
                       timeout=90)
        return r.status_code, time.time() - start, dict(r.headers)

    victim = min(replicas())
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(ask, seed) for seed in range(16)]
        time.sleep(1.0)
        os.kill(victim, signal.SIGKILL)
        answers = [f.result() for f in futures]
    codes = [code for code, _, _ in answers]
    assert set(codes) <= {200, 503}, codes
    assert all(seconds < 60 for _, seconds, _ in answers)
    assert all(headers.get("retry-after") for code, _, headers in answers if code == 503)
    print(f"replica killed under load: {codes.count(200)} answered 200, {codes.count(503)} got a retryable 503")
    deadline, pids = time.time() + 120, set()
    while time.time() < deadline and not (len(pids) == 2 and victim not in pids):
        time.sleep(2)
        pids = replicas()
    assert len(pids) == 2 and victim not in pids and running() == 2
    print(f"both replicas answered again {120 - (deadline - time.time()):.0f} s after the load ended")
    r = httpx.post(cluster + "/v1/images/generations", json={"prompt": "after", "seed": 1, "steps": 2}, timeout=60)
    assert r.status_code == 200


def test_the_config_file_and_the_builders_options():
    """serve/ray-config.yaml names this module's builder and its deployments; the builder turns replicas / autoscale
    / threads into Ray's options (fixed count, or an autoscaling_config on queued requests) without a cluster."""
    import importlib
    from pathlib import Path

    import yaml

    from diffrt.serve.ray_app import replica_options

    config = yaml.safe_load((Path(__file__).parents[1] / "serve" / "ray-config.yaml").read_text())
    application = config["applications"][0]
    module, _, name = application["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), name))
    assert {d["name"] for d in application["deployments"]} == {"Replica", "Ingress"}
    assert replica_options({"replicas": "3", "threads": "2"}) == {"num_replicas": 3, "ray_actor_options": {"num_cpus": 2}}
    scaled = replica_options({"autoscale": "1-4", "gpus_per_replica": 1})
    assert scaled["autoscaling_config"]["min_replicas"] == 1 and scaled["autoscaling_config"]["max_replicas"] == 4
    assert scaled["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 1.0}
