"""The OpenVINO CPU backend (ov-cpu): the package's ONNX graphs as they are, fp32 equal to onnxruntime, bf16 within
its quality gate, chosen by auto, recorded in the metadata, its model cache written and used."""

from __future__ import annotations

import numpy as np
import pytest

from diffrt.runtime.engines import OrtEngine, resolve_backend
from diffrt.runtime.errors import UserError
from diffrt.runtime.pipeline import Pipeline

pytest.importorskip("openvino")
from diffrt.runtime.ov_backend import BF16_GATE_DB, OvEngine, has_bf16  # noqa: E402


def unet_feeds(batch: int = 2, size: int = 8, hidden: int = 32) -> dict:
    rng = np.random.default_rng(0)
    return {"sample": rng.standard_normal((batch, 4, size, size), dtype=np.float32), "timestep": np.full((batch,), 321.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, 77, hidden), dtype=np.float32)}


def test_unet_equals_onnxruntime_in_fp32_and_each_shape_compiles_once(tiny_package):
    path = tiny_package / "unet" / "model.onnx"
    ours, ort = OvEngine(path, threads=2, precision="fp32"), OrtEngine(path, "ort-cpu", 2)
    assert set(ours.inputs) == set(ort.inputs) and set(ours.outputs) == set(ort.outputs)
    for batch, size in ((2, 8), (1, 12), (2, 8)):
        feeds = unet_feeds(batch, size)
        got, want = ours.run(feeds)["out_sample"], ort.run(feeds)["out_sample"]
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert len(ours.compiled) == 2  # (2, 8) ran twice on one compiled model


def test_pipeline_fp32_equals_ort_cpu_and_bf16_passes_its_gate(tiny_package):
    from diffrt.runtime.doctor import check_backends

    kwargs = dict(steps=4, seed=3, guidance_scale=7.5, scheduler="euler_a")
    ort = Pipeline.from_package(tiny_package, backend="ort-cpu")("a red house", **kwargs)
    ov = Pipeline.from_package(tiny_package, backend="ov-cpu", precision="fp32")("a red house", **kwargs)
    assert np.abs(ov.array - ort.array).max() <= 1e-3
    assert ov.settings["backend"] == "ov-cpu" and ov.settings["precision"] == "fp32"
    if has_bf16():
        checks = check_backends(tiny_package, ["ort-cpu", "ov-cpu"])
        assert checks["ov-cpu"]["precision"] == "bf16" and checks["ov-cpu"]["psnr_db_min"] >= BF16_GATE_DB, checks


def test_auto_picks_openvino_and_precision_is_checked(tiny_package, monkeypatch):
    import diffrt.runtime.ov_backend as ov_backend

    assert resolve_backend("auto") == "ov-cpu"  # no CUDA here, OpenVINO installed
    with pytest.raises(UserError, match="--precision picks OpenVINO's CPU precision"):
        Pipeline.from_package(tiny_package, backend="ort-cpu", precision="bf16")
    with pytest.raises(UserError, match="precision must be one of auto, bf16, fp32"):
        Pipeline.from_package(tiny_package, backend="ov-cpu", precision="int4")
    monkeypatch.setattr(ov_backend, "has_bf16", lambda: False)  # a CPU without AMX or AVX-512-BF16
    assert Pipeline.from_package(tiny_package, backend="ov-cpu").precision == "fp32"
    with pytest.raises(UserError, match="neither AMX nor AVX-512-BF16"):
        Pipeline.from_package(tiny_package, backend="ov-cpu", precision="bf16")
    with pytest.raises(UserError, match="CUDA graphs need the ort-cuda backend, not ov-cpu"):
        Pipeline.from_package(tiny_package, backend="ov-cpu", cuda_graph=True)


def test_the_model_cache_is_written_and_reused(tiny_package, tmp_path):
    first = Pipeline.from_package(tiny_package, backend="ov-cpu", graph_cache=tmp_path)("a cat", steps=2, seed=1)
    blobs = sorted((tmp_path / "openvino").glob("*.blob"))
    assert blobs, list(tmp_path.rglob("*"))
    again = Pipeline.from_package(tiny_package, backend="ov-cpu", graph_cache=tmp_path)("a cat", steps=2, seed=1)
    assert sorted((tmp_path / "openvino").glob("*.blob")) == blobs and np.array_equal(first.array, again.array)


def test_doctor_names_the_cpu_int8_path():
    from diffrt.runtime.doctor import format_report, int8_path, machine_report

    assert "(AMX-INT8)" in int8_path(["avx2", "avx512_vnni", "amx_int8"])
    assert "(AVX-512 VNNI)" in int8_path(["avx2", "avx512_vnni"]) and "(AVX-VNNI)" in int8_path(["avx2", "avx_vnni"])
    assert "gain little" in int8_path(["avx2"])
    report = machine_report()
    assert int8_path(report["cpu_isa"]) in format_report(report).splitlines()
