"""Which ONNX initializer holds which checkpoint weight (and whether transposed), so a LoRA key finds its tensor.

Exporters keep most weights under their parameter names (`model.<name>`: Conv, Gemm, and every weight of a streamed
export); TorchScript's constant folding stores a Linear's weight transposed under a made-up name (`onnx::MatMul_N`),
found here by value. A weight that shares its initializer with another (the exporter deduplicates equal tensors) is
left out: a LoRA changing it would change both."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from .graphs import TRANSPOSED

MAP_FILE = "weights_map.json"


def _digest(array: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=16).hexdigest()


def write_weights_map(module: torch.nn.Module, graph: Path) -> Path:
    """Write graph.parent/weights_map.json: {parameter: [initializer, "T" (stored transposed) or ""]} for every 2-D and
    4-D weight of module found in the graph."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    weights = {k: v.detach() for k, v in module.named_parameters() if k.endswith(".weight") and v.ndim in (2, 4)}
    found: dict[str, list[str]] = {}
    for name, w in weights.items():
        init = inits.get(f"model.{name}")
        if init is not None and tuple(init.dims) == tuple(w.shape):
            found[name] = [init.name, ""]
        transposed = inits.get(f"model.{name}{TRANSPOSED}")  # a streamed export's folded Transpose
        if transposed is not None and tuple(transposed.dims) == tuple(w.shape[::-1]):
            found[name] = [transposed.name, "T"]
    by_value: dict[tuple, list[str]] = {}
    for init in inits.values():
        if init.name.startswith("model.") or len(init.dims) != 2:
            continue
        value = numpy_helper.to_array(init, base_dir=str(graph.parent)).astype(np.float32)
        by_value.setdefault((tuple(init.dims), _digest(value)), []).append(init.name)
    for name, w in weights.items():
        if name in found or w.ndim != 2:
            continue
        t = w.float().numpy().T
        names = by_value.get((t.shape, _digest(t)), [])
        if len(names) == 1:
            found[name] = [names[0], "T"]
    claimed: dict[str, int] = {}
    for init, _ in found.values():
        claimed[init] = claimed.get(init, 0) + 1
    kept = {k: v for k, v in found.items() if claimed[v[0]] == 1}
    path = graph.parent / MAP_FILE
    path.write_text(json.dumps(kept, indent=0, sort_keys=True) + "\n", encoding="utf-8")
    return path
