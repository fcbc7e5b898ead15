"""Matrix-product weights stored [out, in] behind a Transpose (export/linear_layout.py): what the export writes, the
round trip, NNCF finding them, and LoRA graphs left as they were."""

import shutil

import numpy as np
import onnx
import pytest

from tests.conftest import exported, make_tiny_sd3_checkpoint


def direct_weight_names(path) -> set[str]:
    """The 2-D float initializers MatMuls read directly as their weight."""
    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer if len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT}
    return {n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits}


def direct_weights(path) -> int:
    """How many MatMuls read a 2-D float initializer as their weight."""
    return len(direct_weight_names(path))


def transposed_weights(path) -> set[str]:
    """The 2-D initializers that MatMuls read through a Transpose."""
    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer if len(t.dims) == 2}
    fed = {n.input[1] for n in model.graph.node if n.op_type == "MatMul"}
    return {n.input[0] for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in inits and n.output[0] in fed}


@pytest.fixture(scope="module")
def sd3_package(tmp_path_factory):
    return exported(make_tiny_sd3_checkpoint(tmp_path_factory.mktemp("sd3")), tmp_path_factory, "sd3")


def run(path, feeds):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def feeds_for(path) -> dict[str, np.ndarray]:
    from diffrt.runtime.backends.onnxruntime import OrtEngine

    rng = np.random.default_rng(0)
    engine = OrtEngine(path)
    sizes = {"batch": 2, "height": 16, "width": 16, "sequence": 8}
    out = {}
    for spec in engine.inputs.values():
        shape = [d if isinstance(d, int) else sizes.get(next((k for k in sizes if k in str(d)), ""), 2)
                 for d in spec.shape]
        out[spec.name] = (rng.integers(0, 10, shape) if np.issubdtype(spec.dtype, np.integer)
                          else rng.standard_normal(shape)).astype(spec.dtype)
    return out


def test_export_writes_linear_weights_out_in(sd3_package, tiny_package):
    for comp in ("transformer", "text_encoder", "text_encoder_2"):
        graph = sd3_package / comp / "model.onnx"
        assert direct_weights(graph) == 0, comp
        assert transposed_weights(graph), comp
    # an SD UNet and its text encoder keep [in, out]: onnxruntime folds a Transpose from the file, where a LoRA
    # override does not reach
    assert direct_weights(tiny_package / "unet" / "model.onnx") > 0
    assert not transposed_weights(tiny_package / "unet" / "model.onnx")


def test_round_trip_is_exact(sd3_package, tmp_path):
    from diffrt.export.linear_layout import in_out, out_in

    folder = tmp_path / "transformer"
    shutil.copytree(sd3_package / "transformer", folder)
    graph = folder / "model.onnx"
    feeds = feeds_for(graph)
    before, data = run(graph, feeds), (folder / "model.onnx_data").read_bytes()
    assert in_out(graph) > 0
    assert direct_weights(graph) > 0 and not transposed_weights(graph)
    assert (folder / "model.onnx_data").read_bytes() != data  # the weights themselves moved
    for a, b in zip(before, run(graph, feeds)):
        np.testing.assert_array_equal(a, b)
    assert out_in(graph) > 0
    assert (folder / "model.onnx_data").read_bytes() == data
    for a, b in zip(before, run(graph, feeds)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("component", ["sd3:transformer", "sd:unet"])
def test_nncf_compresses_weights_in_either_layout(component, sd3_package, tiny_package, tmp_path):
    """Every matrix product's weight compressed, in either layout (a Transpose before the weight hid it from NNCF)."""
    pytest.importorskip("nncf")
    import openvino as ov

    from diffrt.export.ov_weights import compress_graph

    package, name = (sd3_package, "transformer") if component.startswith("sd3") else (tiny_package, "unet")
    folder = tmp_path / name
    shutil.copytree(package / name, folder)
    compress_graph(folder / "model.onnx", 8)
    model = ov.Core().read_model(str(folder / "openvino_model.xml"))
    compressed = {op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "Constant"
                  and op.get_output_element_type(0).get_type_name() == "u8"}
    weights = transposed_weights(package / name / "model.onnx") or direct_weight_names(package / name / "model.onnx")
    assert weights and {f"{w}_compressed" for w in weights} <= compressed
