"""FLUX.1-dev's architecture at full width with random weights and fewer blocks: export memory, per block.

    python -m diffrt.benchmarks.flux export [--double N --single M] [--t5 DIR] [--cache DIR] [--json FILE]
    python -m diffrt.benchmarks.flux blocks [--t5 DIR] [--cache DIR] [--json FILE]
    python -m diffrt.benchmarks.flux stage [--double N --single M] [--t5 DIR] [--cache DIR]
    python -m diffrt.benchmarks.flux step [--size 512x512] [--cache DIR] [--json FILE]

FLUX.1's transformer (12 B parameters: 19 double-stream and 38 single-stream blocks, 3072 wide) is 24 GB in
bfloat16, more than this machine's disk and memory allow beside T5-XXL. Its blocks are all alike, so `export`
builds the real widths (CLIP-L, T5-XXL's encoder, the 16-channel VAE, the transformer's embedders, norms and
projections) with N double and M single blocks and exports the whole checkpoint in a child process, reporting wall
time and peak RSS; `blocks` builds two such checkpoints (3 + 6 and 6 + 12 blocks) and measures the transformer's
streamed export alone (`stage`: the stage of `diffrt export` that writes it, in a process of its own, without the
check against PyTorch, which the full model skips for want of 48 GB), then extrapolates its peak RSS linearly in
the parameter count to the full 19 + 38 blocks. The other stages do not grow with the transformer's blocks.
`step` times one transformer call (FLUX.1-dev: no CFG batch, 512 text tokens) at two block counts, diffrt's graph on
ov-cpu with int8 weights (what `diffrt quantize --precision int8-weights` writes) against diffusers in bfloat16, each
in a process of its own, and extrapolates time and peak RSS linearly in the blocks to the full transformer (FLUX.1's
blocks come as 1 double to 2 single, as both measured models do).
--t5 reuses a saved T5-XXL encoder folder (SD3.5's text_encoder_3 is the same model) instead of building one.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from .sd3 import T5_XXL, VAE
from .sdxl import TEXT_ENCODER, clip_tokenizers, export_report, parse_with_export_args

DEFAULT_CACHE = Path(".cache") / "flux"
FULL_BLOCKS = (19, 38)
TRANSFORMER = dict(patch_size=1, in_channels=64, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                   pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_VAE = {**VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}
SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                 max_image_seq_len=4096)
CLASSES = {"text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
           "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
           "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
           "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}


def save_bf16(build, folder: Path) -> None:
    """Build a model with bfloat16 parameters (as the released checkpoint ships them) and save it."""
    import torch

    torch.set_default_dtype(torch.bfloat16)
    try:
        build().save_pretrained(folder)
    finally:
        torch.set_default_dtype(torch.float32)


def make_checkpoint(path: Path, double: int, single: int, t5: Path | None = None, seed: int = 0) -> Path:
    """A random-weight FluxPipeline folder at full width with `double` and `single` blocks (T5 linked from t5)."""
    if (path / "model_index.json").is_file():
        return path
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from diffrt.models.train_shapes import build_t5_tokenizer

    torch.manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    corpus = clip_tokenizers(path)
    shutil.rmtree(path / "tokenizer_2")  # FLUX's second tokenizer is T5's
    build_t5_tokenizer(corpus * 20, path / "tokenizer_2", vocab_size=200)
    clip = {k: v for k, v in TEXT_ENCODER.items() if k != "projection_dim"}
    save_bf16(lambda: CLIPTextModel(CLIPTextConfig(**clip)), path / "text_encoder")
    if t5 is not None:
        (path / "text_encoder_2").symlink_to(t5.resolve(), target_is_directory=True)
    else:
        save_bf16(lambda: T5EncoderModel(T5Config(**T5_XXL)), path / "text_encoder_2")
    save_bf16(lambda: AutoencoderKL(**FLUX_VAE), path / "vae")
    save_bf16(lambda: FluxTransformer2DModel(num_layers=double, num_single_layers=single, **TRANSFORMER), path / "transformer")
    FlowMatchEulerDiscreteScheduler(**SCHEDULER).save_pretrained(path / "scheduler")
    index = {"_class_name": "FluxPipeline", "_diffusers_version": "0.39.0", **CLASSES}
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def transformer_parameters(double: int, single: int) -> int:
    """The transformer's parameter count at these block counts (built without weights)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        model = FluxTransformer2DModel(num_layers=double, num_single_layers=single, **TRANSFORMER)
    return sum(p.numel() for p in model.parameters())


def stage(args) -> dict:
    """The transformer's stage of `diffrt export` alone in this process: seconds and this process's peak RSS."""
    import resource
    import tempfile
    import time

    from diffrt.export import ExportOptions
    from diffrt.export.checkpoint import open_checkpoint
    from diffrt.export.writer import _export_one

    ckpt = open_checkpoint(make_checkpoint(args.cache / "checkpoint", args.double, args.single, args.t5))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.cache) as dest:
        entry, _ = _export_one(ckpt, "transformer", Path(dest), ExportOptions(), lambda msg: None, {})
    return {"seconds": round(time.perf_counter() - start, 1), "weights": entry.get("weights", "fp32"),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def blocks(args) -> dict:
    """The transformer's stage at two block counts, each in a process of its own, and its peak RSS extrapolated
    linearly in the parameter count to the full model."""
    import subprocess
    import sys

    from .machine import describe

    runs = []
    for double, single in ((3, 6), (6, 12)):  # both past BIG_MODEL_BYTES, so both streamed as the full model is
        cache = args.cache / f"blocks-{double}-{single}"
        make_checkpoint(cache / "checkpoint", double, single, args.t5)  # here: building is not the stage's memory
        command = [sys.executable, "-m", "diffrt.benchmarks.flux", "--double", str(double), "--single", str(single),
                   "--cache", str(cache), *(["--t5", str(args.t5)] if args.t5 else []), "stage"]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        runs.append({"double": double, "single": single, "parameters": transformer_parameters(double, single), **result})
        print(f"{double} double + {single} single blocks ({runs[-1]['parameters'] / 1e9:.2f} B): "
              f"{result['seconds']} s, peak RSS {result['peak_rss_gb']} GB", flush=True)
    (a, b), full = runs, transformer_parameters(*FULL_BLOCKS)
    per_billion = (b["peak_rss_gb"] - a["peak_rss_gb"]) / ((b["parameters"] - a["parameters"]) / 1e9)
    predicted = b["peak_rss_gb"] + per_billion * (full - b["parameters"]) / 1e9
    print(f"peak RSS grows {per_billion:.3f} GB per billion parameters: the full {full / 1e9:.2f} B transformer's "
          f"export should peak near {predicted:.2f} GB", flush=True)
    return {"runs": runs, "full_parameters": full, "gb_per_billion": round(per_billion, 4),
            "predicted_full_peak_gb": round(predicted, 2), "machine": describe()}


STEP_BLOCKS = ((2, 4), (4, 8))  # both streamed at export, as the full model is
TEXT_TOKENS = 512  # FLUX.1-dev's max_sequence_length


def tiny_t5(path: Path) -> Path:
    """A one-layer T5 encoder folder: a transformer call does not depend on T5, but the checkpoint needs one."""
    if not (path / "config.json").is_file():
        from transformers import T5Config, T5EncoderModel

        T5EncoderModel(T5Config(vocab_size=200, d_model=32, d_ff=64, d_kv=16, num_heads=2, num_layers=1)).save_pretrained(path)
    return path


def prepare(args) -> None:
    """The checkpoint, its transformer's graph (the stage of `diffrt export`) and that graph's int8-weight IR
    (`diffrt quantize --precision int8-weights`'s compression); the ONNX files removed once the IR is written."""
    from diffrt.export import ExportOptions
    from diffrt.export.checkpoint import open_checkpoint
    from diffrt.export.ov_weights import compress_graph
    from diffrt.export.writer import _export_one

    graph = args.cache / "package" / "transformer" / "model.onnx"
    if graph.with_name("openvino_model.xml").is_file():
        return
    ckpt = open_checkpoint(make_checkpoint(args.cache / "checkpoint", args.double, args.single, args.t5))
    _export_one(ckpt, "transformer", graph.parent.parent, ExportOptions(), lambda msg: None, {})
    compress_graph(graph, 8)
    for path in graph.parent.glob("model.onnx*"):
        path.unlink()


def step_feeds(width: int, height: int) -> dict:
    """One FLUX.1-dev transformer call's inputs at this size, as diffrt's loop feeds them (random latents and text)."""
    import numpy as np

    from diffrt.runtime.families.flux import image_ids

    rng, h, w = np.random.default_rng(0), height // 8, width // 8
    return {"hidden_states": rng.standard_normal((1, h * w // 4, 64), dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((1, TEXT_TOKENS, 4096), dtype=np.float32),
            "pooled_projections": rng.standard_normal((1, 768), dtype=np.float32), "timestep": np.array([0.5], np.float32),
            "img_ids": image_ids(h, w), "txt_ids": np.zeros((TEXT_TOKENS, 3), np.float32),
            "guidance": np.array([3.5], np.float32)}


def step_child(args) -> dict:
    """One implementation's transformer calls in this process (a warm-up, then two timed); its output saved."""
    import resource
    import time

    import numpy as np

    width, height = (int(v) for v in args.size.split("x"))
    feeds, start = step_feeds(width, height), time.perf_counter()
    if args.impl == "diffrt":
        from diffrt.runtime.backends.openvino import OvEngine, compute_precision

        engine = OvEngine(args.cache / "package" / "transformer" / "model.onnx", precision=compute_precision("auto"))
        precision = f"int8-weights+{engine.precision}"
        typed = {k: v.astype(engine.inputs[k].dtype) for k, v in feeds.items() if k in engine.inputs}
        call = lambda: next(iter(engine.run(typed).values()))  # noqa: E731
    else:
        import torch
        from diffusers import FluxTransformer2DModel

        model = FluxTransformer2DModel.from_pretrained(args.cache / "checkpoint" / "transformer", torch_dtype=torch.bfloat16)
        precision = "bf16"
        typed = {k: torch.from_numpy(v).to(torch.float32 if k == "guidance" else torch.bfloat16) for k, v in feeds.items()}

        def call():
            with torch.inference_mode():
                return model(**typed, return_dict=False)[0].float().numpy()
    load = time.perf_counter() - start
    first = time.perf_counter()
    call()
    first = time.perf_counter() - first
    calls = []
    for _ in range(2):
        start = time.perf_counter()
        out = call()
        calls.append(time.perf_counter() - start)
    np.save(args.cache / f"{args.impl}.npy", np.asarray(out, np.float32))
    return {"impl": args.impl, "precision": precision, "load_seconds": load, "first_call_seconds": first, "calls": calls,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def step(args) -> dict:
    """Transformer calls at two block counts (each implementation in its own process), extrapolated to FLUX.1."""
    import subprocess
    import sys

    import numpy as np

    from .machine import describe

    t5, runs = tiny_t5(args.cache / "tiny-t5"), []
    for double, single in STEP_BLOCKS:
        folder = args.cache / f"step-{double}-{single}"
        base = [sys.executable, "-m", "diffrt.benchmarks.flux", "--double", str(double), "--single", str(single),
                "--cache", str(folder), "--t5", str(t5), "--size", args.size]
        subprocess.run([*base, "prepare"], check=True)
        run = {"double": double, "single": single, "parameters": transformer_parameters(double, single)}
        for impl in ("diffrt", "diffusers"):
            out = subprocess.run([*base, "--impl", impl, "step-child"], check=True, capture_output=True, text=True).stdout
            run[impl] = json.loads(out.splitlines()[-1])
            print(f"{double} + {single} blocks, {impl} ({run[impl]['precision']}): call {min(run[impl]['calls']):.2f} s, "
                  f"peak RSS {run[impl]['peak_rss_gb']:.2f} GB", flush=True)
        got, ref = (np.load(folder / f"{impl}.npy") for impl in ("diffrt", "diffusers"))
        run["rel_l2_vs_diffusers"] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        runs.append(run)
    return {"date": __import__("time").strftime("%Y-%m-%d %H:%M:%S"), "machine": describe(), "size": args.size,
            "text_tokens": TEXT_TOKENS, "runs": runs, "full": extrapolate(runs)}


def extrapolate(runs: list[dict]) -> dict:
    """Each implementation's call time and peak RSS as lines in the double-block count (single = 2 x double), read at
    FLUX.1's 19."""
    (a, b), full = runs, {"double": FULL_BLOCKS[0], "single": FULL_BLOCKS[1], "parameters": transformer_parameters(*FULL_BLOCKS)}
    for impl in ("diffrt", "diffusers"):
        for key, (ya, yb) in (("call_seconds", (min(a[impl]["calls"]), min(b[impl]["calls"]))),
                              ("peak_rss_gb", (a[impl]["peak_rss_gb"], b[impl]["peak_rss_gb"]))):
            slope = (yb - ya) / (b["double"] - a["double"])
            full[f"{impl}_{key}"] = round(yb + slope * (FULL_BLOCKS[0] - b["double"]), 2)
    full["speedup"] = round(full["diffusers_call_seconds"] / full["diffrt_call_seconds"], 2)
    print(f"FLUX.1 (19 + 38 blocks, extrapolated): diffrt {full['diffrt_call_seconds']} s a call, peak "
          f"{full['diffrt_peak_rss_gb']} GB; diffusers bf16 {full['diffusers_call_seconds']} s, peak "
          f"{full['diffusers_peak_rss_gb']} GB ({full['speedup']}x)", flush=True)
    return full


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["export", "blocks", "stage", "step", "prepare", "step-child"])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--double", type=int, default=2, help="double-stream blocks (export; FLUX.1 has 19)")
    ap.add_argument("--single", type=int, default=4, help="single-stream blocks (export; FLUX.1 has 38)")
    ap.add_argument("--t5", type=Path, help="a saved T5-XXL encoder folder to link instead of building one")
    ap.add_argument("--json", type=Path, help="write the measurement here")
    ap.add_argument("--size", default="512x512", help="WIDTHxHEIGHT of the image (step)")
    ap.add_argument("--impl", choices=["diffrt", "diffusers"], help="(step-child) the implementation this process runs")
    args = parse_with_export_args(ap, argv)
    if args.action == "prepare":
        prepare(args)
        return
    if args.action == "step-child":
        print(json.dumps(step_child(args)))
        return
    if args.action == "stage":
        print(json.dumps(stage(args)))
        return
    if args.action in ("blocks", "step"):
        result = blocks(args) if args.action == "blocks" else step(args)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
        return
    label = f"FLUX.1-dev (full width, {args.double} double + {args.single} single blocks)"
    export_report(lambda path: make_checkpoint(path, args.double, args.single, args.t5), label, args)


if __name__ == "__main__":
    main()
