"""A component's weights read one tensor at a time from its safetensors files, so that a model larger than memory is
exported without ever being held: its graph is traced on a weightless copy (graphs.export_streamed) and each
initializer is read from the file only as it is written, in the dtype the checkpoint stores it in."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

VARIANT = re.compile(r"\.(fp16|bf16|fp32)\.safetensors$|\.(fp16|bf16|fp32)-\d+-of-\d+\.safetensors$")


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files from_pretrained reads (an index's shards, else the files that are not a variant)."""
    for index in sorted(folder.glob("*.safetensors.index.json")):
        if not VARIANT.search(index.name.removesuffix(".index.json")):
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            return [folder / s for s in sorted(shards)]
    return [f for f in sorted(folder.glob("*.safetensors")) if not VARIANT.search(f.name)]


class FileWeights:
    """Tensors by name from a component folder's safetensors files; aliases map a tied parameter's other names to the
    one the file holds (T5's embed_tokens and shared)."""

    def __init__(self, folder: Path, aliases: dict[str, str] | None = None,
                 buffers: dict[str, torch.Tensor] | None = None) -> None:
        from safetensors import safe_open

        self.where: dict[str, Path] = {}
        self.dtypes: dict[str, str] = {}
        for path in weight_files(folder):
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    self.where.setdefault(key, path)
                    self.dtypes.setdefault(key, f.get_slice(key).get_dtype())
        self.aliases = {k: v for k, v in (aliases or {}).items() if v in self.where and k not in self.where}
        self.buffers = {k: v for k, v in (buffers or {}).items() if k not in self.where}  # computed ones (positions)

    def __bool__(self) -> bool:
        return bool(self.where)

    def __contains__(self, name: str) -> bool:
        return name in self.where or name in self.aliases or name in self.buffers

    def dtype(self, name: str) -> str:
        """The stored dtype's safetensors name (F32, F16, BF16)."""
        return "buffer" if name in self.buffers else self.dtypes[self.aliases.get(name, name)]

    def tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name in self.buffers:
            return self.buffers[name]
        key = self.aliases.get(name, name)
        with safe_open(str(self.where[key]), framework="pt") as f:  # opened per tensor: no mapping outlives its read
            return f.get_tensor(key)


class ModuleWeights:
    """A loaded module's parameters and buffers by name, in float32 (what a model loaded whole streams from)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.tensors = dict((*module.named_parameters(), *module.named_buffers()))

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def dtype(self, name: str) -> str:
        return "F32"

    def tensor(self, name: str) -> torch.Tensor:
        return self.tensors[name]


def file_weights(folder: Path, module: torch.nn.Module) -> FileWeights:
    """The weights of a weightless module as its checkpoint folder's files hold them, its computed buffers (position
    tables) kept from the module, which is then wholly on the meta device, as tracing it with meta inputs needs."""
    buffers = {k: v.clone() for k, v in module.named_buffers() if not v.is_meta}
    module.to("meta")
    return FileWeights(folder, tied_aliases(module), buffers)


def materialized(module: torch.nn.Module, weights: FileWeights) -> torch.nn.Module:
    """The weightless module with its parameters read from the files in float32 one at a time (tied ones shared) and
    its buffers put back: the float32 model without the stored copy beside it that from_pretrained holds
    while converting (SD3.5-medium's MMDiT: 10 GB instead of 14)."""
    groups: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    for names in groups.values():
        loaded = torch.nn.Parameter(weights.tensor(next(n for n in names if n in weights)).float(), requires_grad=False)
        for name in names:
            owner, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(owner), leaf, loaded)
    for name, buffer in list(module.named_buffers()):
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            module.get_submodule(owner).register_buffer(leaf, weights.tensor(name))
    return module.eval()


def tied_aliases(module: torch.nn.Module) -> dict[str, str]:
    """name -> every other name of the same parameter (tied weights), both ways."""
    groups: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return {a: b for names in groups.values() for a in names for b in names if a != b}


def ir_tensor(tensor: torch.Tensor, name: str):
    """An onnx_ir tensor of a torch tensor, bfloat16 included (as ml_dtypes' bfloat16)."""
    import ml_dtypes
    import onnx_ir as ir

    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.bfloat16:
        return ir.Tensor(tensor.view(torch.uint16).numpy().view(ml_dtypes.bfloat16), name=name)
    return ir.Tensor(tensor.numpy(), name=name)
