"""fp16 and int8 (QDQ) packages made from an fp32 package, with quality gates against it.

fp16: onnxruntime's float16 converter, graph I/O kept float32, chosen ops and components kept float32.
int8: the UNet quantized by onnxruntime's static QDQ quantizer (activations uint8 with a zero point, weights
symmetric int8 per channel), calibrated on the UNet's real inputs captured from denoising trajectories of the fp32
package; sensitive layers stay in float. Unsigned activations are what OpenVINO's CPU plugin computes right on every
CPU kind (signed ones only on AMX); `diffrt build` gives TensorRT, which is symmetric only, the same ranges as
symmetric int8 (export/trt_ready.py).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffrt.runtime.doctor import GATE_PROMPTS, psnr
from diffrt.runtime.errors import UserError
from diffrt.runtime.optimized import cpu_name
from diffrt.runtime.package import MANIFEST, Package, load_package, required
from diffrt.runtime.pipeline import Pipeline
from diffrt.runtime.residency import trim_heap
from diffrt.runtime.trust import cpu_kind, gate_db

from .cut import drop as drop_cut_graphs
from .linear_layout import in_out

FP16_KEEP_OPS = ("Softmax", "InstanceNormalization", "LayerNormalization", "GroupNormalization", "Pow", "ReduceMean")
INT8_KEEP_LAYERS = ("time_embedding", "time_proj", "conv_in", "conv_out")  # attention too is int8: 1.40x bf16 on OpenVINO
INT8_FLOAT_ATTENTION = INT8_KEEP_LAYERS + ("norm", "attn", "proj_in", "proj_out")  # the earlier default: 1.18x (64x64)
FP16_EXTERNAL = 1_500_000_000  # bytes of float16 weights past which they go to a file of their own (protobuf's limit is 2 GB)
QUANTIZED = ("fp16", "int8")  # what quantize makes; trust.GATES_DB holds every path's gate
CALIBRATION_PROMPTS = (
    "a small red circle on a blue background, top left", "a large yellow square on a black background, center",
    "a green triangle on a white background", "a small cyan bar on a magenta background, bottom right",
    "a photo of a cat sitting on a red sofa", "a mountain landscape at sunset, oil painting",
    "a city street at night in the rain", "a bowl of fruit on a wooden table",
)


@dataclass
class QuantizeOptions:
    precision: str = "fp16"
    keep_fp32_ops: tuple[str, ...] = FP16_KEEP_OPS
    keep_fp32_components: tuple[str, ...] = ()
    keep_fp32_layers: tuple[str, ...] = INT8_KEEP_LAYERS
    calibration_prompts: int = 8
    calibration_seeds: int = 1
    gate_seeds: int = 2
    keep_fallback: bool = True
    accept_quality: bool = False
    overwrite: bool = False
    steps: int | None = None
    size: tuple[int, int] | None = None  # width, height of the calibration and gate images (default: the package's)
    adherence: bool = False
    cuda_fusions: bool = False  # fp16: UNet and VAE decoder fused for onnxruntime's CUDA provider (runs there only)
    activations: str = "uint8"  # int8: "int8" (symmetric, signed) is wrong on OpenVINO without AMX; benchmarks compare
    extra: dict[str, Any] = field(default_factory=dict)


class Recorder:
    """Wraps an engine and keeps a copy of every feed and output (a UNet's real inputs along trajectories)."""

    def __init__(self, engine) -> None:
        self.engine, self.inputs, self.outputs, self.to_device = engine, engine.inputs, engine.outputs, engine.to_device
        self.calls: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = []

    def run(self, feeds, release: bool = False):
        out = self.engine.run(feeds, release=release)
        self.calls.append(({k: np.array(v) for k, v in feeds.items()}, {k: np.array(v) for k, v in out.items()}))
        return out


@contextmanager
def recording(pipe: Pipeline, *stages: str) -> Iterator[dict[str, Recorder]]:
    """Each named stage of pipe wrapped in a Recorder for the block (its engine put back after)."""
    recorders = {s: Recorder(getattr(pipe, s)) for s in stages}
    for stage, recorder in recorders.items():
        setattr(pipe, stage, recorder)
    try:
        yield recorders
    finally:
        for stage, recorder in recorders.items():
            setattr(pipe, stage, recorder.engine)


def sized(size: tuple[int, int] | None) -> dict[str, int]:
    return {"width": size[0], "height": size[1]} if size else {}


def trajectories(pipe: Pipeline, prompts: list[str], seeds: int, steps: int | None,
                 size: tuple[int, int] | None = None) -> list[tuple[dict, dict]]:
    """Every denoiser call (feeds, outputs) made while generating each prompt with each seed."""
    with recording(pipe, pipe.family.denoiser) as recorders:
        for prompt in prompts:
            for seed in range(seeds):
                pipe(prompt, seed=seed, steps=steps, **sized(size))
    return recorders[pipe.family.denoiser].calls


def save_calibration(calls: list[tuple[dict, dict]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"{i:05d}/{k}": v for i, (feeds, _) in enumerate(calls) for k, v in feeds.items()}
    np.savez_compressed(path, **arrays)


def load_calibration(path: Path) -> list[dict[str, np.ndarray]]:
    data = np.load(path)
    calls: dict[str, dict[str, np.ndarray]] = {}
    for key in data.files:
        i, name = key.split("/", 1)
        calls.setdefault(i, {})[name] = data[key]
    return [calls[i] for i in sorted(calls)]


def convert_fp16(src: Path, dst: Path, keep_ops: tuple[str, ...]) -> None:
    """Write dst, the float16 form of src with float32 I/O and keep_ops left in float32, at any size.

    Types come from ONNX shape inference run on the graph without its weights (a > 2 GB model cannot be
    serialized whole for it); the converter then needs no inference of its own. Past FP16_EXTERNAL bytes of
    weights the result keeps them in `<dst stem>.fp16.onnx_data` beside it (never the name src's data has)."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    typed = onnx.shape_inference.infer_shapes(onnx.load(str(src), load_external_data=False))
    model = onnx.load(str(src))
    del model.graph.value_info[:]
    model.graph.value_info.extend(typed.graph.value_info)
    model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True,
                                     op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(keep_ops)))
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    data = f"{dst.stem}.fp16.onnx_data"
    for stale in (dst, dst.with_name(data)):
        stale.unlink(missing_ok=True)
    onnx.save(model, str(dst), save_as_external_data=weights > FP16_EXTERNAL, all_tensors_to_one_file=True, location=data)


def fp16_copy(package: Path, out: Path, keep_ops: tuple[str, ...] = FP16_KEEP_OPS, log: Callable[[str], None] = print) -> Path:
    """out: package with every graph in float16 (but an SDXL VAE that must stay float32) and no quality gates or
    float32 copies (for speed and memory measurements on random weights, where image gates mean nothing)."""
    graphs = {p for p in package.rglob("*") if p.suffix == ".onnx" or p.name.endswith("onnx_data")}
    shutil.copytree(package, out, ignore=lambda d, names: [n for n in names if Path(d) / n in graphs], dirs_exist_ok=True)
    manifest = json.loads((out / MANIFEST).read_text())
    drop_cut_graphs(out, manifest)
    kept = upcast_vae(package, log) if manifest.get("family") == "sdxl" else ()
    for comp, entry in manifest["components"].items():
        if comp in kept:
            for graph in (package / entry["file"]).parent.iterdir():
                if graph in graphs:
                    shutil.copy2(graph, out / graph.relative_to(package))
            continue
        log(f"{comp}: fp16")
        convert_fp16(package / entry["file"], out / entry["file"], keep_ops)
        entry.update(precision="fp16", made_by=f"onnxruntime float16 converter, kept float32: {', '.join(keep_ops)}")
    manifest["precision"] = "fp16"
    write_manifest(out, manifest)
    return out


def sensitive_nodes(path: Path, patterns: tuple[str, ...]) -> list[str]:
    """Nodes whose name or weight names mention one of the patterns (module paths such as time_embedding)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return [n.name for n in model.graph.node if any(p in n.name or any(p in i for i in n.input) for p in patterns)]


def quantize_int8(src: Path, dst: Path, calibration: list[dict[str, np.ndarray]], keep_layers: tuple[str, ...],
                  activations: str = "uint8") -> None:
    """dst: src's Conv, MatMul and Gemm in QDQ form, weights symmetric int8 per channel, activations uint8 with zero
    points (or, asked, symmetric int8)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(calibration)

        def get_next(self):
            return next(self.it, None)

    if activations not in ("uint8", "int8"):
        raise UserError(f"activations must be uint8 or int8, not {activations!r}")
    signed = activations == "int8"
    big = src.stat().st_size > 1_500_000_000 or (src.parent / "model.onnx_data").exists()
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                    per_channel=True, activation_type=QuantType.QInt8 if signed else QuantType.QUInt8,
                    weight_type=QuantType.QInt8, nodes_to_exclude=sensitive_nodes(src, keep_layers),
                    use_external_data_format=big,
                    extra_options={"ActivationSymmetric": signed, "WeightSymmetric": True, "QuantizeBias": False})


def image_psnrs(reference: Pipeline, candidate: Pipeline, prompts: list[str], seeds: int, steps: int | None,
                size: tuple[int, int] | None, close_reference: bool = False) -> dict[str, Any]:
    """PSNR of final images (same prompts, seeds, latents): lowest, mean and how many. close_reference closes the
    reference's engines once its images are made, before the candidate's run (a large model's two copies need not
    fit in memory together)."""
    cases = [(p, s) for p in prompts for s in range(seeds)]
    references = [reference(p, seed=s, steps=steps, **sized(size)).array for p, s in cases]
    if close_reference:
        reference.close()
        trim_heap()
    psnrs = [psnr(ref, candidate(p, seed=s, steps=steps, **sized(size)).array) for ref, (p, s) in zip(references, cases)]
    return {"psnr_db_min": min(psnrs), "psnr_db_mean": float(np.mean(psnrs)), "images": len(psnrs)}


def quality(reference: Pipeline, candidate: Pipeline, prompts: list[str], seeds: int, steps: int | None,
            size: tuple[int, int] | None = None) -> dict[str, Any]:
    """Image PSNRs and per-step relative error of the UNet output on identical inputs (the reference's own trajectory
    fed to both)."""
    images = image_psnrs(reference, candidate, prompts, seeds, steps, size)
    calls = trajectories(reference, prompts[:1], 1, steps, size)
    per_step = []
    for feeds, outs in calls:
        got = candidate.unet.run(feeds)["out_sample"]
        ref = outs["out_sample"]
        per_step.append(float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12)))
    return {**images, "unet_step_rel_err_max": max(per_step), "unet_step_rel_err_mean": float(np.mean(per_step)),
            "unet_step_rel_err": per_step}


def quantize_package(package: str | Path, out: str | Path, options: QuantizeOptions,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write a reduced-precision copy of package to out; returns the quality gates (also stored in its manifest)."""
    from . import _prepare_out, _publish

    if options.precision not in QUANTIZED:
        raise UserError(f"precision {options.precision!r} is not one of fp16, int8 (fp32 is what `diffrt export` writes)")
    if options.cuda_fusions and options.precision != "fp16":
        raise UserError("--cuda-fusions makes float16 graphs for onnxruntime's CUDA provider; use it with --precision fp16")
    source = load_package(package, hashes=False)
    if any(source.precision(c) != "fp32" for c in required(source.family)):
        raise UserError(f"{source.root} is not an fp32 package; quantize the package `diffrt export` wrote")
    if options.cuda_fusions and source.manifest.get("components", {}).get("unet", {}).get("attention") != "mha":
        raise UserError(f"--cuda-fusions needs a UNet exported with fused attention, which {source.root} does not have; "
                        "export the checkpoint again with `diffrt export CHECKPOINT OUT --attention mha`")
    out = Path(out).expanduser()
    tmp = _prepare_out(out, options.overwrite)
    try:
        shutil.rmtree(tmp)
        shutil.copytree(source.root, tmp, ignore=shutil.ignore_patterns("card", "README.md"))
        manifest = json.loads((tmp / MANIFEST).read_text())
        drop_cut_graphs(tmp, manifest)
        reference = Pipeline(source, backend="ort-cpu")
        convert_components(tmp, manifest, reference, options, log)
        write_manifest(tmp, manifest)
        log("quality gates against the fp32 package")
        manifest["quality"] = gates = quality_gates(reference, load_package(tmp), options, log)
        write_manifest(tmp, manifest)
        if not gates["passed"] and not options.accept_quality:
            raise UserError(f"the {options.precision} package misses its quality gate ({missed(gates)}); nothing was "
                            "written: keep more layers in float, or pass --accept-quality to write it anyway")
        if options.cuda_fusions:
            from .cuda_fusions import fuse_package

            reference.close()  # its float32 sessions' memory, before the fusions (a full-size UNet's take 17 GB)
            fuse_package(tmp, source.root, manifest, options.size, log)
            write_manifest(tmp, manifest)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return gates


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """The manifest with every file's current hash."""
    from .writer import file_hashes

    manifest["files"] = file_hashes(root)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def upcast_vae(root: Path, log: Callable[[str], None]) -> tuple[str, ...]:
    """The SDXL VAE graphs kept in float32 because their config says force_upcast (SDXL's VAE overflows in float16
    and decodes black; diffusers' SDXL pipelines upcast it so too); a fp16-safe VAE declares force_upcast false."""
    config = root / "vae_decoder" / "config.json"
    if not (config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("force_upcast", False)):
        return ()
    log("vae: kept float32 (its config says force_upcast: it overflows in float16)")
    return ("vae_decoder", "vae_encoder")


def convert_components(tmp: Path, manifest: dict[str, Any], reference: Pipeline, options: QuantizeOptions,
                       log: Callable[[str], None]) -> None:
    """Each targeted graph of the package in tmp converted in place, its float32 graph kept as the fallback."""
    upcast = upcast_vae(tmp, log) if options.precision == "fp16" and manifest.get("family") == "sdxl" else ()
    kept = options.keep_fp32_components + upcast
    targets = [c for c in manifest["components"] if c not in kept] if options.precision == "fp16" else ["unet"]
    if options.precision == "int8":
        prompts = [CALIBRATION_PROMPTS[i % len(CALIBRATION_PROMPTS)] for i in range(options.calibration_prompts)]
        log(f"capturing UNet inputs along {len(prompts) * options.calibration_seeds} fp32 trajectories")
        calls = trajectories(reference, prompts, options.calibration_seeds, options.steps, options.size)
        calibration_file = tmp / "build" / "calibration" / "unet.npz"
        save_calibration(calls, calibration_file)
    for comp in targets:
        entry = manifest["components"][comp]
        graph = tmp / entry["file"]
        fp32 = graph.with_name("model.fp32.onnx")
        graph.rename(fp32)
        log(f"{comp}: {options.precision}")
        if options.precision == "fp16":
            convert_fp16(fp32, graph, options.keep_fp32_ops)
            entry["made_by"] = f"onnxruntime float16 converter, kept float32: {', '.join(options.keep_fp32_ops)}"
        else:
            in_out(fp32)  # onnxruntime's quantizer takes a MatMul's weight where it is the MatMul's own initializer
            quantize_int8(fp32, graph, load_calibration(calibration_file), options.keep_fp32_layers, options.activations)
            entry["activations"] = options.activations  # runtime/trust.py: int8 ones are wrong on OpenVINO without AMX
            entry["made_by"] = (f"onnxruntime quantize_static QDQ, {options.activations} activations, symmetric int8 "
                                f"per-channel weights, float biases, MinMax "
                                f"calibration on {len(calls)} UNet calls ({calibration_file.relative_to(tmp)}); kept float: "
                                f"{', '.join(options.keep_fp32_layers)}")
        entry["precision"] = options.precision
        entry.pop("weights", None)
        if options.keep_fallback:
            entry["fallback"] = str(fp32.relative_to(tmp))
        else:
            fp32.unlink()
    manifest["precision"] = options.precision


def gate_backends(precision: str) -> list[str]:
    """The CPU backends a package's gates run on: onnxruntime always; OpenVINO too for int8 where it is installed (its
    CPU plugin runs the QDQ graph in int8 kernels of its own, per CPU kind, so those images are gated as well; float
    paths accumulate in float32 everywhere, trust.py needs no gate of theirs)."""
    from diffrt.runtime.backends.openvino import openvino_available

    return ["ort-cpu"] + (["ov-cpu"] if precision == "int8" and openvino_available() else [])


def quality_gates(reference: Pipeline, candidate: Package, options: QuantizeOptions,
                  log: Callable[[str], None]) -> dict[str, Any]:
    """PSNR and per-step UNet error against the fp32 package on onnxruntime, the PSNR on OpenVINO too for int8, each
    path held to its gate (trust.gate_db), with the CPU kind they were measured on (and, asked, the shapes model's
    prompt adherence)."""
    prompts, pipe = list(GATE_PROMPTS), Pipeline(candidate, backend="ort-cpu", gated=False)
    gates = quality(reference, pipe, prompts, options.gate_seeds, options.steps, options.size)
    gate = gate_db(pipe.computes)
    gates.update(computes=pipe.computes, psnr_gate_db=gate, passed=bool(gates["psnr_db_min"] >= gate), cpu=cpu_name(),
                 cpu_kind=cpu_kind())
    log(f"ort-cpu: PSNR min {gates['psnr_db_min']:.1f} dB (gate {gate:.0f} dB), mean {gates['psnr_db_mean']:.1f} dB over "
        f"{gates['images']} images; UNet per-step relative error max {gates['unet_step_rel_err_max']:.2e}, mean "
        f"{gates['unet_step_rel_err_mean']:.2e}")
    for backend in gate_backends(options.precision)[1:]:
        other = Pipeline(candidate, backend=backend, gated=False)
        gate = gate_db(other.computes)
        gates[backend] = {"computes": other.computes, "psnr_gate_db": gate,
                          **image_psnrs(reference, other, prompts, options.gate_seeds, options.steps, options.size)}
        gates["passed"] = gates["passed"] and gates[backend]["psnr_db_min"] >= gate
        log(f"{backend} ({other.computes}): PSNR min {gates[backend]['psnr_db_min']:.1f} dB (gate {gate:.0f} dB), mean "
            f"{gates[backend]['psnr_db_mean']:.1f} dB")
        other.close()
    if options.adherence:
        from diffrt.models.evaluate_shapes import evaluate

        ref_scores, new_scores = evaluate(reference, seeds=2)["scores"], evaluate(pipe, seeds=2)["scores"]
        gates["adherence"] = {"fp32": ref_scores, options.precision: new_scores}
        gates["adherence_passed"] = bool(all(ref_scores[k] - new_scores[k] <= 0.03 for k in ref_scores))
        gates["passed"] = gates["passed"] and gates["adherence_passed"]
        log("held-out prompt adherence (background / colour / shape), fp32 -> " + options.precision + ": "
            + " / ".join(f"{ref_scores[k]:.0%}" for k in ref_scores) + " -> "
            + " / ".join(f"{new_scores[k]:.0%}" for k in new_scores))
    return gates


def missed(gates: dict[str, Any]) -> str:
    """Which gates a package missed, in words."""
    backends = {"ort-cpu": gates, **{b: gates[b] for b in ("ov-cpu",) if b in gates}}
    parts = [f"PSNR {g['psnr_db_min']:.1f} dB on {b}, needs {g['psnr_gate_db']:.0f} dB" for b, g in backends.items()
             if g["psnr_db_min"] < g["psnr_gate_db"]]
    if not gates.get("adherence_passed", True):
        parts.append("prompt adherence fell more than 3 points")
    return "; ".join(parts)
