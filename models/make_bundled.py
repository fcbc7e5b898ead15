"""Turn the trained shapes checkpoint into the bundled package models/shapes-tiny (run after train_shapes.py).

    python models/make_bundled.py [--checkpoint models/build/shapes-checkpoint]

Weights are rounded to float16 (so the package can store them as float16 losslessly and stay small) and
exported with diffrt's own exporter; the model card (README.md, card/) is kept across re-exports.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from diffrt.export import ExportOptions, export_package

HERE = Path(__file__).resolve().parent
DEFAULTS = {"steps": 20, "guidance_scale": 4.0, "scheduler": "ddim"}


def round_weights_fp16(source: Path, dest: Path) -> Path:
    pipe = StableDiffusionPipeline.from_pretrained(source)
    with torch.no_grad():
        for module in (pipe.text_encoder, pipe.unet, pipe.vae):
            for p in module.parameters():
                p.copy_(p.half().float())
    pipe.save_pretrained(dest)
    return dest


def plot_curve(training_json: Path, out: Path) -> None:
    """The UNet's training loss (moving average per logging interval) as a PNG for the model card."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = json.loads(training_json.read_text())["curve"]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([c["step"] for c in curve], [c["loss"] for c in curve])
    ax.set_xlabel("UNet step")
    ax.set_ylabel("noise-prediction MSE")
    ax.set_yscale("log")
    ax.set_title("shapes-tiny training")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=HERE / "build" / "shapes-checkpoint")
    ap.add_argument("--out", type=Path, default=HERE / "shapes-tiny")
    args = ap.parse_args(argv)
    rounded = round_weights_fp16(args.checkpoint, HERE / "build" / "shapes-checkpoint-fp16w")
    keep = Path(tempfile.mkdtemp())
    for name in ("README.md", "card"):
        if (args.out / name).exists():
            shutil.move(str(args.out / name), keep / name)
    try:
        export_package(rounded, args.out, ExportOptions(components=("text_encoder", "unet", "vae_decoder"), overwrite=True,
                                                        weights_fp16=True, name="shapes-tiny", defaults=DEFAULTS))
    finally:
        for item in keep.iterdir():
            target = args.out / item.name
            if not target.exists():
                shutil.move(str(item), target)
    manifest = json.loads((args.out / "diffrt.json").read_text())
    manifest["source"]["checkpoint"] = rounded.name  # a shipped manifest names no path of the machine that made it
    (args.out / "diffrt.json").write_text(json.dumps(manifest, indent=1) + "\n")
    if (args.checkpoint / "training.json").is_file():
        plot_curve(args.checkpoint / "training.json", args.out / "card" / "curve.png")
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"{args.out}: {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
