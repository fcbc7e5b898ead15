"""Export: a diffusers checkpoint folder becomes a model package (ONNX per component, checked, with a manifest)."""

from __future__ import annotations

import errno
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffrt.runtime.errors import UserError
from diffrt.runtime.files import ordinary_mode
from diffrt.runtime.package import COMPONENTS, required

COMPONENT_ORDER = COMPONENTS


@dataclass
class ExportOptions:
    components: tuple[str, ...] | None = None  # None: every component the checkpoint has
    opset: int = 17
    # "auto": TorchScript, but dynamo for a model whose float32 weights pass BIG_MODEL_BYTES (TorchScript's export
    # holds about 2.4x the weights in memory, dynamo's about 1.1x: the SDXL UNet's 10 GB would not fit in 24 GB)
    exporter: str = "auto"
    overwrite: bool = False
    check: bool = True
    # "mha": onnxruntime's fused MultiHeadAttention (fast on CUDA, CUDA graphs); "plain": MatMul/Softmax (TensorRT);
    # "auto": mha with the torchscript exporter, plain with dynamo
    attention: str = "auto"
    weights_fp16: bool = False  # store weights as float16, compute in float32 (see export/weights.py)
    weights_fp32: bool = False  # a streamed (large) model's 16-bit weights written as float32, not behind Casts
    name: str | None = None
    loras: list = field(default_factory=list)  # LoraChoice: merged into the weights before export
    defaults: dict[str, Any] = field(default_factory=dict)
    controlnets: list[Path] = field(default_factory=list)  # ControlNetModel folders: added, and the UNet takes residuals


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _prepare_out(out: Path, overwrite: bool) -> Path:
    """A fresh temporary folder beside out, after checking that out may be (re)written."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder; choose another output folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output folder {out} exists and is not empty; pass --overwrite to replace it or choose another")
    if not out.parent.is_dir():
        raise UserError(f"the folder {out.parent} that should hold {out.name} does not exist; create it first")
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))


def _publish(tmp: Path, out: Path) -> None:
    """Swap the finished package into place; the old one is removed only once the new one is there."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{int(time.time())}")
        out.rename(old)
    tmp.chmod(ordinary_mode(0o777))  # mkdtemp makes 0700; a package is an ordinary folder
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_package(checkpoint: str | Path, out: str | Path, options: ExportOptions | None = None,
                   log: Callable[[str], None] = _log) -> Path:
    """Export every asked component, check it against PyTorch, and write the package atomically."""
    options = options or ExportOptions()
    if options.components is not None:
        unknown = set(options.components) - set(COMPONENT_ORDER)
        if unknown:
            raise UserError(f"unknown components {sorted(unknown)}; choose from {', '.join(COMPONENT_ORDER)}")
    if options.exporter not in ("auto", "torchscript", "dynamo"):
        raise UserError(f"unknown exporter {options.exporter!r}; use auto, torchscript or dynamo")
    if options.attention not in ("auto", "mha", "plain"):
        raise UserError(f"unknown attention form {options.attention!r}; use mha (onnxruntime) or plain (TensorRT, dynamo)")
    if options.attention == "mha" and options.exporter == "dynamo":
        raise UserError("--attention mha needs the torchscript exporter; with --exporter dynamo pass --attention plain")
    if options.weights_fp16 and options.weights_fp32:
        raise UserError("--weights-fp16 and --weights-fp32 ask for opposite storage; give one of them")
    if not 14 <= options.opset <= 21:
        raise UserError(f"opset {options.opset} is outside 14..21; TensorRT 10 parses opset 17 best")
    from .checkpoint import open_checkpoint

    ckpt = open_checkpoint(checkpoint)
    options.components = ckpt.components if options.components is None else options.components
    for needed in required(ckpt.family):
        if needed not in options.components:
            family = {"sdxl": "an SDXL", "sd2": "an SD 2.x", "sd1": "an SD 1.x", "sd3": "an SD3", "flux": "a FLUX.1"}.get(ckpt.family, "a")
            raise UserError(f"{family} package needs {needed}; add it to --components")
    if options.loras and ckpt.denoiser != "unet":
        raise UserError(f"LoRAs on {ckpt.family} models are not supported yet; export without --lora")
    if options.loras:
        from .lora_merge import check_loras

        check_loras(options.loras, ckpt.components)
    for name in options.components:
        if name not in ckpt.components:
            raise UserError(f"{ckpt.root} has no {name} (this {ckpt.family} checkpoint has "
                            f"{', '.join(ckpt.components)}); leave it out of --components")
    if options.controlnets:
        from .controlnet import with_controlnets

        options.components = (*options.components, *with_controlnets(ckpt, [Path(f) for f in options.controlnets]))
    out = Path(out).expanduser()
    tmp = _prepare_out(out, options.overwrite)
    try:
        from .writer import write_package

        write_package(ckpt, tmp, options, log, out.name)
        _publish(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise UserError(f"no space left on the device holding {out.parent} while exporting; free some space "
                            "and export again (nothing was written)") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"package written to {out}")
    return out


__all__ = ["ExportOptions", "export_package", "COMPONENT_ORDER"]
