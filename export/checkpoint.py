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
    "text_encoder_2": ("CLIPTextModelWithProjection",),
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
    text2_config: dict[str, Any] | None = None  # SDXL's second text encoder

    @property
    def family(self) -> str:
        """sdxl for a UNet that takes pooled text embeddings and time ids, else by the UNet's text width."""
        from diffrt.runtime.package import family_of

        return family_of(int(self.unet_config.get("cross_attention_dim", 768)), self.unet_config.get("addition_embed_type"))

    @property
    def components(self) -> tuple[str, ...]:
        """Every component this checkpoint can give, in export order."""
        from diffrt.runtime.package import COMPONENTS

        return tuple(c for c in COMPONENTS if c != "text_encoder_2" or self.text2_config is not None)

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
        config = {"text_encoder": self.text_config, "text_encoder_2": self.text2_config or {}, "unet": self.unet_config,
                  "vae": self.vae_config}[folder]
        name = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
        name = name or config.get("_class_name") or (config.get("architectures") or [None])[0]
        if name not in KNOWN_CLASSES[folder]:
            raise UserError(f"{self.root / folder} is a {name or 'model of unknown class'}; diffrt exports "
                            f"{' or '.join(KNOWN_CLASSES[folder])} there (SD 1.x / 2.x / SDXL architecture)")
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
    sdxl = "text_encoder_2" in index or (root / "text_encoder_2").is_dir()
    for name in ("tokenizer", "scheduler") + (("tokenizer_2",) if sdxl else ()):
        if not (root / name).is_dir():
            raise UserError(f"{root} lacks {name}/: the {name} component is missing; give a complete diffusers checkpoint")
    sched_path = root / "scheduler" / "scheduler_config.json"
    if not sched_path.is_file():
        raise UserError(f"{root} lacks scheduler/scheduler_config.json; give a complete diffusers checkpoint")
    if sdxl and not (root / "text_encoder").is_dir():
        raise UserError(f"{root} has text_encoder_2 but no text_encoder (an SDXL refiner); diffrt exports SDXL base "
                        "and Turbo checkpoints, which have both")
    ckpt = Checkpoint(root, index, _config(root, "text_encoder"), _config(root, "unet"), _config(root, "vae"),
                      json.loads(sched_path.read_text(encoding="utf-8")),
                      _config(root, "text_encoder_2") if sdxl else None)
    for folder in KNOWN_CLASSES:
        if folder != "text_encoder_2" or sdxl:
            ckpt.class_of(folder)
    if (ckpt.family == "sdxl") != sdxl:
        raise UserError(f"{root}: the UNet {'does not take' if sdxl else 'takes'} SDXL's pooled text embeddings and "
                        f"time ids but the checkpoint {'has' if sdxl else 'lacks'} text_encoder_2; the checkpoint is "
                        "inconsistent (or of a family diffrt does not export)")
    return ckpt
