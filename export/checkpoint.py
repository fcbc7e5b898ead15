"""Reading a diffusers checkpoint folder: what it holds, refused clearly when diffrt cannot export it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffrt.runtime.errors import UserError

# component folder -> diffusers/transformers classes diffrt knows how to export
KNOWN_CLASSES = {
    "text_encoder": ("CLIPTextModel", "CLIPTextModelWithProjection"),
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
}


def _config(folder: Path, name: str) -> dict[str, Any]:
    path = folder / name / "config.json"
    if not path.is_file():
        raise UserError(f"{folder} lacks {name}/config.json: the {name} component is missing; "
                        "give a complete diffusers checkpoint (model_index.json, text_encoder/, tokenizer/, unet/, vae/, scheduler/)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); repair or re-download the checkpoint") from None


@dataclass
class Checkpoint:
    root: Path
    index: dict[str, Any]
    text_config: dict[str, Any]
    unet_config: dict[str, Any]
    vae_config: dict[str, Any]
    scheduler_config: dict[str, Any]

    def load(self, name: str):
        """The PyTorch module of one component, in eval mode, float32."""
        import torch  # noqa: F401  (imported for its side effects on diffusers/transformers loading)
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        classes = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection,
                   "UNet2DConditionModel": UNet2DConditionModel, "AutoencoderKL": AutoencoderKL}
        folder = "vae" if name.startswith("vae") else name
        cls = classes[self.class_of(folder)]
        try:
            model = cls.from_pretrained(self.root / folder)
        except (OSError, ValueError, RuntimeError) as exc:
            raise UserError(f"{self.root / folder} could not be loaded ({str(exc).splitlines()[0][:200]}); "
                            "its weights are missing or corrupt") from None
        return model.float().eval()

    def class_of(self, folder: str) -> str:
        entry = self.index.get(folder)
        config = {"text_encoder": self.text_config, "unet": self.unet_config, "vae": self.vae_config}[folder]
        name = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
        name = name or config.get("_class_name") or (config.get("architectures") or [None])[0]
        if name not in KNOWN_CLASSES[folder]:
            raise UserError(f"{self.root / folder} is a {name or 'model of unknown class'}; diffrt exports "
                            f"{' or '.join(KNOWN_CLASSES[folder])} there (SD 1.x / 2.x architecture)")
        return name


def resolve_source(source: str | Path) -> Path:
    """A local folder as is; anything else is taken for a hub id and fetched only where the hub answers."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if str(source).count("/") == 1 and not str(source).startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(str(source), allow_patterns=["*.json", "*.txt", "*.safetensors"]))
        except Exception as exc:
            raise UserError(f"{source} is not a local folder and the model hub could not be reached for it "
                            f"({type(exc).__name__}); download the checkpoint and pass its folder") from None
    raise UserError(f"checkpoint folder {source} does not exist")


def open_checkpoint(source: str | Path) -> Checkpoint:
    root = resolve_source(source)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; give a diffusers checkpoint folder (the one with model_index.json)")
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise UserError(f"{root} is not a diffusers checkpoint: it has no model_index.json; "
                        "give the folder that StableDiffusionPipeline.save_pretrained wrote")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{index_path} is not valid JSON ({exc})") from None
    for name in ("tokenizer", "scheduler"):
        if not (root / name).is_dir():
            raise UserError(f"{root} lacks {name}/: the {name} component is missing; give a complete diffusers checkpoint")
    sched_path = root / "scheduler" / "scheduler_config.json"
    if not sched_path.is_file():
        raise UserError(f"{root} lacks scheduler/scheduler_config.json; give a complete diffusers checkpoint")
    ckpt = Checkpoint(root, index, _config(root, "text_encoder"), _config(root, "unet"), _config(root, "vae"),
                      json.loads(sched_path.read_text(encoding="utf-8")))
    for folder in KNOWN_CLASSES:
        ckpt.class_of(folder)
    if ckpt.unet_config.get("addition_embed_type") == "text_time":
        raise UserError(f"{root} is an SDXL checkpoint (two text encoders); diffrt exports SD 1.x / 2.x architectures")
    return ckpt
