"""Weight-only int8 / int4 for OpenVINO (`diffrt quantize --precision int8-weights|int4-weights`): the text
encoders' and the denoiser's matrix products get NNCF-compressed weights (int8 per channel, or int4 in groups of 64,
smaller where a layer's width is no multiple of 64, with int8 for the layers NNCF keeps so), written as each
component's OpenVINO IR beside its ONNX graph, which ort-cpu keeps running as it is.

Convolutions stay float (stored float16, computed in the CPU's bf16 or fp32): OpenVINO's CPU plugin decompresses a
compressed convolution's weights into float32 constants when it compiles, which holds more memory than the float
weights do (SD 1.5's UNet: 3.5 GB held against 2.2 GB in bf16; with only the matrix products compressed, 1.5 GB).
The gate holds ov-cpu's images to the float32 package's (ort-cpu) over the gate prompts."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffrt.runtime.backends.openvino import IR, read_onnx
from diffrt.runtime.errors import UserError
from diffrt.runtime.families import family_for
from diffrt.runtime.package import MANIFEST, load_package
from diffrt.runtime.pipeline import Pipeline
from diffrt.runtime.residency import trim_heap

from .cut import drop as drop_cut_graphs

BITS = {"int8-weights": 8, "int4-weights": 4}
GATES_DB = {8: 30.0, 4: 22.0}  # ov-cpu images' lowest PSNR against float32 (bf16 alone is held to 30 dB)
GROUP = 64  # int4: weights per scale


def compress_graph(graph: Path, bits: int) -> str:
    """graph's OpenVINO IR, its matrix products' weights compressed, written beside it; says how it was made."""
    import nncf
    import openvino as ov

    mode = nncf.CompressWeightsMode.INT8_ASYM if bits == 8 else nncf.CompressWeightsMode.INT4_ASYM
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode

    adjust = AdvancedCompressionParameters(group_size_fallback_mode=GroupSizeFallbackMode.ADJUST, min_adjusted_group_size=16)
    extra = {} if bits == 8 else {"group_size": GROUP, "ratio": 1.0, "advanced_parameters": adjust}
    halved = graph.with_name("float16.xml")  # float weights as float16 first: save_model leaves NNCF's output float32
    ov.save_model(transposes_absorbed(read_onnx(graph)), str(halved), compress_to_fp16=True)
    try:
        model = nncf.compress_weights(ov.Core().read_model(str(halved)), mode=mode,
                                      ignored_scope=nncf.IgnoredScope(types=["Convolution"], validate=False), **extra)
        ov.save_model(model, str(graph.with_name(IR)), compress_to_fp16=False)
        del model
    finally:
        halved.unlink()
        halved.with_suffix(".bin").unlink(missing_ok=True)
    kind = "int8 asymmetric per channel" if bits == 8 else f"int4 asymmetric in groups of {GROUP} (int8 where NNCF keeps it)"
    return f"NNCF {nncf.__version__} compress_weights, {kind}; convolutions float16"


def transposes_absorbed(model):
    """model with each MatMul of a transposed 2-D constant reading the constant itself, transpose_b flipped (the
    [out, in] weights `diffrt export` writes): NNCF finds a matrix product's weight only as its own constant input."""
    import numpy as np
    from openvino import opset13

    for op in model.get_ordered_ops():
        source = op.input_value(1).get_node() if op.get_type_name() == "MatMul" else None
        if source is None or source.get_type_name() != "Transpose":
            continue
        weight, order = (source.input_value(i).get_node() for i in (0, 1))
        if weight.get_type_name() != "Constant" or order.get_type_name() != "Constant" or \
                len(weight.get_output_shape(0)) != 2 or list(np.ravel(order.get_data())) != [1, 0]:
            continue
        flags = op.get_attributes()
        product = opset13.matmul(op.input_value(0), weight.output(0), flags["transpose_a"], not flags["transpose_b"])
        product.set_friendly_name(op.get_friendly_name())
        op.output(0).replace(product.output(0))
    return model


def compress_package(package: str | Path, out: str | Path, precision: str, options: Any,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write package's copy with compressed OpenVINO weights to out; returns its quality gate (also in its manifest)."""
    from diffrt.runtime.doctor import GATE_PROMPTS

    from . import _prepare_out, _publish
    from .precision import image_psnrs, write_manifest

    require_nncf()
    bits = BITS[precision]
    source = load_package(package, hashes=False)
    family = family_for(source)
    targets = [c for c in (*family.encoders, family.denoiser) if source.has(c)]
    out = Path(out).expanduser()
    tmp = _prepare_out(out, options.overwrite)
    try:
        shutil.rmtree(tmp)
        shutil.copytree(source.root, tmp, ignore=shutil.ignore_patterns("card", "README.md", IR, IR.replace(".xml", ".bin")),
                        copy_function=link_or_copy)
        manifest = json.loads((tmp / MANIFEST).read_text())
        drop_cut_graphs(tmp, manifest)
        for comp in targets:
            log(f"{comp}: {precision} for OpenVINO")
            entry = manifest["components"][comp]
            entry["openvino"] = {"file": str(Path(entry["file"]).with_name(IR)), "weights": f"int{bits}",
                                 "made_by": compress_graph(tmp / entry["file"], bits)}
        write_manifest(tmp, manifest)
        trim_heap()  # what compressing left on the heap, before two pipelines open
        log("quality gate: ov-cpu against the float32 package on ort-cpu")
        reference = Pipeline(source, backend="ort-cpu")
        candidate = Pipeline(load_package(tmp), backend="ov-cpu", gated=False)
        gate = {"backend": "ov-cpu", "computes": candidate.computes, "psnr_gate_db": GATES_DB[bits],
                **image_psnrs(reference, candidate, list(GATE_PROMPTS), options.gate_seeds, options.steps, options.size,
                             close_reference=True)}
        gate["passed"] = bool(gate["psnr_db_min"] >= GATES_DB[bits])
        log(f"ov-cpu ({gate['computes']}): PSNR min {gate['psnr_db_min']:.1f} dB (gate {GATES_DB[bits]:.0f} dB), mean "
            f"{gate['psnr_db_mean']:.1f} dB over {gate['images']} images")
        manifest["openvino_weights"] = {"precision": precision, "quality": gate}
        write_manifest(tmp, manifest)
        if not gate["passed"] and not options.accept_quality:
            raise UserError(f"the {precision} package misses its quality gate (PSNR {gate['psnr_db_min']:.1f} dB on "
                            f"ov-cpu, needs {GATES_DB[bits]:.0f} dB); nothing was written: use int8-weights, or pass "
                            "--accept-quality to write it anyway")
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return gate


def link_or_copy(src: str, dst: str) -> None:
    """A large file (graphs and weights, which quantize leaves as they are) hard-linked where the file system allows,
    so the copy costs no disk; small ones (the manifest, configs, which it rewrites) copied."""
    if Path(src).stat().st_size >= 2**20:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def require_nncf() -> None:
    from importlib.util import find_spec

    if find_spec("nncf") is None or find_spec("openvino") is None:
        raise UserError('weight-only quantization for OpenVINO needs NNCF: `pip install "diffrt[nncf]"`')
