"""The backend registry: every backend diffrt runs engines on, what each can do, and how its engines are opened.

This is the one place that knows backends by name. The pipeline, the trust checks and the CLI ask a Backend for a
capability (`backend.image_to_image`, `backend.lora == "refit"`, ...) and never compare names. Adding a backend is
one module beside this one and one entry in REGISTRY."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import UserError
from .engine import DENOISERS, Engine


@dataclass(frozen=True)
class EngineOptions:
    """Settings for opening engines; a backend takes those its `options` lists and refuses the others."""

    threads: int | None = None  # CPU threads per session
    cuda_graph: bool = False  # capture the UNet as a CUDA graph per shape
    graph_cache: Path | None = None  # a folder for optimized / compiled graphs that later loads reuse
    gpu_mem_limit: int | None = None  # bytes: a cap on each engine's CUDA memory arena
    fp32_fallback: bool = False  # rerun a stage that overflows on its float32 copy
    release_memory: bool = False  # hand host memory back at the end of each request (onnxruntime's CPU arena shrinks
    # after a request's last denoiser and decoder calls; a server's RSS returns near idle; OpenVINO does so already)

    def given(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name)]


FLAGS = {"threads": "--threads", "cuda_graph": "--cuda-graph", "graph_cache": "--graph-cache",
         "gpu_mem_limit": "--gpu-mem-limit", "fp32_fallback": "--fp32-fallback", "release_memory": "--release-memory"}


@dataclass(frozen=True)
class Backend:
    """A backend's name, capabilities and engine opener. Capabilities are what the pipeline asks instead of names."""

    name: str
    summary: str
    device: str  # where activations live: "cpu" (host memory, checked against a request's size) or "cuda"
    options: frozenset[str]  # EngineOptions fields it honours
    missing: Callable[[], str | None]  # why it cannot run here, with the fix (None: it can)
    opener: Callable[[Path, str, str, EngineOptions, dict | None], Engine] | None  # (graph, component, precision, ...)
    precisions: tuple[str, ...] = ()  # what --precision may ask of it; () runs the package's own precision only
    mixed: bool = False  # a quantized UNet's float parts compute in the backend's precision (recorded as int8+bf16)
    dynamic_shapes: bool = True  # any size and batch without a rebuild (else within profiles built ahead)
    cuda_graphs: bool = False  # replays the UNet as a CUDA graph
    lora: str = "reopen"  # how LoRAs reach weights: "reopen" a session over overridden weights, or "refit" in place
    fp16_weight_overrides: bool = True  # LoRAs reach float16 weights kept behind Casts (onnxruntime folds them first)
    cuda_fusions: bool = False  # runs graphs holding onnxruntime's CUDA-only fused operators
    text_chunks: bool = True  # prompts longer than one 75-token chunk (a longer text sequence)
    image_to_image: bool = True  # runs the VAE encoder (img2img, inpainting)
    per_row_timesteps: bool = True  # rows at different steps share a call where the graph takes one timestep per row
    int8_exact_on: tuple[str, ...] = ()  # CPU kinds (trust.cpu_kind) where its int8 products are summed exactly
    signed_int8_on: tuple[str, ...] = ()  # CPU kinds that compute signed int8 activations right (() any)
    group_opener: Callable[[Path, str, tuple[str, ...]], dict[str, Engine]] | None = None  # engines opened together
    openvino_ir: bool = False  # reads a component's weight-compressed OpenVINO IR where the package has one
    note: str = ""  # said when an option is refused

    def check_options(self, options: EngineOptions) -> None:
        """Refuse, in one line, options this backend does not take."""
        refused = [o for o in options.given() if o not in self.options]
        if not refused:
            return
        flags = ", ".join(FLAGS[o] for o in refused)
        takers = [b.name for b in REGISTRY.values() if all(o in b.options for o in refused)]
        fix = f"leave {'it' if len(refused) == 1 else 'them'} out" + (f" or use --backend {takers[0]}" if takers else "")
        raise UserError(f"the {self.name} backend does not take {flags}{f' ({self.note})' if self.note else ''}: {fix}")

    def compute_precision(self, asked: str, package_precision: str) -> str:
        """What the UNet computes in: on a backend with precisions, `asked` (auto: its best here); else the package's own."""
        if self.precisions:
            from .openvino import compute_precision

            return compute_precision(asked)
        if asked != "auto":
            with_it = [b.name for b in REGISTRY.values() if b.precisions]
            raise UserError(f"--precision picks the CPU precision of --backend {', '.join(with_it)}; {self.name} runs the "
                            "package's own precision: leave it out, or use a package made by `diffrt quantize`")
        return package_precision

    def computes(self, precision: str, unet: str) -> str:
        """What a path computes in, as recorded with images: on a mixed backend a quantized UNet's own precision with
        the backend's for the float rest (int8+bf16); elsewhere the precision it runs in."""
        return f"{unet}+{precision}" if self.mixed and unet != "fp32" else precision

    def open(self, path: Path, component: str, precision: str, options: EngineOptions,
             weights: dict[str, Any] | None = None) -> Engine:
        """One graph's engine, computing in `precision`, its named weights replaced by `weights` (LoRAs)."""
        if self.opener is None:
            raise UserError(f"the {self.name} backend runs only engines built ahead for the GPU (`diffrt build`), not "
                            f"{path}; use --backend ort-cuda for it")
        return self.opener(path, component, precision, options, weights)

    def open_stages(self, package: Path, unet_precision: str, paths: dict[str, Path], precision: str,
                    options: EngineOptions, weights: dict[str, dict[str, Any]]) -> dict[str, Engine]:
        """Every stage's engine with its LoRA weights: together where the backend shares resources between them (and
        refits LoRAs in), else one by one."""
        if self.group_opener is None:
            return {c: self.open(p, c, precision, options, weights.get(c)) for c, p in paths.items()}
        engines = self.group_opener(package, unet_precision, tuple(paths))
        for name, values in weights.items():
            engines[name].refit(values)
        return engines


def _refusal(check: Callable[[], Any]) -> str | None:
    """The one line a check that imports a backend's library refuses with, None when it passes."""
    try:
        check()
    except UserError as exc:
        return str(exc)
    return None


def _ort_cpu_missing() -> str | None:
    from .onnxruntime import onnxruntime

    return _refusal(onnxruntime)


def _ort_cuda_missing() -> str | None:
    from .onnxruntime import cuda_missing

    return cuda_missing()


def _ov_missing() -> str | None:
    from .openvino import openvino_available

    return None if openvino_available() else 'backend ov-cpu needs OpenVINO: `pip install "diffrt[openvino]"`, or use --backend ort-cpu'


def _trt_missing() -> str | None:
    from .tensorrt import import_tensorrt

    return _refusal(import_tensorrt)


def _ort_opener(backend: str) -> Callable[..., Engine]:
    def open_ort(path: Path, component: str, precision: str, options: EngineOptions, weights: dict | None) -> Engine:
        from .onnxruntime import OrtEngine

        return OrtEngine(path, backend, options.threads, cuda_graph=options.cuda_graph and component in DENOISERS,
                         graph_cache=options.graph_cache, gpu_mem_limit=options.gpu_mem_limit, weights=weights)

    return open_ort


def _ov_open(path: Path, component: str, precision: str, options: EngineOptions, weights: dict | None) -> Engine:
    from .openvino import OvEngine

    return OvEngine(path, options.threads, precision, options.graph_cache, weights=weights)


def _trt_open_stages(package: Path, unet_precision: str, components: tuple[str, ...]) -> dict[str, Engine]:
    from .backends.engine_store import engine_precisions
    from .tensorrt import open_engines

    return open_engines(package, engine_precisions(unet_precision), components)


CPU_OPTIONS = frozenset({"threads", "graph_cache", "fp32_fallback", "release_memory"})
REGISTRY: dict[str, Backend] = {b.name: b for b in (
    Backend("ort-cuda", "onnxruntime's CUDA provider (NVIDIA GPUs)", "cuda", CPU_OPTIONS | {"cuda_graph", "gpu_mem_limit"},
            _ort_cuda_missing, _ort_opener("ort-cuda"), cuda_graphs=True, fp16_weight_overrides=False, cuda_fusions=True),
    Backend("ov-cpu", "OpenVINO on the CPU (bf16 where the CPU has AMX or AVX-512-BF16)", "cpu", CPU_OPTIONS,
            _ov_missing, _ov_open, precisions=("auto", "bf16", "fp32"), mixed=True, signed_int8_on=("amx",),
            openvino_ir=True),
    Backend("ort-cpu", "onnxruntime on the CPU", "cpu", CPU_OPTIONS, _ort_cpu_missing, _ort_opener("ort-cpu"),
            fp16_weight_overrides=False, int8_exact_on=("amx", "avx512-vnni", "avx-vnni")),
    Backend("trt", "TensorRT engines built ahead per GPU (`diffrt build`)", "cuda", frozenset({"release_memory"}), _trt_missing, None,
            dynamic_shapes=False, cuda_graphs=True, lora="refit", text_chunks=False, image_to_image=False,
            group_opener=_trt_open_stages,
            note="engines capture CUDA graphs when built with --static; fp32 engines come from `diffrt build --precision fp32`"),
)}
BACKENDS = ("auto", *REGISTRY)
AUTO = ("ort-cuda", "ov-cpu", "ort-cpu")  # what auto may pick, fastest first (TensorRT only when asked for)


def get(name: str) -> Backend:
    """A backend by name, refused in one line when unknown."""
    if name not in REGISTRY:
        raise UserError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    return REGISTRY[name]


def auto_order() -> list[Backend]:
    """The backends 'auto' may pick that can run here, fastest first."""
    return [REGISTRY[n] for n in AUTO if n != "ort-cpu" and REGISTRY[n].missing() is None] + [REGISTRY["ort-cpu"]]


def candidates(name: str) -> list[Backend]:
    """The backends to try for --backend NAME: auto's order, or the one named."""
    return auto_order() if name == "auto" else [get(name)]


def resolve(name: str) -> Backend:
    """A named backend, checked to be installed ('auto': the first of auto_order(); a pipeline also skips paths this
    CPU does not trust)."""
    if name == "auto":
        return auto_order()[0]
    backend = get(name)
    why = backend.missing()
    if why:
        raise UserError(why)
    return backend
