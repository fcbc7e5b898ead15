"""First-Block Cache's graphs for a DiT package's transformer (SD3/3.5, FLUX.1), cut from its ONNX graph.

First-Block Cache (ParaAttention; diffusers' FirstBlockCacheConfig) runs the transformer's first block every step and
compares what the block added to the image stream with what it added on the last fully computed step; where the two
differ by less than a threshold, the other blocks are skipped and what they added on that step is added again.

    diffrt fbcache add PACKAGE

writes beside transformer/model.onnx, each naming the transformer's own weight file:
- fbcache_head.onnx: the embedders and the first block; outputs the image stream entering and leaving that block and
  the text stream leaving it (fbc_hidden_in, fbc_hidden, fbc_context);
- fbcache_tail.onnx: the other blocks over fbc_hidden and fbc_context (reading the transformer's own inputs for the
  time embedding and rotary tables); outputs the image stream leaving the last block (fbc_hidden_last);
- fbcache_out.onnx: the output head over fbc_hidden_last.
The blocks are found by the exporter's scope names (transformer_blocks.N, single_transformer_blocks.N), the streams
by their shapes on a probe run; head, tail and out in turn are checked equal to the whole transformer."""

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

HIDDEN_IN, HIDDEN, CONTEXT, LAST = "fbc_hidden_in", "fbc_hidden", "fbc_context", "fbc_hidden_last"
FILES = {"head": "fbcache_head.onnx", "tail": "fbcache_tail.onnx", "out": "fbcache_out.onnx"}
BLOCK = re.compile(r"(?:^|[/.'])(transformer_blocks|single_transformer_blocks)\.(\d+)(?=[/.']|$)")
GROUPS = ("transformer_blocks", "single_transformer_blocks")  # the order the blocks run in
TOKENS, TEXT = 16, 7  # the probe's image and text tokens (different, so the streams tell apart)


def block_of(node: Any) -> tuple[int, int] | None:
    """(group, index) of the transformer block a node belongs to, from its name (TorchScript's /a/b/ scopes) or the
    dynamo exporter's name_scopes metadata; None outside the blocks."""
    scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
    found = [(GROUPS.index(m[1]), int(m[2])) for m in BLOCK.finditer(f"{node.name} {scopes}")]
    return max(found) if found else None


def blocks_of(graph: Any) -> list[tuple[int, int] | None]:
    """Each node's block: its own scope's, or for a node the dynamo exporter's optimizer made without one (a Split of
    a block's modulation), the block of the scoped nodes it reads from (graph order is topological)."""
    scoped = [any(p.key == "pkg.torch.onnx.name_scopes" for p in n.metadata_props) for n in graph.node]
    tensor_block: dict[str, tuple[int, int]] = {}
    found = []
    for node, has_scope in zip(graph.node, scoped):
        block = block_of(node)
        if block is None and not has_scope and any(scoped):  # (TorchScript's graphs scope every node by its name)
            block = max((tensor_block[i] for i in node.input if i in tensor_block), default=None)
        found.append(block)
        tensor_block.update(dict.fromkeys(node.output, block) if block is not None else {})
    return found


def crossings(graph: Any, owner: list[Any], block: tuple[int, int]) -> tuple[list[str], list[str]]:
    """(tensors the block's nodes read from nodes outside it, tensors they make that outside nodes or outputs read);
    owner: each node's block (blocks_of)."""
    inside = [n for n, b in zip(graph.node, owner) if b == block]
    made = {o for n in inside for o in n.output}
    produced = {o for n in graph.node for o in n.output}
    ins = list(dict.fromkeys(i for n in inside for i in n.input if i in produced and i not in made))
    read_outside = {i for n, b in zip(graph.node, owner) if b != block for i in n.input} | {o.name for o in graph.output}
    return ins, [o for o in made if o in read_outside]


def probe_inputs(inputs: list[Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random transformer inputs with TOKENS image tokens (SD3's latents 2x2 patches, FLUX's packed) and TEXT text."""
    side = 2 * int(TOKENS ** 0.5)
    fill = {"hidden_states": {0: 2, 1: TOKENS, 2: side, 3: side}, "encoder_hidden_states": {0: 2, 1: TEXT},
            "img_ids": {0: TOKENS}, "txt_ids": {0: TEXT}}
    feeds = {}
    for spec in inputs:
        dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}[spec.type]
        dims = [d if isinstance(d, int) else fill.get(spec.name, {}).get(k, 2) for k, d in enumerate(spec.shape)]
        feeds[spec.name] = (np.full(dims, 0.5, dtype) if spec.name in ("timestep", "guidance") else
                            rng.standard_normal(dims).astype(dtype))
    return feeds


def find_streams(model: Any, path: Path) -> dict[str, str]:
    """The tensors the cut is made at: the image stream entering and leaving the first block, the text stream leaving
    it, the image stream leaving the last block (told apart by their token counts on a probe run)."""
    import onnx

    owner = blocks_of(model.graph)
    blocks = sorted({b for b in owner if b is not None})
    if len(blocks) < 2:
        raise UserError("First-Block Cache needs a transformer with at least two blocks whose scope names the export "
                        "kept (transformer_blocks.N); re-export the package with this diffrt")
    first_in, first_out = crossings(model.graph, owner, blocks[0])
    last_out = crossings(model.graph, owner, blocks[-1])[1]
    candidates = list(dict.fromkeys(first_in + first_out + last_out))
    types = elem_types(model, candidates, "First-Block Cache")
    probe = copy.deepcopy(model)
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(c, types[c], None) for c in candidates)
    session = open_beside(probe, path)
    shapes = dict(zip(candidates, (v.shape for v in session.run(candidates, probe_inputs(session.get_inputs(),
                                                                                          np.random.default_rng(0))))))

    def stream(names: list[str], tokens: int, what: str) -> str:
        found = [n for n in names if len(shapes[n]) == 3 and shapes[n][1] == tokens]
        if len(found) != 1:
            raise UserError(f"the transformer graph has {len(found)} candidates for {what}; First-Block Cache cannot be "
                            "cut from this export (please report it)")
        return found[0]

    return {HIDDEN_IN: stream(first_in, TOKENS, "the image stream entering the first block"),
            HIDDEN: stream(first_out, TOKENS, "the image stream leaving the first block"),
            CONTEXT: stream(first_out, TEXT, "the text stream leaving the first block"),
            LAST: stream(last_out, TOKENS, "the image stream leaving the last block")}


def open_beside(model: Any, path: Path) -> Any:
    """An onnxruntime session on a changed copy of the graph, saved beside it for a while (it names the weight file)."""
    import onnx
    import onnxruntime as ort

    probe = path.with_name("fbcache_probe.onnx")
    onnx.save(model, str(probe))
    try:
        return ort.InferenceSession(str(probe), providers=["CPUExecutionProvider"])
    finally:
        probe.unlink()


def write_graphs(transformer: Path) -> dict[str, Any]:
    """The three graphs beside transformer (model.onnx), naming its weight file; their manifest entry."""
    import onnx

    model = onnx.load(str(transformer), load_external_data=False)
    at = find_streams(model, transformer)
    types = elem_types(model, list(at.values()), "First-Block Cache")
    out = model.graph.output[0].name
    parts = {"head": subgraph(model, {at[k]: k for k in (HIDDEN_IN, HIDDEN, CONTEXT)}, {}, types, "fbcache_head"),
             "tail": subgraph(model, {at[LAST]: LAST}, {at[HIDDEN]: HIDDEN, at[CONTEXT]: CONTEXT}, types, "fbcache_tail"),
             "out": subgraph(model, {out: out}, {at[LAST]: LAST}, types, "fbcache_out")}
    for key, part in parts.items():
        onnx.save(part, str(transformer.with_name(FILES[key])))
    folder = transformer.parent.name
    return {**{k: f"{folder}/{f}" for k, f in FILES.items()}, "cut": at}


def check_graphs(root: Path, entry: dict[str, Any], whole: Path) -> float:
    """Largest |difference| between the whole transformer's output and head, tail and out run in turn, relative to
    the output's largest |value|, on random inputs."""
    import onnxruntime as ort

    def session(path: Path) -> Any:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    full = session(whole)
    feeds = probe_inputs(full.get_inputs(), np.random.default_rng(1))
    expected = full.run(None, feeds)[0].astype(np.float32)
    del full
    head, tail, out = (session(root / entry[k]) for k in ("head", "tail", "out"))
    hidden_in, hidden, context = head.run([HIDDEN_IN, HIDDEN, CONTEXT], own(head, feeds))
    last = tail.run([LAST], own(tail, {**feeds, HIDDEN: hidden, CONTEXT: context}))[0]
    got = out.run(None, own(out, {**feeds, LAST: last}))[0].astype(np.float32)
    return float(np.abs(got - expected).max() / max(float(np.abs(expected).max()), 1e-12))


def own(session: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = {i.name for i in session.get_inputs()}
    return {k: v for k, v in feeds.items() if k in names}


def add_fbcache(package: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write First-Block Cache's graphs into a package, check them and record them in its manifest."""
    from ..runtime.package import MANIFEST, load_package, sha256

    pkg = load_package(package)
    if pkg.denoiser != "transformer":
        raise UserError(f"First-Block Cache skips a transformer's blocks; {pkg.family} models have a UNet: use "
                        "`diffrt deepcache add` for step caching on them")
    if pkg.openvino_weights("transformer"):
        raise UserError("this package's transformer runs from OpenVINO IR with compressed weights, which First-Block "
                        "Cache's graphs (cut from the ONNX transformer) would not use; add them to the package it was "
                        "compressed from")
    log(f"cutting First-Block Cache's graphs from {pkg.component('transformer')}")
    entry = write_graphs(pkg.component("transformer"))
    entry["check_max_rel_diff"] = check_graphs(pkg.root, entry, pkg.component("transformer"))
    if not entry["check_max_rel_diff"] <= 1e-3:
        raise UserError(f"First-Block Cache's graphs differ from the whole transformer by {entry['check_max_rel_diff']:.3g} "
                        "(relative); this export cannot be cut (please report it)")
    manifest = pkg.manifest
    manifest["components"]["transformer"]["fbcache"] = entry
    manifest["files"].update({entry[k]: {"bytes": (pkg.root / entry[k]).stat().st_size, "sha256": sha256(pkg.root / entry[k])}
                              for k in FILES})
    (pkg.root / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    log(f"First-Block Cache graphs written ({', '.join(entry[k] for k in FILES)}); in turn vs whole: max relative "
        f"|diff| {entry['check_max_rel_diff']:.2g}")
    return entry
