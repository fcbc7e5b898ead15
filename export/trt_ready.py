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
