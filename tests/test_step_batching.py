"""Step-level batching: calls at different steps (of different schedules, guidance, modes) share UNet calls, and each
call's images equal the call made alone; the UNet graph that makes it possible (one timestep per row), as exported
and as rewritten from an older package's scalar timestep."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffrt.runtime.errors import UserError
from diffrt.runtime.pipeline import Pipeline

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

CALLS = [
    {"prompt": "a red house", "seed": 1, "steps": 9},
    {"prompt": "a blue cat", "seed": 2, "steps": 5, "scheduler": "euler_a", "guidance_scale": 9.0},
    {"prompt": ["a dog", "a tree"], "negative_prompt": "blurry", "seeds": [5, 6], "steps": 7, "scheduler": "dpmpp_2m"},
    {"prompt": "a green car", "seed": 8, "steps": 6, "guidance_scale": 1.0, "scheduler": "heun"},
]


def picture(size: int = 32) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size]
    return Image.fromarray(np.stack([x * 8, y * 8, (x + y) * 4], axis=2).astype(np.uint8))


@pytest.fixture(scope="module")
def pipe(tiny_package):
    return Pipeline.from_package(tiny_package, backend="ort-cpu")


def counting(pipe: Pipeline) -> list[int]:
    """The batch size of every UNet call the pipeline makes from now on (the real engine still runs)."""
    sizes, run = [], pipe.unet.run

    def spy(feeds, *args, **kwargs):
        sizes.append(len(feeds["sample"]))
        return run(feeds, *args, **kwargs)

    pipe.unet.run = spy
    return sizes


def staggered(pipe: Pipeline, calls: list[dict], every: int = 2) -> dict[int, np.ndarray]:
    """The calls begun one every `every` steps into one running set, stepped together; each one's images."""
    pending, active, done, k = list(enumerate(calls)), [], {}, 0
    while pending or active:
        if pending and k % every == 0:
            i, call = pending.pop(0)
            call = dict(call)
            stream = pipe.begin(call.pop("prompt"), **call)
            active.append((i, stream))
        pipe.step([s for _, s in active])
        k += 1
        for i, s in [(i, s) for i, s in active if s.done]:
            done[i] = pipe.finish(s).array
            active.remove((i, s))
    return done


def test_export_gives_the_unet_one_timestep_per_row(tiny_package, pipe):
    manifest = json.loads((tiny_package / "diffrt.json").read_text())
    assert manifest["components"]["unet"]["inputs"]["timestep"]["dims"] == ["batch_size"]
    assert pipe.per_row_timesteps


def test_calls_at_different_steps_share_unet_calls_and_equal_their_calls_alone(pipe):
    calls = CALLS + [{"prompt": "a red house at night", "image": picture(), "strength": 0.6, "seed": 11, "steps": 8}]
    alone = [pipe(**dict(c)).array for c in calls]
    sizes = counting(pipe)
    try:
        together = staggered(pipe, calls)
    finally:
        del pipe.unet.run
    for i, want in enumerate(alone):
        assert np.abs(together[i] - want).max() <= 1e-3, calls[i]
    unet_calls = sum(len(pipe.begin(**dict(c)).timesteps) * (2 if c.get("scheduler") == "heun" else 1) for c in calls)
    assert len(sizes) < unet_calls - 10 and max(sizes) > 4  # most steps were shared


def test_rows_of_different_sizes_or_text_lengths_are_refused(pipe):
    a = pipe.begin("a cat", seed=1, steps=3)
    with pytest.raises(UserError, match="different sizes or text lengths"):
        pipe.step([a, pipe.begin("a cat", seed=1, steps=3, width=48)])
    with pytest.raises(UserError, match="different sizes or text lengths"):
        pipe.step([a, pipe.begin(" ".join(["a long cat"] * 30), seed=1, steps=3)])


def scalar_timestep_unet(checkpoint, path, dynamo: bool) -> None:
    """The tiny UNet as diffrt exported it before its timestep had a batch dimension (and as optimum's graph
    declares a scalar): what the rewrite is for."""
    from diffusers import UNet2DConditionModel

    from diffrt.export.graphs import UNet

    unet = UNet(UNet2DConditionModel.from_pretrained(checkpoint / "unet")).eval()
    example = (torch.randn(2, 4, 16, 16), torch.tensor(500.0), torch.randn(2, 77, 32))
    names = {"input_names": ["sample", "timestep", "encoder_hidden_states"], "output_names": ["out_sample"]}
    if dynamo:
        batch = torch.export.Dim("batch_size")
        torch.onnx.export(unet, example, str(path), dynamo=True, opset_version=18, **names,
                          dynamic_shapes=({0: batch}, {}, {0: batch}))
    else:
        torch.onnx.export(unet, example, str(path), dynamo=False, opset_version=17, **names,
                          dynamic_axes={"sample": {0: "batch_size"}, "encoder_hidden_states": {0: "batch_size"}})


@pytest.fixture(scope="module")
def old_package(tiny_package, tiny_checkpoint, tmp_path_factory):
    """The tiny package with a scalar-timestep UNet, its manifest made to match."""
    from diffrt.export.writer import file_hashes, graph_io

    root = tmp_path_factory.mktemp("old") / "tiny-old"
    shutil.copytree(tiny_package, root)
    (root / "unet" / "model.onnx").unlink()
    scalar_timestep_unet(tiny_checkpoint, root / "unet" / "model.onnx", dynamo=False)
    manifest = json.loads((root / "diffrt.json").read_text())
    manifest["components"]["unet"].update(graph_io(root / "unet" / "model.onnx"))
    manifest["files"] = file_hashes(root)
    (root / "diffrt.json").write_text(json.dumps(manifest))
    return root


@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["torchscript", "dynamo"])
def test_a_scalar_timestep_unet_is_rewritten_to_take_one_per_row(tiny_checkpoint, tmp_path, dynamo):
    import onnxruntime as ort

    from diffrt.export.timestep_rows import per_row_timestep

    path = tmp_path / "unet.onnx"
    scalar_timestep_unet(tiny_checkpoint, path, dynamo)
    model = onnx.load(str(path))
    assert per_row_timestep(model) and not per_row_timestep(model)
    onnx.checker.check_model(model)
    before, after = ort.InferenceSession(str(path)), ort.InferenceSession(model.SerializeToString())
    rng = np.random.default_rng(0)
    x, text, ts = rng.standard_normal((3, 4, 16, 16), np.float32), rng.standard_normal((3, 77, 32), np.float32), [3.0, 420.0, 999.0]
    rows = after.run(None, {"sample": x, "timestep": np.array(ts, np.float32), "encoder_hidden_states": text})[0]
    for i, t in enumerate(ts):
        one = before.run(None, {"sample": x[i:i + 1], "timestep": np.array(t, np.float32), "encoder_hidden_states": text[i:i + 1]})[0]
        assert np.abs(one - rows[i:i + 1]).max() <= 1e-5


def test_an_old_package_is_refused_then_rewritten(old_package, tmp_path):
    old = Pipeline.from_package(old_package, backend="ort-cpu")
    assert not old.per_row_timesteps
    with pytest.raises(UserError, match="one timestep per call.*timestep_rows"):
        old.step([old.begin("a cat", seed=1, steps=4), old.begin("a dog", seed=2, steps=6, scheduler="euler")])
    want = old("a cat", seed=1, steps=4).array
    copy = tmp_path / "pkg"
    shutil.copytree(old_package, copy)
    done = subprocess.run([sys.executable, "-m", "diffrt.export.timestep_rows", str(copy)], capture_output=True, text=True)
    assert done.returncode == 0 and "rewrote unet/model.onnx" in done.stdout, done.stderr
    new = Pipeline.from_package(copy, backend="ort-cpu", verify_hashes=True)
    assert new.per_row_timesteps
    assert np.abs(new("a cat", seed=1, steps=4).array - want).max() <= 1e-5
    again = subprocess.run([sys.executable, "-m", "diffrt.export.timestep_rows", str(copy)], capture_output=True, text=True)
    assert again.returncode == 0 and "already" in again.stdout
    bad = subprocess.run([sys.executable, "-m", "diffrt.export.timestep_rows", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no diffrt.json" in bad.stderr


def test_a_stream_whose_own_step_fails_stops_alone(pipe):
    """Bookkeeping: one stream's scheduler made to give NaN (a stand-in for an unstable sampler) ends that stream with
    its error; the stream sharing its UNet calls goes on and equals its call alone."""
    from diffrt.runtime.stream import NonFiniteError

    want = pipe("a cat", seed=4, steps=5).array
    good, bad = pipe.begin("a cat", seed=4, steps=5), pipe.begin("a dog", seed=5, steps=5)
    bad.sched.step = lambda out, x, rng: x * np.nan
    pipe.step([good, bad])
    assert bad.done and isinstance(bad.error, NonFiniteError) and good.i == 1
    with pytest.raises(NonFiniteError, match="NaN or inf at step 1 of"):
        pipe.finish(bad)
    while not good.done:
        pipe.step([good])
    assert np.abs(pipe.finish(good).array - want).max() <= 1e-6


def test_a_new_stream_in_a_finished_ones_place_gets_its_own_text(pipe):
    """The joined text inputs are remade whenever the set of streams changes: each new stream beside the same other
    one gets its own prompt's rows (a finished stream's memory, and so its id(), may be a new one's)."""
    import gc

    other = pipe.begin("a dog", seed=2, steps=20)
    for i in range(6):
        stream = pipe.begin(f"a cat number {i}", seed=i, steps=3)
        pipe.step([stream, other])
        joined = pipe._joined_cond([stream, other])["encoder_hidden_states"]
        assert np.array_equal(joined[:len(joined) // 2], stream.host_cond["encoder_hidden_states"]), i
        del stream, joined
        gc.collect()
