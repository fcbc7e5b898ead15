"""LoRA files read with safetensors' numpy API (never pickle), and the weight changes they make, in numpy.

Forms read: diffusers/PEFT (`unet.<module>.lora_A.weight` / `lora_B`, `text_encoder.…`, `text_encoder_2.…`; alpha
from the file's `lora_adapter_metadata`, else alpha = rank as diffusers assumes), diffusers' older
`<module>.lora.down.weight` / `lora.up.weight`, and kohya / AUTOMATIC1111 (`lora_unet_<module>.lora_down.weight` /
`lora_up`, `.alpha`; `lora_te_`, `lora_te1_`, `lora_te2_` for the text encoders), with module names as diffusers and
transformers write them or, for the UNet, the original LDM / SGM block names kohya writes for SDXL. Each layer
changes one weight W (out, in[, kh, kw]) by scale * alpha / rank * up @ down."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .stored import stored_values

KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2",
                  "lora_te_": "text_encoder"}
COMPONENT_PREFIXES = ("text_encoder_2.", "text_encoder.", "unet.")
PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"),
         (".lora_down.weight", ".lora_up.weight"))


@dataclass(frozen=True)
class LoraChoice:
    """A LoRA file and the scale it is applied at."""

    path: Path
    scale: float = 1.0

    @property
    def label(self) -> str:
        return f"{self.path.name}:{self.scale:g}"


@dataclass
class LoraLayer:
    """One low-rank change: component, the module it patches (as named in the checkpoint), down (rank, in...) and
    up (out, rank...) matrices, and its alpha."""

    component: str
    module: str
    down: np.ndarray
    up: np.ndarray
    alpha: float

    def delta(self, scale: float, shape: tuple[int, ...]) -> np.ndarray:
        """scale * alpha / rank * up @ down, shaped as the weight it changes (linear, or conv of any kernel)."""
        rank = self.down.shape[0]
        up = self.up.reshape(self.up.shape[0], rank).astype(np.float32)
        down = self.down.reshape(rank, -1).astype(np.float32)
        change = (np.float32(scale * self.alpha / rank) * (up @ down))
        if change.size != int(np.prod(shape)):
            raise UserError(f"LoRA layer {self.component}.{self.module} makes a change of {tuple(up.shape[:1]) + down.shape[1:]}"
                            f" but the model's weight is {tuple(shape)}: the LoRA was made for another architecture")
        return change.reshape(shape)


def parse_choice(text: str) -> LoraChoice:
    """FILE or FILE:SCALE (the scale a number)."""
    path, sep, scale = str(text).rpartition(":")
    if not sep or "/" in scale or "\\" in scale:
        path, scale = str(text), ""
    try:
        value = float(scale) if scale else 1.0
    except ValueError:
        raise UserError(f"LoRA {text!r}: the scale {scale!r} is not a number; write FILE:SCALE, e.g. "
                        "style.safetensors:0.8") from None
    if not np.isfinite(value):
        raise UserError(f"LoRA {text!r}: the scale must be a finite number")
    return LoraChoice(Path(path).expanduser(), value)


def _open(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The file's tensors and metadata; pickled formats are refused unread."""
    if path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin", ".pkl"):
        raise UserError(f"{path} is a pickle file ({path.suffix}), which can run code when read; diffrt reads LoRAs from "
                        ".safetensors only: convert it with a trusted tool first")
    if not path.is_file():
        raise UserError(f"LoRA file {path} does not exist")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise UserError(f"{path} is not a readable .safetensors file ({str(exc).splitlines()[0][:120]}); "
                        "it is corrupt or of another format") from None


def _peft_alpha(metadata: dict[str, str], component: str, module: str, rank: int) -> float:
    """alpha for a PEFT layer: its alpha_pattern, else lora_alpha of the component's config; else rank."""
    try:
        config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except json.JSONDecodeError:
        config = {}
    pattern = config.get(f"{component}.alpha_pattern") or {}
    for key, value in pattern.items():
        if re.search(rf"(^|\.){re.escape(key.lstrip('^'))}$", module):
            return float(value)
    return float(config.get(f"{component}.lora_alpha", rank))


def _split(key: str) -> tuple[str, str, str] | None:
    """(component, module as written, form) of a down-matrix key, None for any other key."""
    for down, _ in PAIRS:
        if key.endswith(down):
            stem = key[: -len(down)]
            for prefix, component in KOHYA_PREFIXES.items():
                if stem.startswith(prefix):
                    return component, stem[len(prefix):], "kohya"
            stem = stem.removeprefix("base_model.model.")
            for prefix in COMPONENT_PREFIXES:
                if stem.startswith(prefix):
                    return prefix[:-1], stem[len(prefix):], "peft"
            return "unet", stem, "peft"
    return None


def read_lora(path: Path) -> list[LoraLayer]:
    """Every layer of a LoRA file; kohya module names keep their underscores here (resolve_modules maps them)."""
    tensors, metadata = _open(path)
    layers = []
    for key, down in tensors.items():
        split = _split(key)
        if split is None:
            continue
        component, module, form = split
        up_key = next(key[: -len(d)] + u for d, u in PAIRS if key.endswith(d))
        if up_key not in tensors:
            raise UserError(f"{path}: {key} has no matching up matrix ({up_key}); the file is incomplete")
        rank = down.shape[0]
        if form == "kohya":
            alpha_key = key[: -len(".lora_down.weight")] + ".alpha"
            alpha = float(tensors[alpha_key]) if alpha_key in tensors else float(rank)
        else:
            alpha = _peft_alpha(metadata, component, module, rank)
        layers.append(LoraLayer(component, module, down, tensors[up_key], alpha))
    if not layers:
        raise UserError(f"{path} holds no LoRA layers diffrt reads (diffusers/PEFT lora_A/lora_B or kohya "
                        "lora_down/lora_up keys)")
    return layers


def _onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise UserError('applying a LoRA at run time reads the graph\'s weights with onnx: pip install "diffrt[lora]"') from None
    return onnx, numpy_helper


RESNET = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj",
          "skip_connection": "conv_shortcut"}
LDM_FIXED = {"time_embed_0": "time_embedding_linear_1", "time_embed_2": "time_embedding_linear_2",
             "label_emb_0_0": "add_embedding_linear_1", "label_emb_0_2": "add_embedding_linear_2",
             "input_blocks_0_0": "conv_in", "out_2": "conv_out"}


def _ldm_part(prefix: str, kind: int, pos: int, rest: str) -> str:
    """diffusers' underscored name of part `kind` (0 resnet, 1 attention or upsampler, 2 upsampler) of a block."""
    if kind == 0:
        return f"{prefix}_resnets_{pos}_{RESNET.get(rest, rest)}"
    if kind == 2 or rest == "conv":
        return f"{prefix}_upsamplers_0_{rest}"
    return f"{prefix}_attentions_{pos}_{rest}"


def ldm_name(module: str, per_block: int = 2) -> str | None:
    """The diffusers (underscored) name of a kohya UNet module written with the original LDM / SGM names
    (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`, as kohya's SDXL LoRAs are): per_block layers a block."""
    if module in LDM_FIXED:
        return LDM_FIXED[module]
    if m := re.fullmatch(r"input_blocks_(\d+)_(\d+)_(.+)", module):
        block, pos = divmod(int(m[1]) - 1, per_block + 1)
        if pos == per_block:
            return f"down_blocks_{block}_downsamplers_0_conv"
        return _ldm_part(f"down_blocks_{block}", int(m[2]), pos, m[3])
    if m := re.fullmatch(r"middle_block_(\d)_(.+)", module):
        part = {"0": "resnets_0", "1": "attentions_0", "2": "resnets_1"}[m[1]]
        return f"mid_block_{part}_{RESNET.get(m[2], m[2]) if m[1] != '1' else m[2]}"
    if m := re.fullmatch(r"output_blocks_(\d+)_(\d+)_(.+)", module):
        block, pos = divmod(int(m[1]), per_block + 1)
        return _ldm_part(f"up_blocks_{block}", int(m[2]), pos, m[3])
    return None


class WeightIndex:
    """A model's weight names, found by a LoRA layer's module name in any of the forms read here."""

    def __init__(self, names) -> None:
        self.names = set(names)
        self.underscored = {k[:-7].replace(".", "_"): k for k in self.names if k.endswith(".weight")}

    def find(self, layer: LoraLayer) -> str | None:
        """The weight a layer patches: by module name (PEFT), by its underscored form (kohya), or by the LDM / SGM
        block names kohya writes for SDXL."""
        if f"{layer.module}.weight" in self.names:
            return f"{layer.module}.weight"
        ldm = ldm_name(layer.module) if layer.component == "unet" else None
        return self.underscored.get(layer.module) or self.underscored.get(ldm)


def graph_overrides(graph: Path, chosen: list[tuple[LoraLayer, float, str]]) -> dict[str, np.ndarray]:
    """{initializer: new value} for one graph: each weight plus the sum of its LoRA changes (layer, scale, file name),
    in the graph's layout (transposed where it stores the weight so) and dtype."""
    mapping = json.loads((graph.parent / "weights_map.json").read_text(encoding="utf-8"))
    index = WeightIndex(mapping)
    onnx, _ = _onnx()
    model = onnx.load(str(graph), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    changes: dict[str, np.ndarray] = {}
    unmatched: dict[str, list[str]] = {}
    for layer, scale, file in chosen:
        param = index.find(layer)
        if param is None:
            unmatched.setdefault(file, []).append(f"{layer.component}.{layer.module}")
            continue
        init, transposed = mapping[param]
        if init not in inits and f"{init}__fp16" in inits:  # `diffrt export --weights-fp16` stores it as float16
            init = f"{init}__fp16"
        shape = tuple(inits[init].dims)
        delta = layer.delta(scale, shape[::-1] if transposed else shape)
        delta = delta.T if transposed else delta
        changes[init] = changes[init] + delta if init in changes else delta
    if unmatched:
        path, keys = next(iter(unmatched.items()))
        raise UserError(f"LoRA {path}: {len(keys)} layer(s) match no weight of this model's {graph.parent.name} (e.g. "
                        f"{keys[0]}): it was made for another model, or names layers in a form diffrt does not read")
    out = {}
    for init, delta in changes.items():
        original = stored_values(inits[init], graph.parent)
        out[init] = (original.astype(np.float32) + delta).astype(original.dtype)
    return out


def lora_overrides(root: Path, components: dict[str, Path], choices: list[LoraChoice]) -> dict[str, dict[str, np.ndarray]]:
    """{component: {initializer: merged value}} that the chosen LoRAs make for a package's graphs; every layer of every
    file must find its weight."""
    by_component: dict[str, list[tuple[LoraLayer, float, str]]] = {}
    for choice in choices:
        for layer in read_lora(choice.path):
            if layer.component not in components:
                raise UserError(f"LoRA {choice.path.name} changes a {layer.component}, which this model does not have: "
                                "it was made for another model family")
            by_component.setdefault(layer.component, []).append((layer, choice.scale, choice.path.name))
    for component in by_component:
        if not (components[component].parent / "weights_map.json").is_file():
            raise UserError(f"{root} records no weight map for its {component} (an optimum export, or one made before "
                            "diffrt read LoRAs); re-export it with `diffrt export`, or merge the LoRA there with --lora")
    return {c: graph_overrides(components[c], layers) for c, layers in by_component.items()}


def restored(graph: Path, changed: dict[str, np.ndarray], before: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The weights to set when a graph goes from the set `before` to `changed` in place (TensorRT's Refitter): the new
    values, and the graph's own values for the initializers only `before` changed."""
    back = [name for name in before if name not in changed]
    if not back:
        return dict(changed)
    onnx, _ = _onnx()
    inits = {i.name: i for i in onnx.load(str(graph), load_external_data=False).graph.initializer if i.name in back}
    return {**changed, **{n: stored_values(inits[n], graph.parent) for n in back}}


class LoraSets:
    """The merged weights of the last few LoRA sets used (a server switching between sets computes each once)."""

    def __init__(self, root: Path, components: dict[str, Path], size: int = 4) -> None:
        import threading
        from collections import OrderedDict

        self.root, self.components, self.size = root, components, size
        self.cache: OrderedDict[tuple, dict[str, dict[str, np.ndarray]]] = OrderedDict()
        self.lock = threading.Lock()

    @staticmethod
    def key(choices: list[LoraChoice]) -> tuple:
        """A set's identity: each file (and its modification time) with its scale, in order."""
        return tuple((str(c.path.resolve()), c.path.stat().st_mtime_ns if c.path.is_file() else 0, c.scale)
                     for c in choices)

    def weights(self, choices: list[LoraChoice]) -> dict[str, dict[str, np.ndarray]]:
        """{component: {initializer: merged value}} for the set, computed or from the cache."""
        if not choices:
            return {}
        key = self.key(choices)
        with self.lock:
            if key in self.cache:
                self.cache.move_to_end(key)
                return self.cache[key]
        weights = lora_overrides(self.root, self.components, choices)
        with self.lock:
            self.cache[key] = weights
            while len(self.cache) > self.size:
                self.cache.popitem(last=False)
        return weights


PROMPT_LORA = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?>")


def prompt_loras(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """AUTOMATIC1111's `<lora:NAME:SCALE>` tags taken out of a prompt: the prompt without them, and (name, scale)."""
    found = []
    for name, scale in PROMPT_LORA.findall(prompt):
        try:
            value = float(scale) if scale.strip() else 1.0
        except ValueError:
            raise UserError(f"<lora:{name}:{scale}>: the scale {scale!r} is not a number") from None
        found.append((name.strip(), value))
    return PROMPT_LORA.sub("", prompt).strip(), found


def named_loras(folder: Path | None, wanted: list[tuple[str, float]]) -> list[LoraChoice]:
    """LoRAs by name (a file NAME.safetensors in folder), in order, one entry per name (the last scale given wins)."""
    if not wanted:
        return []
    if folder is None:
        raise UserError("this server has no LoRA folder; start it with --lora-dir DIR to serve LoRAs by name")
    chosen: dict[str, float] = {}
    for name, scale in wanted:
        if not re.fullmatch(r"[\w.\- ]+", name) or name.startswith("."):
            raise UserError(f"LoRA name {name!r} is not a plain file name (letters, digits, ., -, _)")
        if not np.isfinite(scale):
            raise UserError(f"LoRA {name}: the scale must be a finite number")
        chosen[name] = scale
    choices = [LoraChoice(folder / f"{name}.safetensors", scale) for name, scale in chosen.items()]
    for choice in choices:
        if not choice.path.is_file():
            raise UserError(f"LoRA {choice.path.stem!r} is not in the server's LoRA folder; GET /sdapi/v1/loras lists them")
    return choices
