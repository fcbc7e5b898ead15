"""Writing a package folder: graphs, checks, tokenizer, scheduler, configs and the diffrt.json manifest."""

from __future__ import annotations

import gc
import json
import platform
import shutil
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from diffrt.runtime import __version__
from diffrt.runtime.errors import UserError
from diffrt.runtime.package import COMPONENTS, FORMAT_VERSION, MANIFEST, sha256
from diffrt.runtime.schedulers import CLASSES

from .check import compare, reference_cases
from .checkpoint import Checkpoint
from .graphs import effective_opset, latent_size, vae_scale_factor
from .lora_merge import merge_loras
from .weights import store_weights_fp16
from .weights_map import write_weights_map

TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "tokenizer.json")


def file_hashes(root: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file under root but the manifest itself, by relative path."""
    return {str(p.relative_to(root)): {"bytes": p.stat().st_size, "sha256": sha256(p)}
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def library_versions() -> dict[str, str]:
    found = {}
    for name in ("torch", "diffusers", "transformers", "onnx", "onnxruntime"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def graph_io(path: Path) -> dict[str, Any]:
    """Inputs and outputs of a graph as the manifest records them: dtype and dims (ints or axis names)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(values):
        out = {}
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            out[v.name] = {"dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "dims": dims}
        return out

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def default_settings(ckpt: Checkpoint, family: str) -> dict[str, Any]:
    from diffrt.runtime.families import FAMILIES, family_class

    size = latent_size(ckpt) * vae_scale_factor(ckpt)
    sched = ckpt.scheduler_config.get("_class_name", "PNDMScheduler")
    short = CLASSES[sched].name if sched in CLASSES else "euler"
    kind = family_class(family)
    steps = kind.default_steps if family in FAMILIES else 20  # a custom model: fewer steps than SD's own
    return {"width": size, "height": size, "steps": steps, "guidance_scale": kind.default_guidance,
            "scheduler": short, **kind.export_defaults(ckpt.denoiser_config)}


def copy_tokenizer(ckpt: Checkpoint, dest: Path, folder: str) -> None:
    (dest / folder).mkdir(parents=True, exist_ok=True)
    copied = [n for n in TOKENIZER_FILES if (ckpt.root / folder / n).is_file()]
    if not ({"vocab.json", "merges.txt"} <= set(copied) or "tokenizer.json" in copied):
        raise UserError(f"{ckpt.root / folder} has neither vocab.json + merges.txt nor tokenizer.json")
    for n in copied:
        shutil.copy2(ckpt.root / folder / n, dest / folder / n)


def copy_assets(ckpt: Checkpoint, dest: Path, components: tuple[str, ...]) -> None:
    """Tokenizer(s), scheduler config, model_index.json and each component's config.json (optimum's layout)."""
    for name in components:
        if name.startswith("text_encoder"):
            copy_tokenizer(ckpt, dest, name.replace("text_encoder", "tokenizer"))
    (dest / "scheduler").mkdir(exist_ok=True)
    shutil.copy2(ckpt.root / "scheduler" / "scheduler_config.json", dest / "scheduler" / "scheduler_config.json")
    shutil.copy2(ckpt.root / "model_index.json", dest / "model_index.json")
    for name in components:
        source = "vae" if name.startswith("vae") else name
        shutil.copy2(ckpt.root / source / "config.json", dest / name / "config.json")


BIG_MODEL_BYTES = 4 * 2**30
MADE_BY = {"streamed": "torch.onnx dynamo, traced without weights, weights streamed"}


def uses_rms_norm(module) -> bool:
    """Whether a model has RMS norms (FLUX, SD3.5's q/k norms), which TorchScript cannot export below opset 23."""
    return any(type(m).__name__ == "RMSNorm" for m in module.modules())


def exporter_for(module, options) -> tuple[str, str]:
    """(exporter, attention form) for one model: auto picks "streamed" (dynamo, traced without weights, see
    graphs.export_streamed) for a model whose float32 weights pass BIG_MODEL_BYTES (unless mha attention, which only
    TorchScript writes, was asked); auto attention is mha with TorchScript, plain with dynamo."""
    exporter = options.exporter
    if exporter == "auto":
        size = sum(p.numel() for p in module.parameters()) * 4
        exporter = "streamed" if size > BIG_MODEL_BYTES and options.attention != "mha" else \
            "dynamo" if uses_rms_norm(module) else "torchscript"
    attention = options.attention if options.attention != "auto" else "mha" if exporter == "torchscript" else "plain"
    return exporter, attention


def _source(rest: list[str]) -> str | None:
    """The checkpoint folder the next component comes from (the VAE's two graphs share one)."""
    return ("vae" if rest[0].startswith("vae") else rest[0]) if rest else None


def write_package(ckpt: Checkpoint, dest: Path, options, log: Callable[[str], None], name: str) -> dict[str, Any]:
    from .graphs import export_component, export_streamed

    family = ckpt.family
    components: dict[str, Any] = {}
    order = [c for c in COMPONENTS if c in options.components]
    total = len(order)
    modules: dict[str, Any] = {}
    for i, comp in enumerate(order):
        start = time.perf_counter()
        log(f"[{i + 1}/{total}] {comp}: loading")
        source = "vae" if comp.startswith("vae") else comp
        if source not in modules:
            modules.clear()
            gc.collect()
            modules[source] = ckpt.load(comp)
            if options.loras and (comp.startswith("text_encoder") or comp == "unet"):
                merged = merge_loras(comp, modules[source], options.loras)
                log(f"[{i + 1}/{total}] {comp}: merged {merged} LoRA layers")
        exporter, attention = exporter_for(modules[source], options)
        log(f"[{i + 1}/{total}] {comp}: exporting ({exporter}, opset {effective_opset(options.opset, exporter)})")
        if exporter == "streamed":
            path = export_streamed(comp, modules[source], ckpt, dest / comp, options.opset)
        else:
            path, attention = export_component(comp, modules[source], ckpt, dest / comp, options.opset, exporter, attention)
        made_by = MADE_BY.get(exporter, f"torch.onnx {exporter}")
        entry: dict[str, Any] = {"file": f"{comp}/model.onnx", "precision": "fp32", "made_by": made_by,
                                 "attention": attention}
        if ckpt.denoiser == "unet" and (comp.startswith("text_encoder") or comp == "unet"):  # what LoRAs change
            write_weights_map(modules[source], path)
        if options.weights_fp16:
            store_weights_fp16(path)
            entry["weights"] = "fp16"
        entry.update(graph_io(path))
        if options.check:
            cases = reference_cases(comp, modules[source], ckpt)
            if source != _source(order[i + 1:]):
                modules.clear()  # a large model's PyTorch weights are released before its graph is opened
                gc.collect()
            result = compare(path, cases)
            entry["check"] = result.as_dict()
            verdict = "ok" if result.ok else f"FAILED (tolerance {result.tolerance:g})"
            log(f"[{i + 1}/{total}] {comp}: onnxruntime vs PyTorch max abs {result.max_abs:.2e}, "
                f"max rel {result.max_rel:.2e} over {len(result.cases)} shapes: {verdict}")
            if not result.ok:
                other = "dynamo" if exporter == "torchscript" else "torchscript"
                raise UserError(f"{comp}: onnxruntime differs from PyTorch by {result.max_rel:.2e} (relative), over the "
                                f"tolerance {result.tolerance:g}; try --exporter {other} or another --opset")
        entry["seconds"] = round(time.perf_counter() - start, 2)
        components[comp] = entry
    modules.clear()
    gc.collect()
    copy_assets(ckpt, dest, tuple(components))

    tok_cfg = {}
    if (dest / "tokenizer" / "tokenizer_config.json").is_file():
        tok_cfg = json.loads((dest / "tokenizer" / "tokenizer_config.json").read_text(encoding="utf-8"))
    max_len = tok_cfg.get("model_max_length")
    manifest = {
        "format": "diffrt-package",
        "format_version": FORMAT_VERSION,
        "name": options.name or name,
        "family": family,
        "prediction_type": ckpt.scheduler_config.get("prediction_type", "epsilon"),
        "vae_scaling_factor": float(ckpt.vae_config.get("scaling_factor", 0.18215)),
        "vae_scale_factor": vae_scale_factor(ckpt),
        "latent_channels": int(ckpt.vae_config.get("latent_channels", 4)),
        "vae_shift_factor": float(ckpt.vae_config.get("shift_factor") or 0.0),
        "inpainting": int(ckpt.denoiser_config.get("in_channels", 4)) == 9,  # the UNet also takes a mask and masked latents
        "force_zeros_for_empty_prompt": bool(ckpt.index.get("force_zeros_for_empty_prompt", False)),
        "text_max_length": max_len if isinstance(max_len, int) and max_len < 10_000 else 77,
        "defaults": {**default_settings(ckpt, family), **options.defaults},
        "components": components,
        "loras": [{"file": c.path.name, "scale": c.scale, "sha256": sha256(c.path)} for c in options.loras],
        "source": {"checkpoint": str(ckpt.root), "exporter": options.exporter,
                   "opset": effective_opset(options.opset, options.exporter)},
        "versions": {"diffrt": __version__, "python": platform.python_version(), **library_versions()},
    }
    manifest["files"] = file_hashes(dest)
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest
