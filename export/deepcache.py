"""DeepCache's graphs for a package's UNet, cut from its ONNX graph (any precision: float32, float16, int8 QDQ).

DeepCache (Ma et al. 2023) reuses the UNet's deep features between steps: a full step runs the whole UNet and keeps
the hidden state that enters the last up block's second-to-last resnet (DeepCache's branch 0: what the deep path
made); the steps between run only the shallow branch, conv_in and the first down resnet (whose outputs the last up
block's last two resnets take as skips), then those two resnets and the output head, over the kept feature.

    diffrt deepcache add PACKAGE

writes beside unet/model.onnx:
- deepcache_full.onnx: the UNet as it is, with the kept feature as a second output (deep_features);
- deepcache_shallow.onnx: the shallow branch, taking deep_features as an input.
Both name the UNet's own weight file (no copy of the weights); the manifest records them under the unet's
"deepcache" entry, and the shallow branch is checked against the full graph on random inputs."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.errors import UserError
from .cut import elem_types, subgraph

FEATURE = "deep_features"
FULL, SHALLOW = "deepcache_full.onnx", "deepcache_shallow.onnx"
RESNET = re.compile(r"/up_blocks\.(\d+)/resnets\.(\d+)/")
PASS_THROUGH = ("QuantizeLinear", "DequantizeLinear", "Cast")  # what a quantized package puts between the Concat and it


def cut_tensor(graph: Any) -> str:
    """The tensor DeepCache keeps: the hidden state concatenated with its skip before the last up block's
    second-to-last resnet (read from the exporter's scope names, /up_blocks.L/resnets.R/...)."""
    found = [(int(m[1]), int(m[2])) for n in graph.node if (m := RESNET.search(n.name))]
    if not found:
        raise UserError("the UNet graph has no /up_blocks.N/resnets.M/ scopes to cut DeepCache's branch at; re-export "
                        "the package with this diffrt (`diffrt export`) and add DeepCache's graphs to it")
    last = max(b for b, _ in found)
    resnet = max(r for b, r in found if b == last) - 1
    if resnet < 0:
        raise UserError("the UNet's last up block has a single resnet, so DeepCache has no shallow branch to keep")
    scope = f"/up_blocks.{last}/resnets.{resnet}/"
    produced = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if scope in node.name:
            for name in node.input:
                source = produced.get(name)
                while source is not None and source.op_type in PASS_THROUGH:  # an int8 package's Q/DQ, fp16's Cast
                    source = produced.get(source.input[0])
                if source is not None and source.op_type == "Concat" and scope not in source.name:
                    return source.input[0]
    raise UserError(f"no Concat feeds {scope} in the UNet graph; DeepCache cannot be cut from this export")


def full_graph(model: Any, cut: str, elem_type: int) -> Any:
    """The UNet with the kept feature as its second output."""
    import onnx

    full = copy.deepcopy(model)
    full.graph.node.append(onnx.helper.make_node("Identity", [cut], [FEATURE], name="/deepcache/keep"))
    full.graph.output.append(onnx.helper.make_tensor_value_info(FEATURE, elem_type, None))
    return full


def shallow_graph(model: Any, cut: str, elem_type: int) -> Any:
    """The shallow branch: what the output needs once the kept feature is given, the feature an input."""
    out = model.graph.output[0].name
    return subgraph(model, {out: out}, {cut: FEATURE}, {cut: elem_type}, "deepcache_shallow")


def write_graphs(unet: Path) -> dict[str, Any]:
    """Both graphs beside unet (model.onnx), naming its weight file; their manifest entry."""
    import onnx

    model = onnx.load(str(unet), load_external_data=False)
    cut = cut_tensor(model.graph)
    elem_type = elem_types(model, [cut], "DeepCache")[cut]
    onnx.save(full_graph(model, cut, elem_type), str(unet.with_name(FULL)))
    onnx.save(shallow_graph(model, cut, elem_type), str(unet.with_name(SHALLOW)))
    folder = unet.parent.name
    return {"full": f"{folder}/{FULL}", "shallow": f"{folder}/{SHALLOW}", "feature": FEATURE, "cut": cut, "branch": 0}


def check_graphs(root: Path, entry: dict[str, Any], size: int = 16) -> float:
    """Largest |difference| between the full graph's output and the shallow branch's over the full graph's feature,
    on random inputs (equal up to rounding: the same operations on the same values)."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    full = ort.InferenceSession(str(root / entry["full"]), providers=["CPUExecutionProvider"])
    shallow = ort.InferenceSession(str(root / entry["shallow"]), providers=["CPUExecutionProvider"])
    feeds = {i.name: random_input(i, size, rng) for i in full.get_inputs()}
    out, feature = full.run(["out_sample", FEATURE], feeds)
    names = {i.name for i in shallow.get_inputs()}
    again = shallow.run(["out_sample"], {**{k: v for k, v in feeds.items() if k in names}, FEATURE: feature})[0]
    return float(np.abs(out.astype(np.float32) - again.astype(np.float32)).max())


def random_input(spec: Any, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random value for one UNet input at latent side `size` (residuals: zeros, their sides from the name's level)."""
    dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(double)": np.float64}[spec.type]
    if spec.name == "timestep":
        return np.full([d if isinstance(d, int) else 2 for d in spec.shape], 500, dtype)
    dims = [d if isinstance(d, int) else None for d in spec.shape]
    if spec.name.endswith("residual") or "residual_" in spec.name:
        return np.zeros([2, dims[1], 1, 1], dtype)  # broadcast over the skip it is added to
    fill = {0: 2, 1: 77} if len(dims) == 3 else {0: 2, 2: size, 3: size}
    shape = [d if d is not None else fill.get(k, 1) for k, d in enumerate(dims)]
    return rng.standard_normal(shape).astype(dtype)


def add_deepcache(package: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write DeepCache's graphs into a package, check them and record them in its manifest."""
    from ..runtime.package import MANIFEST, load_package, sha256

    pkg = load_package(package)
    if pkg.denoiser != "unet":
        raise UserError(f"DeepCache reuses a UNet's deep features; {pkg.family} models have a transformer, not a UNet")
    if pkg.openvino_weights("unet"):
        raise UserError("this package's UNet runs from OpenVINO IR with compressed weights, which DeepCache's graphs "
                        "(cut from the ONNX UNet) would not use; add them to the package it was compressed from")
    log(f"cutting DeepCache's shallow branch from {pkg.component('unet')}")
    entry = write_graphs(pkg.component("unet"))
    entry["check_max_abs_diff"] = check_graphs(pkg.root, entry)
    if not entry["check_max_abs_diff"] <= 1e-3:
        raise UserError(f"DeepCache's shallow branch differs from the full UNet by {entry['check_max_abs_diff']:.3g} on "
                        "the same feature; this export cannot be cut (please report it)")
    manifest = pkg.manifest
    manifest["components"]["unet"]["deepcache"] = entry
    manifest["files"].update({k: {"bytes": (pkg.root / k).stat().st_size, "sha256": sha256(pkg.root / k)}
                              for k in (entry["full"], entry["shallow"])})
    (pkg.root / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    log(f"DeepCache graphs written ({entry['full']}, {entry['shallow']}); shallow vs full: max |diff| "
        f"{entry['check_max_abs_diff']:.2g}")
    return entry
