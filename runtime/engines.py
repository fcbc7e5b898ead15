"""Engines: one ONNX graph behind `run(feeds) -> outputs`, on onnxruntime's CPU or CUDA provider."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import UserError

BACKENDS = ("auto", "ort-cpu", "ort-cuda", "trt")
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(double)": np.float64}


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: name, dims (int, or a name for a dynamic axis) and numpy dtype."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: type


class Engine(Protocol):
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]

    def run(self, feeds: dict[str, Any]) -> dict[str, np.ndarray]: ...


def cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def resolve_backend(backend: str) -> str:
    """'auto' becomes ort-cuda where onnxruntime has its CUDA provider, else ort-cpu."""
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "ort-cuda" if cuda_available() else "ort-cpu"
    if backend == "trt":
        from .trt_backend import import_tensorrt

        import_tensorrt()
        return backend
    if backend == "ort-cuda" and not cuda_available():
        raise UserError("backend ort-cuda needs onnxruntime's CUDA provider, which is not installed: "
                        "`pip install diffrt[gpu]` on a machine with an NVIDIA GPU, or use --backend ort-cpu")
    return backend


class OrtEngine:
    """One onnxruntime session; on CUDA, inputs may be OrtValues already on the GPU (see `to_device`)."""

    def __init__(self, path: Path, backend: str = "ort-cpu", threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if backend == "ort-cuda" else ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{path} could not be loaded by onnxruntime ({first[:200]}); "
                            "the file is corrupt or not an ONNX graph: re-export the package") from None
        self.backend = backend
        self.path = path
        self.inputs = {i.name: TensorSpec(i.name, tuple(i.shape), ORT_DTYPES.get(i.type, np.float32))
                       for i in self.session.get_inputs()}
        self.outputs = {o.name: TensorSpec(o.name, tuple(o.shape), ORT_DTYPES.get(o.type, np.float32))
                        for o in self.session.get_outputs()}

    def to_device(self, array: np.ndarray):
        """Put an array where the engine runs: an OrtValue on the GPU for CUDA, the array itself on the CPU."""
        if self.backend != "ort-cuda":
            return array
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", 0)

    def run(self, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        missing = set(self.inputs) - set(feeds)
        if missing:
            raise ValueError(f"{self.path}: missing inputs {sorted(missing)}")
        if self.backend != "ort-cuda":
            names = list(self.outputs)
            return dict(zip(names, self.session.run(names, {k: feeds[k] for k in self.inputs})))
        binding = self.session.io_binding()
        for name in self.inputs:
            value = feeds[name]
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                binding.bind_ortvalue_input(name, value)
        for name in self.outputs:
            binding.bind_output(name, "cuda", 0)
        self.session.run_with_iobinding(binding)
        return dict(zip(self.outputs, binding.copy_outputs_to_cpu()))


def timestep_feed(spec: TensorSpec, t: float, batch: int) -> np.ndarray:
    """The timestep in the dtype and rank the UNet graph declares: a scalar, [1], or one per batch row."""
    value = np.asarray(round(float(t)) if np.issubdtype(spec.dtype, np.integer) else t, dtype=spec.dtype)
    if len(spec.shape) == 0:
        return value
    n = spec.shape[0] if isinstance(spec.shape[0], int) else batch
    return np.full((n,), value, dtype=value.dtype)
