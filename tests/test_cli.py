"""The CLI as a user meets it: images with their settings, and bad input refused in one line with exit code 2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image


def diffrt(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffrt.runtime.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def assert_refused(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_version():
    proc = diffrt("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("diffrt ")


def test_generate_writes_png_with_a1111_parameters(tiny_package, tmp_path):
    out = tmp_path / "cat.png"
    proc = diffrt("generate", "a red cat", "--model", tiny_package, "--steps", 3, "--seed", 42, "--negative", "blurry",
                  "--scheduler", "euler_a", "--guidance", 5, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "3/3" in proc.stderr  # the progress bar reached the end
    image = Image.open(out)
    params = image.info["parameters"]
    assert params.splitlines()[0] == "a red cat"
    assert params.splitlines()[1] == "Negative prompt: blurry"
    for field in ("Steps: 3", "Sampler: Euler a", "CFG scale: 5.0", "Seed: 42", "Size: 32x32", "Model: tiny"):
        assert field in params.splitlines()[2]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_several_images_get_numbered_names(tiny_package, tmp_path):
    proc = diffrt("generate", "a dog", "--model", tiny_package, "--steps", 2, "-n", 2, "-q", "-o", tmp_path / "dog.png")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dog-0.png", "dog-1.png"]


@pytest.mark.parametrize("args, fragments", [
    (["--scheduler", "heun"], ["unknown scheduler 'heun'", "dpmpp_2m_karras", "Euler a"]),
    (["--width", "33"], ["width 33 is not a multiple of 2", "use 32 or 34"]),
    (["--steps", "0"], ["--steps", "1 or more"]),
    (["--steps", "5000"], ["steps must be a whole number from 1 to 1000"]),
    (["-n", "0"], ["-n", "1 or more"]),
    (["--guidance", "lots"], ["--guidance", "'lots' is not a number"]),
    (["--guidance", "nan"], ["not a finite number"]),
    (["--seed", "-2"], ["--seed", "-1: random"]),
    (["--guidance", "-3"], ["guidance scale must be 0 or more"]),
    (["--steps", "1000", "--scheduler", "ddim"], ["ddim scheduler cannot take 1000 steps", "at most 999"]),
    (["--steps", "1000", "--scheduler", "pndm"], ["pndm scheduler cannot take 1000 steps", "at most"]),
    (["--gpu-mem-limit", "2"], ["GPU memory limit needs the ort-cuda backend"]),
    (["--backend", "tensorrt"], ["invalid choice"]),
    (["--cuda-graph", "--backend", "ort-cpu"], ["CUDA graphs need the ort-cuda backend"]),
    (["--graph-cache", "/dev/null/graphs"], ["graph cache /dev/null/graphs cannot be written"]),
])
def test_bad_settings_are_refused(tiny_package, tmp_path, args, fragments):
    out = tmp_path / "x.png"
    assert_refused(diffrt("generate", "a cat", "--model", tiny_package, "-o", out, *args), *fragments)
    assert not out.exists()


def test_bad_output_paths(tiny_package, tmp_path):
    assert_refused(diffrt("generate", "a cat", "--model", tiny_package, "-o", tmp_path / "missing" / "x.png"),
                   "does not exist")
    assert_refused(diffrt("generate", "a cat", "--model", tiny_package, "-o", tmp_path / "x.gif"), "must end in .png, .jpg")
    (tmp_path / "taken.png").write_bytes(b"precious")
    assert_refused(diffrt("generate", "a cat", "--model", tiny_package, "-o", tmp_path / "taken.png"), "exists", "--overwrite")
    assert (tmp_path / "taken.png").read_bytes() == b"precious"
    if os.geteuid() != 0:  # root writes anywhere, so this case is only testable as a normal user
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert_refused(diffrt("generate", "a cat", "--model", tiny_package, "-o", locked / "x.png"), "not writable")


def test_bad_packages(tiny_package, tmp_path):
    assert_refused(diffrt("generate", "a cat", "--model", tmp_path / "nowhere"), "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_refused(diffrt("generate", "a cat", "--model", empty), "is not a model package")

    broken = tmp_path / "broken"
    shutil.copytree(tiny_package, broken)
    (broken / "unet" / "model.onnx").unlink()
    assert_refused(diffrt("generate", "a cat", "--model", broken), "unet is missing", "re-export")

    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_package, truncated)
    data = (truncated / "unet" / "model.onnx").read_bytes()
    (truncated / "unet" / "model.onnx").write_bytes(data[: len(data) // 2])
    assert_refused(diffrt("generate", "a cat", "--model", truncated), "truncated or corrupt")

    garbled = tmp_path / "garbled"
    shutil.copytree(tiny_package, garbled)
    path = garbled / "unet" / "model.onnx"
    path.write_bytes(b"\x00" * path.stat().st_size)
    assert_refused(diffrt("generate", "a cat", "--model", garbled, "--verify"), "does not match its sha256")
    (garbled / "diffrt.json").write_text("{not json")
    assert_refused(diffrt("generate", "a cat", "--model", garbled), "not valid JSON")
    (garbled / "diffrt.json").unlink()
    assert_refused(diffrt("generate", "a cat", "--model", garbled), "could not be loaded by onnxruntime", "corrupt")


def test_runtime_never_imports_torch(tiny_package, tmp_path):
    """A whole `diffrt generate` run, CLI included, loads none of the export stack nor diffrt's own export,
    benchmarks or models code."""
    code = (
        "import sys\n"
        "from diffrt.runtime.cli import main\n"
        f"rc = main(['generate', 'a cat', '--model', {str(tiny_package)!r}, '--steps', '2', '-q', '-o', sys.argv[1]])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers')\n"
        "               or m.startswith(('diffrt.export', 'diffrt.benchmarks', 'diffrt.models')))\n"
        "print('RC', rc, 'HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, tmp_path / "x.png"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "RC 0 HEAVY []" in proc.stdout
    assert Path(tmp_path / "x.png").stat().st_size > 0


