"""The benchmark harness on the tiny model: every measurement recorded, reports written, baseline interleaved."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")


def test_bench_with_diffusers_baseline(tiny_package, tiny_checkpoint, tmp_path):
    from diffrt.benchmarks.bench import BenchConfig, benchmark, write_outputs

    cfg = BenchConfig(package=tiny_package, backend="ort-cpu", steps=3, scheduler="ddim", batches=[1, 2], runs=2, warmup=1,
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
    assert len(e2e[0]["unet_calls"]) == 3
    assert set(summary["cold_start"]) == {"diffrt", "diffrt_graph_cache", "diffusers"}
    assert len(list((tmp_path / "graphs").iterdir())) == 3  # the timed cold start found the three graphs saved
    assert summary["cold_start"]["diffrt"]["peak_rss_mb"] > 0
    assert {"e2e_speedup/b1", "cold_start_ratio", "peak_rss_ratio", "cold_start_ratio_graph_cache"} <= set(summary["ratios"])
    assert "scheduler_step_share_of_unet_call" in summary["stages"]["diffrt/b1"]
    assert data["machine"]["cpu"] and "onnxruntime" in data["machine"]["versions"]
    assert "| diffrt/b1 |" in paths[1].read_text() and "| diffrt_graph_cache | - |" in paths[1].read_text()


def test_bench_needs_checkpoint_for_baseline(tiny_package, tmp_path):
    from diffrt.benchmarks.bench import BenchConfig, benchmark
    from diffrt.runtime.errors import UserError

    with pytest.raises(UserError, match="pass --checkpoint"):
        benchmark(BenchConfig(package=tiny_package, baseline="diffusers", checkpoint=tmp_path, runs=1), log=lambda m: None)


def test_gpu_check_script_at_toy_size(tmp_path, capsys):
    from diffrt.benchmarks import gpu_check

    assert gpu_check.main(["--tiny", "--out", str(tmp_path), "--steps", "2", "--batches", "1,2", "--runs", "1"]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["batch"] for r in report["rows"]] == [1, 2]
    assert all(r["max_abs_diff"] < 1e-2 for r in report["rows"])  # same weights, same latents, fp32 on the CPU
    assert "| batch | diffrt s | diffusers s |" in capsys.readouterr().out


def test_session_load_with_and_without_the_graph_cache(tiny_package, tmp_path):
    from diffrt.benchmarks.session_load import main

    assert main([str(tiny_package), "--cache", str(tmp_path / "graphs"), "--json", str(tmp_path / "load.json")]) == 0
    result = json.loads((tmp_path / "load.json").read_text())
    assert result["max_abs_diff"] == 0 and len(result["loads"]) == 3
    assert all(r["seconds"] > 0 and r["peak_rss_mb"] > 0 for r in result["loads"].values())
