"""Reading a diffusers checkpoint folder: what it holds, refused clearly when diffrt cannot export it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffrt.runtime.errors import UserError

# component folder -> diffusers/transformers classes diffrt knows how to export
KNOWN_CLASSES = {
    "text_encoder": ("CLIPTextModel", "CLIPTextModelWithProjection"),
    "text_encoder_2": ("CLIPTextModelWithProjection", "T5EncoderModel"),
    "text_encoder_3": ("T5EncoderModel",),
    "unet": ("UNet2DConditionModel",),
    "transformer": ("SD3Transformer2DModel", "FluxTransformer2DModel"),
    "vae": ("AutoencoderKL",),
}
DIT_FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}  # a transformer's class -> its family


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
    configs: dict[str, dict[str, Any]]  # each model folder's config.json: text encoders, unet or transformer, vae
    scheduler_config: dict[str, Any]
    controlnets: dict[str, Path] = field(default_factory=dict)  # controlnet/<name> -> its ControlNetModel folder
    control_inputs: bool = False  # export the UNet with ControlNet residual inputs

    @property
    def denoiser(self) -> str:
        return "transformer" if "transformer" in self.configs else "unet"

    @property
    def denoiser_config(self) -> dict[str, Any]:
        return self.configs[self.denoiser]

    @property
    def vae_config(self) -> dict[str, Any]:
        return self.configs["vae"]

    def text_config(self, name: str) -> dict[str, Any]:
        return self.configs[name]

    @property
    def family(self) -> str:
        """A DiT's family by its transformer's class; sdxl for a UNet that takes pooled text embeddings and time ids,
        else by the UNet's text width."""
        from diffrt.runtime.package import family_of

        if self.denoiser == "transformer":
            return DIT_FAMILIES[self.class_of("transformer")]
        unet = self.denoiser_config
        return family_of(int(unet.get("cross_attention_dim", 768)), unet.get("addition_embed_type"))

    @property
    def components(self) -> tuple[str, ...]:
        """Every component this checkpoint can give, in export order."""
        from diffrt.runtime.package import COMPONENTS

        return tuple(c for c in COMPONENTS if c.startswith("vae") or c in self.configs)

    def load(self, name: str):
        """The PyTorch module of one component, in eval mode, float32."""
        import diffusers
        import torch  # noqa: F401  (imported for its side effects on diffusers/transformers loading)
        import transformers

        folder = "vae" if name.startswith("vae") else name
        where = self.controlnets.get(name, self.root / folder)
        class_name = "ControlNetModel" if name in self.controlnets else self.class_of(folder)
        cls = getattr(diffusers if folder in ("unet", "transformer", "vae") or name in self.controlnets else transformers,
                      class_name)
        try:
            model = cls.from_pretrained(where)
        except (OSError, ValueError, RuntimeError) as exc:
            raise UserError(f"{where} could not be loaded ({str(exc).splitlines()[0][:200]}); "
                            "its weights are missing or corrupt") from None
        return model.float().eval()

    def weightless(self, name: str):
        """The component's module with no weights (the meta device) but its computed buffers real: what a model
        larger than memory is traced on while its weights are read from the files (graphs.export_streamed)."""
        import diffusers
        import transformers
        from accelerate import init_empty_weights

        folder = "vae" if name.startswith("vae") else name
        cls = getattr(diffusers if folder in ("unet", "transformer", "vae") else transformers, self.class_of(folder))
        with init_empty_weights(include_buffers=False):
            if folder in ("unet", "transformer", "vae"):
                model = cls.from_config(self.configs[folder])
            else:
                model = cls(cls.config_class.from_pretrained(self.root / folder))
        return model.float().eval()

    def class_of(self, folder: str) -> str:
        entry = self.index.get(folder)
        config = self.configs.get(folder, {})
        name = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
        name = name or config.get("_class_name") or (config.get("architectures") or [None])[0]
        if name not in KNOWN_CLASSES[folder]:
            raise UserError(f"{self.root / folder} is a {name or 'model of unknown class'}; diffrt exports "
                            f"{' or '.join(KNOWN_CLASSES[folder])} there (SD 1.x / 2.x / SDXL / SD3 / FLUX.1 architecture)")
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
    present = [f for f in KNOWN_CLASSES if _listed(index, root, f)]
    dit = "transformer" in present
    sdxl = "text_encoder_2" in present and not dit
    if not dit and "unet" not in present:
        raise UserError(f"{root} lacks unet/config.json: the unet component is missing; give a complete diffusers "
                        "checkpoint (model_index.json, text_encoder/, tokenizer/, unet/, vae/, scheduler/)")
    tokenizers = ("tokenizer", *(f"tokenizer_{i}" for i in (2, 3) if f"text_encoder_{i}" in present))
    for name in (*tokenizers, "scheduler"):
        if not (root / name).is_dir():
            raise UserError(f"{root} lacks {name}/: the {name} component is missing; give a complete diffusers checkpoint")
    sched_path = root / "scheduler" / "scheduler_config.json"
    if not sched_path.is_file():
        raise UserError(f"{root} lacks scheduler/scheduler_config.json; give a complete diffusers checkpoint")
    if "text_encoder_2" in present and "text_encoder" not in present:
        raise UserError(f"{root} has text_encoder_2 but no text_encoder (an SDXL refiner); diffrt exports SDXL base "
                        "and Turbo checkpoints, which have both")
    configs = {f: _config(root, f) for f in dict.fromkeys(("text_encoder", *present, "vae"))}
    ckpt = Checkpoint(root, index, configs, json.loads(sched_path.read_text(encoding="utf-8")))
    for folder in configs:
        ckpt.class_of(folder)
    if not dit and (ckpt.family == "sdxl") != sdxl:
        raise UserError(f"{root}: the UNet {'does not take' if sdxl else 'takes'} SDXL's pooled text embeddings and "
                        f"time ids but the checkpoint {'has' if sdxl else 'lacks'} text_encoder_2; the checkpoint is "
                        "inconsistent (or of a family diffrt does not export)")
    return ckpt


def _listed(index: dict[str, Any], root: Path, folder: str) -> bool:
    """Whether the checkpoint has a component: listed in model_index.json with a class (SD3 may list T5 as
    [null, null]) and its folder there, or, where model_index.json does not list it, its folder alone."""
    entry = index.get(folder)
    if isinstance(entry, list) and None in entry:
        return False
    return (root / folder).is_dir()
