"""Whether an ONNX graph is in the form TensorRT 10's ONNX parser takes (checked without TensorRT).

Opsets 9..20 (TensorRT 10.0's range); no ops the parser refuses (onnx-tensorrt's operator table: the
integer/QLinear quantized ops and sequence ops among them); quantization only as explicit Q/DQ pairs with
int8 zero points equal to 0 (TensorRT is symmetric only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

OPSET_RANGE = (9, 20)
REFUSED_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear", "QLinearAdd", "QLinearMul",
    "ConcatFromSequence", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert",
    "SequenceLength", "SplitToSequence", "BitShift", "Compress", "Det", "Hardmax", "IsInf", "MaxRoiPool", "MaxUnpool",
    "Multinomial", "NegativeLogLikelihoodLoss", "OneHot", "RandomNormal", "RandomNormalLike", "Shrink",
    "SoftmaxCrossEntropyLoss", "StringNormalizer", "TfIdfVectorizer", "Unique",
})


def trt_problems(path: str | Path) -> list[str]:
    """Everything that would stop TensorRT 10 from parsing the graph; empty when it is ready."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    problems = []
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and not OPSET_RANGE[0] <= imp.version <= OPSET_RANGE[1]:
            problems.append(f"opset {imp.version} is outside TensorRT 10's {OPSET_RANGE[0]}..{OPSET_RANGE[1]}")
        elif imp.domain not in ("", "ai.onnx"):
            problems.append(f"operator domain {imp.domain!r} (e.g. onnxruntime's contrib ops) is not parsed by TensorRT")
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in REFUSED_OPS:
            problems.append(f"{node.name or node.op_type}: {node.op_type} is not supported by TensorRT's ONNX parser")
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zp = inits.get(node.input[2])
            if zp is None:
                problems.append(f"{node.name}: zero point is not a constant")
                continue
            value = numpy_helper.to_array(zp)
            if value.dtype != np.int8 or value.any():
                problems.append(f"{node.name}: zero point must be int8 and 0 (symmetric), is {value.dtype} {value.ravel()[:3]}")
    return problems


def symmetric_form(src: Path, dst: Path) -> int:
    """Write dst: src with each uint8 activation Q/DQ pair made int8 with zero point 0 over the same calibrated range
    (scale = max(|low|, |high|) / 127, what symmetric calibration gives), the form TensorRT takes; returns how many
    pairs changed. The range of a uint8 pair is [-z s, (255 - z) s], 0 always inside it (onnxruntime's calibration
    widens it to hold 0)."""
    import onnx
    from onnx import numpy_helper

    from diffrt.runtime.stored import loaded

    model = loaded(src)
    inits = {i.name: i for i in model.graph.initializer}
    made: dict[tuple[str, str], tuple[str, str]] = {}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        zp = inits.get(node.input[2])
        if zp is None or zp.data_type != onnx.TensorProto.UINT8:
            continue
        key = (node.input[1], node.input[2])
        if key not in made:
            z = numpy_helper.to_array(zp).astype(np.float64)
            scale = numpy_helper.to_array(inits[key[0]])
            made[key] = (f"{key[0]}__symmetric", f"{key[1]}__symmetric")
            model.graph.initializer.extend([
                numpy_helper.from_array((scale * np.maximum(z, 255 - z) / 127).astype(scale.dtype), made[key][0]),
                numpy_helper.from_array(np.zeros(z.shape, np.int8), made[key][1])])
        node.input[1], node.input[2] = made[key]
    used = {i for node in model.graph.node for i in node.input}
    kept = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    del model.graph.value_info[:]  # the quantized tensors' recorded types were uint8
    dst.parent.mkdir(parents=True, exist_ok=True)
    big = sum(len(i.raw_data) for i in kept) > 1_500_000_000
    onnx.save(model, str(dst), save_as_external_data=big, all_tensors_to_one_file=True, location=f"{dst.name}.data")
    return len(made)
