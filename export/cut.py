"""Cutting a component's ONNX graph into parts that run in turn (DeepCache's and First-Block Cache's graphs): the
parts name the component's own weight file, so nothing is copied; quantizing drops them (they are cut again)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from ..runtime.errors import UserError
from ..runtime.stepcache import METHODS


def needed(graph: Any, outputs: list[str], given: set[str]) -> tuple[list[Any], set[str]]:
    """The nodes `outputs` depend on when the tensors `given` are fed (in graph order), and every tensor they read."""
    produced = {o: n for n in graph.node for o in n.output}
    seen, todo, nodes = set(given), list(outputs), set()
    while todo:
        name = todo.pop()
        if name in seen or not name:
            continue
        seen.add(name)
        if name in produced:
            nodes.add(id(produced[name]))
            todo.extend(produced[name].input)
    return [n for n in graph.node if id(n) in nodes], seen


def elem_types(model: Any, names: list[str], what: str) -> dict[str, int]:
    """The element types of tensors inside the graph (ONNX's shape inference); refused where one is not inferred."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    known = {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *inferred.graph.output)}
    missing = [n for n in names if not known.get(n)]
    if missing:
        raise UserError(f"the type of {missing[0]} could not be inferred; {what} cannot be cut from this export")
    return {n: known[n] for n in names}


def subgraph(model: Any, outputs: dict[str, str], given: dict[str, str], types: dict[str, int], name: str) -> Any:
    """The part of model that computes `outputs` (tensor: the name it has there) when the tensors `given` (tensor: the
    input's name) are fed; the graph inputs it reads stay inputs, the initializers it reads come along (external ones
    still naming the component's weight file)."""
    import onnx

    graph = model.graph
    nodes, read = needed(graph, list(outputs), set(given))
    nodes = copy.deepcopy(nodes)
    for node in nodes:
        node.input[:] = [given.get(i, i) for i in node.input]
    nodes += [onnx.helper.make_node("Identity", [t], [n], name=f"/{name}/{n}") for t, n in outputs.items() if t != n]
    kept = {o.name: o for o in graph.output}
    outs = [kept[t] if t == n and t in kept else onnx.helper.make_tensor_value_info(n, types[t], None)
            for t, n in outputs.items()]
    inputs = [*(i for i in graph.input if i.name in read and i.name not in given),
              *(onnx.helper.make_tensor_value_info(n, types[t], None) for t, n in given.items())]
    body = onnx.helper.make_graph(nodes, name, inputs, outs, [t for t in graph.initializer if t.name in read])
    part = onnx.helper.make_model(body, opset_imports=model.opset_import, ir_version=model.ir_version)
    part.producer_name = f"diffrt {name}"
    return part


def drop(root: Path, manifest: dict[str, Any]) -> None:
    """Take the cut graphs out of a package copy being quantized: cut from the float graph, they would run its float
    weights beside the quantized one (`diffrt deepcache add` / `diffrt fbcache add` cut them again from the new one)."""
    for method, (component, keys, _) in METHODS.items():
        entry = manifest.get("components", {}).get(component, {}).pop(method, None)
        for key in keys if entry else ():
            (root / entry[key]).unlink(missing_ok=True)
            manifest.get("files", {}).pop(entry[key], None)
