"""Edge memory: sequential residency, the memory budget's plans and refusals, the peak prediction against a measured
peak, and dropping a graph file's pages while a compiler reads it."""

from __future__ import annotations

import json
import mmap
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from diffrt.runtime.errors import UserError

PROMPT = "a red circle on a blue background"


def open_names(pipe) -> list[str]:
    return sorted(e.name for e in pipe.shelf.open)


@pytest.mark.parametrize("backend", ["ort-cpu", "ov-cpu"])
def test_sequential_residency_makes_the_same_images_one_stage_at_a_time(tiny_package, backend):
    from diffrt.runtime.pipeline import Pipeline

    resident = Pipeline.from_package(tiny_package, backend=backend)
    sequential = Pipeline.from_package(tiny_package, backend=backend, residency="sequential")
    assert sequential.shelf.open == []  # nothing opened at load
    source = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    for settings in (dict(steps=3, seed=1), dict(steps=3, seed=2, image=source, strength=0.6)):
        stream = sequential.begin(PROMPT, **settings)
        assert open_names(sequential) == ["unet"]  # the text encoder closed when the UNet opened
        while not stream.done:
            sequential.step([stream])
        ours = sequential.finish(stream)
        assert open_names(sequential) == ["vae_decoder"]
        assert sequential.text_encoder._engine is None and sequential.unet._engine is None
        theirs = resident(PROMPT, **settings)
        np.testing.assert_array_equal(ours.array, theirs.array)
        assert ours.settings["residency"] == "sequential" and "residency" not in theirs.settings
        assert ours.timings["load"] > 0
    with pytest.raises(UserError, match="residency must be one of resident, sequential, not 'sometimes'"):
        Pipeline.from_package(tiny_package, backend=backend, residency="sometimes")


def test_sequential_residency_keeps_controlnets_open_with_the_unet():
    """The bundled model's ControlNet runs every step beside the UNet: both stay open through the loop, and the images
    equal the resident pipeline's."""
    from diffrt.runtime.control import ControlInput
    from diffrt.runtime.pipeline import Pipeline

    edges = np.zeros((64, 64, 3), np.uint8)
    edges[10:30, 10] = edges[10:30, 30] = edges[10, 10:30] = edges[30, 10:31] = 255
    settings = dict(steps=2, seed=3, control=[ControlInput("edges", Image.fromarray(edges), 1.0)])
    sequential = Pipeline.from_package(None, backend="ort-cpu", residency="sequential")
    stream = sequential.begin("a circle", **settings)
    sequential.step([stream])
    assert open_names(sequential) == ["controlnet/edges", "unet"]
    while not stream.done:
        sequential.step([stream])
    ours = sequential.finish(stream)
    theirs = Pipeline.from_package(None, backend="ort-cpu")("a circle", **settings)
    np.testing.assert_array_equal(ours.array, theirs.array)


def test_the_budget_picks_the_fastest_plan_that_fits_and_refuses_what_fits_none(tiny_package):
    from diffrt.runtime.budget import GB, PLANS, predict
    from diffrt.runtime.package import load_package
    from diffrt.runtime.pipeline import Pipeline

    package = load_package(tiny_package)
    d = package.defaults
    peaks = {n: predict(package, "ort-cpu", "fp32", p, d["width"], d["height"]) / GB for n, p in PLANS.items()}
    assert peaks["sequential"] < peaks["resident"]
    roomy = Pipeline.from_package(tiny_package, backend="ort-cpu", memory_budget=peaks["resident"] + 0.01)
    assert roomy.residency == "resident"
    result = roomy(PROMPT, steps=1)
    assert result.settings["memory_plan"] == "resident" and result.settings["memory_budget"] == peaks["resident"] + 0.01
    assert result.settings["predicted_peak_gb"] == round(peaks["resident"], 2)
    tight = Pipeline.from_package(tiny_package, backend="ort-cpu", memory_budget=(peaks["resident"] + peaks["sequential"]) / 2)
    assert tight.residency == "sequential"
    assert tight(PROMPT, steps=1).settings["memory_plan"] == "sequential"
    with pytest.raises(UserError, match=r"needs about .* GB; give --memory-budget [0-9.]+ or more"):
        Pipeline.from_package(tiny_package, backend="ort-cpu", memory_budget=0.01)
    bundled = Pipeline.from_package(None, backend="ort-cpu", memory_budget=0.5)  # its VAE's plain attention: tiles fit
    large = bundled(PROMPT, steps=1, width=384, height=384)
    assert large.settings["memory_plan"] == "resident+tiled" and large.settings["vae_tiled"] is True
    with pytest.raises(UserError, match=r"384x384 with 1 image\(s\) needs about .* over the memory budget of 0.5 GB; "
                                        r"give --memory-budget [0-9.]+ or more, .*--residency sequential"):
        bundled(PROMPT, steps=1, width=384, height=384, vae_tiling="off")
    for bad in ("lots", -1, 0, float("nan")):
        with pytest.raises(UserError, match="memory budget must be a"):
            Pipeline.from_package(tiny_package, backend="ort-cpu", memory_budget=bad)


def test_memory_budget_on_the_command_line(tiny_package, tmp_path):
    out = tmp_path / "a.png"
    r = run_cli("generate", PROMPT, "--model", tiny_package, "--steps", "1", "--memory-budget", "64", "-q", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "diffrt: memory budget 64 GB: plan resident (every stage's engine open), predicted peak" in r.stderr
    from diffrt.runtime.images import read_settings

    assert read_settings(out)["memory_plan"] == "resident"
    for bad in ("lots", "-1", "0"):
        r = run_cli("generate", PROMPT, "--model", tiny_package, "--memory-budget", bad, "-o", tmp_path / "b.png")
        assert r.returncode == 2 and "--memory-budget" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run_cli("generate", PROMPT, "--model", tiny_package, "--memory-budget", "0.01", "-o", tmp_path / "b.png")
    assert r.returncode == 2 and "give --memory-budget" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "b.png").exists()
    r = subprocess.run([sys.executable, "-m", "diffrt.runtime.cli", "serve", "--model", str(tiny_package), "--port", "7999",
                        "--memory-budget", "0.01"], capture_output=True, text=True, timeout=60)  # refused before it starts
    assert r.returncode == 2 and "give --memory-budget" in r.stderr and "diffrt serve:" not in r.stdout, r.stderr


PEAK = """
import json, sys
from diffrt.runtime.pipeline import Pipeline
pipe = Pipeline.from_package(None, backend=sys.argv[1], residency=sys.argv[2])
for seed in range(3):  # a server's steady state: onnxruntime's arenas grow after the first request
    pipe("a red circle", steps=1, width=int(sys.argv[3]), height=int(sys.argv[3]), seed=seed)
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
print(json.dumps({"peak": int(status["VmHWM"].split()[0]) * 1024}))
"""


@pytest.mark.parametrize("backend", ["ort-cpu", "ov-cpu"])
@pytest.mark.parametrize("residency", ["resident", "sequential"])
def test_predicted_peak_against_a_measured_one(backend, residency):
    """The bundled model at 384x384 (its VAE decoder's plain attention holds 0.3 GB of scores on onnxruntime), three
    requests in a fresh process: the measured whole-process peak lies within the prediction's margin."""
    from diffrt.runtime.budget import MARGIN, predicted_peaks
    from diffrt.runtime.bundled import bundled_model

    done = subprocess.run([sys.executable, "-c", PEAK, backend, residency, "384"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])["peak"]
    predicted = predicted_peaks(bundled_model(), backend, (384, 384))[residency]
    assert predicted / MARGIN <= measured <= predicted, (measured / 2**30, predicted / 2**30)


def test_pages_of_a_mapped_file_are_dropped_while_open(tmp_path):
    from diffrt.runtime.mapped import DroppingPages

    path = tmp_path / "model.onnx_data"
    path.write_bytes(np.arange(2**20, dtype=np.float32).tobytes())
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        assert sum(mapped[i] for i in range(0, len(mapped), 4096)) >= 0  # every page read in
        resident = mapped_kb(path)
        with DroppingPages(path, every=0.02):
            time.sleep(0.2)
            assert mapped_kb(path) < resident / 4
            assert bytes(mapped[4:8]) == np.float32(1).tobytes()  # a dropped page reads back from the file


def mapped_kb(path) -> int:
    """Resident kB of this process's mappings of path (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        if "-" in line.split()[0] and len(line.split()) >= 5:
            inside = line.rstrip().endswith(str(path.resolve()))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.fixture(scope="module")
def int8_weights(tmp_path_factory):
    from diffrt.export.ov_weights import compress_package
    from diffrt.export.precision import QuantizeOptions
    from diffrt.runtime.bundled import bundled_model

    root = tmp_path_factory.mktemp("w8")
    source = shutil.copytree(bundled_model(), root / "shapes")  # the repository's files are never linked from a test
    out = root / "shapes-w8"
    manifest = (source / "diffrt.json").read_bytes()
    gate = compress_package(source, out, "int8-weights", QuantizeOptions(gate_seeds=1), log=lambda m: None)
    assert (source / "diffrt.json").read_bytes() == manifest  # the source is untouched (large files are linked)
    weights, linked = source / "unet" / "model.onnx_data", out / "unet" / "model.onnx_data"
    if weights.stat().st_dev == linked.stat().st_dev:
        assert weights.stat().st_ino == linked.stat().st_ino
    return out, gate


def test_int8_weights_for_openvino_hold_less_and_stay_near_float32(int8_weights):
    """The bundled model's text encoder and UNet with NNCF int8 matrix-product weights: ov-cpu reads them (its images
    change, within the gate, and say so), ort-cpu still runs the float32 graphs (its images do not change), and the
    planner counts the smaller weights."""
    from diffrt.runtime.budget import held_bytes
    from diffrt.runtime.bundled import bundled_model
    from diffrt.runtime.doctor import psnr
    from diffrt.runtime.package import load_package
    from diffrt.runtime.pipeline import Pipeline

    out, gate = int8_weights
    assert gate["passed"] and gate["psnr_db_min"] >= 30 and gate["images"] >= 4
    package, source = load_package(out), load_package(bundled_model())
    assert (out / "unet" / "openvino_model.xml").is_file() and (out / "text_encoder" / "openvino_model.bin").is_file()
    assert package.openvino_weights("unet") == "int8" and package.openvino_weights("vae_decoder") is None
    ov, ov_source = Pipeline(package, backend="ov-cpu"), Pipeline(source, backend="ov-cpu")
    ours, float_ov = ov(PROMPT, steps=4, seed=5), ov_source(PROMPT, steps=4, seed=5)
    assert ours.settings["precision"] in ("int8-weights+bf16", "int8-weights+fp32")
    assert np.abs(ours.array - float_ov.array).max() > 0  # the compressed graph ran
    reference = Pipeline(source, backend="ort-cpu")(PROMPT, steps=4, seed=5)
    assert psnr(reference.array, ours.array) >= 30
    np.testing.assert_array_equal(Pipeline(package, backend="ort-cpu")(PROMPT, steps=4, seed=5).array, reference.array)
    precision = ov.precision
    assert held_bytes(package, "unet", "ov-cpu", precision) < held_bytes(source, "unet", "ov-cpu", precision)


@pytest.mark.slow
def test_weights_that_miss_the_gate_write_nothing(tmp_path, monkeypatch):
    """A package under its gate (int4 here, its gate raised past what any image reaches) is refused in one line, and
    nothing is written."""
    from diffrt.export import ov_weights
    from diffrt.runtime.bundled import bundled_model

    monkeypatch.setitem(ov_weights.GATES_DB, 4, 99.0)
    out = tmp_path / "w4"
    r = run_cli("quantize", bundled_model(), out, "--precision", "int4-weights", "--gate-seeds", "1", "--steps", "4")
    assert r.returncode == 2 and "misses its quality gate" in r.stderr.splitlines()[-1], r.stderr[-500:]
    assert "needs 99 dB" in r.stderr and "Traceback" not in r.stderr and not out.exists()


def test_memory_this_process_already_holds_counts_as_room_for_its_peak():
    """The size check compares a whole-process peak with the memory available plus what the process holds: a
    pipeline's own engines (here 512 MB of arrays) are part of its predicted peak, not taken from it twice."""
    from diffrt.runtime.budget import available_bytes, room_bytes

    before = room_bytes() - available_bytes()
    held = np.ones(2**27, np.float32)  # 512 MB, touched
    after = room_bytes() - available_bytes()
    assert after - before >= 0.8 * held.nbytes, (before, after)
