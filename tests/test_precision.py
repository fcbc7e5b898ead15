"""fp16 and int8 packages of the tiny model: end to end, gates computed and stored, NaN/inf guard and fallback."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from diffrt.runtime.doctor import psnr
from diffrt.runtime.errors import UserError
from diffrt.runtime.package import load_package
from diffrt.runtime.pipeline import NonFiniteError, Pipeline

pytest.importorskip("torch")
from conftest import plant_addition  # noqa: E402

from diffrt.export.precision import QuantizeOptions, quantize_package  # noqa: E402


def test_fp16_package(fp16_package, tiny_package):
    m = json.loads((fp16_package / "diffrt.json").read_text())
    for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        assert m["components"][name]["precision"] == "fp16"
        assert m["components"][name]["fallback"] == f"{name}/model.fp32.onnx"
    q = m["quality"]
    assert q["passed"] and q["psnr_db_min"] >= 35 and len(q["unet_step_rel_err"]) > 0
    load_package(fp16_package, hashes=True)
    pipe = Pipeline.from_package(fp16_package, backend="ort-cpu")
    assert pipe.unet.inputs["sample"].dtype == np.float32  # graph I/O stays float32
    a = pipe("a red cat", steps=4, seed=1, scheduler="ddim")
    b = Pipeline.from_package(tiny_package, backend="ort-cpu")("a red cat", steps=4, seed=1, scheduler="ddim")
    assert np.abs(a.array - b.array).max() < 0.05


@pytest.fixture(scope="module")
def int8_package(tiny_package, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "tiny-int8"
    gates = quantize_package(tiny_package, out, QuantizeOptions(precision="int8", steps=6, calibration_prompts=2,
                                                                accept_quality=True, gate_seeds=1), log=lambda m: None)
    return out, gates


@pytest.mark.slow
def test_int8_package_is_qdq_and_runs(int8_package):
    import onnx

    out, gates = int8_package
    m = json.loads((out / "diffrt.json").read_text())
    assert m["components"]["unet"]["precision"] == "int8" and m["components"]["vae_decoder"]["precision"] == "fp32"
    assert (out / "build" / "calibration" / "unet.npz").is_file()
    assert m["quality"]["psnr_db_min"] == gates["psnr_db_min"]
    graph = onnx.load(str(out / "unet" / "model.onnx"))
    ops = {n.op_type for n in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "QLinearConv" not in ops
    inits = {i.name: i for i in graph.graph.initializer}
    zero_points = {}
    for node in graph.graph.node:
        if node.op_type == "DequantizeLinear":  # weights: symmetric int8 per channel; activations: uint8 with a zero point
            zp = onnx.numpy_helper.to_array(inits[node.input[2]])
            zero_points.setdefault("weights" if node.input[0] in inits else "activations", set()).add(zp.dtype)
            assert zp.dtype == np.uint8 or not zp.any()
    assert zero_points == {"weights": {np.dtype(np.int8)}, "activations": {np.dtype(np.uint8)}}
    assert m["components"]["unet"]["activations"] == "uint8"
    dequantized = {o for n in graph.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    kept = [n for n in graph.graph.node if n.op_type == "Conv" and ("conv_in" in n.name or "conv_out" in n.name)]
    assert kept and all(not dequantized & set(n.input) for n in kept)
    assert any(dequantized & set(n.input) for n in graph.graph.node if n.op_type == "Conv")
    image = Pipeline.from_package(out, backend="ort-cpu")("a red cat", steps=4, seed=1)
    assert np.isfinite(image.array).all()


def runtime_precisions(compiled) -> set[tuple[str, str]]:
    """(layer type, precision) of the convolutions and matrix products OpenVINO's CPU plugin compiled."""
    info = [op.get_rt_info() for op in compiled.get_runtime_model().get_ops()]
    found = {(i["layerType"].astype(str), i["runtimePrecision"].astype(str)) for i in info}
    return {f for f in found if f[0] in ("Convolution", "FullyConnected", "MatMul")}


@pytest.mark.slow
def test_int8_package_runs_in_int8_on_openvino(int8_package, tiny_package):
    """The same QDQ graph is int8 on OpenVINO's CPU plugin (not dequantized back to float), gated there too."""
    pytest.importorskip("openvino")
    out, gates = int8_package
    pipe = Pipeline.from_package(out, backend="ov-cpu")
    result = pipe("a red cat", steps=4, seed=1)
    assert result.settings["precision"] == f"int8+{pipe.precision}"
    compiled = runtime_precisions(next(iter(pipe.unet.compiled.values())))  # unsigned or signed inputs by CPU kind
    assert {p for t, p in compiled if t == "Convolution"} & {"u8", "i8"}, compiled
    assert {p for t, p in compiled if t == "FullyConnected"} & {"u8", "i8"}, compiled
    reference = Pipeline.from_package(tiny_package, backend="ov-cpu")
    reference("a red cat", steps=4, seed=1)
    assert all(p not in ("i8", "u8") for _, p in runtime_precisions(next(iter(reference.unet.compiled.values()))))
    ov = gates["ov-cpu"]
    assert ov["computes"] == f"int8+{pipe.precision}" and ov["images"] == 4 and np.isfinite(ov["psnr_db_min"])
    fp32 = Pipeline.from_package(tiny_package, backend="ort-cpu")("a red cat", steps=4, seed=1)
    assert psnr(result.array, fp32.array) > 15  # the tiny random model's images are noise-like; the bundled model is gated at 22 dB


@pytest.mark.parametrize("precision", ["fp16", pytest.param("int8", marks=pytest.mark.slow)])
def test_quality_gate_refuses(tiny_package, tmp_path, monkeypatch, precision):
    """Nothing written; the message names each backend whose images missed (int8 is gated on OpenVINO too)."""
    import diffrt.export.precision as module
    from diffrt.runtime import trust

    monkeypatch.setitem(trust.GATES_DB, precision, 500.0)
    with pytest.raises(UserError, match="misses its quality gate") as err:
        quantize_package(tiny_package, tmp_path / "x", QuantizeOptions(precision=precision, steps=3, gate_seeds=1,
                                                                      calibration_prompts=1), log=lambda m: None)
    assert list(tmp_path.iterdir()) == []
    assert "on ort-cpu, needs 500 dB" in str(err.value)
    assert ("on ov-cpu, needs 500 dB" in str(err.value)) == (module.gate_backends(precision) == ["ort-cpu", "ov-cpu"])


def test_nan_guard_and_fp32_fallback(fp16_package, tiny_package, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(fp16_package, broken)
    plant_addition(broken, np.inf)  # the inf an fp16 overflow gives
    with pytest.raises(NonFiniteError, match=r"the unet \(fp16\) produced NaN or inf at step 1 of 3; retry with --fp32-fallback"):
        Pipeline.from_package(broken, backend="ort-cpu")("a cat", steps=3, seed=2, scheduler="ddim")
    with pytest.warns(UserWarning, match="rerunning it in float32"):
        rescued = Pipeline.from_package(broken, backend="ort-cpu", fp32_fallback=True)("a cat", steps=3, seed=2, scheduler="ddim")
    reference = Pipeline.from_package(tiny_package, backend="ort-cpu")("a cat", steps=3, seed=2, scheduler="ddim")
    assert np.abs(rescued.array - reference.array).max() < 0.05
    (broken / "unet" / "model.fp32.onnx").unlink()  # as `--no-fallback` leaves it
    manifest = json.loads((broken / "diffrt.json").read_text())
    del manifest["components"]["unet"]["fallback"], manifest["files"]["unet/model.fp32.onnx"]
    (broken / "diffrt.json").write_text(json.dumps(manifest))
    with pytest.raises(NonFiniteError, match="keeps no float32 copy"):
        Pipeline.from_package(broken, backend="ort-cpu", fp32_fallback=True)("a cat", steps=3, seed=2, scheduler="ddim")


@pytest.mark.slow
def test_fp16_of_a_graph_over_two_gigabytes(tmp_path):
    """A > 2 GB float32 graph (external data; protobuf cannot serialize it whole) becomes fp16 with its
    LayerNormalization kept in float32, loads, and computes what the float32 graph does."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from diffrt.export.precision import FP16_KEEP_OPS, convert_fp16

    n = 16384  # two n x n float32 weights: 2.1 GB
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((n, n), dtype=np.float32) / n**0.5, f"w{i}") for i in range(2)]
    norm = [numpy_helper.from_array(np.ones(n, np.float32), "gamma"), numpy_helper.from_array(np.zeros(n, np.float32), "beta")]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"]), helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["n"]),
             helper.make_node("MatMul", ["n", "w1"], ["y"])]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])], weights + norm)
    src = tmp_path / "fp32" / "model.onnx"
    src.parent.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src), save_as_external_data=True,
              all_tensors_to_one_file=True, location="model.onnx_data")
    del weights, graph
    dst = tmp_path / "fp16" / "model.onnx"
    dst.parent.mkdir()
    convert_fp16(src, dst, FP16_KEEP_OPS)
    import onnxruntime as ort

    x = rng.standard_normal((2, n), dtype=np.float32)
    want = ort.InferenceSession(str(src)).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(dst)).run(None, {"x": x})[0]
    assert got.dtype == np.float32 and np.abs(got - want).max() / np.abs(want).max() < 1e-2
    assert (dst.parent / "model.fp16.onnx_data").is_file() is False  # 1.07 GB of fp16 weights fit inline
