"""Each exported graph run in onnxruntime against its PyTorch module on fresh random inputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffrt.runtime.backends.engine import TensorSpec
from diffrt.runtime.backends.onnxruntime import OrtEngine

from .checkpoint import Checkpoint
from .graphs import example_inputs, latent_size, patch_size, spec_for, wrapped

# max |onnx - torch| allowed, relative to max |torch| (at least 1): fp32 graphs agree to ~1e-6 in practice
TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "int8": 0.25}


@dataclass
class CheckResult:
    max_abs: float
    max_rel: float
    tolerance: float
    cases: list[str]

    @property
    def ok(self) -> bool:
        return self.max_rel <= self.tolerance

    def as_dict(self) -> dict:
        return {"max_abs": self.max_abs, "max_rel": self.max_rel, "tolerance": self.tolerance, "cases": self.cases,
                "passed": self.ok}


def check_sizes(ckpt: Checkpoint) -> list[tuple[int, int, int]]:
    """Two batch sizes and two latent sizes: the native square (at most 64, 512 pixels: SDXL's 1024 checks no more
    and costs four times the time), and a non-square one that the UNet cannot halve evenly (the sizes that need the
    traced explicit upsample sizes)."""
    s, p = min(latent_size(ckpt), 64), patch_size(ckpt)
    return [(1, s, s), (2, -(-(s // 2 + 1) // p) * p, s)]


Case = tuple[str, dict[str, np.ndarray], dict[str, np.ndarray]]  # (label, feeds, PyTorch's outputs)


def reference_cases(name: str, module: torch.nn.Module, ckpt: Checkpoint, seed: int = 1) -> list[Case]:
    """PyTorch's outputs on random inputs at check_sizes, taken while the module is loaded (so a large model can be
    released before its graph is opened)."""
    model, spec = wrapped(name, module, ckpt), spec_for(name, ckpt)
    gen = torch.Generator().manual_seed(seed)
    cases = []
    for batch, h, w in check_sizes(ckpt):
        inputs = example_inputs(name, ckpt, batch, h, w, gen)
        with torch.no_grad():
            ref = model(*inputs)
        refs = ref if isinstance(ref, tuple) else (ref,)
        cases.append((f"batch {batch}, latents {h}x{w}", {k: v.numpy() for k, v in zip(spec.inputs, inputs)},
                      {k: r.numpy() for k, r in zip(spec.outputs, refs)}))
    return cases


def compare(path: Path, cases: list[Case], precision: str = "fp32", fold: bool = True) -> CheckResult:
    """The graph at path run in onnxruntime on each case's inputs, against PyTorch's outputs. fold=False runs it
    unoptimized: a graph of 16-bit weights behind Casts then casts each weight as it is used, rather than holding a
    float32 copy of them all (the MMDiT of SD3.5-medium: 5 GB instead of 15 GB during its check)."""
    engine = OrtEngine(path) if fold else Unfolded(path)
    worst_abs = worst_rel = 0.0
    for _, feeds, refs in cases:
        outs = engine.run({k: v.astype(engine.inputs[k].dtype) for k, v in feeds.items()})
        for out_name, r in refs.items():
            diff = float(np.abs(outs[out_name].astype(np.float32) - r).max())
            worst_abs = max(worst_abs, diff)
            worst_rel = max(worst_rel, diff / max(1.0, float(np.abs(r).max())))
    engine.close()
    return CheckResult(worst_abs, worst_rel, TOLERANCE[precision], [label for label, _, _ in cases])


class Unfolded:
    """An onnxruntime CPU session with no graph optimization, for checks."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        from diffrt.runtime.backends.onnxruntime import ORT_DTYPES, session_options

        self.session = ort.InferenceSession(str(path), session_options(None, ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
                                            providers=["CPUExecutionProvider"])
        self.inputs = {i.name: TensorSpec(i.name, tuple(i.shape), ORT_DTYPES.get(i.type, np.float32))
                       for i in self.session.get_inputs()}

    def run(self, feeds: dict[str, np.ndarray], release: bool = False) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, feeds)))

    def close(self) -> None:
        del self.session
