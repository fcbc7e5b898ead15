"""Engines: one ONNX graph behind `run(feeds) -> outputs`, on onnxruntime's CPU or CUDA provider."""

from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass
class FixedBuffers:
    """Inputs and outputs of one input shape in buffers that never move, bound once: what a CUDA graph replays.

    Each call copies the inputs into the same device memory (`update_inplace`) and runs with the graph id of
    this shape, so onnxruntime captures the graph on the first call and replays it after."""

    binding: Any
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    run_options: Any = None

    @classmethod
    def allocate(cls, session: Any, arrays: dict[str, np.ndarray], device: str, graph_id: int) -> FixedBuffers:
        import onnxruntime as ort

        probe = ort.RunOptions()
        probe.add_run_config_entry("gpu_graph_id", "-1")  # a plain run, only to learn the output shapes
        binding = session.io_binding()
        for name, array in arrays.items():
            binding.bind_cpu_input(name, array)
        names = [o.name for o in session.get_outputs()]
        for name in names:
            binding.bind_output(name, device, 0)
        session.run_with_iobinding(binding, probe)
        shapes = {name: (v.shape(), ORT_DTYPES[v.data_type()]) for name, v in zip(names, binding.get_outputs())}
        fixed = cls(session.io_binding(), {n: ort.OrtValue.ortvalue_from_numpy(a, device, 0) for n, a in arrays.items()},
                    {n: ort.OrtValue.ortvalue_from_shape_and_type(s, t, device, 0) for n, (s, t) in shapes.items()},
                    ort.RunOptions())
        fixed.run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        for name, value in fixed.inputs.items():
            fixed.binding.bind_ortvalue_input(name, value)
        for name, value in fixed.outputs.items():
            fixed.binding.bind_ortvalue_output(name, value)
        return fixed

    def run(self, session: Any, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, array in arrays.items():
            self.inputs[name].update_inplace(array)
        session.run_with_iobinding(self.binding, self.run_options)
        return {name: value.numpy() for name, value in self.outputs.items()}


@dataclass
class CudaGraphs:
    """FixedBuffers per input shape; the n-th shape seen gets CUDA graph id n."""

    device: str
    shapes: dict[tuple, FixedBuffers] = field(default_factory=dict)

    def run(self, session: Any, specs: dict[str, TensorSpec], feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        arrays = {name: np.require(feeds[name], spec.dtype, "C") for name, spec in specs.items()}
        key = tuple(a.shape for a in arrays.values())
        if key not in self.shapes:
            self.shapes[key] = FixedBuffers.allocate(session, arrays, self.device, len(self.shapes))
        return self.shapes[key].run(session, arrays)


def session_options(threads: int | None, level=None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if level is not None:
        opts.graph_optimization_level = level
    if threads:
        opts.intra_op_num_threads = threads
    return opts


def open_session(path: Path, backend: str, providers: list, threads: int | None, graph_cache: Path | None):
    """An onnxruntime session; with graph_cache, from the optimized graph saved by an earlier session when there is
    one (no graph optimization then), else optimized here and saved for the next."""
    import onnxruntime as ort

    from . import optimized

    entry = graph_cache / optimized.cache_key(path, backend) if graph_cache else None
    if entry and (entry / optimized.GRAPH).is_file():
        opts = session_options(threads, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        try:
            return ort.InferenceSession(str(entry / optimized.GRAPH), opts, providers=providers)
        except Exception:  # a damaged cache entry: drop it and optimize the source again
            optimized.forget(entry)
    opts = session_options(threads)
    staging = optimized.save_optimized(opts, graph_cache) if entry else None
    try:
        session = ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
        if staging:
            optimized.forget(staging)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} could not be loaded by onnxruntime ({first[:200]}); "
                        "the file is corrupt or not an ONNX graph: re-export the package") from None
    if staging:
        optimized.publish(staging, entry)
    return session


class OrtEngine:
    """One onnxruntime session; on CUDA, inputs may be OrtValues already on the GPU (see `to_device`).

    With cuda_graph (ort-cuda only) every input shape is captured as a CUDA graph on its first call and
    replayed after: inputs are copied into fixed device buffers, so `to_device` leaves arrays on the host."""

    def __init__(self, path: Path, backend: str = "ort-cpu", threads: int | None = None, cuda_graph: bool = False,
                 graph_cache: Path | None = None) -> None:
        if cuda_graph and backend != "ort-cuda":
            raise UserError(f"CUDA graphs need the ort-cuda backend, not {backend}: use --backend ort-cuda, "
                            "or leave out --cuda-graph")
        cuda = ("CUDAExecutionProvider", {"enable_cuda_graph": "1"}) if cuda_graph else "CUDAExecutionProvider"
        providers = [cuda, "CPUExecutionProvider"] if backend == "ort-cuda" else ["CPUExecutionProvider"]
        self.session = open_session(path, backend, providers, threads, graph_cache)
        self.backend = backend
        self.path = path
        self.graphs = CudaGraphs("cuda") if cuda_graph else None
        self.inputs = {i.name: TensorSpec(i.name, tuple(i.shape), ORT_DTYPES.get(i.type, np.float32))
                       for i in self.session.get_inputs()}
        self.outputs = {o.name: TensorSpec(o.name, tuple(o.shape), ORT_DTYPES.get(o.type, np.float32))
                        for o in self.session.get_outputs()}

    def to_device(self, array: np.ndarray):
        """Put an array where the engine runs: an OrtValue on the GPU for CUDA, the array itself on the CPU."""
        if self.backend != "ort-cuda" or self.graphs:
            return array
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(np.require(array, requirements="C"), "cuda", 0)

    def run(self, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        missing = set(self.inputs) - set(feeds)
        if missing:
            raise ValueError(f"{self.path}: missing inputs {sorted(missing)}")
        if self.graphs:
            return self.graphs.run(self.session, self.inputs, feeds)
        if self.backend != "ort-cuda":
            names = list(self.outputs)
            return dict(zip(names, self.session.run(names, {k: feeds[k] for k in self.inputs})))
        binding = self.session.io_binding()
        for name in self.inputs:
            value = feeds[name]
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, np.require(value, requirements="C"))
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
