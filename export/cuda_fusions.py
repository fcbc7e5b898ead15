"""onnxruntime's UNet fusions for its CUDA provider on a fused-attention export, then float16.

onnxruntime's transformers optimizer (model_type "unet") rewrites GroupNorm (+ SiLU, + skip add) into its GroupNorm
and SkipGroupNorm ops, convolutions into NHWC ones, the GEGLU into BiasSplitGelu, and bias adds and layer norms
into their fused forms; diffrt's MultiHeadAttention nodes stay as they are. Those ops exist on the CUDA provider
only: the graph this writes cannot run on the CPU, so it is checked by its structure here and timed on a GPU by
benchmarks/gpu_check.py.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

FUSED_OPS = ("NhwcConv", "GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd", "SkipLayerNormalization",
             "MultiHeadAttention")
EXTERNAL = 1_500_000_000  # bytes of weights past which they are written beside the graph


def fuse_unet_for_cuda(src: Path, dst: Path, fp16: bool = True) -> dict[str, int]:
    """Write dst, the CUDA-fused (and, by default, float16) form of the fp32 UNet graph src; returns how many of
    each fused op it holds."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    model = optimize_model(str(src), model_type="unet", opt_level=0, optimization_options=FusionOptions("unet"),
                           use_gpu=True)
    if fp16:
        model.convert_float_to_float16(keep_io_types=True, op_block_list=["RandomNormalLike", "Resize"])
    weights = sum(len(t.raw_data) for t in model.model.graph.initializer)
    dst.parent.mkdir(parents=True, exist_ok=True)
    model.save_model_to_file(str(dst), use_external_data_format=weights > EXTERNAL)
    counts = Counter(n.op_type for n in model.model.graph.node)
    return {op: counts.get(op, 0) for op in FUSED_OPS}


def cuda_fused_copy(fp32: Path, fp16: Path, out: Path) -> dict[str, int]:
    """out: the fp16 package with its UNet replaced by the CUDA-fused float16 graph made from the fp32 package's."""
    import json
    import shutil

    from diffrt.runtime.package import MANIFEST

    from .precision import write_manifest

    unet = json.loads((fp16 / MANIFEST).read_text())["components"]["unet"]["file"]
    shutil.copytree(fp16, out, ignore=lambda d, names: [n for n in names if Path(d) == fp16 / Path(unet).parent
                                                         and n.startswith("model.")], dirs_exist_ok=True)
    counts = fuse_unet_for_cuda(fp32 / unet, out / unet)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["components"]["unet"].update(
        made_by="onnxruntime UNet fusions for CUDA, then float16: " + ", ".join(f"{k} {v}" for k, v in counts.items()),
        providers=["CUDAExecutionProvider"])
    write_manifest(out, manifest)
    return counts
