"""`diffrt build`: one TensorRT engine per component from a package's ONNX graphs (TensorRT 10/11 Python API).

Not run on any machine of ours yet (TensorRT cannot be installed here); the profile, naming and manifest
logic it relies on is tested without TensorRT.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffrt.runtime.backends.engine_store import engine_file, gpu_slug, write_engine_meta
from diffrt.runtime.control import CONTROL
from diffrt.runtime.errors import UserError
from diffrt.runtime.package import COMPONENTS, Package, load_package

from .profiles import derive_profiles, parse_batch, parse_size
from .trt_ready import symmetric_form


@dataclass
class BuildOptions:
    precision: str = "fp16"
    batch: str = "1"
    size: str | None = None
    static: bool = False
    timing_cache: Path | None = None
    version_compatible: bool = False
    opt_level: int = 3
    workspace_gb: float = 4.0
    components: tuple[str, ...] = COMPONENTS
    refittable: bool = False  # REFIT: LoRAs are applied by TensorRT's Refitter, without a rebuild


def build_flags(precision: str, graph_precision: str, trt_major: int, version_compatible: bool,
                refittable: bool = False) -> dict[str, Any]:
    """Which network and builder flags a component gets.

    QDQ (int8) and fp16 graphs build strongly typed: the graph's types are the precision. An fp32 graph asked
    for fp16 uses TensorRT 10's FP16 flag; TensorRT 11 has no such flag, so it needs the fp16 package."""
    strongly_typed = graph_precision in ("int8", "fp16") or trt_major >= 11
    builder = []
    if precision == "fp16" and graph_precision == "fp32" and precision != graph_precision:
        if trt_major >= 11:
            raise UserError("TensorRT 11 builds fp16 only from fp16 graphs: make the fp16 package first "
                            "(`diffrt quantize PACKAGE OUT --precision fp16`) and build that")
        builder.append("FP16")
    if version_compatible:
        builder += ["VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME"]
    if refittable:
        builder.append("REFIT")
    return {"strongly_typed": strongly_typed, "builder": builder}


def check_trt_package(package: Path) -> None:
    """Refuse, before TensorRT is needed, a package whose graphs TensorRT's parser cannot read."""
    pkg = load_package(package)
    fused = [c for c, e in pkg.manifest.get("components", {}).items() if e.get("attention") == "mha"]
    if fused:
        raise UserError(f"{package} was exported with onnxruntime's fused attention ({', '.join(fused)}), which TensorRT "
                        f"cannot parse; export a package for TensorRT with `diffrt export CHECKPOINT OUT --attention plain`")


def package_profiles(pkg, batch, width, height, static: bool = False) -> dict[str, dict[str, dict[str, list[int]]]]:
    """Optimization profiles for every graph of the package, from its manifest or, for an optimum export without
    one, from the graphs' declared inputs."""
    from .writer import graph_io

    components = {c: {"inputs": (pkg.manifest.get("components", {}).get(c, {}).get("inputs")
                                 or graph_io(pkg.component(c))["inputs"])}
                  for c in COMPONENTS if pkg.has(c)}
    from diffrt.runtime.families import family_class

    shape = {"vae_scale_factor": pkg.vae_scale_factor, "text_max_length": pkg.text_max_length,
             "latent_channels": pkg.latent_channels, "components": components, "family": pkg.family,
             "max_sequence_length": pkg.defaults.get("max_sequence_length")}
    cfg = family_class(pkg.family).guidance == "cfg"  # FLUX doubles its batch only for true CFG
    return derive_profiles(shape, batch, width, height, static, guided=cfg and pkg.defaults["guidance_scale"] > 1)


def trt_graph(pkg: Package, comp: str, log: Callable[[str], None] = print) -> Path:
    """The graph TensorRT builds a component from: an int8 UNet's uint8 activations made symmetric int8 over the same
    ranges (build/trt/<component>/model.onnx, made again when the package's graph changed), any other as it is."""
    graph = pkg.component(comp)
    if pkg.precision(comp) != "int8":
        return graph
    out = pkg.root / "build" / "trt" / comp / "model.onnx"
    if not out.is_file() or out.stat().st_mtime < graph.stat().st_mtime:
        log(f"{comp}: {symmetric_form(graph, out)} activation ranges made symmetric int8 for TensorRT")
    return out


def build_engines(package: Path, options: BuildOptions, log: Callable[[str], None] = print) -> list[Path]:
    check_trt_package(package)
    import tensorrt as trt

    from diffrt.runtime.backends.tensorrt import current_device
    from diffrt.runtime.families import family_class, family_for

    pkg = load_package(package)
    loras = family_class(pkg.family).loras  # refittable engines are for LoRA switching
    if options.precision == "int8" and pkg.precision(pkg.denoiser) != "int8":
        raise UserError(f"{package} has no int8 (QDQ) UNet; make one with `diffrt quantize {package} OUT --precision int8` "
                        "and build that package")
    size = options.size or f"{pkg.defaults['width']}x{pkg.defaults['height']}"
    width, height = parse_size(size, family_for(pkg).size_multiple, pkg.defaults["width"])
    profiles = package_profiles(pkg, parse_batch(options.batch), width, height, options.static)
    device = current_device()
    major = int(trt.__version__.split(".")[0])
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_bytes = options.timing_cache.read_bytes() if options.timing_cache and options.timing_cache.is_file() else b""
    written = []
    controlnets = tuple(CONTROL + n for n in pkg.controlnets()) if options.components == COMPONENTS else ()
    for comp in (c for c in (*options.components, *controlnets) if pkg.has(c)):
        graph = trt_graph(pkg, comp, log)
        flags = build_flags(options.precision, pkg.precision(comp), major, options.version_compatible,
                            options.refittable and loras and (comp == "unet" or comp.startswith("text_encoder")))
        network_flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if flags["strongly_typed"] else 0
        network = builder.create_network(network_flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(graph)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise UserError(f"TensorRT's ONNX parser refused {graph}: {errors[:300]}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * 2**30))
        config.builder_optimization_level = options.opt_level
        for flag in flags["builder"]:
            config.set_flag(getattr(trt.BuilderFlag, flag))
        cache = config.create_timing_cache(cache_bytes)
        config.set_timing_cache(cache, ignore_mismatch=False)
        profile = builder.create_optimization_profile()
        for name, p in profiles[comp].items():
            profile.set_shape(name, p["min"], p["opt"], p["max"])
        config.add_optimization_profile(profile)
        log(f"{comp}: building {options.precision} engine ({', '.join(flags['builder']) or 'strongly typed'})")
        start = time.perf_counter()
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise UserError(f"TensorRT could not build {comp}; see the messages above (workspace {options.workspace_gb} GB, "
                            f"try --workspace larger or a narrower --size range)")
        cache_bytes = bytes(cache.serialize())
        out = engine_file(pkg.root, device.gpu, device.compute_capability, trt.__version__, comp, options.precision)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(plan)
        write_engine_meta(out, {
            "component": comp, "precision": options.precision, "profiles": [profiles[comp]],
            "flags": flags, "tensorrt": trt.__version__, "gpu": gpu_slug(device.gpu),
            "compute_capability": list(device.compute_capability), "version_compatible": options.version_compatible,
            "opt_level": options.opt_level, "build_seconds": round(time.perf_counter() - start, 1),
            "built": time.strftime("%Y-%m-%d %H:%M:%S"),
            "source": {"file": str(graph.relative_to(pkg.root)), "sha256": hashlib.sha256(graph.read_bytes()).hexdigest()}})
        written.append(out)
    if options.timing_cache:
        options.timing_cache.write_bytes(cache_bytes)
    return written
