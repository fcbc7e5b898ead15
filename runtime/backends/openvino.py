"""The OpenVINO backend (ov-cpu): the package's ONNX graphs read as they are and compiled once per input shape
(static shapes are what its CPU plugin runs fastest), in bf16 where the CPU has AMX or AVX-512-BF16, else fp32."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..mapped import DroppingPages
from .engine import MAX_SHAPES, TensorSpec

PRECISIONS = ("auto", "bf16", "fp32")
HINTS = {"bf16": "bf16", "fp32": "f32"}
DTYPES = {"f32": np.float32, "f16": np.float16, "i64": np.int64, "i32": np.int32, "bf16": np.float32}
_CORE: list = []


def core():
    """The process's OpenVINO Core (one holds the plugins and their caches), or a one-line error naming the extra."""
    if not _CORE:
        try:
            import openvino as ov
        except ImportError as exc:
            from .onnxruntime import interrupted

            if interrupted(exc):  # Ctrl-C while OpenVINO loads surfaces as its ImportError
                raise KeyboardInterrupt from None
            raise UserError('backend ov-cpu needs OpenVINO: `pip install "diffrt[openvino]"`, or use --backend ort-cpu') from None
        _CORE.append(ov.Core())
    return _CORE[0]


def openvino_available() -> bool:
    from importlib.util import find_spec

    return find_spec("openvino") is not None


def has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin computes in bf16 here (AMX or AVX-512-BF16)."""
    return "BF16" in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def compute_precision(requested: str) -> str:
    """bf16 or fp32 for `requested` (auto: bf16 where the CPU has it); bf16 on a CPU without it is refused."""
    if requested not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, not {requested!r}")
    if requested == "auto":
        return "bf16" if has_bf16() else "fp32"
    if requested == "bf16" and not has_bf16():
        raise UserError("this CPU has neither AMX nor AVX-512-BF16, so OpenVINO cannot compute in bf16 here; "
                        "use --precision fp32 (or auto)")
    return requested


def read_onnx(path: Path):
    """The graph through OpenVINO's ONNX front end only (trying every front end would print each one's complaint)."""
    from openvino.frontend import FrontEndManager

    core()
    frontend = FrontEndManager().load_by_framework("onnx")
    try:
        return frontend.convert(frontend.load(str(path)))
    except Exception as exc:  # OpenVINO raises its own GeneralFailure / OpConversionFailure types
        detail = next((line for line in str(exc).splitlines() if line.strip() and "Check " not in line), type(exc).__name__)
        raise UserError(f"{path} could not be loaded by OpenVINO ({detail.strip()[:160]}); the file is corrupt, incomplete "
                        "or not an ONNX graph: re-export the package") from None


IR = "openvino_model.xml"  # a component's weight-compressed graph for OpenVINO (`diffrt quantize --precision int8-weights`)


def graph_file(path: Path) -> Path:
    """The file ov-cpu reads for a component's graph: its OpenVINO IR beside model.onnx where quantize wrote one."""
    ir = path.with_name(IR)
    return ir if path.name == "model.onnx" and ir.is_file() else path


def read_graph(path: Path):
    """A component's graph: its OpenVINO IR (weight-compressed), else the ONNX graph."""
    source = graph_file(path)
    if source == path:
        return read_onnx(path)
    try:
        return core().read_model(str(source))
    except Exception as exc:  # OpenVINO's own error types
        raise UserError(f"{source} could not be loaded by OpenVINO ({str(exc).strip().splitlines()[0][:160]}); "
                        "quantize the package again") from None


def with_weights(model, weights: dict[str, np.ndarray]):
    """The model with the named initializers (OpenVINO's Constant nodes keep their ONNX names) holding new values:
    LoRAs applied at run time."""
    if not weights:
        return model
    from openvino import opset13

    constants = {op.get_friendly_name(): op for op in model.get_ops() if op.get_type_name() == "Constant"}
    for name, value in weights.items():
        if name not in constants:
            raise UserError(f"OpenVINO's reading of the graph has no weight {name}; apply this LoRA with --backend ort-cpu")
        new = opset13.constant(np.ascontiguousarray(value))
        new.set_friendly_name(name)
        for target in list(constants[name].output(0).get_target_inputs()):
            target.replace_source_output(new.output(0))
    return model


def spec(port) -> TensorSpec:
    shape = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
    return TensorSpec(port.get_any_name(), shape, DTYPES.get(port.get_element_type().get_type_name(), np.float32))


def output_name(port, names) -> str:
    """The graph's name of a compiled output: OpenVINO's first name for it may be a Cast's it put in front (an fp16
    graph's float32 outputs), the graph's own is among the others."""
    return next((name for name in port.get_names() if name in names), port.get_any_name())


class OvEngine:
    """One ONNX graph on OpenVINO's CPU plugin, compiled per input shape (the last MAX_SHAPES kept)."""

    def __init__(self, path: Path, threads: int | None = None, precision: str = "fp32", cache: Path | None = None,
                 weights: dict[str, np.ndarray] | None = None) -> None:
        self.weights = weights or {}
        self.model = with_weights(read_graph(path), self.weights)
        self.path, self.precision = path, precision
        self.config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": HINTS[precision]}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = threads
        if cache and not self.weights:  # OpenVINO's model cache: a later start imports the compiled blob instead of compiling
            from ..optimized import writable

            self.config["CACHE_DIR"] = str(writable(cache, cache / "openvino"))
        self.inputs = {s.name: s for s in map(spec, self.model.inputs)}
        self.outputs = {s.name: s for s in map(spec, self.model.outputs)}
        self.compiled: OrderedDict[tuple, Any] = OrderedDict()

    def _compiled(self, feeds: dict[str, np.ndarray]):
        key = tuple(np.shape(feeds[name]) for name in self.inputs)
        if key in self.compiled:
            self.compiled.move_to_end(key)
            return self.compiled[key]
        model = self.model if self.model is not None else with_weights(read_graph(self.path), self.weights)
        self.model = None  # the float32 graph is not kept beside the compiled one; another shape reads it again
        model.reshape({name: list(np.shape(feeds[name])) for name in self.inputs})
        cache = self.config.get("CACHE_DIR")  # the plugin packs its own copy; the files' pages are read again if needed
        source = graph_file(self.path)  # model.onnx(_data), or openvino_model.xml / .bin
        with DroppingPages(source.with_suffix(""), *([Path(cache)] if cache else [])):  # the file not held whole beside the copy
            self.compiled[key] = core().compile_model(model, "CPU", self.config)
            del model
        if len(self.compiled) > MAX_SHAPES:
            self.compiled.popitem(last=False)
        return self.compiled[key]

    def run(self, feeds: dict[str, Any], release: bool = False) -> dict[str, np.ndarray]:
        missing = set(self.inputs) - set(feeds)
        if missing:
            raise ValueError(f"{self.path}: missing inputs {sorted(missing)}")
        import openvino as ov

        compiled = self._compiled(feeds)  # np.asarray keeps the 0-d timestep 0-d (np.ascontiguousarray would not)
        results = compiled({name: ov.Tensor(np.asarray(feeds[name], order="C")) for name in self.inputs})
        return {output_name(port, self.outputs): np.array(value) for port, value in results.items()}

    def to_device(self, array: np.ndarray) -> np.ndarray:
        return array

    def close(self) -> None:
        self.compiled.clear()
        self.weights = {}
