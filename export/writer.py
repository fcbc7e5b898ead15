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
from diffrt.runtime.control import CONTROL
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
        copy_config(ckpt, dest, name)


def copy_config(ckpt: Checkpoint, dest: Path, name: str) -> None:
    """A component's diffusers config.json beside its graph (the VAE halves share the VAE's)."""
    source = ckpt.controlnets.get(name, ckpt.root / ("vae" if name.startswith("vae") else name))
    shutil.copy2(source / "config.json", dest / name / "config.json")


BIG_MODEL_BYTES = 4 * 2**30
MADE_BY = {"streamed": "torch.onnx dynamo, traced without weights, weights streamed"}


def uses_rms_norm(module) -> bool:
    """Whether a model has RMS norms (FLUX, SD3.5's q/k norms), which TorchScript cannot export below opset 23."""
    return any(type(m).__name__ == "RMSNorm" for m in module.modules())


def exporter_for(module, options) -> tuple[str, str]:
    """(exporter, attention form) for one model: auto picks "streamed" (dynamo, traced without weights, see
    graphs.export_streamed) for a model whose float32 weights pass BIG_MODEL_BYTES (unless mha attention, which only
    TorchScript writes, was asked), dynamo for one with RMS norms, else TorchScript; auto attention is mha with
    TorchScript, plain with dynamo."""
    exporter = options.exporter
    if exporter == "auto":
        size = sum(p.numel() for p in module.parameters()) * 4
        exporter = "streamed" if size > BIG_MODEL_BYTES and options.attention != "mha" else \
            "dynamo" if uses_rms_norm(module) else "torchscript"
    attention = options.attention if options.attention != "auto" else "mha" if exporter == "torchscript" else "plain"
    return exporter, attention


def lora_able(ckpt: Checkpoint, comp: str) -> bool:
    """Whether run-time LoRAs change this component (an SD / SDXL text encoder or UNet)."""
    return ckpt.denoiser == "unet" and (comp.startswith("text_encoder") or comp == "unet")


def _export_one(ckpt: Checkpoint, comp: str, dest: Path, options, step: Callable[[str], None],
                modules: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """One component's graph and its manifest entry; and whether its module is loaded (modules[source]) for the
    check. A family without LoRAs whose model passes BIG_MODEL_BYTES is streamed from the checkpoint's files without
    being loaded; any other model is loaded whole (LoRAs merged)."""
    from .graphs import export_component, export_streamed
    from .linear_layout import out_in
    from .stream_weights import file_weights, weight_files

    source = "vae" if comp.startswith("vae") else comp
    weights = None
    if source not in modules and ckpt.denoiser != "unet" and weight_files(ckpt.root / source):
        weightless = ckpt.weightless(comp)
        if exporter_for(weightless, options)[0] == "streamed":
            weights = file_weights(ckpt.root / source, weightless)
    if weights is None and source not in modules:
        step("loading")
        modules[source] = ckpt.load(comp)
        if options.loras and (comp.startswith("text_encoder") or comp == "unet"):
            step(f"merged {merge_loras(comp, modules[source], options.loras)} LoRA layers")
    exporter, attention = exporter_for(weightless if weights is not None else modules[source], options)
    step(f"exporting ({exporter}{', weights read from the files' if weights is not None else ''}, "
         f"opset {effective_opset(options.opset, exporter)})")
    if exporter == "streamed":
        path = export_streamed(comp, weightless if weights is not None else modules[source], ckpt, dest / comp,
                               options.opset, weights, widen=options.weights_fp32, fold=lora_able(ckpt, comp))
    else:
        path, attention = export_component(comp, modules[source], ckpt, dest / comp, options.opset, exporter, attention)
    entry: dict[str, Any] = {"file": f"{comp}/model.onnx", "precision": "fp32",
                             "made_by": MADE_BY.get(exporter, f"torch.onnx {exporter}"), "attention": attention}
    if weights is not None and not options.weights_fp32 and {weights.dtype(k) for k in weights.where} & {"F16", "BF16"}:
        entry["weights"] = "fp16" if "F16" in {weights.dtype(k) for k in weights.where} else "bf16"
    if lora_able(ckpt, comp):  # what LoRAs change, [in, out]: onnxruntime folds a weight's Transpose from the file,
        write_weights_map(modules[source], path)  # out of a LoRA override's reach
    elif exporter != "streamed":  # (the streamed graph reads its Linear weights [out, in] already)
        out_in(path)
    if options.weights_fp16:
        store_weights_fp16(path)
        entry["weights"] = "fp16"
    entry.update(graph_io(path))
    if comp in ckpt.controlnets:  # where it came from: a benchmark's diffusers baseline loads it from there
        entry["source"] = str(ckpt.controlnets[comp].resolve())
    if comp == "unet" and ckpt.control_inputs:  # each residual input's channels and halvings of the latents
        from .controlnet import residual_halvings

        entry["residuals"] = residual_halvings(ckpt.denoiser_config)
    return entry, weights is None


def _check(ckpt: Checkpoint, comp: str, path: Path, modules: dict[str, Any], loaded: bool, last: bool,
           step: Callable[[str], None]) -> dict[str, Any]:
    """The graph against PyTorch on random inputs; a streamed model is loaded for it only where it fits in memory
    (its float32 weights and the graph's, one after the other), else the check is skipped, saying why. The module is
    released before the graph is opened where no later graph comes from it (last)."""
    from diffrt.runtime.budget import available_bytes

    from .stream_weights import file_weights, materialized

    source = "vae" if comp.startswith("vae") else comp
    if not loaded:
        need = 1.6 * sum(p.numel() for p in ckpt.weightless(comp).parameters()) * 4
        free = available_bytes()
        if free is not None and need > free:
            why = f"needs about {need / 2**30:.0f} GB to load in float32 and this machine has {free / 2**30:.0f} GB free"
            step(f"check against PyTorch skipped: {why}")
            return {"skipped": why}
        module = ckpt.weightless(comp)
        modules[source] = materialized(module, file_weights(ckpt.root / source, module))
        del module  # modules holds the only reference, so the release below frees it before the graph runs
    cases = reference_cases(comp, modules[source], ckpt)
    if last:
        modules.clear()  # a large model's PyTorch weights are released before its graph is opened
        gc.collect()
    result = compare(path, cases, fold=loaded)  # a streamed graph's 16-bit weights stay 16-bit while it runs
    verdict = "ok" if result.ok else f"FAILED (tolerance {result.tolerance:g})"
    step(f"onnxruntime vs PyTorch max abs {result.max_abs:.2e}, max rel {result.max_rel:.2e} over "
         f"{len(result.cases)} shapes: {verdict}")
    if not result.ok:
        raise UserError(f"{comp}: onnxruntime differs from PyTorch by {result.max_rel:.2e} (relative), over the "
                        f"tolerance {result.tolerance:g}; try another --exporter or --opset")
    return result.as_dict()


def _source(rest: list[str]) -> str | None:
    """The checkpoint folder the next component comes from (the VAE's two graphs share one)."""
    return ("vae" if rest[0].startswith("vae") else rest[0]) if rest else None


def write_package(ckpt: Checkpoint, dest: Path, options, log: Callable[[str], None], name: str) -> dict[str, Any]:
    family = ckpt.family
    components: dict[str, Any] = {}
    order = [c for c in COMPONENTS if c in options.components] + [c for c in options.components if c.startswith(CONTROL)]
    modules: dict[str, Any] = {}
    for i, comp in enumerate(order):
        start = time.perf_counter()
        step = (lambda msg, i=i, comp=comp: log(f"[{i + 1}/{len(order)}] {comp}: {msg}"))
        entry, loaded = _export_one(ckpt, comp, dest, options, step, modules)
        last = _source([comp]) != _source(order[i + 1:])  # the last graph of its checkpoint folder
        if options.check:
            entry["check"] = _check(ckpt, comp, dest / comp / "model.onnx", modules, loaded, last, step)
        if last:
            modules.clear()  # a large model's PyTorch weights are released before the next one is loaded
            gc.collect()
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
