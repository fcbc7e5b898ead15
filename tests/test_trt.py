"""TensorRT path: profiles, engine naming and selection, QDQ readiness, errors (no TensorRT needed);
engine builds and runs marked `trt`, run wherever TensorRT and a GPU exist."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from diffrt.runtime.backends.engine_store import Device, engine_dir_name, engine_file, gpu_slug, select_engine, write_engine_meta
from diffrt.runtime.errors import UserError

pytest.importorskip("onnx")
from diffrt.export.profiles import Span, derive_profiles, parse_batch, parse_size  # noqa: E402
from diffrt.export.trt_build import build_flags  # noqa: E402
from diffrt.export.trt_ready import trt_problems  # noqa: E402

MANIFEST = {
    "vae_scale_factor": 8, "text_max_length": 77,
    "components": {
        "text_encoder": {"inputs": {"input_ids": {"dims": ["batch_size", "sequence_length"]}}},
        "unet": {"inputs": {"sample": {"dims": ["batch_size", 4, "height", "width"]}, "timestep": {"dims": []},
                            "encoder_hidden_states": {"dims": ["batch_size", "sequence_length", 768]}}},
        "vae_decoder": {"inputs": {"latent_sample": {"dims": ["batch_size", 4, "latent_height", "latent_width"]}}},
        "vae_encoder": {"inputs": {"sample": {"dims": ["batch_size", 3, "sample_height", "sample_width"]}}},
    },
}
H100 = Device("NVIDIA H100 80GB HBM3", (9, 0), "10.7.0")


def test_batch_one_with_guidance_doubles_the_unet_batch():
    w, h = parse_size("512x512", 8, 512)
    p = derive_profiles(MANIFEST, parse_batch("1"), w, h)
    assert p["unet"]["sample"] == {"min": [1, 4, 64, 64], "opt": [2, 4, 64, 64], "max": [2, 4, 64, 64]}
    assert p["text_encoder"]["input_ids"] == {"min": [1, 77], "opt": [2, 77], "max": [2, 77]}
    assert p["vae_decoder"]["latent_sample"] == {"min": [1, 4, 64, 64], "opt": [1, 4, 64, 64], "max": [1, 4, 64, 64]}
    assert p["unet"]["timestep"] == {"min": [], "opt": [], "max": []}
    assert p["unet"]["encoder_hidden_states"]["max"] == [2, 77, 768]
    unguided = derive_profiles(MANIFEST, parse_batch("1"), w, h, guided=False)
    assert unguided["unet"]["sample"]["opt"] == [1, 4, 64, 64]


def test_ranges_static_and_not_multiples():
    w, h = parse_size("250-1030", 8, 512)
    assert (w, h) == (Span(256, 512, 1024), Span(256, 512, 1024))
    p = derive_profiles(MANIFEST, parse_batch("1-4"), w, h)
    assert p["unet"]["sample"]["min"] == [1, 4, 32, 32] and p["unet"]["sample"]["max"] == [8, 4, 128, 128]
    assert p["vae_encoder"]["sample"]["max"] == [4, 3, 1024, 1024]
    static = derive_profiles(MANIFEST, parse_batch("1-4"), w, h, static=True)
    for inputs in static.values():
        for spec in inputs.values():
            assert spec["min"] == spec["opt"] == spec["max"]
    assert static["unet"]["sample"]["opt"] == [2, 4, 64, 64]
    with pytest.raises(UserError, match="holds no multiple of 8"):
        parse_size("250-254", 8, 512)
    with pytest.raises(UserError, match="513 is not a multiple of 8; use 512 or 520"):
        parse_size("513x512", 8, 512)
    with pytest.raises(UserError, match="N or N-M"):
        parse_batch("4-1")
    odd = json.loads(json.dumps(MANIFEST))
    odd["components"]["unet"]["inputs"]["sample"]["dims"][2] = "frames"
    with pytest.raises(UserError, match="dynamic axis 'frames'"):
        derive_profiles(odd, parse_batch("1"), w, h)


def test_flags_by_precision_and_version():
    assert build_flags("int8", "int8", 10, False) == {"strongly_typed": True, "builder": []}
    assert build_flags("fp16", "fp32", 10, False) == {"strongly_typed": False, "builder": ["FP16"]}
    assert build_flags("fp16", "fp16", 11, True)["builder"] == ["VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME"]
    with pytest.raises(UserError, match="TensorRT 11 builds fp16 only from fp16 graphs"):
        build_flags("fp16", "fp32", 11, False)


def fake_engine(package, device, component="unet", precision="fp16", batch=(1, 2), side=(32, 96), vc=False):
    plan = engine_file(package, device.gpu, device.compute_capability, device.trt_version, component, precision)
    plan.parent.mkdir(parents=True, exist_ok=True)
    plan.write_bytes(b"not a real plan")
    write_engine_meta(plan, {"component": component, "precision": precision, "gpu": gpu_slug(device.gpu),
                             "compute_capability": list(device.compute_capability), "tensorrt": device.trt_version,
                             "version_compatible": vc, "profiles": [{"sample": {"min": [batch[0], 4, side[0], side[0]],
                                                                                "opt": [batch[1], 4, 64, 64],
                                                                                "max": [batch[1], 4, side[1], side[1]]}}]})
    return plan


def test_engine_naming_and_selection(tmp_path):
    assert gpu_slug("NVIDIA GeForce RTX 4090") == "nvidia-geforce-rtx-4090"
    assert engine_dir_name(H100.gpu, H100.compute_capability, H100.trt_version) == "nvidia-h100-80gb-hbm3_sm90_trt10.7.0"
    plan = fake_engine(tmp_path, H100)
    assert plan.relative_to(tmp_path).as_posix() == "engines/nvidia-h100-80gb-hbm3_sm90_trt10.7.0/unet.fp16.plan"
    assert select_engine(tmp_path, "unet", "fp16", H100, {"sample": (2, 4, 64, 64)}).plan == plan
    with pytest.raises(UserError, match=r"no unet.fp16 engine takes sample \[4, 4, 64, 64\].*rebuild with wider ranges"):
        select_engine(tmp_path, "unet", "fp16", H100, {"sample": (4, 4, 64, 64)})
    orin = Device("Orin", (8, 7), "10.3.0")
    with pytest.raises(UserError, match=r"built for nvidia-h100-80gb-hbm3 \(sm90\), TensorRT 10.7.0, not for Orin \(sm87\)"
                                        r".*diffrt build"):
        select_engine(tmp_path, "unet", "fp16", orin)
    with pytest.raises(UserError, match=r"no unet.int8 TensorRT engine.*diffrt build .* --precision int8"):
        select_engine(tmp_path, "unet", "int8", H100)
    newer = Device(H100.gpu, (9, 0), "10.9.1")
    with pytest.raises(UserError, match="not for"):
        select_engine(tmp_path, "unet", "fp16", newer)
    fake_engine(tmp_path, H100, precision="int8", vc=True)
    assert select_engine(tmp_path, "unet", "int8", newer).precision == "int8"  # version-compatible runs on later TRT
    (plan.with_suffix(".json")).write_text("{oops")
    with pytest.raises(UserError, match="not valid JSON"):
        select_engine(tmp_path, "unet", "fp16", H100)


@pytest.mark.slow
def test_int8_qdq_graph_is_tensorrt_ready(tiny_plain_package, tmp_path):
    from diffrt.export.precision import QuantizeOptions, quantize_package

    for name in ("text_encoder", "unet", "vae_decoder"):
        assert trt_problems(tiny_plain_package / name / "model.onnx") == []
    gates = quantize_package(tiny_plain_package, tmp_path / "int8", QuantizeOptions(
        precision="int8", steps=3, calibration_prompts=1, accept_quality=True, gate_seeds=1), log=lambda m: None)
    assert gates["unet_step_rel_err_max"] > 0
    graph = tmp_path / "int8" / "unet" / "model.onnx"
    problems = trt_problems(graph)  # uint8 activations (right on every CPU) are not TensorRT's form ...
    assert problems and all("zero point must be int8 and 0" in p for p in problems)
    from diffrt.export.trt_build import trt_graph
    from diffrt.runtime.package import load_package

    symmetric = trt_graph(load_package(tmp_path / "int8"), "unet", log=lambda m: None)  # ... which `diffrt build` makes
    assert symmetric == tmp_path / "int8" / "build" / "trt" / "unet" / "model.onnx" and trt_problems(symmetric) == []
    assert symmetric_ranges_match(graph, symmetric, tmp_path / "int8" / "build" / "calibration" / "unet.npz")


def symmetric_ranges_match(asymmetric, symmetric, calibration) -> bool:
    """Each activation's symmetric scale is max(|low|, |high|) / 127 of its uint8 range, and the symmetric graph
    computes what the asymmetric one does to within int8 rounding (on onnxruntime, a real calibration call)."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from diffrt.export.precision import load_calibration

    before = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(asymmetric)).graph.initializer}
    after = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(symmetric)).graph.initializer}
    pairs = [(n[: -len("_zero_point__symmetric")]) for n in after if n.endswith("_zero_point__symmetric")]
    assert pairs
    for name in pairs:
        scale, zero = before[f"{name}_scale"].astype(np.float64), before[f"{name}_zero_point"].astype(np.float64)
        low, high = -zero * scale, (255 - zero) * scale
        assert np.allclose(after[f"{name}_scale__symmetric"], max(abs(low), abs(high)) / 127, rtol=1e-6)
    feeds = load_calibration(calibration)[0]
    run = {g: ort.InferenceSession(str(g), providers=["CPUExecutionProvider"]).run(None, feeds)[0] for g in (asymmetric, symmetric)}
    fp32 = ort.InferenceSession(str(asymmetric.with_name("model.fp32.onnx")), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    err = {g: np.linalg.norm(out - fp32) / np.linalg.norm(fp32) for g, out in run.items()}
    return err[symmetric] < 2 * err[asymmetric] + 0.02  # symmetric int8 spends one bit of the range on its sign


def test_trt_problems_flags_what_the_parser_refuses(tiny_package, tmp_path):
    """Fused attention (a contrib-op domain), an opset past TensorRT 10's, refused ops and asymmetric zero points."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    assert any("com.microsoft" in p for p in trt_problems(tiny_package / "unet" / "model.onnx"))
    zp = numpy_helper.from_array(np.array(3, np.uint8), "zp")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q"), helper.make_node("Unique", ["q"], ["y"])]
    graph = helper.make_graph(nodes, "bad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [None])], [zp, scale])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(tmp_path / "bad.onnx"))
    problems = trt_problems(tmp_path / "bad.onnx")
    assert len(problems) == 3 and "opset 21" in problems[0] and "zero point" in problems[1] and "Unique" in problems[2]


def test_build_refuses_a_fused_attention_package_before_needing_tensorrt(tiny_package):
    from diffrt.export.trt_build import check_trt_package

    with pytest.raises(UserError, match="--attention plain"):
        check_trt_package(tiny_package)


def test_tensorrt_missing_is_a_clear_error(tiny_plain_package):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    for args in (["build", str(tiny_plain_package)], ["generate", "a cat", "--model", str(tiny_plain_package), "--backend", "trt"]):
        proc = run_cli(*args)
        assert proc.returncode == 2 and "TensorRT is not installed" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("doctor")
    assert proc.returncode == 0 and "TensorRT: not installed" in proc.stdout and "ort-cpu" in proc.stdout


trt = pytest.mark.trt


@trt
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_trt_engines_match_onnxruntime(tiny_plain_package, tmp_path, precision):
    pytest.importorskip("tensorrt")
    pytest.importorskip("polygraphy")
    import shutil

    from diffrt.export.precision import QuantizeOptions, quantize_package
    from diffrt.export.trt_build import BuildOptions, build_engines
    from diffrt.runtime.pipeline import Pipeline

    package = tmp_path / "pkg"
    if precision == "int8":
        quantize_package(tiny_plain_package, package, QuantizeOptions(precision="int8", steps=4, accept_quality=True), log=lambda m: None)
    else:
        shutil.copytree(tiny_plain_package, package)
    build_engines(package, BuildOptions(precision=precision, batch="1-2", size="32-64"), log=lambda m: None)
    a = Pipeline.from_package(package, backend="trt")("a red cat", steps=4, seed=1)
    b = Pipeline.from_package(package, backend="ort-cpu")("a red cat", steps=4, seed=1)
    assert np.abs(a.array - b.array).max() < (0.05 if precision == "fp16" else 0.15)


@trt
def test_cuda_graph_replay_is_timed(tiny_plain_package, tmp_path):
    pytest.importorskip("tensorrt")
    import shutil
    import time

    from diffrt.export.trt_build import BuildOptions, build_engines
    from diffrt.runtime.pipeline import Pipeline

    package = tmp_path / "pkg"
    shutil.copytree(tiny_plain_package, package)
    build_engines(package, BuildOptions(precision="fp16", static=True), log=lambda m: None)
    pipe = Pipeline.from_package(package, backend="trt")
    timings = {}
    for graphs in (False, True):
        pipe.unet.static = graphs  # False: plain execute_async_v3 every step
        pipe("warm-up", steps=2, seed=0)
        start = time.perf_counter()
        result = pipe("a cat", steps=20, seed=0)
        timings[graphs] = (time.perf_counter() - start, result.array)
    print(f"20 steps: plain {timings[False][0]:.4f} s, CUDA graph replay {timings[True][0]:.4f} s")
    assert np.abs(timings[True][1] - timings[False][1]).max() < 1e-3


def test_fp32_engines_are_used_when_no_fp16_ones_exist(tmp_path):
    from diffrt.runtime.backends.engine_store import engine_precisions, pick_engine

    fake_engine(tmp_path, H100, precision="fp32")
    assert engine_precisions("fp32") == ("fp16", "fp32") and engine_precisions("int8") == ("int8",)
    assert pick_engine(tmp_path, "unet", engine_precisions("fp32"), H100).precision == "fp32"
    fake_engine(tmp_path, H100, precision="fp16")
    assert pick_engine(tmp_path, "unet", engine_precisions("fp16"), H100).precision == "fp16"
    with pytest.raises(UserError, match="no unet.int8 TensorRT engine"):
        pick_engine(tmp_path, "unet", engine_precisions("int8"), H100)


def test_trt_backend_refuses_onnxruntime_only_options(tiny_plain_package):
    from diffrt.runtime.pipeline import Pipeline

    for option in ({"threads": 2}, {"fp32_fallback": True}, {"cuda_graph": True}, {"graph_cache": "/tmp/x"}):
        flag = "--" + next(iter(option)).replace("_", "-")
        with pytest.raises(UserError, match=f"the trt backend does not take {flag}"):
            Pipeline.from_package(tiny_plain_package, backend="trt", **option)


@trt
def test_refittable_engines_take_loras_without_a_rebuild(tiny_plain_package, tiny_checkpoint, tmp_path):
    """`diffrt build --refittable`: set_loras refits the text encoder and UNet engines in place; the image with the
    LoRA is onnxruntime's with it, and [] brings back the engines' own."""
    pytest.importorskip("tensorrt")
    pytest.importorskip("peft")
    import shutil

    from test_lora import make_lora

    from diffrt.export.trt_build import BuildOptions, build_engines
    from diffrt.runtime.lora import LoraChoice
    from diffrt.runtime.pipeline import Pipeline

    package = tmp_path / "pkg"
    shutil.copytree(tiny_plain_package, package)
    make_lora(tiny_checkpoint, tmp_path / "style.safetensors", 1, ("to_q", "to_k", "to_v", "to_out.0", "conv1"))
    build_engines(package, BuildOptions(precision="fp16", batch="1-2", size="32-64", refittable=True), log=lambda m: None)
    choice = [LoraChoice(tmp_path / "style.safetensors", 0.8)]
    engines = Pipeline.from_package(package, backend="trt")
    plain = engines("a red cat", steps=4, seed=1)
    engines.set_loras(choice)
    styled = engines("a red cat", steps=4, seed=1)
    reference = Pipeline.from_package(package, backend="ort-cpu", loras=choice)("a red cat", steps=4, seed=1)
    assert np.abs(styled.array - reference.array).max() < 0.05 and np.abs(styled.array - plain.array).max() > 0.02
    engines.set_loras([])
    assert np.abs(engines("a red cat", steps=4, seed=1).array - plain.array).max() < 1e-3


def test_controlnet_and_residual_unet_profiles():
    """A ControlNet's profile doubles the batch with guidance as the UNet's; residual inputs' sides follow each
    halving of the latents, rounded up; the control image is the image's size; engine files stay one per component."""
    manifest = json.loads(json.dumps(MANIFEST))
    residual = {"down_block_additional_residual_0": {"dims": ["batch_size", 320, "height_0", "width_0"]},
                "mid_block_additional_residual": {"dims": ["batch_size", 1280, "height_3", "width_3"]}}
    manifest["components"]["unet"]["inputs"].update(residual)
    manifest["components"]["controlnet/canny"] = {"inputs": {
        **{k: v for k, v in MANIFEST["components"]["unet"]["inputs"].items()},
        "controlnet_cond": {"dims": ["batch_size", 3, "image_height", "image_width"]}}}
    w, h = parse_size("256-520", 8, 512)
    p = derive_profiles(manifest, parse_batch("1"), w, h)
    assert p["unet"]["mid_block_additional_residual"] == {"min": [1, 1280, 4, 4], "opt": [2, 1280, 8, 8],
                                                          "max": [2, 1280, 9, 9]}  # 520 / 8 = 65 latents -> 9 after 3 halvings
    assert p["unet"]["down_block_additional_residual_0"]["max"] == [2, 320, 65, 65]
    assert p["controlnet/canny"]["controlnet_cond"] == {"min": [1, 3, 256, 256], "opt": [2, 3, 512, 512],
                                                        "max": [2, 3, 520, 520]}
    assert p["controlnet/canny"]["sample"]["opt"] == [2, 4, 64, 64]
    path = engine_file(Path("/pkg"), H100.gpu, H100.compute_capability, H100.trt_version, "controlnet/canny", "fp16")
    assert path.parent == Path("/pkg") / "engines" / engine_dir_name(H100.gpu, H100.compute_capability, H100.trt_version)
    assert path.name == "controlnet--canny.fp16.plan"
