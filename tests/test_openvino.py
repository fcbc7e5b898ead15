"""The OpenVINO CPU backend (ov-cpu): the package's ONNX graphs as they are, fp32 equal to onnxruntime, bf16 within
its quality gate, chosen by auto, recorded in the metadata, its model cache written and used."""

from __future__ import annotations

import numpy as np
import pytest

from diffrt.runtime.backends.onnxruntime import OrtEngine
from diffrt.runtime.backends.registry import resolve
from diffrt.runtime.errors import UserError
from diffrt.runtime.pipeline import Pipeline

pytest.importorskip("openvino")
from diffrt.runtime.backends.openvino import OvEngine, has_bf16  # noqa: E402
from diffrt.runtime.trust import GATES_DB  # noqa: E402


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
        checks = check_backends(tiny_package, ["ort-cpu", "ov-cpu"], steps=4)
        assert checks["ov-cpu"]["precision"] == "bf16" and checks["ov-cpu"]["psnr_db_min"] >= GATES_DB["bf16"], checks
        assert checks["ov-cpu fp32"]["ok"] and checks["ort-cpu"]["psnr_db_min"] == float("inf"), checks


def test_auto_picks_openvino_and_precision_is_checked(tiny_package, monkeypatch):
    import diffrt.runtime.backends.openvino as ov_backend

    assert resolve("auto").name == "ov-cpu"  # no CUDA here, OpenVINO installed
    with pytest.raises(UserError, match="--precision picks the CPU precision of --backend ov-cpu"):
        Pipeline.from_package(tiny_package, backend="ort-cpu", precision="bf16")
    with pytest.raises(UserError, match="precision must be one of auto, bf16, fp32"):
        Pipeline.from_package(tiny_package, backend="ov-cpu", precision="int4")
    monkeypatch.setattr(ov_backend, "has_bf16", lambda: False)  # a CPU without AMX or AVX-512-BF16
    assert Pipeline.from_package(tiny_package, backend="ov-cpu").precision == "fp32"
    with pytest.raises(UserError, match="neither AMX nor AVX-512-BF16"):
        Pipeline.from_package(tiny_package, backend="ov-cpu", precision="bf16")
    with pytest.raises(UserError, match="the ov-cpu backend does not take --cuda-graph: leave it out or use --backend ort-cuda"):
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


def mapped_resident_kb(prefix) -> int:
    """Resident kB of this process's mappings of files under prefix (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:
            inside = len(fields) == 6 and fields[5].startswith(str(prefix))
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


def test_weight_file_pages_are_handed_back_after_compiling(tiny_package, tmp_path):
    """OpenVINO maps external weights and keeps them mapped beside its packed copy; diffrt drops those pages after
    compiling (they count twice otherwise) and the engine's results stay the same and equal onnxruntime's."""
    import onnx

    from diffrt.runtime.mapped import shared_read_only

    graph = tmp_path / "unet" / "model.onnx"
    graph.parent.mkdir()
    onnx.save(onnx.load(str(tiny_package / "unet" / "model.onnx")), str(graph), save_as_external_data=True,
              location="model.onnx_data", size_threshold=0)
    engine, feeds = OvEngine(graph, precision="fp32"), unet_feeds()
    engine._compiled(feeds)  # compiling alone: the pages it read are dropped (in fp32 some are read again when run)
    assert shared_read_only(graph.parent.resolve(), open("/proc/self/maps").read()), "OpenVINO did not map the weights"
    assert mapped_resident_kb(graph.parent.resolve()) == 0
    first = engine.run(feeds)["out_sample"]
    assert np.array_equal(engine.run(feeds)["out_sample"], first)
    want = OrtEngine(graph, "ort-cpu", 2).run(feeds)["out_sample"]
    assert np.abs(first - want).max() <= 1e-4 * np.abs(want).max()
    for _ in range(2):  # the first writes the model cache, the second imports its blob, which stays mapped too
        cached = OvEngine(graph, precision="fp32", cache=tmp_path / "cache")
        cached._compiled(feeds)
    blobs = (tmp_path / "cache").resolve()
    assert shared_read_only(blobs, open("/proc/self/maps").read()) and mapped_resident_kb(blobs) == 0
    assert np.array_equal(cached.run(feeds)["out_sample"], first)


def test_only_shared_read_only_mappings_of_the_graph_are_picked():
    from pathlib import Path

    from diffrt.runtime.mapped import shared_read_only

    maps = ("7f00-7f10 r--s 00000000 fd:01 1 /pkg/unet/model.onnx_data\n"
            "7f10-7f20 r--p 00000000 fd:01 2 /pkg/unet/model.onnx_data\n"
            "7f20-7f30 rw-s 00000000 fd:01 3 /pkg/unet/model.onnx_data\n"
            "7f30-7f40 r--s 00000000 fd:01 4 /pkg/vae_decoder/model.onnx\n"
            "7f40-7f50 r--s 00000000 fd:01 5 /pkg/unet/model.onnx\n"
            "7f50-7f60 rw-p 00000000 00:00 0 \n")
    assert shared_read_only(Path("/pkg/unet/model.onnx"), maps) == [(0x7F00, 0x7F10), (0x7F40, 0x7F50)]
