"""Export: manifest contents, the check's numbers, bad input refused, and the optimum round trips."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import run_cli

from diffrt.runtime.errors import UserError
from diffrt.runtime.package import load_package, sha256
from diffrt.runtime.pipeline import Pipeline

pytest.importorskip("torch")
from diffrt.export import ExportOptions, export_package  # noqa: E402


def test_manifest(tiny_package, tiny_checkpoint):
    m = json.loads((tiny_package / "diffrt.json").read_text())
    assert m["format_version"] == 1 and m["family"] == "custom"
    assert m["prediction_type"] == "epsilon" and m["vae_scale_factor"] == 2 and m["latent_channels"] == 4
    assert m["text_max_length"] == 77
    assert m["defaults"] == {"width": 32, "height": 32, "steps": 20, "guidance_scale": 7.5, "scheduler": "pndm"}
    unet = m["components"]["unet"]
    assert unet["inputs"]["sample"] == {"dtype": "float32", "dims": ["batch_size", 4, "height", "width"]}
    assert unet["inputs"]["timestep"] == {"dtype": "float32", "dims": ["batch_size"]}  # one per row
    assert unet["outputs"]["out_sample"]["dims"] == ["batch_size", 4, "height", "width"]
    assert set(m["components"]) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    for comp in m["components"].values():
        assert comp["precision"] == "fp32"
        assert comp["check"]["passed"] and comp["check"]["max_abs"] < 1e-4 and len(comp["check"]["cases"]) == 2
    for rel, info in m["files"].items():
        assert sha256(tiny_package / rel) == info["sha256"]
    assert {"diffrt", "torch", "diffusers", "onnx", "onnxruntime"} <= set(m["versions"])
    for name in ("tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json", "model_index.json",
                 "unet/config.json", "vae_decoder/config.json"):
        assert (tiny_package / name).is_file()
    for comp in m["components"]:  # weights beside the graph at any size, so OpenVINO maps them rather than copies them
        data = tiny_package / comp / "model.onnx_data"
        assert f"{comp}/model.onnx_data" in m["files"] and data.stat().st_size > (tiny_package / comp / "model.onnx").stat().st_size
    load_package(tiny_package, hashes=True)


def test_bad_checkpoints(tiny_checkpoint, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="not a diffusers checkpoint"):
        export_package(empty, tmp_path / "out1")
    with pytest.raises(UserError, match="does not exist"):
        export_package(tmp_path / "nowhere", tmp_path / "out1")

    no_unet = tmp_path / "no_unet"
    shutil.copytree(tiny_checkpoint, no_unet)
    shutil.rmtree(no_unet / "unet")
    with pytest.raises(UserError, match="unet component is missing"):
        export_package(no_unet, tmp_path / "out2")

    odd = tmp_path / "odd"
    shutil.copytree(tiny_checkpoint, odd)
    config = json.loads((odd / "unet" / "config.json").read_text())
    config["_class_name"] = "UNet2DModel"
    (odd / "unet" / "config.json").write_text(json.dumps(config))
    index = json.loads((odd / "model_index.json").read_text())
    index["unet"] = ["diffusers", "UNet2DModel"]
    (odd / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="is a UNet2DModel; diffrt exports UNet2DConditionModel"):
        export_package(odd, tmp_path / "out3")
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_existing_output_is_kept_unless_overwrite(tiny_checkpoint, tmp_path):
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run_cli("export", str(tiny_checkpoint), str(out))
    assert proc.returncode == 2 and "--overwrite" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert (out / "keep.txt").read_text() == "mine"
    export_package(tiny_checkpoint, out, ExportOptions(overwrite=True, check=False, components=("text_encoder", "unet",
                                                                                             "vae_decoder")),
                   log=lambda m: None)
    assert not (out / "keep.txt").exists() and (out / "diffrt.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]
    both = run_cli("export", str(tiny_checkpoint), str(tmp_path / "both"), "--weights-fp16", "--weights-fp32")
    assert both.returncode == 2 and "--weights-fp16 and --weights-fp32 ask for opposite storage" in both.stderr
    assert not (tmp_path / "both").exists()


def test_no_space_left_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    import diffrt.export.graphs as graphs

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(graphs, "export_component", full)
    with pytest.raises(UserError, match="no space left"):
        export_package(tiny_checkpoint, tmp_path / "pkg", log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


def test_check_failure_names_component(tiny_checkpoint, tmp_path, monkeypatch):
    import diffrt.export.check as check

    monkeypatch.setitem(check.TOLERANCE, "fp32", 1e-12)
    with pytest.raises(UserError, match=r"text_encoder: onnxruntime differs from PyTorch by .* over the tolerance 1e-12"):
        export_package(tiny_checkpoint, tmp_path / "pkg", log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_dynamo_exporter(tiny_checkpoint, tmp_path):
    pytest.importorskip("onnxscript")
    out = export_package(tiny_checkpoint, tmp_path / "pkg", ExportOptions(exporter="dynamo", components=(
        "text_encoder", "unet", "vae_decoder")), log=lambda m: None)
    m = json.loads((out / "diffrt.json").read_text())
    assert all(c["check"]["passed"] for c in m["components"].values())


def test_optimum_loads_our_package(tiny_package):
    import torch

    optimum = pytest.importorskip("optimum.onnxruntime", reason="optimum-onnx is not installed")
    pipe = optimum.ORTStableDiffusionPipeline.from_pretrained(tiny_package)
    latents = np.random.default_rng(3).standard_normal((1, 4, 16, 16), dtype=np.float32)
    theirs = pipe("a red house", num_inference_steps=5, guidance_scale=7.5, latents=torch.from_numpy(latents),
                  output_type="np").images
    ours = Pipeline.from_package(tiny_package, backend="ort-cpu")("a red house", steps=5, guidance_scale=7.5,
                                                                  scheduler="pndm", seed=3, latents=latents)
    assert np.abs(ours.array - theirs).max() <= 1e-3


def test_we_load_optimums_export(tiny_checkpoint, tiny_package, tmp_path):
    """diffrt runs optimum's export (no diffrt.json) and derives TensorRT profiles from its graphs' inputs."""
    pytest.importorskip("optimum.onnxruntime", reason="optimum-onnx is not installed")
    from optimum.exporters.onnx import main_export

    from diffrt.export.profiles import Span
    from diffrt.export.trt_build import package_profiles

    main_export(str(tiny_checkpoint), output=tmp_path / "opt", task="text-to-image", do_validation=False)
    assert not (tmp_path / "opt" / "diffrt.json").exists()
    latents = np.random.default_rng(4).standard_normal((1, 4, 16, 16), dtype=np.float32)
    images = [Pipeline.from_package(p, backend="ort-cpu")("a green tree", steps=5, seed=4, latents=latents, scheduler="ddim")
              for p in (tmp_path / "opt", tiny_package)]
    assert np.abs(images[0].array - images[1].array).max() <= 1e-4
    assert load_package(tmp_path / "opt").vae_scale_factor == 2
    profiles = package_profiles(load_package(tmp_path / "opt"), Span(1, 1, 2), Span(32, 32, 64), Span(32, 32, 64))
    assert profiles["unet"]["sample"] == {"min": [1, 4, 16, 16], "opt": [2, 4, 16, 16], "max": [4, 4, 32, 32]}
    assert profiles["vae_decoder"]["latent_sample"]["max"] == [2, 4, 32, 32]
    assert profiles["text_encoder"]["input_ids"]["opt"] == [2, 77]  # guidance encodes the negative prompt too


@pytest.mark.slow
def test_killed_export_leaves_nothing(tiny_checkpoint, tmp_path):
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "diffrt.runtime.cli", "export", str(tiny_checkpoint), str(tmp_path / "pkg")],
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "unet: exporting" in line:
            proc.send_signal(signal.SIGTERM)
            break
    proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert list(tmp_path.iterdir()) == []


def test_fused_attention_leaves_no_float_shape_arithmetic(tiny_package, tiny_plain_package):
    """The default export writes onnxruntime's MultiHeadAttention (CUDA graphs can then capture the UNet); the plain
    form keeps the Shape -> Cast -> Sqrt scale that onnxruntime must run on the CPU, and the check flags it."""
    import onnx

    from diffrt.export.cuda_ready import check_cuda_graph_ready

    m = json.loads((tiny_package / "diffrt.json").read_text())
    assert {c: e["attention"] for c, e in m["components"].items()} == {
        "text_encoder": "plain", "unet": "mha", "vae_decoder": "mha", "vae_encoder": "mha"}
    unet = onnx.load(str(tiny_package / "unet" / "model.onnx"))
    assert sum(n.op_type == "MultiHeadAttention" for n in unet.graph.node) == 12 and not any(
        n.op_type == "Softmax" for n in unet.graph.node)
    assert check_cuda_graph_ready(tiny_package / "unet" / "model.onnx") == []
    plain = tiny_plain_package
    assert json.loads((plain / "diffrt.json").read_text())["components"]["unet"]["attention"] == "plain"
    problems = check_cuda_graph_ready(plain / "unet" / "model.onnx")
    assert len(problems) == 1 and "--attention mha" in problems[0]
    a = Pipeline.from_package(plain, backend="ort-cpu")("a red house", steps=4, seed=2)
    b = Pipeline.from_package(tiny_package, backend="ort-cpu")("a red house", steps=4, seed=2)
    assert np.abs(a.array - b.array).max() < 1e-4


def test_attention_options_refused(tiny_checkpoint, tmp_path):
    with pytest.raises(UserError, match="unknown attention form"):
        export_package(tiny_checkpoint, tmp_path / "a", ExportOptions(attention="flash"))
    with pytest.raises(UserError, match="needs the torchscript exporter"):
        export_package(tiny_checkpoint, tmp_path / "b", ExportOptions(attention="mha", exporter="dynamo"))


@pytest.mark.slow
def test_auto_exporter_takes_dynamo_for_a_big_model(tiny_checkpoint, tmp_path, monkeypatch):
    """auto: TorchScript, but dynamo traced without weights, each written from the loaded model (no copy of them in
    memory) for a model over the size threshold, recorded per component; the graph passes its check against PyTorch."""
    import diffrt.export.writer as writer

    unet_bytes = 4 * sum(p.numel() for p in __import__("diffusers").UNet2DConditionModel.from_pretrained(
        tiny_checkpoint / "unet").parameters())
    monkeypatch.setattr(writer, "BIG_MODEL_BYTES", unet_bytes - 1)
    out = export_package(tiny_checkpoint, tmp_path / "pkg", ExportOptions(components=("text_encoder", "unet", "vae_decoder")),
                         log=lambda m: None)
    components = json.loads((out / "diffrt.json").read_text())["components"]
    assert components["unet"]["made_by"].startswith("torch.onnx dynamo, traced without weights")
    assert components["unet"]["attention"] == "plain"
    assert components["text_encoder"]["made_by"] == "torch.onnx torchscript"
    assert components["vae_decoder"]["made_by"] == "torch.onnx torchscript"
    assert all(c["check"]["passed"] for c in components.values())


def test_float16_weights_halve_the_weight_file(tiny_checkpoint, tiny_package, tmp_path):
    """--weights-fp16 rewrites model.onnx_data with the float16 weights alone (onnx appends to an existing file: the
    float32 ones stayed behind it once, making the file one and a half times the float32 one)."""
    from diffrt.export import ExportOptions, export_package

    options = ExportOptions(components=("text_encoder", "unet", "vae_decoder"), weights_fp16=True, check=False)
    half = export_package(tiny_checkpoint, tmp_path / "half", options, log=lambda m: None)
    full = (tiny_package / "unet" / "model.onnx_data").stat().st_size
    assert (half / "unet" / "model.onnx_data").stat().st_size < 0.55 * full
