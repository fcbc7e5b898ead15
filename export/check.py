"""Each exported graph run in onnxruntime against its PyTorch module on fresh random inputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffrt.runtime.engines import OrtEngine

from .checkpoint import Checkpoint
from .graphs import SPECS, WRAPPERS, example_inputs, latent_size

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
    """Two batch sizes and two latent sizes: the native square, and a non-square one that the UNet
    cannot halve evenly (the sizes that need the traced explicit upsample sizes)."""
    s = latent_size(ckpt)
    return [(1, s, s), (2, s // 2 + 1, s)]


def check_component(name: str, module: torch.nn.Module, ckpt: Checkpoint, path: Path, precision: str = "fp32",
                    seed: int = 1) -> CheckResult:
    engine = OrtEngine(path)
    wrapped = WRAPPERS[name](module).eval()
    gen = torch.Generator().manual_seed(seed)
    worst_abs = worst_rel = 0.0
    cases = []
    for batch, h, w in check_sizes(ckpt):
        inputs = example_inputs(name, ckpt, batch, h, w, gen)
        with torch.no_grad():
            ref = wrapped(*inputs)
        refs = ref if isinstance(ref, tuple) else (ref,)
        feeds = {k: v.numpy().astype(engine.inputs[k].dtype) for k, v in zip(SPECS[name].inputs, inputs)}
        outs = engine.run(feeds)
        for out_name, r in zip(SPECS[name].outputs, refs):
            r = r.numpy()
            diff = float(np.abs(outs[out_name].astype(np.float32) - r).max())
            worst_abs = max(worst_abs, diff)
            worst_rel = max(worst_rel, diff / max(1.0, float(np.abs(r).max())))
        cases.append(f"batch {batch}, latents {h}x{w}")
    return CheckResult(worst_abs, worst_rel, TOLERANCE[precision], cases)
