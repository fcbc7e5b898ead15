"""The backend registry: capabilities instead of names, dynamic dimensions written one way, options refused in one
line, and a pipeline that chooses nothing by a backend's name."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from diffrt.runtime.backends.engine import TensorSpec, dims
from diffrt.runtime.backends.registry import BACKENDS, REGISTRY, EngineOptions, get, resolve
from diffrt.runtime.errors import UserError
from diffrt.runtime.families import timestep_feed

RUNTIME = Path(__file__).parents[1] / "runtime"


def test_dynamic_dimensions_are_none_on_every_backend():
    """onnxruntime names a dynamic axis (or gives None), OpenVINO gives None, TensorRT -1: all read None."""
    assert dims(("batch", 4, None, np.int64(64), -1)) == (None, 4, None, 64, None)
    assert TensorSpec("timestep", (-1,), np.float16).shape == (None,)


def test_a_tensorrt_timestep_of_dynamic_length_takes_one_per_row():
    """TensorRT reports a dynamic dimension as -1; the UNet's first call made np.full((-1,)) of it before."""
    spec = TensorSpec("timestep", (-1,), np.float16)  # what TrtEngine builds from engine.get_tensor_shape
    fed = timestep_feed(spec, 981.0, 4)
    assert fed.shape == (4,) and fed.dtype == np.float16 and (fed == np.float16(981)).all()
    assert timestep_feed(TensorSpec("timestep", (2,), np.int64), 981.4, 4).tolist() == [981, 981]
    assert timestep_feed(spec, np.array([981.0, 981.0, 501.0, 501.0]), 4).tolist() == [981, 981, 501, 501]


def test_registry_lists_every_backend_with_its_capabilities():
    assert BACKENDS == ("auto", "ort-cuda", "ov-cpu", "ort-cpu", "trt")
    assert get("trt").lora == "refit" and not get("trt").image_to_image and not get("trt").text_chunks
    assert get("ort-cuda").cuda_graphs and get("ort-cuda").cuda_fusions and get("ort-cuda").device == "cuda"
    assert get("ov-cpu").precisions and get("ov-cpu").mixed and not get("ort-cpu").precisions
    assert get("ov-cpu").computes("bf16", "int8") == "int8+bf16" and get("ort-cpu").computes("int8", "int8") == "int8"
    with pytest.raises(UserError, match="unknown backend 'cuda'; choose one of: auto, ort-cuda"):
        get("cuda")
    assert resolve("ort-cpu").name == "ort-cpu"
    assert resolve("auto").name in ("ov-cpu", "ort-cpu")  # no CUDA provider here


def test_options_a_backend_does_not_take_are_refused_naming_one_that_does():
    with pytest.raises(UserError, match=r"the ort-cpu backend does not take --cuda-graph: leave it out or use --backend ort-cuda"):
        get("ort-cpu").check_options(EngineOptions(cuda_graph=True))
    with pytest.raises(UserError, match=r"the trt backend does not take --threads, --graph-cache \(engines capture"):
        get("trt").check_options(EngineOptions(threads=2, graph_cache=Path("/tmp/x")))
    get("ort-cuda").check_options(EngineOptions(threads=2, cuda_graph=True, gpu_mem_limit=2**30))
    with pytest.raises(UserError, match="--precision picks the CPU precision of --backend ov-cpu; ort-cpu runs"):
        get("ort-cpu").compute_precision("bf16", "fp32")


def test_only_the_registry_names_backends():
    """pipeline.py (and the other runtime modules that run engines) compare no backend name: each asks the registry
    for a capability. A string literal naming a backend in a comparison there fails this test."""
    names = set(REGISTRY)
    for module in ("pipeline.py", "stream.py", "families/base.py", "families/sd.py", "families/sdxl.py", "request.py", "img2img.py"):
        tree = ast.parse((RUNTIME / module).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                literals = [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
                assert not names & set(literals), f"{module}:{node.lineno} compares a backend name"
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "startswith":
                literals = [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
                assert not any(name.startswith(lit) for lit in literals for name in names), f"{module}:{node.lineno}"


def test_a_pipeline_runs_what_the_registry_opens(tiny_package):
    from diffrt.runtime.pipeline import Pipeline

    pipe = Pipeline.from_package(tiny_package, backend="ort-cpu")
    assert pipe.runner is REGISTRY["ort-cpu"] and pipe.backend == "ort-cpu"
    assert all(spec.shape[0] is None for spec in pipe.unet.inputs.values() if spec.shape)  # the batch axis
    with pytest.raises(UserError, match="the trt backend runs only engines built ahead"):
        REGISTRY["trt"].open(tiny_package / "unet" / "model.onnx", "unet", "fp32", EngineOptions())
