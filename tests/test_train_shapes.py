"""The bundled model's training script, run end to end at toy size (a few steps of each stage)."""

from __future__ import annotations

import json

from diffrt.models.train_shapes import main
from diffrt.runtime.schedulers import make_scheduler


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
