"""onnxruntime's CUDA fusions of the UNet and VAE decoder: checked on the CPU through onnx's reference evaluator with the
CUDA-only ops written out, against the plain graphs on onnxruntime; on a GPU against onnxruntime's own CUDA kernels."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto, helper

from diffrt.runtime.errors import UserError
from diffrt.runtime.package import load_package
from diffrt.runtime.pipeline import Pipeline

pytest.importorskip("torch")
from conftest import exported, make_tiny_checkpoint  # noqa: E402

from diffrt.export.cuda_fusions import PARITY_TOLERANCE, cuda_fused_copy, fuse_for_cuda, parity  # noqa: E402
from diffrt.export.cuda_reference import run_reference  # noqa: E402
from diffrt.export.precision import QuantizeOptions, fp16_copy, quantize_package  # noqa: E402

RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def fusable_package(tmp_path_factory):
    """The tiny model with 16 GroupNorm groups, so that every group has an even number of channels, which
    onnxruntime's GroupNorm kernel needs (the tiny model's 32 groups over 32 channels leave it unfused)."""
    root = tmp_path_factory.mktemp("fusable")
    return exported(make_tiny_checkpoint(root, norm_groups=16), tmp_path_factory, "fusable")


def unet_feeds(batch: int, height: int, width: int) -> dict[str, np.ndarray]:
    return {"sample": RNG.standard_normal((batch, 4, height, width), dtype=np.float32),
            "timestep": RNG.uniform(0, 999, batch).astype(np.float32),
            "encoder_hidden_states": RNG.standard_normal((batch, 77, 32), dtype=np.float32)}


def vae_feeds(batch: int, height: int, width: int) -> dict[str, np.ndarray]:
    return {"latent_sample": RNG.standard_normal((batch, 4, height, width), dtype=np.float32)}


def single_op(op: str, inputs: dict[str, tuple], outputs: int = 1, **attrs):
    """A one-node com.microsoft graph; inputs: name -> shape (float32)."""
    node = helper.make_node(op, list(inputs), [f"y{i}" for i in range(outputs)], domain="com.microsoft", **attrs)
    graph = helper.make_graph([node], op, [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(outputs)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def run_both(model, feeds: dict[str, np.ndarray], providers: list[str], tmp_path) -> tuple[list, list]:
    import onnx
    import onnxruntime as ort

    path = tmp_path / "op.onnx"
    onnx.save(model, str(path))
    return ort.InferenceSession(str(path), providers=providers).run(None, feeds), run_reference(path, feeds)


def test_reference_ops_match_onnxruntimes_cpu_kernels(tmp_path):
    """The fused ops onnxruntime also runs on the CPU, written out the same way as the CUDA-only ones."""
    x = {"x": RNG.standard_normal((2, 5, 16), dtype=np.float32), "skip": RNG.standard_normal((2, 5, 16), dtype=np.float32),
         "gamma": RNG.standard_normal(16, dtype=np.float32), "beta": RNG.standard_normal(16, dtype=np.float32),
         "bias": RNG.standard_normal(16, dtype=np.float32)}
    want, got = run_both(single_op("SkipLayerNormalization", {k: v.shape for k, v in x.items()}, 4, epsilon=1e-5), x,
                         ["CPUExecutionProvider"], tmp_path)
    assert np.abs(want[0] - got[0]).max() < 1e-5 and np.abs(want[3] - got[3]).max() < 1e-6
    qkv = {"q": RNG.standard_normal((2, 6, 16), dtype=np.float32), "k": RNG.standard_normal((2, 9, 16), dtype=np.float32),
           "v": RNG.standard_normal((2, 9, 16), dtype=np.float32)}
    want, got = run_both(single_op("MultiHeadAttention", {k: v.shape for k, v in qkv.items()}, num_heads=4), qkv,
                         ["CPUExecutionProvider"], tmp_path)
    assert np.abs(want[0] - got[0]).max() < 1e-5
    for op, inputs in (("Gelu", {"x": (2, 5, 16)}), ("BiasGelu", {"x": (2, 5, 16), "bias": (16,)})):
        feeds = {k: 3 * RNG.standard_normal(s, dtype=np.float32) for k, s in inputs.items()}
        want, got = run_both(single_op(op, inputs), feeds, ["CPUExecutionProvider"], tmp_path)
        assert np.abs(want[0] - got[0]).max() < 1e-5, op
    # BiasSplitGelu (CUDA only) against its parts on onnxruntime's CPU: add the bias, halve, GELU the right half, multiply
    nodes = [helper.make_node("Add", ["x", "bias"], ["h"]), helper.make_node("Split", ["h"], ["a", "b"], axis=-1, num_outputs=2),
             helper.make_node("Gelu", ["b"], ["g"], domain="com.microsoft"), helper.make_node("Mul", ["a", "g"], ["y0"])]
    graph = helper.make_graph(nodes, "parts", [helper.make_tensor_value_info("x", TensorProto.FLOAT, (2, 4, 2560)),
                                               helper.make_tensor_value_info("bias", TensorProto.FLOAT, (2560,))],
                              [helper.make_tensor_value_info("y0", TensorProto.FLOAT, None)])
    parts = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    feeds = {"x": RNG.standard_normal((2, 4, 2560), dtype=np.float32), "bias": RNG.standard_normal(2560, dtype=np.float32)}
    want, _ = run_both(parts, feeds, ["CPUExecutionProvider"], tmp_path)
    got = run_reference_of(single_op("BiasSplitGelu", {"x": (2, 4, 2560), "bias": (2560,)}), feeds, tmp_path)
    assert got[0].shape == (2, 4, 1280) and np.abs(want[0] - got[0]).max() < 1e-5


def test_reference_ops_refuse_what_the_cuda_kernels_refuse(tmp_path):
    """BiasAdd and BiasSplitGelu take SD's channel counts only, GroupNorm float32 gamma and beta: the CPU check fails
    where the GPU would, and the fusion leaves such ops out of a model of other sizes."""
    from diffrt.export.cuda_fusions import refused_by_cuda
    from diffrt.export.cuda_reference import CudaKernelRefusal

    small = {"x": (2, 16, 32), "bias": (32,), "skip": (2, 16, 32)}
    with pytest.raises(CudaKernelRefusal, match="BiasAdd"):
        run_reference_of(single_op("BiasAdd", small), {k: RNG.standard_normal(s, dtype=np.float32) for k, s in small.items()},
                         tmp_path)
    half = {"x": (1, 2, 2, 64), "gamma": (64,), "beta": (64,)}
    model = single_op("GroupNorm", half, epsilon=1e-5, groups=32, activation=0)
    model.graph.input[1].type.tensor_type.elem_type = TensorProto.FLOAT16
    feeds = {"x": RNG.standard_normal(half["x"], dtype=np.float32), "gamma": np.ones(64, np.float16),
             "beta": np.zeros(64, np.float32)}
    with pytest.raises(CudaKernelRefusal, match="gamma and beta in float"):
        run_reference_of(model, feeds, tmp_path)
    odd = {"x": (1, 2, 2, 32), "gamma": (32,), "beta": (32,)}
    with pytest.raises(CudaKernelRefusal, match="1 channel"):
        run_reference_of(single_op("GroupNorm", odd, epsilon=1e-5, groups=32, activation=0),
                         {k: RNG.standard_normal(s, dtype=np.float32) for k, s in odd.items()}, tmp_path)
    for channels, refused in ((320, set()), (32, {"BiasAdd"})):
        graph = single_op("BiasAdd", {"x": (1, 4, channels), "skip": (1, 4, channels)}).graph
        graph.node[0].input[:] = ["x", "bias", "skip"]
        graph.initializer.append(helper.make_tensor("bias", TensorProto.FLOAT, [channels], [0.0] * channels))
        assert refused_by_cuda(helper.make_model(graph)) == refused


@pytest.mark.slow
def test_fusions_the_cuda_kernels_would_refuse_are_left_out(tiny_package, tmp_path):
    """The tiny model (one channel per GroupNorm group at 32 channels, a GEGLU of 512): no GroupNorm, BiasSplitGelu or
    BiasAdd fusions, the rest fused, and the result still computes what the plain graph does."""
    counts = fuse_for_cuda(tiny_package / "unet" / "model.onnx", tmp_path / "unet.onnx", fp16=False)
    assert counts["NhwcConv"] > 0 and counts["MultiHeadAttention"] > 0
    assert not {"GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd"} & set(counts)
    assert parity(tiny_package / "unet" / "model.onnx", tmp_path / "unet.onnx", unet_feeds(2, 8, 8)) < 1e-4


def run_reference_of(model, feeds: dict[str, np.ndarray], tmp_path) -> list:
    import onnx

    onnx.save(model, str(tmp_path / "op.onnx"))
    return run_reference(tmp_path / "op.onnx", feeds)


@pytest.mark.slow
@pytest.mark.parametrize("component, feeds", [("unet", unet_feeds), ("vae_decoder", vae_feeds)])
def test_fused_graphs_compute_what_the_plain_ones_do(fusable_package, tmp_path, component, feeds):
    """float32 fusions leave each output as it was (batches, non-square sizes); a fusion that got one attribute wrong
    (one GroupNorm without its SiLU) is caught by the same check."""
    import onnx

    plain = fusable_package / component / "model.onnx"
    fused = tmp_path / "fused.onnx"
    counts = fuse_for_cuda(plain, fused, component, fp16=False)
    assert counts["NhwcConv"] > 0 and counts["GroupNorm"] > 0 and counts["MultiHeadAttention"] > 0
    assert "BiasSplitGelu" not in counts and "BiasAdd" not in counts  # the tiny model's sizes: the kernels refuse them
    for batch, height, width in ((1, 8, 8), (2, 16, 8)):
        assert parity(plain, fused, feeds(batch, height, width)) < 1e-4, (batch, height, width)
    model = onnx.load(str(fused))
    silu = next(a for n in model.graph.node if n.op_type == "GroupNorm" for a in n.attribute if a.name == "activation" and a.i)
    silu.i = 0
    onnx.save(model, str(tmp_path / "broken.onnx"))
    assert parity(plain, tmp_path / "broken.onnx", feeds(1, 8, 8)) > 1e-2


@pytest.mark.slow
def test_fp16_fused_package_at_toy_size(fusable_package, tmp_path):
    """The benchmark's fused copy: float32 I/O, its providers listed, float16 parity, and refused off CUDA."""
    import onnxruntime as ort

    fp16 = fp16_copy(fusable_package, tmp_path / "fp16", log=lambda m: None)
    counts = cuda_fused_copy(fusable_package, fp16, tmp_path / "fused")
    assert set(counts) == {"unet", "vae_decoder"} and counts["unet"]["MultiHeadAttention"] == 12
    package = load_package(tmp_path / "fused", hashes=True)
    assert package.manifest["components"]["vae_decoder"]["providers"] == ["CUDAExecutionProvider"]
    for comp, feeds in (("unet", unet_feeds(2, 8, 8)), ("vae_decoder", vae_feeds(1, 8, 8))):
        assert parity(fp16 / comp / "model.onnx", tmp_path / "fused" / comp / "model.onnx", feeds) < PARITY_TOLERANCE
    with pytest.raises(Exception, match="NhwcConv"):
        ort.InferenceSession(str(tmp_path / "fused" / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    with pytest.raises(UserError, match="CUDA provider only"):
        Pipeline.from_package(tmp_path / "fused", backend="ort-cpu")


@pytest.mark.slow
def test_quantize_with_cuda_fusions(fusable_package, tiny_package, tmp_path, capsys):
    """`diffrt quantize --precision fp16 --cuda-fusions`: gated as fp16, then fused, each fused graph checked on the CPU
    against the plain one on a real call; the fp32 fallback kept; int8 with fusions refused."""
    out = tmp_path / "fused"
    quantize_package(fusable_package, out, QuantizeOptions(precision="fp16", steps=4, gate_seeds=1, cuda_fusions=True),
                     log=lambda m: None)
    manifest = json.loads((out / "diffrt.json").read_text())
    for comp in ("unet", "vae_decoder"):
        entry = manifest["components"][comp]
        assert entry["providers"] == ["CUDAExecutionProvider"] and entry["precision"] == "fp16"
        assert entry["cuda_parity"]["max_error_of_range"] <= PARITY_TOLERANCE
        assert sorted(p.name for p in (out / comp).glob("model*")) == ["model.fp32.onnx", "model.onnx", "model.onnx_data"]
    assert "providers" not in manifest["components"]["text_encoder"]
    load_package(out, hashes=True)
    with pytest.raises(UserError, match="CUDA provider only"):
        Pipeline.from_package(out, backend="ort-cpu")
    from diffrt.runtime.cli import main

    assert main(["info", str(out)]) == 0
    assert capsys.readouterr().out.count("CUDA fusions: runs on --backend ort-cuda only") == 2
    with pytest.raises(UserError, match="--cuda-fusions"):
        quantize_package(tiny_package, tmp_path / "int8", QuantizeOptions(precision="int8", cuda_fusions=True))
    assert not (tmp_path / "int8").exists()


@pytest.mark.slow
def test_cuda_fusions_refuse_a_plain_attention_export(tiny_plain_package, tmp_path):
    """onnxruntime's UNet optimizer crashes on plain attention (TensorRT's form): refused in one line up front."""
    with pytest.raises(UserError, match="fused attention"):
        quantize_package(tiny_plain_package, tmp_path / "out", QuantizeOptions(precision="fp16", cuda_fusions=True))
    assert not (tmp_path / "out").exists()


CUDA_ONLY = [
    ("GroupNorm", {"x": (2, 4, 4, 64), "gamma": (64,), "beta": (64,)}, 1, dict(epsilon=1e-5, groups=32, activation=1)),
    ("SkipGroupNorm", {"x": (2, 4, 4, 64), "gamma": (64,), "beta": (64,), "skip": (2, 64)}, 2,
     dict(epsilon=1e-6, groups=32, activation=0)),
    ("NhwcConv", {"x": (2, 8, 8, 16), "w": (32, 3, 3, 16), "b": (32,)}, 1, dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                                                             strides=[2, 2])),
    ("BiasSplitGelu", {"x": (2, 16, 2560), "bias": (2560,)}, 1, {}),
    ("BiasAdd", {"x": (2, 16, 320), "bias": (320,), "skip": (2, 16, 320)}, 1, {}),
]


@pytest.mark.gpu
@pytest.mark.parametrize("op, inputs, outputs, attrs", CUDA_ONLY, ids=[c[0] for c in CUDA_ONLY])
def test_reference_ops_match_onnxruntimes_cuda_kernels(op, inputs, outputs, attrs, tmp_path):
    """The CPU check's written-out ops against the kernels the fused graphs run on the GPU."""
    from diffrt.runtime.backends.onnxruntime import cuda_available

    if not cuda_available():
        pytest.skip("onnxruntime's CUDA provider is not available here")
    feeds = {k: RNG.standard_normal(s, dtype=np.float32) for k, s in inputs.items()}
    want, got = run_both(single_op(op, inputs, outputs, **attrs), feeds, ["CUDAExecutionProvider"], tmp_path)
    for w, g in zip(want, got):
        assert np.abs(w - g).max() <= 1e-3 * max(1.0, float(np.abs(w).max())), op


@pytest.mark.gpu
def test_cuda_fused_package_runs_on_the_gpu(fusable_package, tmp_path):
    """The quantized, CUDA-fused package on ort-cuda (also replayed from CUDA graphs) makes the plain fp16 package's
    images."""
    from diffrt.runtime.backends.onnxruntime import cuda_available

    if not cuda_available():
        pytest.skip("onnxruntime's CUDA provider is not available here")
    options = dict(precision="fp16", steps=4, gate_seeds=1)
    quantize_package(fusable_package, tmp_path / "plain", QuantizeOptions(**options), log=lambda m: None)
    quantize_package(fusable_package, tmp_path / "fused", QuantizeOptions(**options, cuda_fusions=True), log=lambda m: None)
    plain = Pipeline.from_package(tmp_path / "plain", backend="ort-cuda")("a red house", steps=5, seed=4, num_images=2)
    for graph in (False, True):
        fused = Pipeline.from_package(tmp_path / "fused", backend="ort-cuda", cuda_graph=graph)
        assert np.abs(fused("a red house", steps=5, seed=4, num_images=2).array - plain.array).max() <= 2e-2


@pytest.mark.slow
def test_cpu_fusion_benchmark_at_toy_size(fusable_package, tmp_path, capsys):
    """benchmarks/cuda_fusions_cpu.py, which measured the full-size figures, on the tiny package."""
    from diffrt.benchmarks import cuda_fusions_cpu

    assert cuda_fusions_cpu.main([str(fusable_package), "--out", str(tmp_path / "r.json"), "--sides", "8"]) == 0
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [r["component"] for r in rows] == ["unet", "vae_decoder"]
    assert all(p["max_error_of_range"] < PARITY_TOLERANCE for r in rows for p in r["parity"])
    assert "| unet |" in capsys.readouterr().out


@pytest.mark.slow
def test_sdxl_unet_fuses_and_its_float32_vae_stays_plain(tiny_sdxl_package, tmp_path):
    """SDXL's UNet (linear projections, text_embeds and time_ids) fuses and computes what its plain graph does; the
    fused fp16 copy leaves the VAE that fp16 keeps in float32 (force_upcast) as it is."""
    unet = tiny_sdxl_package / "unet" / "model.onnx"
    counts = fuse_for_cuda(unet, tmp_path / "unet.onnx", fp16=False)
    assert counts["NhwcConv"] > 0 and counts["MultiHeadAttention"] > 0
    feeds = {**unet_feeds(2, 8, 8), "encoder_hidden_states": RNG.standard_normal((2, 77, 64), dtype=np.float32),
             "text_embeds": RNG.standard_normal((2, 24), dtype=np.float32),
             "time_ids": RNG.uniform(0, 64, (2, 6)).astype(np.float32)}
    assert parity(unet, tmp_path / "unet.onnx", feeds) < 1e-4
    fp16 = fp16_copy(tiny_sdxl_package, tmp_path / "fp16", log=lambda m: None)
    assert set(cuda_fused_copy(tiny_sdxl_package, fp16, tmp_path / "fused")) == {"unet"}
    manifest = json.loads((tmp_path / "fused" / "diffrt.json").read_text())["components"]
    assert manifest["vae_decoder"]["precision"] == "fp32" and "providers" not in manifest["vae_decoder"]
