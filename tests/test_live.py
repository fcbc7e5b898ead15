"""Live progress: the step callback and previews (Python), --preview (CLI), and over HTTP, as real clients meet them:
the OpenAI SDK's streamed images, A1111's progress / interrupt / options, and jobs with events and cancel."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import exported, make_tiny_flux_checkpoint, make_tiny_sd3_checkpoint, run_cli
from PIL import Image

from diffrt.runtime.pipeline import Pipeline
from diffrt.runtime.stream import Cancelled


def r2(pred: np.ndarray, ref: np.ndarray) -> float:
    """How much of ref's variance pred explains (1: all; 0: no better than ref's mean colour)."""
    return float(1 - ((pred - ref) ** 2).sum() / ((ref - ref.mean(axis=(0, 1, 2))) ** 2).sum())


def pooled(images: np.ndarray, factor: int) -> np.ndarray:
    """(n, H, W, 3) averaged over factor x factor blocks: what one latent pixel covers."""
    n, h, w, _ = images.shape
    return images.reshape(n, h // factor, factor, w // factor, factor, 3).mean(axis=(2, 4))


@pytest.fixture(scope="module")
def bundled():
    return Pipeline.from_package(None, backend="ort-cpu")


def as_array(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im, np.float32) / 255 for im in images])


def test_the_callback_sees_every_nth_step_and_the_last_and_can_cancel(bundled):
    seen = []
    result = bundled("a red circle", seed=2, steps=7, callback=lambda p: seen.append((p.step, p.total, p.latents.copy())),
                     callback_every=3)
    assert [(s, t) for s, t, _ in seen] == [(3, 7), (6, 7), (7, 7)]
    assert np.array_equal(seen[-1][2], result.latents)  # the latents as they stood after that step
    assert not np.array_equal(seen[0][2], seen[1][2])
    with pytest.raises(Cancelled, match="step 2 of 7"):
        bundled("a red circle", seed=2, steps=7, callback=lambda p: p.step < 2)
    again = bundled("a red circle", seed=2, steps=7)  # the pipeline is whole after a cancelled call
    assert np.array_equal(again.array, result.array)
    with pytest.raises(Exception, match="callback_every"):
        bundled("a red circle", callback=print, callback_every=0)


def test_previews_look_like_the_image_they_become(bundled):
    """The latent->RGB map on prompts and seeds it never saw decoded: the preview of the final latents explains most
    of the final image's colours (A1111's Approx cheap is of this kind), and each preview is closer to its own image
    than to another's; mid-way previews are the image's size and change as the image forms."""
    prompts = ["a purple star on a grey background", "a yellow triangle on a black background",
               "a red circle on a blue background", "a green square on a white background"]
    fresh = Pipeline.from_package(None, backend="ort-cpu")
    held_out = fresh(prompts, seed=103)
    mids = []
    bundled(prompts[::-1], seed=3, callback=lambda p: mids.append(as_array(p.preview())), callback_every=5)
    f = bundled.package.vae_scale_factor
    final = pooled(held_out.array, f)
    preview = pooled(as_array(bundled.preview(held_out.latents, *held_out.array.shape[2:0:-1])), f)
    assert r2(preview, final) > 0.35, r2(preview, final)
    own = [np.abs(preview[i] - final[i]).mean() for i in range(4)]
    other = [np.abs(preview[i] - final[(i + 1) % 4]).mean() for i in range(4)]
    assert all(a < b for a, b in zip(own, other)), (own, other)
    assert mids[0].shape == held_out.array.shape and not np.allclose(mids[0], mids[-1])


def test_the_latent_rgb_map_recovers_a_linear_decoder():
    """Least squares over both sets of latent pixels: a decoder that is linear per latent pixel is found exactly."""
    from diffrt.runtime.preview import LatentRGB

    rng = np.random.default_rng(0)
    weights = rng.normal(0, 0.3, (17, 3)).astype(np.float32)

    def decode(z: np.ndarray) -> np.ndarray:  # each latent pixel's colour over its 2x2 pixels
        rgb = np.einsum("nchw,cd->ndhw", z, weights[:-1]) + weights[-1][None, :, None, None]
        return rgb.repeat(2, axis=2).repeat(2, axis=3)

    fitted = LatentRGB(16)
    for kind in ("prior", "own"):
        z = rng.standard_normal((2, 16, 6, 5)).astype(np.float32)
        fitted.learn(z, decode(z), kind)
    assert fitted.has_prior and np.abs(fitted.weights - weights).max() < 1e-4
    z = rng.standard_normal((1, 16, 3, 4)).astype(np.float32)
    assert np.allclose(fitted(z), np.clip(decode(z)[:, :, ::2, ::2].transpose(0, 2, 3, 1) / 2 + 0.5, 0, 1), atol=1e-4)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_previews_of_16_channel_families(family, tmp_path_factory):
    """SD3 and FLUX (16 latent channels, a VAE shift; FLUX's transformer sees packed tokens) preview through the same
    map in the decoder's latent space: the image's size, one per image, and once the pipeline has decoded the image
    the map follows it better than the synthetic prior alone (with random VAE weights no linear map follows an
    image closely, so this is all a tiny model can show)."""
    make = make_tiny_sd3_checkpoint if family == "sd3" else make_tiny_flux_checkpoint
    package = exported(make(tmp_path_factory.mktemp(f"{family}-preview-ckpt")), tmp_path_factory, f"{family}-preview")
    fresh, pipe = (Pipeline.from_package(package, backend="ort-cpu") for _ in range(2))
    result = pipe(["a red cat", "a blue dog"], seed=3, steps=3, width=64, height=32)
    f = pipe.package.vae_scale_factor
    final = pooled(result.array, f)
    before = as_array(fresh.preview(result.latents, 64, 32))
    assert before.shape == result.array.shape and not np.allclose(before[0], before[1])
    assert r2(pooled(as_array(pipe.preview(result.latents, 64, 32)), f), final) > r2(pooled(before, f), final)


def test_cli_preview_file_is_rewritten_whole(tmp_path):
    out, preview = tmp_path / "out.png", tmp_path / "live.png"
    done = run_cli("generate", "a red circle", "--seed", "4", "--steps", "6", "-n", "2", "-o", str(out), "--preview",
                   str(preview), "--preview-every", "2")
    assert done.returncode == 0, done.stderr
    image = Image.open(preview)
    assert image.size == (2 * 64, 64)  # both images side by side
    assert "ETA" in done.stderr and not list(tmp_path.glob(".*partial"))
    for args, fragment in ((["--preview-every", "2"], "give --preview"), (["--preview", str(tmp_path / "p.gif")], ".png"),
                           (["--preview", "/sys/p.png"], "not writable"), (["--preview", str(tmp_path)], "a file")):
        bad = run_cli("generate", "a cat", "-o", str(tmp_path / "x.png"), *args)
        assert bad.returncode == 2 and fragment in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert not (tmp_path / "x.png").exists()
