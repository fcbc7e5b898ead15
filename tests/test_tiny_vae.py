"""The tiny decoder (diffusers' AutoencoderTiny: TAESD and kin) as a package component: export and its check,
decodes equal to diffusers', previews from it, `--decoder tiny`, and the refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from conftest import run_cli  # noqa: E402

from diffrt.runtime.pipeline import Pipeline  # noqa: E402


def make_tiny_vae(folder, upsamples: int = 1, channels: int = 4, seed: int = 0):
    """A random AutoencoderTiny enlarging 2**upsamples times, saved in folder (the tiny package's VAE enlarges 2x)."""
    torch.manual_seed(seed)
    blocks = upsamples + 1
    model = diffusers.AutoencoderTiny(latent_channels=channels, encoder_block_out_channels=(16,) * blocks,
                                      decoder_block_out_channels=(16,) * blocks, num_encoder_blocks=(1,) * blocks,
                                      num_decoder_blocks=(1,) * blocks)
    model.save_pretrained(folder)
    return model.eval()


@pytest.fixture(scope="module")
def with_tiny(tiny_package, tmp_path_factory):
    """A copy of the tiny package with a tiny decoder added by the CLI, and the diffusers model it came from."""
    root = tmp_path_factory.mktemp("tiny-vae")
    package = shutil.copytree(tiny_package, root / "pkg")
    model = make_tiny_vae(root / "taesd")
    done = run_cli("tiny-vae", "add", str(package), str(root / "taesd"))
    assert done.returncode == 0, done.stderr
    return package, model, root


def test_the_tiny_decoder_is_exported_checked_and_recorded(with_tiny):
    package, _, _ = with_tiny
    manifest = json.loads((package / "diffrt.json").read_text())
    entry = manifest["components"]["tiny_vae_decoder"]
    assert entry["check"]["passed"] and entry["check"]["max_abs"] <= 1e-3
    assert "tiny_vae_decoder/model.onnx" in manifest["files"]
    done = run_cli("info", str(package))
    assert done.returncode == 0, done.stderr


def test_decoder_tiny_equals_diffusers_autoencoder_tiny(with_tiny):
    """`decoder="tiny"`: the final image is diffusers' AutoencoderTiny.decode of the same latents (max |Δ| ≤ 1e-3),
    and it differs from the model's own VAE's; previews come from the tiny decoder too."""
    package, model, _ = with_tiny
    pipe = Pipeline.from_package(package, backend="ort-cpu")
    tiny = pipe("a red house", seed=3, steps=3, width=32, height=48, decoder="tiny")
    with torch.no_grad():
        want = model.decode(torch.from_numpy(tiny.latents)).sample.numpy()
    want = np.clip(want / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    assert np.abs(tiny.array - want).max() <= 1e-3
    assert tiny.settings["decoder"] == "tiny"
    own = pipe("a red house", seed=3, steps=3, width=32, height=48)
    assert np.array_equal(own.latents, tiny.latents) and np.abs(own.array - tiny.array).max() > 0.05
    preview = np.stack([np.asarray(im, np.float32) / 255 for im in pipe.preview(tiny.latents, 32, 48)])
    assert np.abs(preview - want).max() <= 1 / 255 + 1e-6


def test_tiny_decoder_refusals(with_tiny, tiny_package, tmp_path):
    package, _, root = with_tiny
    bad = run_cli("generate", "a cat", "--model", str(tiny_package), "--decoder", "tiny", "-o", str(tmp_path / "a.png"))
    assert bad.returncode == 2 and "tiny-vae add" in bad.stderr and "Traceback" not in bad.stderr
    make_tiny_vae(tmp_path / "taesd8", upsamples=3)  # TAESD's own 8x: not this package's 2x
    bad = run_cli("tiny-vae", "add", str(package), str(tmp_path / "taesd8"))
    assert bad.returncode == 2 and "enlarges 8x" in bad.stderr and "2x" in bad.stderr
    bad = run_cli("tiny-vae", "add", str(package), str(tmp_path))
    assert bad.returncode == 2 and "config.json" in bad.stderr
    bad = run_cli("tiny-vae", "add", str(package), str(package / "unet"))
    assert bad.returncode == 2 and ("AutoencoderTiny" in bad.stderr or "config.json" in bad.stderr)
    ok = run_cli("generate", "a cat", "--model", str(package), "--decoder", "tiny", "--steps", "2", "-o", str(tmp_path / "b.png"))
    assert ok.returncode == 0, ok.stderr


@pytest.mark.slow
def test_export_with_a_tiny_vae(tiny_checkpoint, tmp_path):
    make_tiny_vae(tmp_path / "taesd")
    done = run_cli("export", str(tiny_checkpoint), str(tmp_path / "pkg"), "--tiny-vae", str(tmp_path / "taesd"))
    assert done.returncode == 0, done.stderr
    assert "tiny_vae_decoder" in json.loads((tmp_path / "pkg" / "diffrt.json").read_text())["components"]
    bad = run_cli("export", str(tiny_checkpoint), str(tmp_path / "pkg2"), "--tiny-vae", str(tmp_path / "nowhere"))
    assert bad.returncode == 2 and "config.json" in bad.stderr and not (tmp_path / "pkg2").exists()
