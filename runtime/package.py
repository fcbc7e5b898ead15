"""A model package on disk: diffrt's own export (diffrt.json) or optimum's (configs and graphs only)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError

MANIFEST = "diffrt.json"
FORMAT_VERSION = 1
COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer", "vae_decoder", "vae_encoder")


def required(family: str) -> tuple[str, ...]:
    """The components text-to-image runs for a family, in the order they run."""
    from .families import family_class

    return family_class(family).components()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what}: {path} is missing; re-export the package with `diffrt export`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{what}: {path} is not valid JSON ({exc}); re-export the package with `diffrt export`") from None


@dataclass
class Package:
    """What the runtime needs to know about a package folder."""

    root: Path
    name: str
    family: str
    prediction_type: str
    vae_scaling_factor: float
    vae_scale_factor: int
    latent_channels: int
    text_max_length: int
    defaults: dict[str, Any]
    scheduler_config: dict[str, Any]
    manifest: dict[str, Any] = field(default_factory=dict)
    force_zeros_for_empty_prompt: bool = False  # SDXL: an empty negative prompt is zeros, not the encoded ""
    vae_shift_factor: float = 0.0  # latents / scaling + shift go into the VAE decoder (SD3, FLUX: their VAE's shift)

    def component(self, name: str) -> Path:
        """Path of a component's ONNX graph; a clear error when the package lacks it."""
        entry = self.manifest.get("components", {}).get(name)
        path = self.root / (entry["file"] if entry else f"{name}/model.onnx")
        if not path.is_file():
            fix = "re-export it with `diffrt export`" if name in required(self.family) else f"export it with `--components ...,{name}`"
            raise UserError(f"model package {self.root}: {name} is missing ({path.relative_to(self.root)}); {fix}")
        return path

    def has(self, name: str) -> bool:
        entry = self.manifest.get("components", {}).get(name)
        return (self.root / (entry["file"] if entry else f"{name}/model.onnx")).is_file()

    def controlnets(self) -> list[str]:
        """The names of the package's ControlNets (`controlnet/<name>` components)."""
        from .control import CONTROL

        return sorted(c[len(CONTROL):] for c in self.manifest.get("components", {}) if c.startswith(CONTROL) and self.has(c))

    def takes_control(self) -> bool:
        """Whether the UNet takes ControlNet residuals (exported with --controlnet)."""
        return bool(self.manifest.get("components", {}).get("unet", {}).get("residuals"))

    def fallback(self, name: str) -> Path:
        """The float32 copy of a reduced-precision component, kept for the NaN/inf fallback."""
        rel = self.manifest.get("components", {}).get(name, {}).get("fallback")
        return self.root / rel if rel else self.component(name)

    def openvino_weights(self, name: str) -> str | None:
        """int8 / int4 where `diffrt quantize --precision int8-weights|int4-weights` compressed a component for OpenVINO."""
        return self.manifest.get("components", {}).get(name, {}).get("openvino", {}).get("weights")

    def has_fallback(self, name: str) -> bool:
        rel = self.manifest.get("components", {}).get(name, {}).get("fallback")
        return bool(rel) and (self.root / rel).is_file()

    def precision(self, name: str) -> str:
        return self.manifest.get("components", {}).get(name, {}).get("precision", "fp32")

    def verify(self, hashes: bool = False) -> None:
        """Check every file the manifest lists: present, the recorded size, and (on request) the sha256."""
        for rel, info in self.manifest.get("files", {}).items():
            path = self.root / rel
            if not path.is_file():
                raise UserError(f"model package {self.root}: {rel} is missing; re-export the package or copy it whole")
            if path.stat().st_size != info["bytes"]:
                raise UserError(f"model package {self.root}: {rel} is {path.stat().st_size} bytes, the manifest says "
                                f"{info['bytes']}: the copy is truncated or corrupt; copy it again or re-export")
            if hashes and sha256(path) != info["sha256"]:
                raise UserError(f"model package {self.root}: {rel} does not match its sha256 in {MANIFEST}; "
                                "the file is corrupt: copy it again or re-export")

    @property
    def denoiser(self) -> str:
        """The component the sampling loop calls: unet, or a DiT's transformer."""
        from .families import family_class

        return family_class(self.family).denoiser

    def per_row_timesteps(self) -> bool | None:
        """Whether the manifest says the denoiser takes one timestep per batch row (None: it does not say)."""
        from .backends.engine import TensorSpec
        from .families import one_per_row

        dims = self.manifest.get("components", {}).get(self.denoiser, {}).get("inputs", {}).get("timestep", {}).get("dims")
        return None if dims is None else one_per_row(TensorSpec("timestep", tuple(dims), np.float32))

    @property
    def model_hash(self) -> str:
        """A short id of the package for image metadata: the denoiser graph's recorded sha256."""
        files = self.manifest.get("components", {}).get(self.denoiser, {}).get("file", f"{self.denoiser}/model.onnx")
        return self.manifest.get("files", {}).get(files, {}).get("sha256", "")[:10]


def load_package(path: str | Path, verify: bool = True, hashes: bool = False) -> Package:
    """Read a package folder; without diffrt.json (an optimum export) everything comes from the configs."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"model package {root} does not exist or is not a folder; give the folder `diffrt export` wrote")
    if (root / MANIFEST).is_file():
        pkg = _from_manifest(root, _read_json(root / MANIFEST, "model package manifest"))
    elif (root / "model_index.json").is_file() or (root / "unet" / "model.onnx").is_file():
        pkg = _from_configs(root)
    else:
        raise UserError(f"{root} is not a model package (no {MANIFEST}, no model_index.json); "
                        "export one with `diffrt export CHECKPOINT OUT`")
    for name in required(pkg.family):
        pkg.component(name)
    if verify:
        pkg.verify(hashes)
    return pkg


def _from_manifest(root: Path, m: dict) -> Package:
    if m.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{root / MANIFEST} has format version {m['format_version']}; this diffrt reads up to "
                        f"{FORMAT_VERSION}: upgrade diffrt")
    try:
        return Package(root=root, name=m["name"], family=m["family"], prediction_type=m["prediction_type"],
                       vae_scaling_factor=float(m["vae_scaling_factor"]), vae_scale_factor=int(m["vae_scale_factor"]),
                       latent_channels=int(m["latent_channels"]), text_max_length=int(m["text_max_length"]),
                       defaults=m["defaults"], scheduler_config=_read_json(root / "scheduler" / "scheduler_config.json",
                                                                            "scheduler config"), manifest=m,
                       force_zeros_for_empty_prompt=bool(m.get("force_zeros_for_empty_prompt", False)),
                       vae_shift_factor=float(m.get("vae_shift_factor") or 0.0))
    except KeyError as exc:
        raise UserError(f"{root / MANIFEST} lacks {exc}; re-export the package with `diffrt export`") from None


def vae_scale_factor(vae_config: dict) -> int:
    """How many times the VAE shrinks an image's sides: 2 per down block after the first."""
    return 2 ** (len(vae_config.get("block_out_channels", [0] * 4)) - 1)


def family_of(cross_attention_dim: int, addition_embed_type: str | None = None) -> str:
    """SD family: sdxl for a UNet taking pooled text embeddings and time ids ("text_time"), else from the UNet's text
    width: 768 sd1, 1024 sd2; anything else 'custom' (run as SD 1.x / 2.x are)."""
    if addition_embed_type == "text_time":
        return "sdxl"
    return {768: "sd1", 1024: "sd2"}.get(cross_attention_dim, "custom")


def _from_configs(root: Path) -> Package:
    """An optimum export: vae_decoder/config.json, unet/config.json and scheduler/scheduler_config.json say it all."""
    vae = _read_json(root / "vae_decoder" / "config.json", "VAE decoder config")
    unet = _read_json(root / "unet" / "config.json", "UNet config")
    sched = _read_json(root / "scheduler" / "scheduler_config.json", "scheduler config")
    scale = vae_scale_factor(vae)
    size = int(unet.get("sample_size", 64)) * scale
    family = family_of(unet.get("cross_attention_dim", 768), unet.get("addition_embed_type"))
    index = _read_json(root / "model_index.json", "model index") if (root / "model_index.json").is_file() else {}
    from .families import family_class

    kind = family_class(family)
    return Package(root=root, name=root.name, family=family,
                   prediction_type=sched.get("prediction_type", "epsilon"),
                   vae_scaling_factor=float(vae.get("scaling_factor", 0.18215)), vae_scale_factor=scale,
                   latent_channels=int(vae.get("latent_channels", 4)), text_max_length=77,
                   defaults={"width": size, "height": size, "steps": 30, "guidance_scale": kind.default_guidance,
                             "scheduler": sched.get("_class_name", "PNDMScheduler")},
                   scheduler_config=sched, vae_shift_factor=float(vae.get("shift_factor") or 0.0),
                   force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", kind.zeros_for_empty_prompt)))
