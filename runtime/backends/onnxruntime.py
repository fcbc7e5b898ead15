"""The onnxruntime backends (ort-cpu, ort-cuda): one ONNX graph per session behind the Engine seam."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .engine import MAX_SHAPES, TensorSpec

ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(double)": np.float64}


def onnxruntime():
    """The onnxruntime module, or a one-line error naming the extra that installs it."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        if interrupted(exc):  # Ctrl-C while onnxruntime loads surfaces as its ImportError
            raise KeyboardInterrupt from None
        raise UserError('onnxruntime is not installed: `pip install "diffrt[cpu]"`, or `pip install "diffrt[gpu]"` on a '
                        "machine with an NVIDIA GPU (one or the other: both share one import folder)") from None
    return ort


def interrupted(exc: BaseException) -> bool:
    """Whether a KeyboardInterrupt is among the exceptions that led to exc."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def both_onnxruntimes() -> bool:
    """onnxruntime and onnxruntime-gpu installed together: they overwrite each other's files."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return bool(version("onnxruntime") and version("onnxruntime-gpu"))
    except PackageNotFoundError:
        return False


def cuda_available() -> bool:
    return "CUDAExecutionProvider" in onnxruntime().get_available_providers()


def cuda_missing() -> str | None:
    """Why ort-cuda cannot run here, with the fix (None: it can)."""
    if cuda_available():
        return None
    if both_onnxruntimes():
        return ("onnxruntime and onnxruntime-gpu are both installed and the CPU one shadows the GPU one: "
                "`pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu`")
    return ("backend ort-cuda needs onnxruntime's CUDA provider, which is not installed: "
            '`pip install "diffrt[gpu]"` on a machine with an NVIDIA GPU, or use --backend ort-cpu')


@dataclass
class FixedBuffers:
    """Inputs and outputs of one input shape in device buffers that never move, bound once.

    Each call copies the inputs into the same device memory (`update_inplace`) and runs the same binding; with a
    CUDA graph id onnxruntime captures the graph on the first call and replays it after. A read-only input that
    is the same array as on the last call (what `to_device` returns) is not copied again."""

    binding: Any
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    run_options: Any
    graph_id: int = -1
    last: dict[str, np.ndarray] = field(default_factory=dict)

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
        del binding
        fixed = cls(session.io_binding(), {n: ort.OrtValue.ortvalue_from_numpy(a, device, 0) for n, a in arrays.items()},
                    {n: ort.OrtValue.ortvalue_from_shape_and_type(s, t, device, 0) for n, (s, t) in shapes.items()},
                    ort.RunOptions(), graph_id)
        fixed.run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        for name, value in fixed.inputs.items():
            fixed.binding.bind_ortvalue_input(name, value)
        for name, value in fixed.outputs.items():
            fixed.binding.bind_ortvalue_output(name, value)
        return fixed

    def run(self, session: Any, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, array in arrays.items():
            if not (array is self.last.get(name) and not array.flags.writeable):
                self.inputs[name].update_inplace(array)
                self.last[name] = array
        session.run_with_iobinding(self.binding, self.run_options)
        return {name: value.numpy() for name, value in self.outputs.items()}


@dataclass
class ShapeBuffers:
    """FixedBuffers per input shape, at most MAX_SHAPES of them. With graphs, the n-th shape gets CUDA graph id n
    (onnxruntime keeps a captured graph for the session's life, so shapes past the cap run without one);
    without, the least recently used shape's buffers make room."""

    device: str
    graphs: bool
    shapes: dict[tuple, FixedBuffers] = field(default_factory=dict)
    captured: int = 0

    def run(self, session: Any, specs: dict[str, TensorSpec], feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        # np.require hands back the same object when it already fits, which FixedBuffers relies on to skip copies
        arrays = {name: np.require(feeds[name], spec.dtype, "C") for name, spec in specs.items()}
        key = tuple(a.shape for a in arrays.values())
        if key not in self.shapes:
            if len(self.shapes) >= MAX_SHAPES:
                evict = next((k for k, b in self.shapes.items() if b.graph_id < 0), None)
                if evict is not None:
                    del self.shapes[evict]
            graph_id = self.captured if self.graphs and self.captured < MAX_SHAPES else -1
            self.captured += graph_id >= 0
            self.shapes[key] = FixedBuffers.allocate(session, arrays, self.device, graph_id)
        self.shapes[key] = self.shapes.pop(key)  # most recently used last
        return self.shapes[key].run(session, arrays)


def shrinking():
    """Run options under which a session's CPU arena hands its free memory back at the end of the run."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def session_options(threads: int | None, level=None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if level is not None:
        opts.graph_optimization_level = level
    if threads:
        opts.intra_op_num_threads = threads
    return opts


def cuda_provider(cuda_graph: bool, gpu_mem_limit: int | None) -> tuple[str, dict[str, str]]:
    """onnxruntime's CUDA provider with its arena growing only by what is asked (its default doubles, which left
    tens of GB reserved beside SD 1.5), optionally capped, and CUDA graphs when asked."""
    options = {"arena_extend_strategy": "kSameAsRequested", "cudnn_conv_algo_search": "EXHAUSTIVE"}
    if gpu_mem_limit:
        options["gpu_mem_limit"] = str(int(gpu_mem_limit))
    if cuda_graph:
        options["enable_cuda_graph"] = "1"
    return "CUDAExecutionProvider", options


def load_error(path: Path, exc: Exception) -> UserError:
    """onnxruntime's error on loading `path`, said as what it is, with its fix."""
    text = str(exc).strip()
    first = (text.splitlines()[0] if text else type(exc).__name__)[:200]
    low = text.lower()
    if "graph capture" in low or "cuda graph" in low:
        return UserError(f"onnxruntime cannot capture {path} as a CUDA graph ({first}); re-export the package with "
                         "`diffrt export ... --attention mha` (no float shape arithmetic left on the CPU) or leave out --cuda-graph")
    if "out of memory" in low or "failed to allocate" in low or "bad_alloc" in low:
        return UserError(f"out of memory loading {path} ({first}); close other GPU work, use the fp16 package, or a smaller "
                         "size or batch")
    if "cannot open shared object" in low or ("error loading" in low and ".so" in low) or "loadlibrary" in low:
        return UserError(f"a library onnxruntime needs for {path} is missing ({first}); install CUDA 12/13 with cuDNN 9 "
                         "(e.g. the nvidia-* pip packages PyTorch brings) or use --backend ort-cpu")
    if "protobuf" in low or "invalid_graph" in low or "no such file" in low or "modelproto" in low or "external data" in low:
        return UserError(f"{path} could not be loaded by onnxruntime ({first}); the file is corrupt, incomplete or not "
                         "an ONNX graph: re-export the package")
    return UserError(f"onnxruntime could not load {path}: {first}")


def preload_cuda() -> None:
    """Load CUDA and cuDNN from the nvidia-* pip packages where onnxruntime can (1.21+), before a CUDA session."""
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload:
        try:
            preload()
        except Exception:  # best effort: the libraries may come from the system instead
            pass


def check_provider(session: Any, path: Path, backend: str) -> None:
    """onnxruntime lists the CUDA provider even when its libraries fail to load, then runs on the CPU: refuse that."""
    if backend == "ort-cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise UserError(f"onnxruntime's CUDA provider did not start for {path} (its CUDA or cuDNN libraries failed to "
                        "load; onnxruntime's log above says which): install them, or use --backend ort-cpu")


def open_session(path: Path, backend: str, providers: list, threads: int | None, graph_cache: Path | None,
                 weights: dict[str, Any] | None = None):
    """An onnxruntime session; with graph_cache, from the optimized graph saved by an earlier session when there is
    one (no graph optimization then), else optimized here and saved for the next. weights ({initializer: OrtValue})
    replace the graph's own before optimization (LoRAs); such a session skips the cache, which holds the unchanged
    weights."""
    import onnxruntime as ort

    from .. import optimized

    if backend == "ort-cuda":
        preload_cuda()
    if weights:  # onnxruntime's NCHWc layout pass (ORT_ENABLE_ALL) reads Conv weights from the file, not the override
        opts = session_options(threads, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
        for name, value in weights.items():
            opts.add_initializer(name, value)
        try:
            return ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as exc:
            raise load_error(path, exc) from None
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
    except Exception as exc:  # onnxruntime raises its own exception types
        if staging:
            optimized.forget(staging)
        raise load_error(path, exc) from None
    if staging:
        optimized.publish(staging, entry)
    return session


class OrtEngine:
    """One onnxruntime session. On CUDA every input shape gets device buffers bound once (ShapeBuffers); with
    cuda_graph each shape is also captured as a CUDA graph on its first call and replayed after."""

    def __init__(self, path: Path, backend: str = "ort-cpu", threads: int | None = None, cuda_graph: bool = False,
                 graph_cache: Path | None = None, gpu_mem_limit: int | None = None,
                 weights: dict[str, np.ndarray] | None = None) -> None:
        import onnxruntime as ort

        cuda = backend == "ort-cuda"
        if not cuda and (cuda_graph or gpu_mem_limit):
            raise ValueError("cuda_graph and gpu_mem_limit are onnxruntime CUDA options (backend ort-cuda)")
        providers = [cuda_provider(cuda_graph, gpu_mem_limit), "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        # the OrtValues must outlive the session that reads them
        self.weights = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in (weights or {}).items()}
        self.session = open_session(path, backend, providers, threads, graph_cache, self.weights)
        check_provider(self.session, path, backend)
        self.backend = backend
        self.path = path
        self.buffers = ShapeBuffers("cuda", cuda_graph) if cuda else None
        self.inputs = {i.name: TensorSpec(i.name, tuple(i.shape), ORT_DTYPES.get(i.type, np.float32))
                       for i in self.session.get_inputs()}
        self.outputs = {o.name: TensorSpec(o.name, tuple(o.shape), ORT_DTYPES.get(o.type, np.float32))
                        for o in self.session.get_outputs()}

    def to_device(self, array: np.ndarray) -> np.ndarray:
        """A read-only copy: on CUDA it is copied to the device on its first call with a shape, not on every call."""
        frozen = np.array(array, copy=True, order="C")
        frozen.flags.writeable = False
        return frozen

    def run(self, feeds: dict[str, Any], release: bool = False) -> dict[str, np.ndarray]:
        """The outputs; release: the session's CPU arena shrinks back at the end of this call (the calls before it
        reused its buffers)."""
        missing = set(self.inputs) - set(feeds)
        if missing:
            raise ValueError(f"{self.path}: missing inputs {sorted(missing)}")
        try:
            if self.buffers is not None:
                return self.buffers.run(self.session, self.inputs, feeds)
            names = list(self.outputs)
            return dict(zip(names, self.session.run(names, {k: feeds[k] for k in self.inputs},
                                                    shrinking() if release else None)))
        except Exception as exc:
            if "out of memory" in str(exc).lower() or "failed to allocate" in str(exc).lower():
                raise UserError(f"out of memory running {self.path.parent.name}; use a smaller size or fewer images "
                                "at once") from None
            raise

    def close(self) -> None:
        """Release the session and its device buffers (and CUDA graphs)."""
        self.buffers = None
        self.session = None
        self.weights = {}
