"""The CLI as a user meets it: images with their settings, and bad input refused in one line with exit code 2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image


def diffrt(*args, cwd=None) -> subprocess.CompletedProcess:
    """The CLI in this process (conftest.run_cli); the tests that need a real process start one themselves."""
    return run_cli(*args, cwd=cwd)


def diffrt_process(*args, cwd=None) -> subprocess.CompletedProcess:
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
    proc = diffrt_process("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("diffrt ")


def test_generate_writes_png_with_a1111_parameters(tiny_package, tmp_path):
    out = tmp_path / "cat.png"
    proc = diffrt_process("generate", "a red cat", "--model", tiny_package, "--steps", 3, "--seed", 42, "--negative", "blurry",
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
    (["--scheduler", "heun++"], ["unknown scheduler 'heun++'", "dpmpp_2m_karras", "Euler a"]),
    (["--rng", "torch"], ["--rng", "invalid choice", "torch-cpu"]),
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
    (["--gpu-mem-limit", "2"], ["backend does not take --gpu-mem-limit: leave it out or use --backend ort-cuda"]),
    (["--backend", "tensorrt"], ["invalid choice"]),
    (["--cuda-graph", "--backend", "ort-cpu"], ["the ort-cpu backend does not take --cuda-graph"]),
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
    for backend in ("ort-cpu", "ov-cpu"):
        assert_refused(diffrt("generate", "a cat", "--model", garbled, "--backend", backend), "could not be loaded by", "corrupt")


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




def test_invalid_utf8_prompt_is_refused_before_any_work(tiny_package, tmp_path):
    proc = subprocess.run([sys.executable.encode(), b"-m", b"diffrt.runtime.cli", b"generate", b"a \xff\xfe cat", b"--model",
                           str(tiny_package).encode(), b"-o", str(tmp_path / "x.png").encode()], capture_output=True, timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and len(err.strip().splitlines()) == 1 and "not valid UTF-8" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_folder_output_info_and_from(tiny_package, tmp_path):
    """-o FOLDER numbers the images by seed; `diffrt info` reads one back; `generate --from` makes it again."""
    proc = diffrt("generate", "a red cat", "--model", tiny_package, "--steps", 2, "--seed", 7, "-n", 2, "-q",
                  "--scheduler", "euler A", "-o", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00001-7.png", "00002-8.png"]
    info = diffrt("info", tmp_path / "00002-8.png")
    assert info.returncode == 0 and '"seed": 8' in info.stdout and "diffrt generate --from" in info.stdout
    assert '"scheduler": "euler_a"' in info.stdout
    again = diffrt("generate", "--from", tmp_path / "00002-8.png", "--model", tiny_package, "-q", "-o", tmp_path / "again.png")
    assert again.returncode == 0, again.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), np.asarray(Image.open(tmp_path / "00002-8.png")))
    pkg = diffrt("info", tiny_package)
    assert pkg.returncode == 0 and "unet: fp32, attention mha" in pkg.stdout and "TensorRT engines: none built" in pkg.stdout
    assert_refused(diffrt("generate", "--model", tiny_package), "give a prompt")
    (tmp_path / "plain.png").write_bytes((tmp_path / "00001-7.png").read_bytes()[:100])
    assert_refused(diffrt("info", tmp_path / "plain.png"), "could not be read as an image")


def test_random_seed_is_printed(tiny_package, tmp_path):
    proc = diffrt("generate", "a cat", "--model", tiny_package, "--steps", 1, "--seed", -1, "-q", "-o", tmp_path / "r.png")
    assert proc.returncode == 0 and "random seed" in proc.stderr
    seed = int(proc.stderr.split("random seed")[1].split()[0])
    from diffrt.runtime.images import read_settings

    assert read_settings(tmp_path / "r.png")["seed"] == seed


def test_help_shows_defaults_and_every_option_has_help():
    proc = diffrt("generate", "--help")
    assert proc.returncode == 0
    import json

    from diffrt.runtime.bundled import bundled_model

    steps = json.loads((bundled_model() / "diffrt.json").read_text())["defaults"]["steps"]
    assert f"--steps STEPS default: the model's own; the bundled model's is {steps} " in " ".join(proc.stdout.split())
    parser = __import__("diffrt.runtime.cli", fromlist=["build_parser"]).build_parser()
    for action in parser._subparsers._group_actions[0].choices.values():
        for option in action._actions:
            assert option.help, f"{action.prog} {option.option_strings or option.dest} has no help line"


@pytest.mark.parametrize("after", [0.3, 2.0])
def test_ctrl_c_is_one_line_on_its_own(tiny_package, tmp_path, after):
    """Ctrl-C while onnxruntime loads or mid-denoising: exit 130, 'interrupted' on a line of its own, no traceback,
    no image file."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "diffrt.runtime.cli", "generate", "a cat", "--model", str(tiny_package),
                             "--steps", "999", "--scheduler", "euler", "--width", "64", "--height", "64",
                             "-o", str(tmp_path / "x.png")], stderr=subprocess.PIPE, text=True)
    time.sleep(after)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.endswith("diffrt: interrupted\n") and "\rdenoising" not in err.splitlines()[-1]
    assert not list(tmp_path.iterdir())


def test_a_size_this_machine_cannot_hold_is_refused_up_front(tiny_package, tmp_path, monkeypatch):
    """4096x4096 with the VAE whole passes the size rules but not the memory of a machine with 4 GB free: one line
    naming the largest size that fits, no traceback."""
    from diffrt.runtime import budget

    monkeypatch.setattr(budget, "room_bytes", lambda: 4 * 2**30)
    assert_refused(diffrt("generate", "a cat", "--model", tiny_package, "--width", 4096, "--height", 4096, "--backend",
                          "ort-cpu", "--vae-tiling", "off", "-o", tmp_path / "x.png"),
                   "4096x4096 needs about ", " GB and this machine has 4 GB free", "largest square size that fits",
                   "this model was made for 32x32")


def test_a_size_far_from_the_models_is_one_plain_warning(tiny_package, tmp_path):
    proc = diffrt("generate", "a cat", "--model", tiny_package, "--steps", 1, "--width", 128, "--height", 128, "-q",
                  "-o", tmp_path / "x.png")
    assert proc.returncode == 0, proc.stderr
    warning = [line for line in proc.stderr.splitlines() if "far from" in line]
    assert warning == ["diffrt: warning: 128x128 is far from the 32x32 this model was made for; expect repeated or "
                       "broken-up subjects"]


def test_a_missing_extra_is_named_before_any_work():
    from diffrt.runtime.cli import require
    from diffrt.runtime.errors import UserError

    with pytest.raises(UserError, match=r'no_such_module_for_diffrt is not installed.*pip install "diffrt\[bench\]"'):
        require("bench", "json", "no_such_module_for_diffrt")
    require("bench", "json")


def test_a_long_prompt_is_read_whole(tiny_package, tmp_path):
    """Past 75 tokens a prompt goes on in another chunk (A1111's way), not cut: no warning, and what comes after the
    first 75 tokens changes the image."""
    long = " ".join(["a red house"] * 40)
    for name, prompt in (("long.png", long), ("longer.png", long + " under a green sky")):
        proc = diffrt("generate", prompt, "--model", tiny_package, "--steps", 1, "--seed", 1, "-q", "-o", tmp_path / name)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "long.png")), np.asarray(Image.open(tmp_path / "longer.png")))


def test_img2img_from_the_command_line(tiny_package, tmp_path):
    from diffrt.runtime.images import read_settings

    Image.fromarray(np.full((32, 40, 3), 200, np.uint8)).save(tmp_path / "in.png")
    proc = diffrt("generate", "a cat", "--model", tiny_package, "--image", tmp_path / "in.png", "--strength", 0.5,
                  "--steps", 4, "--seed", 1, "-q", "-o", tmp_path / "out.png")
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "out.png").size == (40, 32)
    settings = read_settings(tmp_path / "out.png")
    assert settings["strength"] == 0.5 and settings["image"] == "in.png"
    Image.fromarray(np.full((33, 40, 3), 200, np.uint8)).save(tmp_path / "odd.png")
    assert_refused(diffrt("generate", "a cat", "--model", tiny_package, "--image", tmp_path / "odd.png", "-o",
                          tmp_path / "x.png"), "40x33", "--resize")
    assert_refused(diffrt("generate", "a cat", "--model", tiny_package, "--image", tmp_path / "in.png", "--strength", 2,
                          "-o", tmp_path / "y.png"), "strength must be")


def test_inpainting_from_the_command_line(tiny_package, tmp_path):
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, :16] = 180
    Image.fromarray(image).save(tmp_path / "in.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    for blur in (0, 3):
        proc = diffrt("generate", "a cat", "--model", tiny_package, "--image", tmp_path / "in.png", "--mask",
                      tmp_path / "mask.png", "--mask-blur", blur, "--strength", 1, "--steps", 3, "--seed", 2, "-q",
                      "-o", tmp_path / f"out{blur}.png")
        assert proc.returncode == 0, proc.stderr
    # --from takes the same image, mask, blur and strength again: the same image, not a text-to-image one
    again = diffrt("generate", "--from", tmp_path / "out3.png", "--model", tiny_package, "-q", "-o", tmp_path / "again.png")
    assert again.returncode == 0, again.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), np.asarray(Image.open(tmp_path / "out3.png")))
    img2img = diffrt("generate", "a dog", "--model", tiny_package, "--image", tmp_path / "in.png", "--strength", 0.6,
                     "--steps", 4, "--seed", 5, "-q", "-o", tmp_path / "i2i.png")
    assert img2img.returncode == 0, img2img.stderr
    again = diffrt("generate", "--from", tmp_path / "i2i.png", "--model", tiny_package, "-q", "-o", tmp_path / "i2i-again.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "i2i-again.png")), np.asarray(Image.open(tmp_path / "i2i.png")))
    (tmp_path / "in.png").rename(tmp_path / "moved.png")
    assert_refused(diffrt("generate", "--from", tmp_path / "i2i.png", "--model", tiny_package, "-o", tmp_path / "y.png"),
                   "the image was made from the image", "give it with --image FILE")
    moved = diffrt("generate", "--from", tmp_path / "i2i.png", "--image", tmp_path / "moved.png", "--model", tiny_package,
                   "-q", "-o", tmp_path / "i2i-moved.png")
    assert moved.returncode == 0, moved.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "i2i-moved.png")), np.asarray(Image.open(tmp_path / "i2i.png")))
    assert_refused(diffrt("generate", "a cat", "--model", tiny_package, "--mask", tmp_path / "mask.png", "-o",
                          tmp_path / "x.png"), "needs an image")


def test_samplers_are_listed_and_a1111_names_reproduce(tiny_package, tmp_path):
    """`diffrt samplers` lists every sampler with its AUTOMATIC1111 and diffusers names; an A1111 name works in
    --scheduler, goes into the image's metadata as A1111 writes it, and `--from` makes the image again (a stochastic
    two-call sampler: its noise comes from the image's own seed)."""
    from diffrt.runtime.schedulers import SAMPLERS

    listing = diffrt("samplers")
    assert listing.returncode == 0, listing.stderr
    for short, (cls, _, a1111) in SAMPLERS.items():
        assert any(line.split()[0] == short and a1111 in line and cls.class_name in line for line in listing.stdout.splitlines())
    proc = diffrt("generate", "a red cat", "--model", tiny_package, "--steps", 3, "--seed", 4, "-n", 2, "-q",
                  "--scheduler", "dpm2 A karras", "--rng", "torch-cuda", "-o", tmp_path)
    assert proc.returncode == 0, proc.stderr
    made = tmp_path / "00002-5.png"
    assert "Sampler: DPM2 a Karras" in Image.open(made).info["parameters"]
    assert "RNG: GPU" in Image.open(made).info["parameters"] and '"rng": "torch-cuda"' in Image.open(made).info["diffrt"]
    again = diffrt("generate", "--from", made, "--model", tiny_package, "-q", "-o", tmp_path / "again.png")
    assert again.returncode == 0, again.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), np.asarray(Image.open(made)))
    assert_refused(diffrt("generate", "x", "--model", tiny_package, "--scheduler", "DPM++ 3M"), "unknown scheduler")
    # a reader that stops before diffrt writes (`| head`, `| true`): a quiet end, not a BrokenPipeError traceback
    piped = subprocess.run(["bash", "-c", f"set -o pipefail; {sys.executable} -m diffrt.runtime.cli samplers | true"],
                           capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0 and "Traceback" not in piped.stderr, piped.stderr


@pytest.mark.parametrize("args, fragment", [
    (["bench", "--size", "64"], "'64' is not WIDTHxHEIGHT"),
    (["quantize", "pkg", "out", "--precision", "int8", "--size", "100x7"], "positive multiples of 8"),
    (["quantize", "pkg", "out", "--precision", "int8", "--gate-seeds", "0"], "--gate-seeds"),
    (["quantize", "pkg", "out", "--precision", "int8", "--cuda-fusions"], "use it with --precision fp16"),
    (["generate", "x", "--model", "pkg", "--strength", "0.5"], "--strength only applies to image-to-image"),
    (["generate", "x", "--model", "pkg", "--resize", "--mask-blur", "2"], "--mask-blur, --resize only apply to"),
    (["generate", "x", "--model", "pkg", "--image", "in.png", "--mask-blur", "2"], "--mask-blur blurs the edge of an "
                                                                                   "inpainting mask: give --mask"),
])
def test_bench_and_quantize_sizes_are_checked(args, fragment, tmp_path):
    assert_refused(diffrt(*args, cwd=tmp_path), fragment)
