"""A tiny decoder in a package: diffusers' AutoencoderTiny (TAESD, TAESDXL, TAESD3, TAEF1 weights, which users bring
as a folder) exported as the `tiny_vae_decoder` component, checked against PyTorch, for previews and fast decodes.

It decodes the sampler's latents directly (AutoencoderTiny's scaling factor is 1 and its shift 0: diffusers'
pipelines hand it the latents as they are) into images in [-1, 1], like the package's own VAE decoder."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from diffrt.runtime.errors import UserError
from diffrt.runtime.files import ordinary_mode
from diffrt.runtime.package import MANIFEST, load_package

COMPONENT = "tiny_vae_decoder"
TOLERANCE = 1e-3


def load_tiny(folder: Path) -> Any:
    """The AutoencoderTiny saved in folder (config.json and its weights), refused in one line otherwise."""
    from diffusers import AutoencoderTiny

    config = folder / "config.json"
    if not config.is_file():
        raise UserError(f"{folder} has no config.json; give the folder of an AutoencoderTiny (TAESD) model")
    kind = json.loads(config.read_text()).get("_class_name")
    if kind != "AutoencoderTiny":
        raise UserError(f"{folder} holds a {kind or 'model of no known class'}, not an AutoencoderTiny (TAESD, TAESDXL, "
                        "TAESD3 or TAEF1)")
    return AutoencoderTiny.from_pretrained(folder).eval()


def check_fits(tiny: Any, package: Any) -> None:
    """The tiny decoder must take the package's latent channels and enlarge by its VAE's factor."""
    cfg = tiny.config
    factor = cfg.upsampling_scaling_factor ** (len(cfg.decoder_block_out_channels) - 1)
    if cfg.latent_channels != package.latent_channels or factor != package.vae_scale_factor:
        raise UserError(f"the tiny decoder takes {cfg.latent_channels} latent channels and enlarges {factor}x; this "
                        f"package's VAE has {package.latent_channels} and {package.vae_scale_factor}x: use the tiny "
                        "decoder made for this model family (TAESD for SD 1.x/2.x, TAESDXL, TAESD3, TAEF1)")


def export_decoder(tiny: Any, channels: int, path: Path) -> dict[str, Any]:
    """The decoder as ONNX (any batch and size) at path, and its check against PyTorch on two shapes."""
    import onnxruntime as ort
    import torch

    class Decode(torch.nn.Module):
        def __init__(self, model) -> None:
            super().__init__()
            self.model = model

        def forward(self, latent_sample):
            return self.model.decode(latent_sample).sample

    module = Decode(tiny).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(module, (torch.zeros(1, channels, 8, 8),), str(path), input_names=["latent_sample"],
                          output_names=["sample"], opset_version=17, dynamo=False,
                          dynamic_axes={"latent_sample": {0: "batch", 2: "height", 3: "width"},
                                        "sample": {0: "batch", 2: "image_height", 3: "image_width"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for shape in ((1, channels, 8, 8), (2, channels, 6, 10)):
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.no_grad():
            want = module(latents).numpy()
        got = session.run(["sample"], {"latent_sample": latents.numpy()})[0]
        worst = max(worst, float(np.abs(got - want).max()))
    if worst > TOLERANCE:
        raise UserError(f"the tiny decoder's graph differs from PyTorch by {worst:.2e}, over {TOLERANCE:g}")
    return {"max_abs": worst, "tolerance": TOLERANCE, "passed": True}


def add_tiny_vae(package_dir: Path, folder: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Export the AutoencoderTiny in folder into the package (replacing one it has) and record it in the manifest."""
    from .writer import file_hashes, graph_io

    package_dir, folder = Path(package_dir), Path(folder)
    package = load_package(package_dir)
    tiny = load_tiny(folder)
    check_fits(tiny, package)
    log(f"{COMPONENT}: exporting {folder}")
    with tempfile.TemporaryDirectory(dir=package_dir, prefix=f".{COMPONENT}.") as staging:
        path = Path(staging) / "model.onnx"
        check = export_decoder(tiny, package.latent_channels, path)
        log(f"{COMPONENT}: onnxruntime vs PyTorch max abs {check['max_abs']:.2e}: ok")
        shutil.rmtree(package_dir / COMPONENT, ignore_errors=True)
        shutil.move(staging, package_dir / COMPONENT)
        (package_dir / COMPONENT).chmod(ordinary_mode(0o777))  # mkdtemp makes 0700; a package is an ordinary folder
        Path(staging).mkdir()  # for the context manager's own clean-up
    manifest = json.loads((package_dir / MANIFEST).read_text(encoding="utf-8"))
    manifest["components"][COMPONENT] = {"file": f"{COMPONENT}/model.onnx", "precision": "fp32",
                                         "made_by": "torch.onnx torchscript", "source": str(folder.resolve()),
                                         "check": check, **graph_io(package_dir / COMPONENT / "model.onnx")}
    manifest["files"] = file_hashes(package_dir)
    (package_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest["components"][COMPONENT]
