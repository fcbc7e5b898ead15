"""Storing a graph's float weights as float16 while it still computes in float32 (halves the file)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def store_weights_fp16(path: Path, min_elements: int = 256) -> int:
    """Replace each large float32 initializer by a float16 one plus a Cast back to float32; returns how many.

    onnxruntime folds the Casts when it loads the graph, so compute stays float32; the weights lose what
    float16 cannot hold (nothing, when the checkpoint's weights were rounded to float16 first)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    kept, casts, count = [], [], 0
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT and np.prod(init.dims) >= min_elements:
            half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), f"{init.name}__fp16")
            casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT, name=f"{init.name}__cast"))
            kept.append(half)
            count += 1
        else:
            kept.append(init)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    data = path.parent / "model.onnx_data"
    external = data.exists()
    if external:  # the weights are in memory now; onnx would append the new ones after the stale float32 ones
        data.unlink()
    onnx.save(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True, location=data.name)
    return count
