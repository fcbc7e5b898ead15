"""The benchmark harness on the tiny model: every measurement recorded, reports written, baseline interleaved."""

from __future__ import annotations

import json
import os

import pytest

from diffrt.runtime.errors import UserError

pytest.importorskip("matplotlib")


@pytest.mark.slow
def test_bench_with_diffusers_baseline(tiny_package, tiny_checkpoint, tmp_path):
    from diffrt.benchmarks.bench import BenchConfig, benchmark, write_outputs

    cfg = BenchConfig(package=tiny_package, backend="ort-cpu", steps=3, scheduler="heun", batches=[1, 2], runs=2, warmup=1,
                      baseline="diffusers", checkpoint=tiny_checkpoint, graph_cache=tmp_path / "graphs", out=tmp_path / "out")
    result = benchmark(cfg, log=lambda m: None)
    paths = write_outputs(result, cfg.out)
    assert [p.name for p in paths] == ["results.json", "report.md", "report.png"]
    data = json.loads(paths[0].read_text())
    e2e = [r for r in data["records"] if r["kind"] == "e2e"]
    assert len(e2e) == 2 * 2 * 2  # two impls, two batch sizes, two runs
    assert [r["impl"] for r in e2e[:4]] == ["diffrt", "diffusers", "diffusers", "diffrt"]  # interleaved
    summary = data["summary"]
    assert set(summary["e2e"]) == {"diffrt/b1", "diffrt/b2", "diffusers/b1", "diffusers/b2"}
    for s in summary["e2e"].values():
        assert s["min"] <= s["p50"] <= s["p90"] <= s["p99"] and s["images_per_s"] > 0
    # Heun: two UNet calls a step but the last, counted as such on both sides (diffusers' by hooks on its UNet)
    assert all(len(r["unet_calls"]) == 5 for r in e2e)
    assert {s["unet_calls_per_run"] for s in summary["stages"].values()} == {5}
    assert "(5 UNet calls a run)" in paths[1].read_text()
    assert set(summary["cold_start"]) == {"diffrt", "diffrt_graph_cache", "diffusers"}
    assert len(list((tmp_path / "graphs").iterdir())) == 3  # the timed cold start found the three graphs saved
    assert summary["cold_start"]["diffrt"]["peak_rss_mb"] > 0
    assert {"e2e_speedup/b1", "cold_start_ratio", "peak_rss_ratio", "cold_start_ratio_graph_cache"} <= set(summary["ratios"])
    assert "scheduler_step_share_of_unet_call" in summary["stages"]["diffrt/b1"]
    assert data["machine"]["cpu"] and "onnxruntime" in data["machine"]["versions"]
    assert "| diffrt/b1 |" in paths[1].read_text() and "| diffrt_graph_cache | - |" in paths[1].read_text()


def test_bench_needs_checkpoint_for_baseline(tiny_package, tmp_path):
    from diffrt.benchmarks.bench import BenchConfig, benchmark

    with pytest.raises(UserError, match="pass --checkpoint"):
        benchmark(BenchConfig(package=tiny_package, baseline="diffusers", checkpoint=tmp_path, runs=1), log=lambda m: None)


def test_baseline_runs_where_diffrt_runs():
    """diffusers beside ort-cpu stays on the CPU in float32; beside a GPU backend it moves to the GPU, in float16
    unless the package is float32 on onnxruntime (a TensorRT engine is never float32)."""
    from diffrt.benchmarks.bench import baseline_placement

    assert baseline_placement("ort-cpu", "fp16") == ("cpu", "float32")
    assert baseline_placement("ort-cuda", "fp32") == ("cuda", "float32")
    assert baseline_placement("ort-cuda", "fp16") == ("cuda", "float16")
    assert baseline_placement("ort-cuda", "int8") == ("cuda", "float16")
    assert baseline_placement("trt", "fp32") == ("cuda", "float16")
    assert baseline_placement("ov-cpu", "fp32") == ("cpu", "float32")
    assert baseline_placement("ov-cpu", "fp32", "diffusers-bf16") == ("cpu", "bfloat16")
    with pytest.raises(UserError, match="diffusers-bf16 is the CPU baseline"):
        baseline_placement("ort-cuda", "fp16", "diffusers-bf16")


@pytest.mark.slow
def test_bench_beside_diffusers_in_float32_and_bfloat16(tiny_package, tiny_checkpoint, tmp_path):
    """diffrt on OpenVINO beside diffusers in float32 and in bfloat16 on the CPU, in one interleaved run."""
    pytest.importorskip("openvino")
    from diffrt.benchmarks.bench import BenchConfig, benchmark, write_outputs

    cfg = BenchConfig(package=tiny_package, backend="ov-cpu", steps=2, runs=2, warmup=1, cold_start=False,
                      baseline="diffusers,diffusers-bf16", checkpoint=tiny_checkpoint, out=tmp_path)
    result = benchmark(cfg, log=lambda m: None)
    assert {r["impl"] for r in result["records"] if r["kind"] == "e2e"} == {"diffrt", "diffusers", "diffusers-bf16"}
    assert {"e2e_speedup/b1", "e2e_speedup_vs_diffusers-bf16/b1"} <= set(result["summary"]["ratios"])
    assert result["settings"]["baselines"]["diffusers-bf16"] == {"device": "cpu", "dtype": "bfloat16"}
    report = write_outputs(result, tmp_path)[1].read_text()
    assert "diffusers-bf16 on cpu in bfloat16" in report and result["machine"]["isa"] is not None
    with pytest.raises(UserError, match="unknown baseline 'diffusers-fp8'"):
        benchmark(BenchConfig(package=tiny_package, baseline="diffusers-fp8", checkpoint=tiny_checkpoint), log=lambda m: None)


def test_fresh_process_reports_its_own_gpu_memory(tmp_path, monkeypatch):
    """The GPU memory of a fresh process is the card's reading after it, less the one before it started; with a
    stand-in nvidia-smi whose reading grows 300 MB per call, that is 300 MB. The report then gets the column."""
    from diffrt.benchmarks.bench import run_fresh
    from diffrt.benchmarks.report import startup_table

    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text('#!/bin/sh\nn=$(cat "$SMI_COUNT" 2>/dev/null || echo 0); n=$((n + 300)); echo $n > "$SMI_COUNT"; echo $n\n')
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{smi.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("SMI_COUNT", str(tmp_path / "count"))
    fresh = run_fresh("import time\nprint('DONE', time.time())")
    assert fresh.proc.returncode == 0 and fresh.gpu_mb == 300
    assert fresh.started <= fresh.value("DONE") and fresh.peak_rss_mb > 0
    table = startup_table({"load": {}, "cold_start": {"diffrt": {"seconds": 1.0, "peak_rss_mb": 100.0,
                                                                  "gpu_memory_mb": fresh.gpu_mb}}})
    assert table[0].endswith("| GPU memory held after the first image (MB) |") and table[2] == "| diffrt | - | 1.00 | 100 | 300 |"

    monkeypatch.setenv("PATH", os.environ["PATH"].split(":", 1)[1])  # no nvidia-smi: no GPU figure, no column
    assert run_fresh("pass").gpu_mb is None
    assert "GPU" not in startup_table({"load": {}, "cold_start": {"diffrt": {"seconds": 1.0, "peak_rss_mb": 1.0}}})[0]


@pytest.mark.slow
def test_gpu_check_script_at_toy_size(tmp_path, capsys):
    """The GPU check's steps at toy size on the CPU: its fp16 copy is made, fp32 rows match diffusers, working
    files stay out of --out, and the fused-attention UNet has no float shape arithmetic to stop CUDA graphs."""
    from diffrt.benchmarks import gpu_check

    out, work = tmp_path / "out", tmp_path / "work"
    assert gpu_check.main(["--tiny", "--out", str(out), "--work", str(work), "--steps", "2", "--batches", "1,2",
                           "--runs", "1"]) == 0
    report = json.loads((out / "gpu_check.json").read_text())
    assert [(r["precision"], r["batch"]) for r in report["rows"]] == [("fp32", 1), ("fp32", 2)]
    assert all(r["max_abs_diff"]["diffrt"] < 1e-2 and not r["errors"] for r in report["rows"])
    assert report["cuda_graph_blockers"] == [] and sorted(p.name for p in out.iterdir()) == ["gpu_check.json"]
    manifest = json.loads((work / "fp16" / "diffrt.json").read_text())
    assert {c["precision"] for c in manifest["components"].values()} == {"fp16"}
    assert "| fp32 | 2 | diffrt |" in capsys.readouterr().out


def test_session_load_with_and_without_the_graph_cache(tiny_package, tmp_path):
    from diffrt.benchmarks.session_load import main

    assert main([str(tiny_package), "--cache", str(tmp_path / "graphs"), "--json", str(tmp_path / "load.json")]) == 0
    result = json.loads((tmp_path / "load.json").read_text())
    assert result["max_abs_diff"] == 0 and len(result["loads"]) == 3
    assert all(r["seconds"] > 0 and r["peak_rss_mb"] > 0 for r in result["loads"].values())


@pytest.mark.gpu
def test_bench_on_the_gpu_puts_diffusers_on_the_gpu(tiny_package, tiny_checkpoint, tmp_path):
    """Runs wherever onnxruntime has its CUDA provider and torch sees the GPU; skipped elsewhere."""
    import torch

    from diffrt.benchmarks.bench import BenchConfig, benchmark
    from diffrt.runtime.backends.onnxruntime import cuda_available

    if not (cuda_available() and torch.cuda.is_available()):
        pytest.skip("needs onnxruntime's CUDA provider and a CUDA build of torch")
    cfg = BenchConfig(package=tiny_package, backend="ort-cuda", steps=3, runs=1, warmup=1, baseline="diffusers",
                      checkpoint=tiny_checkpoint, out=tmp_path)
    result = benchmark(cfg, log=lambda m: None)
    assert (result["settings"]["baseline_device"], result["settings"]["baseline_dtype"]) == ("cuda", "float32")
    cold = result["summary"]["cold_start"]
    assert cold["diffrt"]["gpu_memory_mb"] > 0 and cold["diffusers"]["gpu_memory_mb"] > 0
    stages = result["summary"]["stages"]["diffusers/b1"]  # timed with CUDA events
    assert 0 < stages["unet_call"] and 0 < stages["mean_seconds"]["unet"] < result["summary"]["e2e"]["diffusers/b1"]["mean"]


def test_optimization_levels_side_by_side(tiny_package, tmp_path, capsys):
    from diffrt.benchmarks.opt_level import main

    assert main([str(tiny_package), "--runs", "2", "--json", str(tmp_path / "levels.json")]) == 0
    rows = json.loads((tmp_path / "levels.json").read_text())["rows"]
    assert [(r["component"], r["level"][11:]) for r in rows] == [(c, lv) for c in ("text_encoder", "unet", "vae_decoder")
                                                                 for lv in ("EXTENDED", "ALL")]
    assert all(r["load_s"] > 0 and len(r["runs_s"]) == 2 for r in rows)
    assert "| unet | ORT_ENABLE_ALL |" in capsys.readouterr().out


def test_bench_image_to_image_times_the_encoder_and_runs_strength_times_steps(tiny_package, tiny_checkpoint, tmp_path):
    """--image: both sides encode the picture (timed as vae_encode) and run int(strength x steps) UNet calls, counted
    by the bench's own stage records (hooks on diffusers' UNet)."""
    from PIL import Image

    from diffrt.benchmarks.bench import BenchConfig, benchmark

    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "in.png")
    cfg = BenchConfig(package=tiny_package, backend="ort-cpu", steps=5, runs=1, warmup=0, width=32, height=32,
                      scheduler="ddim", baseline="diffusers", checkpoint=tiny_checkpoint, image=tmp_path / "in.png",
                      strength=0.6, out=tmp_path)
    result = benchmark(cfg, log=lambda m: None)
    e2e = [r for r in result["records"] if r["kind"] == "e2e"]
    assert {r["impl"] for r in e2e} == {"diffrt", "diffusers"}
    assert all(len(r["unet_calls"]) == 3 for r in e2e)  # int(0.6 x 5)
    assert all(r["stages"]["vae_encode"] > 0 for r in e2e)
    assert not [r for r in result["records"] if r["kind"] == "cold_start"]


@pytest.mark.slow
def test_gpu_check_script_covers_sdxl_at_toy_size(tmp_path):
    """--family sdxl: the SDXL architecture exported with both encoders, its fp16 copy keeping the VAE float32, and its
    fp32 images matching diffusers' StableDiffusionXLPipeline."""
    from diffrt.benchmarks import gpu_check

    out, work = tmp_path / "out", tmp_path / "work"
    assert gpu_check.main(["--tiny", "--family", "sdxl", "--out", str(out), "--work", str(work), "--steps", "2",
                           "--batches", "1", "--runs", "1"]) == 0
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["family"] == "sdxl" and report["rows"][0]["max_abs_diff"]["diffrt"] < 1e-2
    manifest = json.loads((work / "fp16" / "diffrt.json").read_text())
    assert {c: e["precision"] for c, e in manifest["components"].items()} == {
        "text_encoder": "fp16", "text_encoder_2": "fp16", "unet": "fp16", "vae_decoder": "fp32"}


@pytest.mark.slow
def test_family_bench_times_sd3_without_t5_beside_diffusers(tmp_path):
    """The full-size SD3.5 bench's machinery at toy size: diffrt and diffusers each in its own process, diffusers'
    MMDiT timed as the denoiser stage, a checkpoint without T5 loaded with text_encoder_3=None."""
    from conftest import make_tiny_sd3_checkpoint

    from diffrt.benchmarks import sd3
    from diffrt.export import ExportOptions, export_package

    checkpoint = make_tiny_sd3_checkpoint(tmp_path / "sd3", t5=False)
    cache = checkpoint.parent
    assert checkpoint == cache / "checkpoint"  # the bench's cache layout
    export_package(checkpoint, cache / "package", ExportOptions(check=False))
    out = tmp_path / "r.json"
    sd3.main(["bench", "--cache", str(cache), "--size", "48x32", "--steps", "2", "--json", str(out),
              "--impls", "diffrt-ort,diffusers"])
    results = {r["impl"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"diffrt-ort", "diffusers"} and not any("error" in r for r in results.values())
    for r in results.values():
        assert r["records"][0]["stages"]["unet"] > 0 and r["peak_rss_gb"] > 0


@pytest.mark.slow
def test_bench_beside_the_cpu_peers_and_with_deepcache(tiny_package, tiny_checkpoint, tmp_path):
    """OpenVINO GenAI (on optimum-intel's export of the checkpoint) and optimum's pipeline (on the package) run
    interleaved with diffrt's exact and DeepCache paths; each peer has its cold start and peak RSS."""
    pytest.importorskip("openvino_genai")
    pytest.importorskip("optimum.intel.openvino")
    import shutil

    from diffrt.benchmarks.bench import BenchConfig, benchmark
    from diffrt.export.deepcache import add_deepcache

    package = tmp_path / "pkg"
    shutil.copytree(tiny_package, package)
    add_deepcache(package, log=lambda m: None)
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, checkpoint)  # the GenAI export is kept beside it
    cfg = BenchConfig(package=package, backend="ov-cpu", steps=4, scheduler="euler", width=64, height=64, runs=1,
                      warmup=0, baseline="openvino-genai,optimum", checkpoint=checkpoint, cache="deepcache:2",
                      out=tmp_path / "out")
    result = benchmark(cfg, log=lambda m: None)
    summary = result["summary"]
    assert set(summary["e2e"]) == {"diffrt/b1", "diffrt+deepcache:2/b1", "openvino-genai/b1", "optimum/b1"}
    assert summary["e2e"]["diffrt+deepcache:2/b1"]["psnr_vs_exact"] > 5
    assert {"e2e_speedup_vs_openvino-genai/b1", "e2e_speedup_vs_optimum/b1", "diffrt+deepcache:2:speedup_vs_exact/b1",
            "peak_rss_ratio_vs_openvino-genai", "peak_rss_ratio_vs_optimum"} <= set(summary["ratios"])
    assert (tmp_path / "ckpt-openvino-genai" / "fp32" / "unet" / "openvino_model.xml").is_file()
    assert summary["cold_start"]["openvino-genai"]["peak_rss_mb"] > 0


@pytest.mark.slow
def test_genai_hybrid_peer_runs_a_calibrated_int8_export(tiny_checkpoint, tmp_path):
    """openvino-genai-hybrid: optimum-intel's hybrid quantization of the checkpoint, calibrated on our prompts: its UNet
    quantizes activations (FakeQuantize) and holds int8 weights, and GenAI's pipeline draws with it."""
    pytest.importorskip("openvino_genai")
    pytest.importorskip("optimum.intel.openvino")
    import shutil
    from collections import Counter

    import openvino as ov

    from diffrt.benchmarks.peers import make_peer

    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, checkpoint)
    peer = make_peer("openvino-genai-hybrid", checkpoint, tmp_path, "fp32", "euler", None, 1, 64, 64, 5.0)
    assert peer("a red circle", 2, 5.0, 1, 64, 64)["total"] > 0
    unet = ov.Core().read_model(str(tmp_path / "ckpt-openvino-genai" / "hybrid-int8" / "unet" / "openvino_model.xml"))
    ops = Counter(op.get_type_name() for op in unet.get_ops())
    weights = Counter(op.get_element_type().get_type_name() for op in unet.get_ops() if op.get_type_name() == "Constant")
    assert ops["FakeQuantize"] >= 10 and weights["u8"] + weights["i8"] >= 10, (ops, weights)


def test_peers_are_refused_in_one_line_where_they_cannot_run(tiny_package):
    from diffrt.benchmarks.bench import BenchConfig, baseline_placement, baselines

    with pytest.raises(UserError, match="is a CPU runtime; benchmark it beside --backend ov-cpu or ort-cpu"):
        baseline_placement("ort-cuda", "fp16", "openvino-genai")
    for genai in ("openvino-genai", "openvino-genai-int8", "openvino-genai-hybrid"):  # compiled as diffrt's OpenVINO is
        assert baseline_placement("ov-cpu", "fp32", genai, "bf16") == ("cpu", "bf16")
    assert baseline_placement("ov-cpu", "fp32", "optimum", "bf16") == ("cpu", "fp32")
    with pytest.raises(UserError, match="unknown baseline 'sdcpp'; use diffusers, diffusers-bf16, openvino-genai, "
                                        "openvino-genai-int8, openvino-genai-hybrid, optimum, stable-diffusion-cpp"):
        baselines(BenchConfig(package=tiny_package, baseline="optimum,sdcpp"))


def test_the_original_layout_file_loads_back_in_diffusers_equal(tiny_checkpoint, tmp_path):
    """The checkpoint written for stable-diffusion.cpp in the original (ldm) layout: diffusers' own single-file
    converter reads every UNet and VAE tensor back to its name and value, and the text encoder sits under its prefix."""
    pytest.importorskip("diffusers")
    import numpy as np
    import torch
    from diffusers.loaders import single_file_utils as single
    from safetensors.numpy import load_file

    from diffrt.benchmarks.ldm_checkpoint import write_single_file

    written = load_file(str(write_single_file(tiny_checkpoint, tmp_path / "ldm.safetensors")))
    tensors = {k: torch.from_numpy(v) for k, v in written.items()}
    for folder, convert in (("unet", single.convert_ldm_unet_checkpoint), ("vae", single.convert_ldm_vae_checkpoint)):
        original = load_file(str(tiny_checkpoint / folder / "diffusion_pytorch_model.safetensors"))
        back = convert(tensors, json.loads((tiny_checkpoint / folder / "config.json").read_text()))
        assert set(back) == set(original), folder
        for name, value in original.items():
            np.testing.assert_array_equal(back[name].numpy().reshape(value.shape), value)
    text = load_file(str(tiny_checkpoint / "text_encoder" / "model.safetensors"))
    assert all(np.array_equal(written[f"cond_stage_model.transformer.{k}"], v) for k, v in text.items())
    assert len(written) == len(text) + sum(len(load_file(str(tiny_checkpoint / f / "diffusion_pytorch_model.safetensors")))
                                           for f in ("unet", "vae"))
