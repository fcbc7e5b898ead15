"""A memory budget the pipeline plans for: each plan's predicted peak for a request (whole process, on the CPU
backends) and the fastest plan that fits.

The prediction adds, per stage, the weights as the backend holds them (its compute precision's bytes per
parameter), what opening the engine holds besides (OpenVINO reads the graph's file while it compiles), and the
activations of the stage's largest call (the UNet's attention scores; the VAE decoder's full-resolution feature
maps, or one tile's); resident plans hold every stage's weights at once, sequential ones one stage's. The constants
were measured on an AMD EPYC (SD 1.5 architecture and the bundled model, benchmarks/memory_plans.py); a test checks
the prediction against a measured peak."""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .backends.registry import REGISTRY, Backend
from .errors import UserError
from .package import Package, load_package
from .tiling import Tiles

GB = 2**30
STORED = {"fp32": 4, "fp16": 2, "int8": 1}  # bytes per parameter in the package's files, by component precision
HELD = {"fp32": 4, "bf16": 2}  # bytes per parameter OpenVINO holds a float component in, by compute precision
BASE = {"ov-cpu": 0.30 * GB, "ort-cpu": 0.20 * GB}  # the process with the runtime and backend loaded, no engine
OPENING = {"ov-cpu": (0.15 * GB, 0.5), "ort-cpu": (0.0, 0.15)}  # what opening an engine leaves held beside its
# weights: up to a + b x its graph file's bytes, never more than the file (OpenVINO reads the graph file while it
# compiles, diffrt dropping its pages every quarter second, and keeps part of what compiling allocated: SD 1.5's
# float32 UNet 0.8 GB, SDXL's 3.7 GB)
OPENING_SHARE = {"ir": 0.22, "int8": 0.45}  # b on OpenVINO for a weight-compressed IR, and for an int8 (QDQ) graph
UNET_MAPS = 20  # float32 maps per row at the latents' size and the denoiser's first width, held while it runs
SCORE_COPIES = {"ov-cpu": 0.0, "ort-cpu": 4.2}  # of a plain (MatMul/Softmax) attention's scores held by the UNet
VAE_SCORE_COPIES = {"ov-cpu": 0.0, "ort-cpu": 2.0}  # ... by the VAE decoder's mid-block attention
DECODER_MAPS = {"ov-cpu": 3, "ort-cpu": 8}  # full-resolution float32 maps of the decoder's last level held at its peak
ARENA_GROWTH = {"ov-cpu": 1.0, "ort-cpu": 2.3}  # resident engines' activations after a few requests, over one's
# (onnxruntime's arena of each session grows on later requests: the bundled model at 384x384, 3 requests: 1.55 GB
# against 0.85 after one)
HEADROOM = 0.9  # of the memory the system reports available, that a request may plan to take
MARGIN = 1.6  # the prediction is an upper bound; measured peaks lie between it / MARGIN and it (tests/test_memory.py)


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where the system does not say)."""
    return proc_field("/proc/meminfo", "MemAvailable")


def proc_field(path: str, key: str) -> int | None:
    """A kB field of a /proc file, in bytes (None where the system does not say)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def room_bytes() -> int | None:
    """What a whole-process peak may reach: the memory the system has available plus what this process already holds
    (its anonymous memory: the engines it opened count inside the predicted peak, not against it)."""
    free = available_bytes()
    return None if free is None else free + (proc_field("/proc/self/status", "RssAnon") or 0)


def attention_layout(root: Path) -> tuple[int, int] | None:
    """(heads, downsampling of the first level with attention) from the package's UNet config, or a DiT's (its heads,
    its patch: FLUX's latents are packed 2x2 into tokens before its patch of 1); None without one."""
    try:
        config = json.loads((root / "transformer" / "config.json").read_text())
        packed = 2 if config.get("_class_name") == "FluxTransformer2DModel" else 1
        return int(config.get("num_attention_heads", 24)), int(config.get("patch_size", 2)) * packed
    except (OSError, ValueError):
        pass
    try:
        config = json.loads((root / "unet" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    blocks = config.get("down_block_types") or []
    level = next((i for i, b in enumerate(blocks) if "Attn" in b), None)
    if level is None:
        return None
    heads = config.get("num_attention_heads") or config.get("attention_head_dim") or 8
    heads = heads[level] if isinstance(heads, list) else heads
    return int(heads), 2**level


@dataclass(frozen=True)
class Plan:
    """How a request runs: engines all open or one stage's at a time, the VAE whole or in tiles."""

    name: str
    residency: str
    tiled: bool

    def describe(self) -> str:
        stages = "every stage's engine open" if self.residency == "resident" else "one stage's engines open at a time"
        return stages + (", the VAE in tiles" if self.tiled else "")


PLANS = {p.name: p for p in (Plan("resident", "resident", False), Plan("resident+tiled", "resident", True),
                             Plan("sequential", "sequential", False), Plan("sequential+tiled", "sequential", True))}
# fastest first: tiles cost a little, opening every stage's engines again for each request a lot


def component_bytes(package: Package, name: str, backend: str = "ort-cpu") -> int:
    """The bytes of the graph files the backend reads for a component (model.onnx and the external data files it
    names, or ov-cpu's weight-compressed OpenVINO IR's weights)."""
    graph = package.component(name)
    if backend == "ov-cpu" and package.openvino_weights(name):
        return graph.with_name("openvino_model.bin").stat().st_size  # (the .xml is its graph, read and dropped)
    return graph_bytes(str(graph), graph.stat().st_mtime)


@functools.lru_cache(maxsize=64)
def graph_bytes(path: str, mtime: float) -> int:
    """An ONNX graph's size with its external data files (the siblings its bytes name; a quantized package's float32
    fallback keeps its own beside it)."""
    graph = Path(path)
    text = graph.read_bytes()
    return graph.stat().st_size + sum(f.stat().st_size for f in graph.parent.iterdir()
                                      if f != graph and f.is_file() and f.name.encode() in text and "onnx" in f.name)


def held_bytes(package: Package, name: str, backend: str, precision: str) -> float:
    """A component's weights as the backend holds them once open."""
    size = component_bytes(package, name, backend)
    if backend == "ov-cpu" and package.openvino_weights(name):  # float16 convolutions, compressed matrix products
        return size * (1.5 if precision == "fp32" else 1.0)
    stored = package.precision(name)
    entry = package.manifest.get("components", {}).get(name, {})
    per_param = STORED["fp16"] if entry.get("weights") == "fp16" else STORED.get(stored, 4)  # export --weights-fp16
    if backend == "ov-cpu":  # float weights packed in its compute precision, an int8 graph's as they are
        return size / per_param * HELD[precision] if stored in ("fp32", "fp16") else float(size)
    return size / per_param * STORED.get(stored, 4)  # onnxruntime folds float16 weights behind Casts into float32


def opening_bytes(package: Package, name: str, backend: str) -> float:
    size = component_bytes(package, name, backend)
    fixed, share = OPENING[backend]
    if backend == "ov-cpu" and package.openvino_weights(name):
        share = OPENING_SHARE["ir"]
    elif backend == "ov-cpu" and package.precision(name) == "int8":
        share = OPENING_SHARE["int8"]
    return min(size, fixed + share * size)


def activation_bytes(package: Package, name: str, backend: str, width: int, height: int, rows: int, tiled: bool) -> float:
    """The largest call's activations of a stage: the denoiser's attention scores, the decoder's feature maps."""
    factor, plain = package.vae_scale_factor, package.manifest.get("components", {}).get(name, {}).get("attention") != "mha"
    if name == package.denoiser:
        maps = UNET_MAPS * rows * denoiser_width(package) * (height // factor) * (width // factor) * 4
        layout = attention_layout(package.root)
        if layout is None or not plain:
            return maps
        heads, down = layout
        tokens = (height // factor // down) * (width // factor // down)
        return maps + SCORE_COPIES[backend] * rows * heads * tokens**2 * 4
    if name == "vae_decoder":
        config = vae_config(package)
        side = Tiles.of(config).sample if tiled and config else None
        pixels = min(side * side, width * height) if side else width * height
        channels = config.get("block_out_channels", [128])[0] if config else 128
        scores = VAE_SCORE_COPIES[backend] * (pixels // factor**2) ** 2 * 4 if plain else 0.0
        return DECODER_MAPS[backend] * channels * pixels * 4 + scores
    return 0.0


def denoiser_width(package: Package) -> int:
    """The denoiser's first block width (a UNet's block_out_channels[0]; a DiT's inner width over its patch area)."""
    try:
        config = json.loads((package.root / package.denoiser / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 320
    if "block_out_channels" in config:
        return int(config["block_out_channels"][0])
    inner = config.get("num_attention_heads", 24) * config.get("attention_head_dim", 64)
    return max(1, int(inner // config.get("patch_size", 2) ** 2))


def vae_config(package: Package) -> dict | None:
    path = package.root / "vae_decoder" / "config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def predict(package: Package, backend: str, precision: str, plan: Plan, width: int, height: int, rows: int = 2) -> float:
    """The whole process's predicted peak in bytes for one request of rows denoiser rows (2: one guided image)."""
    stages = package_stages(package)
    held = {c: held_bytes(package, c, backend, precision) for c in stages}
    opening = {c: opening_bytes(package, c, backend) for c in stages}
    active = {c: activation_bytes(package, c, backend, width, height, rows, plan.tiled) for c in stages}
    if plan.residency == "resident":  # every stage's weights, what opening each left, and the largest call's activations
        return BASE[backend] + sum(held.values()) + sum(opening.values()) + ARENA_GROWTH[backend] * max(active.values())
    return BASE[backend] + max(held[c] + max(opening[c], active[c]) for c in stages)


def package_stages(package: Package) -> tuple[str, ...]:
    from .families import family_for

    return tuple(c for c in family_for(package).stages() if package.has(c))


def predicted_peaks(path: str | Path, backend: str, size: tuple[int, int], precision: str | None = None) -> dict[str, float]:
    """Each plan's predicted peak (bytes) for one guided image of size (width, height) on a CPU backend."""
    package = load_package(path, verify=False)
    if precision is None:
        precision = REGISTRY[backend].compute_precision("auto", "fp32")
    return {name: predict(package, backend, precision, plan, *size) for name, plan in PLANS.items()}


def round_up(size: float) -> str:
    """Bytes as GB rounded up to a tenth (a budget that holds them)."""
    return f"{math.ceil(size / GB * 10) / 10:g}"


def budget_residency(package: Package, backend: Backend, precision: str, budget: float) -> str:
    """The residency of the fastest plan that fits budget (GB) at the model's own size; refused in one line, naming the
    budget that would do, where none fits, or where the backend does not hold the model in host memory."""
    if backend.device != "cpu" or backend.name not in BASE:
        raise UserError(f"a memory budget plans the host memory of the CPU backends; {backend.name} holds the model "
                        "in GPU memory: leave --memory-budget out (use --gpu-mem-limit), or use ov-cpu or ort-cpu")
    d = package.defaults
    rows = 2 if d.get("guidance_scale", 7.5) > 1 else 1
    peaks = {n: predict(package, backend.name, precision, p, d["width"], d["height"], rows) for n, p in PLANS.items()}
    fitting = [n for n, peak in peaks.items() if peak <= budget * GB]
    if not fitting:
        least = min(peaks, key=peaks.get)
        raise UserError(f"no memory plan fits {package.name} in {budget:g} GB at its own size ({d['width']}x{d['height']}): "
                        f"the leanest ({least}) needs about {peaks[least] / GB:.1f} GB; give --memory-budget "
                        f"{round_up(peaks[least])} or more")
    return PLANS[fitting[0]].residency


def check_budget(value: object) -> float:
    """A budget in GB, checked: a positive number."""
    try:
        budget = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UserError(f"memory budget must be a number of GB (e.g. 1.5), not {value!r}") from None
    if not budget > 0 or budget == float("inf"):
        raise UserError(f"memory budget must be a positive number of GB, not {value!r}")
    return budget


def check_fits(need, width: int, height: int, step: int) -> str | None:
    """Why a request of this size would not fit in this machine's available memory (with the largest square size
    that would), or None; need(width, height) is its predicted peak in bytes, step the size multiple to suggest."""
    free = room_bytes()
    if free is None or need(width, height) <= free * HEADROOM:
        return None
    side = max(width, height) // step * step
    while side > step and need(side, side) > free * HEADROOM:
        side -= step
    return (f"{width}x{height} needs about {need(width, height) / GB:.0f} GB and this machine has {free / GB:.0f} GB "
            f"free; the largest square size that fits is about {side}x{side} (fewer images at once also helps)")


def memory_table(path: str | Path, backends: list[str]) -> list[str]:
    """`diffrt doctor --memory`: each plan's predicted peak per size (the model's own, then 1.5x and 2x) per CPU
    backend, beside the memory this machine has free."""
    package = load_package(path, verify=False)
    own = package.defaults["width"], package.defaults["height"]
    step = 8 * package.vae_scale_factor
    sizes = [tuple(max(step, round(s * k / step) * step) for s in own) for k in (1, 1.5, 2)]
    free = available_bytes()
    lines = [f"predicted peak memory of one guided image, whole process (GB; this machine has "
             f"{free / GB:.1f} GB free):" if free else "predicted peak memory of one guided image, whole process (GB):",
             f"{'backend':8} {'size':>9}  " + "  ".join(f"{name:>16}" for name in PLANS)]
    for backend in (b for b in backends if b in BASE):
        precision = REGISTRY[backend].compute_precision("auto", "fp32")
        for w, h in sizes:
            peaks = [predict(package, backend, precision, plan, w, h) / GB for plan in PLANS.values()]
            lines.append(f"{backend:8} {f'{w}x{h}':>9}  " + "  ".join(f"{p:16.2f}" for p in peaks))
    return lines
