"""The bundled model's training script, run end to end at toy size (a few steps of each stage)."""

from __future__ import annotations

import json

import pytest

from diffrt.models.train_shapes import main
from diffrt.runtime.schedulers import make_scheduler


@pytest.mark.slow
def test_zero_snr_run_writes_a_checkpoint_the_runtime_schedules(tmp_path):
    out = tmp_path / "ckpt"
    main(["--images", "64", "--vae-steps", "2", "--vae-batch", "2", "--refine-steps", "1", "--final-refine-steps", "0",
          "--unet-steps", "4", "--unet-batch", "2", "--snapshot-every", "2", "--zero-snr", "--out", str(out)])
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (config["prediction_type"], config["rescale_betas_zero_snr"], config["timestep_spacing"]) == \
        ("v_prediction", True, "trailing")
    scheduler = make_scheduler(None, config)
    scheduler.set_timesteps(20)
    assert scheduler.timesteps[0] == 999 and scheduler.alphas_cumprod[999] == 0.0
    assert (out / "snapshot-2" / "unet").is_dir() and not (out / "snapshot-4").exists()
    assert len(json.loads((out / "training.json").read_text())["curve"]) == 4


@pytest.mark.slow
def test_encoder_script_adds_a_vae_encoder_the_runtime_uses(tmp_path):
    """train_encoder at toy size on a copy of the bundled package without its encoder: the package gains one (in its
    manifest, hashes and all) and image-to-image runs on it; text-to-image stays the same."""
    import numpy as np
    from conftest import bundled_without

    from diffrt.models.train_encoder import main as train_encoder
    from diffrt.runtime.pipeline import Pipeline

    package = bundled_without(tmp_path / "shapes")
    before = Pipeline.from_package(package, backend="ort-cpu")("a red circle", seed=3, steps=4).array
    train_encoder(["--package", str(package), "--pairs", "16", "--steps", "4"])
    pipe = Pipeline.from_package(package, backend="ort-cpu", verify_hashes=True)
    assert np.array_equal(pipe("a red circle", seed=3, steps=4).array, before)
    assert pipe("a blue circle", image=pipe("a red circle", seed=3).images[0], strength=0.5, seed=1).images[0].size == (64, 64)
