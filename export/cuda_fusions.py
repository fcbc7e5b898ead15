"""onnxruntime's UNet and VAE fusions for its CUDA provider on a fused-attention export, then float16.

onnxruntime's transformers optimizer (model types "unet" and "vae") rewrites GroupNorm (+ SiLU, + skip add) into its
GroupNorm and SkipGroupNorm ops, convolutions into NHWC ones, the GEGLU into BiasSplitGelu, and bias adds and layer
norms into their fused forms; diffrt's MultiHeadAttention nodes stay as they are. Several of those ops exist on the
CUDA provider only, so a fused graph is checked on the CPU by onnx's reference evaluator with those ops written out
(cuda_reference.py) against the plain graph on onnxruntime, and timed on a GPU by benchmarks/gpu_check.py.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

from .cuda_reference import CUDA_SIZES, CudaKernelRefusal

FUSED_OPS = ("NhwcConv", "GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd", "SkipLayerNormalization",
             "MultiHeadAttention")
MODEL_TYPES = {"unet": "unet", "vae_decoder": "vae"}  # component -> onnxruntime optimizer model type
EXTERNAL = 1_500_000_000  # bytes of weights past which they are written beside the graph
PARITY_TOLERANCE = 0.02  # max |fused - plain| over max |plain|, both float16 (their own rounding differs)
GROUP_NORM_SWITCHES = ("enable_group_norm", "enable_skip_group_norm")
FUSION_SWITCHES = {"BiasSplitGelu": ("enable_bias_splitgelu",), "BiasAdd": ("enable_bias_add",),  # FusionOptions' names
                   "GroupNorm": GROUP_NORM_SWITCHES, "SkipGroupNorm": GROUP_NORM_SWITCHES}


def fuse_for_cuda(src: Path, dst: Path, component: str = "unet", fp16: bool = True) -> dict[str, int]:
    """Write dst, the CUDA-fused (and, by default, float16) form of the fp32 graph src of component (unet or
    vae_decoder), its weights in `<dst name>.data` past EXTERNAL bytes; returns how many of each fused op it holds.
    Fusions whose CUDA kernels would refuse this model's sizes are left out."""
    model = optimized(src, MODEL_TYPES[component])
    refused = refused_by_cuda(model.model)
    if refused:
        model = optimized(src, MODEL_TYPES[component], tuple(sorted(refused)))
    if fp16:
        model.convert_float_to_float16(keep_io_types=True, op_block_list=["RandomNormalLike", "Resize"])
    weights = sum(len(t.raw_data) for t in model.model.graph.initializer)
    dst.parent.mkdir(parents=True, exist_ok=True)
    model.save_model_to_file(str(dst), use_external_data_format=weights > EXTERNAL)
    counts = Counter(n.op_type for n in model.model.graph.node)
    return {op: counts[op] for op in FUSED_OPS if counts[op]}


def optimized(src: Path, kind: str, without: tuple[str, ...] = ()):
    """onnxruntime's optimizer (model type kind) over src, with the fusions into the ops in `without` switched off."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    from diffrt.runtime.stored import loaded

    from .linear_layout import to_in_out

    options = FusionOptions(kind)
    for switch in (s for op in without for s in FUSION_SWITCHES[op]):
        setattr(options, switch, False)
    model = loaded(src)
    to_in_out(model, src.parent)  # its fusions find a MatMul's weight as the MatMul's own initializer
    return optimize_model(model, model_type=kind, opt_level=0, optimization_options=options, use_gpu=True)


def refused_by_cuda(model) -> set[str]:
    """Fused ops in model whose CUDA kernels refuse its sizes: BiasAdd and BiasSplitGelu take SD's channel counts only,
    GroupNorm an even number of channels per group (a smaller or distilled model keeps the plain ops instead)."""
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    refused = set()
    for node in model.graph.node:
        last = (dims.get(node.input[1]) if len(node.input) > 1 else None) or [0]
        if node.op_type in CUDA_SIZES and last[-1] not in CUDA_SIZES[node.op_type]:
            refused.add(node.op_type)
        if node.op_type in ("GroupNorm", "SkipGroupNorm"):
            groups = next(a.i for a in node.attribute if a.name == "groups")
            if (last[-1] // groups) % 2:
                refused.add(node.op_type)
    return refused


def parity(plain: Path, fused: Path, feeds: dict[str, np.ndarray]) -> float:
    """max |fused - plain| / max |plain| of the first output: the plain graph on onnxruntime's CPU provider, the fused
    one on onnx's reference evaluator with the CUDA-only ops written out."""
    import onnxruntime as ort

    from .cuda_reference import run_reference

    want = ort.InferenceSession(str(plain), providers=["CPUExecutionProvider"]).run(None, feeds)[0].astype(np.float32)
    got = run_reference(fused, feeds)[0].astype(np.float32)
    if got.shape != want.shape:
        return float("inf")
    return float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-12))


def cuda_fused_copy(fp32: Path, fp16: Path, out: Path) -> dict[str, dict[str, int]]:
    """out: the fp16 package with its UNet (and its VAE decoder, where that is float16) replaced by CUDA-fused float16
    graphs made from the fp32 package's; returns each one's fused-op counts."""
    from diffrt.runtime.package import MANIFEST

    from .precision import write_manifest

    manifest = json.loads((fp16 / MANIFEST).read_text())
    fused = {c: manifest["components"][c] for c in fusable(manifest)}
    folders = {fp16 / Path(e["file"]).parent for e in fused.values()}
    shutil.copytree(fp16, out, dirs_exist_ok=True,
                    ignore=lambda d, names: [n for n in names if Path(d) in folders and n.startswith("model.")])
    counts = {}
    for comp, entry in fused.items():
        counts[comp] = fuse_for_cuda(fp32 / entry["file"], out / entry["file"], comp)
        mark_cuda_only(entry, counts[comp])
    write_manifest(out, manifest)
    return counts


def mark_cuda_only(entry: dict, counts: dict[str, int]) -> None:
    """A manifest entry for a fused graph: what made it, and that it runs on onnxruntime's CUDA provider only."""
    entry.update(made_by=f"onnxruntime fusions for CUDA, then float16: {described(counts)}", providers=["CUDAExecutionProvider"])


def described(counts: dict[str, int]) -> str:
    return ", ".join(f"{op} {n}" for op, n in counts.items())


def fusable(manifest: dict) -> list[str]:
    """The components of a package that get CUDA-fused graphs: the UNet, and the VAE decoder where it is float16."""
    return [c for c in MODEL_TYPES if manifest["components"].get(c, {}).get("precision") == "fp16"]


def recorded_feeds(root: Path, size: tuple[int, int] | None) -> dict[str, dict[str, np.ndarray]]:
    """One UNet call's and one VAE decoder call's real inputs, from two steps of the package at root on the CPU."""
    from diffrt.runtime.package import load_package
    from diffrt.runtime.pipeline import Pipeline

    from .precision import CALIBRATION_PROMPTS, recording, sized

    pipe = Pipeline(load_package(root), backend="ort-cpu")
    with recording(pipe, "unet", "vae_decoder") as recorders:
        pipe(CALIBRATION_PROMPTS[4], seed=0, steps=2, **sized(size))
    return {"unet": recorders["unet"].calls[-1][0], "vae_decoder": recorders["vae_decoder"].calls[0][0]}


def fuse_package(root: Path, source: Path, manifest: dict, size: tuple[int, int] | None, log=print) -> None:
    """Replace, in the fp16 package at root (manifest: its manifest, updated), the UNet and the float16 VAE decoder by
    CUDA-fused graphs made from the fp32 package source's, each first checked on the CPU against the graph it replaces
    on the same real inputs; refused in one line past PARITY_TOLERANCE."""
    from diffrt.runtime.errors import UserError

    if not fusable(manifest):
        log("--cuda-fusions: neither the UNet nor the VAE decoder is float16 here; nothing fused")
        return
    feeds = recorded_feeds(root, size)
    for comp in fusable(manifest):
        entry = manifest["components"][comp]
        plain = root / entry["file"]
        work = plain.parent / "cuda-fused"
        counts = fuse_for_cuda(source / entry["file"], work / plain.name, comp)
        try:
            error = parity(plain, work / plain.name, feeds[comp])
        except CudaKernelRefusal as exc:
            raise UserError(f"the CUDA-fused {comp} would be refused by onnxruntime's CUDA kernels ({exc}); quantize "
                            "without --cuda-fusions") from None
        log(f"{comp}: CUDA fusions ({described(counts)}); on the CPU against the plain "
            f"float16 graph: max error {error:.1e} of the output's range (limit {PARITY_TOLERANCE})")
        if not error <= PARITY_TOLERANCE:
            raise UserError(f"the CUDA-fused {comp} differs from the plain float16 graph by {error:.1e} of its output's "
                            f"range (limit {PARITY_TOLERANCE}); quantize without --cuda-fusions")
        for stale in (plain, plain.with_name(f"{plain.stem}.fp16.onnx_data")):
            stale.unlink(missing_ok=True)
        for done in work.iterdir():
            done.rename(plain.parent / done.name)
        work.rmdir()
        mark_cuda_only(entry, counts)
        entry["cuda_parity"] = {"max_error_of_range": error, "inputs": "one real call at the gate size", "limit": PARITY_TOLERANCE}
