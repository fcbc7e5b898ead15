"""How a graph's matrix-product weights are laid out, changed in place (the weight file rewritten tensor by tensor, no
copy of the model held).

`out_in`: each 2-D weight a MatMul reads directly is stored as its Linear module holds it, [out, in], behind a
Transpose. OpenVINO's CPU plugin takes that form as a fully connected layer's weights as they are; a weight stored
[in, out] (what TorchScript's constant folding writes) it transposes into a new constant that the compiled model
keeps beside its packed bf16 copy (about 2 bytes a weight more): SD3.5-medium's MMDiT held 7.6 GB that way, 4.7 GB
the other (measured, same output, same speed). onnxruntime folds the Transpose at load, holding what it held.

`in_out`: the reverse, for tools that want a MatMul's weight as its initializer (onnxruntime's static quantizer and
its transformer fusions)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SUFFIX = "__out_in"  # the Transpose's output: the weight as the MatMul reads it
FLOATS = {1: np.float32, 10: np.float16, 16: np.uint16}  # onnx FLOAT, FLOAT16, BFLOAT16 (moved as raw 16-bit)


def out_in(path: Path) -> int:
    """Store path's MatMul weights [out, in] behind a Transpose; returns how many were changed."""
    return rewritten(path, to_out_in)


def in_out(path: Path) -> int:
    """Undo out_in: each Transpose of a 2-D weight that only MatMuls read folded into the weight; returns how many."""
    return rewritten(path, to_in_out)


def rewritten(path: Path, change) -> int:
    """path's graph changed by change(model, folder) (which returns the initializers it re-laid), saved in place, its
    weights map told; returns how many changed."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = change(model, path.parent)
    path.write_bytes(model.SerializeToString())  # the weights, external, were rewritten where they are
    flip_weights_map(path, names)
    return len(names)


def to_out_in(model, folder: Path) -> set[str]:
    """model's MatMul weights stored [out, in] behind a Transpose (external data rewritten in folder)."""
    import onnx

    graph = model.graph
    inits = {t.name: t for t in graph.initializer if len(t.dims) == 2 and t.data_type in FLOATS}
    readers: dict[str, list] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in inits:
                readers.setdefault(name, []).append((node, i))
    names = [n for n, uses in readers.items() if all(node.op_type == "MatMul" and i == 1 for node, i in uses)]
    for name in names:
        transpose_data(folder, inits[name])
        inits[name].dims[:] = list(inits[name].dims)[::-1]
        for node, i in readers[name]:
            node.input[i] = name + SUFFIX
    nodes = [onnx.helper.make_node("Transpose", [n], [n + SUFFIX], name=n + SUFFIX, perm=[1, 0]) for n in names]
    nodes += graph.node
    del graph.node[:]
    graph.node.extend(nodes)
    return forget_shapes(graph, set(names))


def to_in_out(model, folder: Path) -> set[str]:
    """The reverse of to_out_in: model's Transposes of 2-D weights that only MatMuls read folded into the weights."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer if t.data_type in FLOATS}
    folded = transposed_weights(graph, set(inits))
    for node, weight, products in folded:
        transpose_data(folder, inits[weight])
        inits[weight].dims[:] = list(inits[weight].dims)[::-1]
        for reader, i in products:
            reader.input[i] = weight
        graph.node.remove(node)
    return forget_shapes(graph, {weight for _, weight, _ in folded})


def transposed_weights(graph, names: set[str]) -> list[tuple]:
    """(Transpose node, weight, [(MatMul, input index)]) for each 2-D initializer of names that only a Transpose reads
    and whose output only MatMuls read, as their weight."""
    dims = {t.name: len(t.dims) for t in graph.initializer}
    readers: dict[str, list] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, i))
    found = []
    for node in graph.node:
        weight = node.input[0] if node.op_type == "Transpose" and node.input else None
        if weight is None or dims.get(weight) != 2 or weight not in names or len(readers[weight]) != 1 \
                or order(node) not in ([1, 0], []):
            continue
        products = readers.get(node.output[0], [])
        if products and all(reader.op_type == "MatMul" and i == 1 for reader, i in products):
            found.append((node, weight, products))
    return found


def order(node) -> list[int]:
    """A Transpose's perm ([] where it has none: the axes reversed)."""
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), [])


def forget_shapes(graph, names: set[str]) -> set[str]:
    """names' shapes as the exporter recorded them (now swapped) dropped from graph; returns names."""
    for value in [v for v in graph.value_info if v.name in names]:
        graph.value_info.remove(value)
    return names


def transpose_data(folder: Path, tensor) -> None:
    """tensor's values transposed where they are stored (its external file's bytes, or inside the graph); its dims,
    still those of the values before, are the caller's to swap."""
    rows, cols = tensor.dims
    dtype = FLOATS[tensor.data_type]
    where = {e.key: e.value for e in tensor.external_data}
    if tensor.data_location == 1 and where:  # EXTERNAL
        offset = int(where.get("offset", 0))
        data = np.memmap(folder / where["location"], dtype=dtype, mode="r+", offset=offset, shape=(rows, cols))
        data[...] = np.ascontiguousarray(data.T).reshape(rows, cols)
        data.flush()
        del data
    else:
        from onnx import numpy_helper

        value = np.frombuffer(tensor.raw_data, dtype).reshape(rows, cols) if tensor.raw_data else \
            numpy_helper.to_array(tensor).astype(dtype)  # values in float_data / int32_data
        tensor.raw_data = np.ascontiguousarray(value.T).tobytes()
        del tensor.float_data[:], tensor.int32_data[:]


def flip_weights_map(path: Path, names: set[str]) -> None:
    """weights_map.json beside path (which initializer holds each checkpoint weight, and whether transposed) told that
    names changed layout."""
    mapping = path.parent / "weights_map.json"
    if not names or not mapping.is_file():
        return
    entries = json.loads(mapping.read_text(encoding="utf-8"))
    for entry in entries.values():
        if entry[0] in names:
            entry[1] = "" if entry[1] == "T" else "T"
    mapping.write_text(json.dumps(entries, indent=0, sort_keys=True) + "\n", encoding="utf-8")
