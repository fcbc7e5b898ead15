"""The TensorRT backend: engines deserialized once, buffers allocated once per shape, one stream, CUDA graphs
for static shapes, one device-memory block shared by the engines (they never run at the same time).

Written against the TensorRT 10/11 Python API; tensorrt (or tensorrt_lean), polygraphy and cuda-python are
imported lazily, so this module loads on machines without them. Not run on any machine of ours yet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .engine import TensorSpec
from .engine_store import Device, EngineInfo


def import_tensorrt():
    """(module, is_lean): the full TensorRT, else the lean runtime (runs version-compatible plans only)."""
    try:
        import tensorrt

        return tensorrt, False
    except ImportError:
        pass
    try:
        import tensorrt_lean

        return tensorrt_lean, True
    except ImportError:
        raise UserError('TensorRT is not installed: `pip install "diffrt[trt]"` on a machine with an NVIDIA GPU (or '
                        "tensorrt-lean for version-compatible engines), or use --backend ort-cuda") from None


def cudart():
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise UserError('the TensorRT backend needs cuda-python: `pip install "diffrt[trt]"`') from None
    return runtime


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest


def current_device() -> Device:
    rt = cudart()
    props = _check(rt.cudaGetDeviceProperties(0))
    trt, _ = import_tensorrt()
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return Device(name.strip("\x00"), (props.major, props.minor), trt.__version__)


class SharedMemory:
    """One device block sized for the largest engine's activations, handed to every execution context."""

    def __init__(self) -> None:
        self.ptr, self.size = 0, 0

    def free(self) -> None:
        if self.ptr:
            _check(cudart().cudaFree(self.ptr))
        self.ptr, self.size = 0, 0

    def ensure(self, size: int) -> int:
        if size > self.size:
            rt = cudart()
            if self.ptr:
                _check(rt.cudaFree(self.ptr))
            self.ptr, self.size = _check(rt.cudaMalloc(size)), size
        return self.ptr


class TrtEngine:
    """One TensorRT plan behind the Engine seam (`run(feeds) -> outputs`, numpy in and out)."""

    def __init__(self, info: EngineInfo, stream, shared: SharedMemory) -> None:
        trt, lean = import_tensorrt()
        self.trt, self.info, self.stream, self.shared = trt, info, stream, shared
        self.path = info.plan
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        if lean or info.meta.get("version_compatible"):
            runtime.engine_host_code_allowed = True
        self.engine = runtime.deserialize_cuda_engine(Path(info.plan).read_bytes())
        if self.engine is None:
            raise UserError(f"{info.plan} could not be deserialized: the plan is corrupt or was built by another TensorRT "
                            f"version; delete it and rebuild with `diffrt build`")
        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
        self.context = (self.engine.create_execution_context(strategy.USER_MANAGED) if strategy
                        else self.engine.create_execution_context_without_device_memory())
        size = getattr(self.engine, "device_memory_size_v2", None) or self.engine.device_memory_size
        self.memory_size = int(size)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = lambda n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT  # noqa: E731
        spec = lambda n: TensorSpec(n, tuple(self.engine.get_tensor_shape(n)), trt.nptype(self.engine.get_tensor_dtype(n)))  # noqa: E731
        self.inputs = {n: spec(n) for n in names if is_input(n)}
        self.outputs = {n: spec(n) for n in names if not is_input(n)}
        self.buffers: dict[tuple[str, tuple[int, ...]], Any] = {}
        self.graphs: dict[tuple, Any] = {}
        self.static = all(p[n]["min"] == p[n]["max"] for p in info.meta["profiles"] for n in p)

    @property
    def refittable(self) -> bool:
        return "REFIT" in self.info.meta.get("flags", {}).get("builder", [])

    def refit(self, weights: dict[str, np.ndarray]) -> None:
        """New values for named weights (the ONNX initializers the engine was parsed from), through TensorRT's
        Refitter: no rebuild. The engine must have been built refittable (`diffrt build --refittable`)."""
        if not self.refittable:
            raise UserError(f"{self.path} was not built refittable, so LoRAs cannot be applied to it; rebuild with "
                            "`diffrt build --refittable`, or merge the LoRA at export")
        refitter = self.trt.Refitter(self.engine, self.trt.Logger(self.trt.Logger.WARNING))
        kept = [np.ascontiguousarray(v) for v in weights.values()]  # alive until the refit is done
        for name, array in zip(weights, kept):
            if not refitter.set_named_weights(name, self.trt.Weights(array)):
                raise UserError(f"{self.path}: TensorRT refused new weights for {name} (unknown name or another size)")
        missing = refitter.get_missing_weights()
        if missing:
            raise UserError(f"{self.path}: refitting also needs {len(missing)} other weights (e.g. {missing[0]})")
        if not refitter.refit_cuda_engine():
            raise UserError(f"{self.path}: TensorRT could not refit the engine")

    def _buffer(self, name: str, shape: tuple[int, ...], dtype) -> Any:
        from polygraphy import cuda

        key = (name, shape)
        if key not in self.buffers:
            self.buffers[key] = cuda.DeviceArray(shape=shape, dtype=dtype)
        return self.buffers[key]

    def to_device(self, array: np.ndarray):
        return array  # inputs are copied into the engine's own per-shape buffers

    def run(self, feeds: dict[str, Any], release: bool = False) -> dict[str, np.ndarray]:
        shapes = {n: tuple(np.shape(feeds[n])) for n in self.inputs}
        if not self.info.accepts(shapes):
            raise UserError(f"{self.info.plan.name} does not take {shapes}; rebuild it with wider --batch/--size ranges")
        memory = self.shared.ensure(self.memory_size)
        if hasattr(self.context, "set_device_memory"):
            self.context.set_device_memory(memory, self.memory_size)
        else:
            self.context.device_memory = memory
        for name, shape in shapes.items():
            buf = self._buffer(name, shape, self.inputs[name].dtype)
            buf.copy_from(np.require(feeds[name], self.inputs[name].dtype, "C"), stream=self.stream)
            self.context.set_input_shape(name, shape)
            self.context.set_tensor_address(name, buf.ptr)
        outs = {}
        for name, spec in self.outputs.items():
            shape = tuple(self.context.get_tensor_shape(name))
            outs[name] = self._buffer(name, shape, spec.dtype)
            self.context.set_tensor_address(name, outs[name].ptr)
        key = (tuple(sorted(shapes.items())), memory)  # a graph holds addresses: a moved shared block needs a new one
        if self.static and key in self.graphs:
            _check(cudart().cudaGraphLaunch(self.graphs[key], self.stream.ptr))
        elif self.static:
            if not self.context.execute_async_v3(self.stream.ptr):  # the first run settles shapes; capture only after it works
                raise RuntimeError(f"TensorRT failed to run {self.info.plan.name}")
            self.graphs[key] = self._capture()
        elif not self.context.execute_async_v3(self.stream.ptr):
            raise RuntimeError(f"TensorRT failed to run {self.info.plan.name}")
        result = {n: buf.copy_to(np.empty(buf.shape, dtype=self.outputs[n].dtype), stream=self.stream)
                  for n, buf in outs.items()}
        self.stream.synchronize()
        return result

    def close(self) -> None:
        """Free this engine's CUDA graphs and buffers (the shared block is freed by SharedMemory.free)."""
        rt = cudart()
        for graph in self.graphs.values():
            _check(rt.cudaGraphExecDestroy(graph))
        for buf in self.buffers.values():
            buf.free()
        self.graphs, self.buffers = {}, {}
        self.context = self.engine = None

    def _capture(self):
        rt = cudart()
        _check(rt.cudaStreamBeginCapture(self.stream.ptr, rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal))
        self.context.execute_async_v3(self.stream.ptr)
        graph = _check(rt.cudaStreamEndCapture(self.stream.ptr))
        return _check(rt.cudaGraphInstantiate(graph, 0))


def open_engines(package: Path, precisions: tuple[str, ...], components: tuple[str, ...]) -> dict[str, TrtEngine]:
    """The engines for this machine's GPU and TensorRT (per component the first of precisions built), sharing one
    stream and one device-memory block."""
    from polygraphy import cuda

    from .engine_store import pick_engine

    device = current_device()
    stream, shared = cuda.Stream(), SharedMemory()
    engines = {c: TrtEngine(pick_engine(package, c, precisions, device), stream, shared) for c in components}
    shared.ensure(max(e.memory_size for e in engines.values()))  # sized once, so captured graphs' addresses stay valid
    return engines
