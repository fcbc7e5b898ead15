"""A package moved between CPUs: which paths its gates vouch for here, what auto and --backend do with the rest, and
`diffrt doctor --check` holding every path to its gate and recording the verdict for this machine."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess

import pytest

from diffrt.runtime import trust
from diffrt.runtime.errors import UserError
from diffrt.runtime.package import load_package
from diffrt.runtime.pipeline import Pipeline

pytest.importorskip("torch")
from conftest import plant_addition, run_cli  # noqa: E402

from diffrt.export.precision import QuantizeOptions, quantize_package  # noqa: E402


@pytest.fixture(scope="module")
def int8_package(tiny_package, tmp_path_factory):
    out = tmp_path_factory.mktemp("trust") / "tiny-int8"
    quantize_package(tiny_package, out, QuantizeOptions(precision="int8", steps=4, calibration_prompts=1, gate_seeds=1,
                                                        accept_quality=True), log=lambda m: None)
    return out


def edited(src, tmp_path, edit) -> object:
    """A copy of package src whose manifest `edit` changed."""
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "diffrt.json").read_text())
    edit(manifest)
    (dst / "diffrt.json").write_text(json.dumps(manifest))
    return dst


def test_a_path_is_held_to_the_gate_of_its_least_precise_part():
    assert [trust.gate_db(c) for c in ("int8", "int8+bf16", "int8+fp32", "fp16+bf16", "fp16+fp32", "bf16", "fp32")] == \
        [22, 22, 22, 30, 35, 30, 35]
    assert trust.cpu_kind(["amx_tile", "amx_int8", "avx512_vnni", "avx2"]) == "amx"
    assert trust.cpu_kind(["avx512f", "avx512_bf16", "avx512_vnni", "avx2"]) == "avx512-vnni"
    assert trust.cpu_kind(["avx2"]) == "avx2" and trust.cpu_kind([]) == "baseline"


@pytest.mark.slow
def test_verdicts_follow_the_cpu_kind(int8_package, monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFRT_CACHE_DIR", str(tmp_path))
    pkg = load_package(int8_package)
    quality = {**pkg.manifest["quality"], "cpu_kind": "amx", "ov-cpu": {"computes": "int8+bf16", "psnr_db_min": 30.0}}
    measured_on_amx = dataclasses.replace(pkg, manifest={**pkg.manifest, "quality": quality})
    unet = {k: v for k, v in pkg.manifest["components"]["unet"].items() if k != "activations"}
    signed = dataclasses.replace(measured_on_amx, manifest={**measured_on_amx.manifest, "components": {
        **pkg.manifest["components"], "unet": unet}})
    cases = [  # (cpu kind here, package, backend, computes) -> trusted
        ("amx", measured_on_amx, "ov-cpu", "int8+bf16", True),
        ("avx512-vnni", measured_on_amx, "ov-cpu", "int8+bf16", False),  # measured on another kind
        ("avx2", measured_on_amx, "ov-cpu", "int8+fp32", False),  # not measured computing so
        ("avx512-vnni", measured_on_amx, "ort-cpu", "int8", True),  # onnxruntime's int8 sums are exact with VNNI or AMX
        ("avx2", measured_on_amx, "ort-cpu", "int8", False),  # and saturate without them
        ("amx", signed, "ov-cpu", "int8+bf16", True),
        ("avx512-vnni", signed, "ov-cpu", "int8+bf16", False),  # signed activations: wrong on OpenVINO without AMX
        ("avx2", measured_on_amx, "ov-cpu", "bf16", True),  # float paths hold anywhere
        ("avx2", measured_on_amx, "ort-cuda", "int8", True),  # GPUs are not judged here
    ]
    for kind, package, backend, computes, expected in cases:
        monkeypatch.setattr(trust, "cpu_kind", lambda isa=None, kind=kind: kind)
        found = trust.verdict(package, backend, computes)
        assert found.trusted == expected and bool(found.why) != expected, (kind, backend, computes, found)
    assert "signed int8" in found.why if not found.trusted else True
    monkeypatch.setattr(trust, "cpu_kind", lambda isa=None: "avx512-vnni")
    assert "signed int8" in trust.verdict(signed, "ov-cpu", "int8+bf16").why
    trust.record(signed, "ov-cpu", "int8+bf16", 25.0)  # measured here: the measurement wins
    assert trust.verdict(signed, "ov-cpu", "int8+bf16").trusted
    trust.record(measured_on_amx, "ov-cpu", "bf16", 12.0)
    found = trust.verdict(measured_on_amx, "ov-cpu", "bf16")
    assert not found.trusted and "measured 12.0 dB here" in found.why and "30 dB gate" in found.why


@pytest.mark.slow
def test_a_package_gated_on_another_cpu_kind_is_refused_until_checked(int8_package, tmp_path, monkeypatch):
    """Neither CPU path is vouched for: auto and --backend refuse in one line naming doctor --check (the CLI exits 2);
    with one path vouched for, auto runs it and the other is refused by name."""
    monkeypatch.setenv("DIFFRT_CACHE_DIR", str(tmp_path / "checks"))
    moved = edited(int8_package, tmp_path, lambda m: m["quality"].update(cpu_kind="baseline"))
    for backend in ("auto", "ort-cpu"):
        with pytest.raises(UserError, match=r"not trusted on this CPU: its gates were measured on a CPU of another kind "
                                            r"\(baseline, this one is .*doctor --check"):
            Pipeline.from_package(moved, backend=backend)
    proc = run_cli("generate", "a cat", "--model", str(moved),
                           "--steps", "2", "-o", str(tmp_path / "x.png"))
    assert proc.returncode == 2 and "doctor --check" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()
    if "ov-cpu" not in load_package(int8_package).manifest["quality"]:
        return
    ov_unmeasured = edited(int8_package, tmp_path / "b", lambda m: m["quality"]["ov-cpu"].update(computes="int8+fp64"))
    with pytest.warns(UserWarning, match=r"auto runs ort-cpu \(int8\): ov-cpu \(int8\+\w+\) is not trusted on this CPU"):
        assert Pipeline.from_package(ov_unmeasured).backend == "ort-cpu"  # auto passes over the path nobody measured
    proc = run_cli("generate", "a cat", "--model", str(ov_unmeasured),
                           "--steps", "2", "-q", "-o", str(tmp_path / "y.png"))
    assert proc.returncode == 0 and "diffrt: warning: auto runs ort-cpu (int8): ov-cpu" in proc.stderr, proc.stderr
    with pytest.raises(UserError, match=r"ov-cpu \(int8\+\w+\) is not trusted on this CPU: its gates were not measured"):
        Pipeline.from_package(ov_unmeasured, backend="ov-cpu")


def doctor(package, steps: int = 4) -> subprocess.CompletedProcess:
    return run_cli("doctor", "--check", str(package), "--steps",
                           str(steps))


@pytest.mark.slow
def test_doctor_check_holds_every_path_to_its_gate_and_auto_follows(int8_package, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFRT_CACHE_DIR", str(tmp_path / "checks"))
    proc = doctor(int8_package)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = [line for line in proc.stdout.splitlines() if line.startswith("check ")]
    assert checks[0].startswith("check ort-cpu (int8): ok, PSNR min") and "against ort-cpu float32 (gate 22 dB)" in checks[0]
    assert all(": ok," in line for line in checks) and len(checks) == 1 + ("ov-cpu" in proc.stdout) + ("ov-cpu fp32" in proc.stdout)
    broken = tmp_path / "broken"
    shutil.copytree(int8_package, broken)
    plant_addition(broken, 3.0)  # every path now draws wrong images
    proc = doctor(broken)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failing = [line for line in proc.stdout.splitlines() if line.startswith("check ")]
    assert failing and all(": fails, PSNR min" in line for line in failing), failing
    measured = {f"{float(line.split('PSNR min ')[1].split(' dB')[0]):.1f}" for line in failing}
    assert all(float(m) < 22 for m in measured)
    for backend in ("auto", "ort-cpu"):  # each refusal names its own path's figure (auto's first may be ov-cpu)
        with pytest.raises(UserError, match=r"measured (\d+\.\d) dB here on .*under its 22 dB gate") as refused:
            Pipeline.from_package(broken, backend=backend)
        assert refused.value.args[0].split("measured ")[1].split(" dB")[0] in measured, (refused.value, measured)
    # the verdict is this machine's: the same package passes where nothing was measured, as its gates were made here
    monkeypatch.setenv("DIFFRT_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert Pipeline.from_package(broken, backend="ort-cpu").backend == "ort-cpu"


@pytest.mark.slow
def test_doctor_check_refuses_a_package_without_float32_copies(int8_package, tmp_path):
    bare = edited(int8_package, tmp_path, lambda m: m["components"]["unet"].pop("fallback"))
    proc = doctor(bare)
    assert proc.returncode == 2 and "keeps no float32 copy of its unet" in proc.stderr and "Traceback" not in proc.stderr



@pytest.mark.slow
def test_info_names_the_gates_and_the_cpu_kinds(int8_package):
    proc = run_cli("info", str(int8_package))
    line = next(x for x in proc.stdout.splitlines() if "gates against float32" in x)
    assert "ort-cpu (int8)" in line and f"({trust.cpu_kind()}); this CPU is {trust.cpu_kind()}" in line, line


@pytest.mark.slow
def test_signed_activations_are_refused_on_openvino_without_amx(tiny_package, tmp_path):
    """A package quantized with signed int8 activations (every int8 package before 2026-12-06) draws speckles on
    OpenVINO without AMX: refused there by name, whatever its gates said; onnxruntime still runs it."""
    out = tmp_path / "signed"
    quantize_package(tiny_package, out, QuantizeOptions(precision="int8", activations="int8", steps=3, calibration_prompts=1,
                                                        gate_seeds=1, accept_quality=True), log=lambda m: None)
    assert load_package(out).manifest["components"]["unet"]["activations"] == "int8"
    assert Pipeline.from_package(out, backend="ort-cpu").backend == "ort-cpu"
    if "ov-cpu" not in load_package(out).manifest["quality"]:
        return
    if trust.cpu_kind() == "amx":
        assert Pipeline.from_package(out, backend="ov-cpu").backend == "ov-cpu"
    else:
        with pytest.raises(UserError, match="quantizes activations as signed int8, which ov-cpu computes wrongly"):
            Pipeline.from_package(out, backend="ov-cpu")
