"""A UNet graph that takes one timestep per call (a scalar or [1]: packages exported before diffrt 0.1's per-row
timestep, the bundled model) rewritten to take one per batch row, so that rows at different steps can share a call
(step-level batching in `diffrt serve`). Graphs already taking [batch_size] are left alone.

    python -m diffrt.export.timestep_rows PACKAGE

The graph's own broadcast of the timestep to the batch (diffusers' `timesteps.expand(batch)`) stays; only the
Unsqueeze or Reshape lifting a scalar to rank 1 is bypassed, and the input is declared [batch_size]."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from diffrt.runtime.errors import UserError
from diffrt.runtime.package import MANIFEST, sha256

PASS_THROUGH = ("Cast", "Identity")  # ops between the input and the broadcast that keep its shape
LIFTS = ("Unsqueeze", "Reshape")  # rank 0 -> rank 1


def per_row_timestep(model) -> bool:
    """Rewrite the graph in place to take timestep [batch_size]; False when it took one per row already."""
    graph = model.graph
    given = next((i for i in graph.input if i.name == "timestep"), None)
    if given is None:
        raise UserError("the UNet graph has no timestep input; is this a UNet?")
    dims = given.type.tensor_type.shape.dim
    if len(dims) == 1 and dims[0].dim_param:
        return False
    name, lift = "timestep", None
    while True:
        users = [n for n in graph.node if name in n.input]
        if len(users) != 1:
            raise UserError(f"the UNet graph's timestep path is not the one diffusers exports ({len(users)} users of "
                            f"{name}); re-export the package with `diffrt export` (its UNet takes one timestep per row)")
        node = users[0]
        if node.op_type == "Expand":
            break
        if node.op_type in LIFTS and not dims and lift is None:
            lift = node
        elif node.op_type not in PASS_THROUGH:
            raise UserError(f"the UNet graph's timestep goes through {node.op_type} before its broadcast; re-export the "
                            "package with `diffrt export` (its UNet takes one timestep per row)")
        name = node.output[0]
    if lift is not None:
        for node in graph.node:
            node.input[:] = [lift.input[0] if i == lift.output[0] else i for i in node.input]
        graph.node.remove(lift)
        drop_unused(graph, lift.input[1:])
    del dims[:]
    dims.add().dim_param = "batch_size"
    return True


def drop_unused(graph, names) -> None:
    """Remove the initializers or Constant nodes behind names that no node uses any more."""
    used = {i for n in graph.node for i in n.input}
    for name in set(names) - used:
        for init in [i for i in graph.initializer if i.name == name]:
            graph.initializer.remove(init)
        for node in [n for n in graph.node if n.op_type == "Constant" and name in n.output]:
            graph.node.remove(node)


def rewrite_package(root: Path) -> list[str]:
    """Rewrite every UNet graph of a diffrt package (its file and a reduced-precision one's float32 fallback) and
    record the new dims and hashes in its manifest; the graphs' external weights are untouched. Returns the files
    rewritten."""
    import onnx

    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"{root} has no {MANIFEST}; give a diffrt package folder")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    entry = manifest.get("components", {}).get("unet")
    if entry is None:
        raise UserError(f"{root} has no UNet in its manifest")
    changed = []
    for rel in filter(None, (entry.get("file"), entry.get("fallback"))):
        model = onnx.load(str(root / rel), load_external_data=False)
        if per_row_timestep(model):
            onnx.save(model, str(root / rel))
            manifest["files"][rel] = {"bytes": (root / rel).stat().st_size, "sha256": sha256(root / rel)}
            changed.append(rel)
    if changed:
        entry.setdefault("inputs", {}).setdefault("timestep", {})["dims"] = ["batch_size"]
        manifest_path.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Make a package's UNet take one timestep per batch row (step-level batching)")
    ap.add_argument("package", type=Path)
    args = ap.parse_args(argv)
    try:
        changed = rewrite_package(args.package)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.package}: " + (f"rewrote {', '.join(changed)}" if changed else "the UNet takes one timestep per row already"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
