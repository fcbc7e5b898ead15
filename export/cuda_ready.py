"""Static checks that an ONNX graph can run whole on onnxruntime's CUDA provider and be captured as a CUDA graph.

onnxruntime places shape arithmetic (Shape, Gather, Concat, ... on int64) on the CPU; that is allowed in a CUDA
graph as long as nothing it computes has to be copied to the GPU. A float computed from a shape (the decomposed
attention's Shape -> Slice -> Cast -> Sqrt scale) is such a copy: onnxruntime then refuses graph capture.
"""

from __future__ import annotations

from pathlib import Path

FLOAT_TYPES = {1, 10, 11, 16}  # onnx TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16
# ops whose output is a device tensor even when their inputs are shapes (the shape is only read on the host)
DEVICE_FROM_SHAPE = {"ConstantOfShape", "Expand", "Reshape", "Resize", "Tile", "RandomNormalLike", "RandomUniformLike"}


def host_float_nodes(model) -> list[str]:
    """Nodes that compute a float tensor from tensor shapes (they end up on the CPU, feeding the GPU)."""
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    from_shape: set[str] = set()
    flagged = []
    for node in model.graph.node:  # ONNX graphs are topologically sorted
        if node.op_type in DEVICE_FROM_SHAPE or node.op_type == "Constant":
            continue
        inputs = [i for i in node.input if i and i not in constants]
        if node.op_type in ("Shape", "Size") or (inputs and all(i in from_shape for i in inputs)):
            from_shape.update(node.output)
            if node.op_type == "Cast" and next(a.i for a in node.attribute if a.name == "to") in FLOAT_TYPES:
                flagged.append(node.name or f"{node.op_type}->{node.output[0]}")
    return flagged


def check_cuda_graph_ready(path: Path) -> list[str]:
    """Why the graph at path could not be captured as a CUDA graph (empty when nothing is found)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    nodes = host_float_nodes(model)
    if not nodes:
        return []
    return [f"{len(nodes)} float value(s) computed from tensor shapes on the CPU (e.g. {', '.join(nodes[:3])}); "
            "re-export with --attention mha"]
