"""The SD 1.5 UNet on OpenVINO's CPU plugin: bf16 (diffrt's ov-cpu default on AMX) against int8 graphs, side by side
in one run: diffrt's own QDQ graph (`diffrt quantize --precision int8`: all but the time embedding and conv_in/out in
int8, and the earlier default that kept attention, its projections and the layers after norms in float) and NNCF's
int8, fully quantized and in its hybrid mode for diffusion UNets (convolutions int8 in weights and activations,
MatMul weights int8 only). Random weights and random calibration inputs: this measures speed only (quality is gated
on a trained model, the bundled one, by `diffrt quantize`).

    pip install ".[nncf]"   # NNCF only; the QDQ graphs need diffrt[export]
    python -m diffrt.benchmarks.int8_ov [--cache .cache/sd15] [--sizes 32,64] [--runs 3] [--calibration 8] [--json FILE]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from .attention_cpu import export_unet
from .machine import unet_report
from .sd15 import DEFAULT_CACHE, make_checkpoint
from .timing import interleaved


def feeds(size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Batch 2 (guidance), one timestep per row."""
    return {"sample": rng.standard_normal((2, 4, size, size), dtype=np.float32),
            "timestep": rng.integers(1, 1000, 2).astype(np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 768), dtype=np.float32)}


def quantized(model, calibration: list[dict], hybrid: bool):
    """NNCF's post-training int8 of the model: all of it (transformer preset), or hybrid as optimum-intel does it for
    diffusion UNets (MatMul weights compressed to int8, then the convolutions quantized with their activations)."""
    import nncf

    dataset = nncf.Dataset(calibration)
    if not hybrid:
        return nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration))
    matmuls = [op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "MatMul"]
    compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM,
                                       ignored_scope=nncf.IgnoredScope(types=["Convolution"]))
    return nncf.quantize(compressed, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration),
                         ignored_scope=nncf.IgnoredScope(names=matmuls, validate=False),
                         advanced_parameters=nncf.AdvancedQuantizationParameters(smooth_quant_alpha=-1))


def qdq_graphs(path: Path, cache: Path, calibration: int) -> dict[str, tuple[Path, float]]:
    """diffrt's QDQ int8 UNet graphs (cached under cache): {name: (graph, seconds its quantization took)}."""
    from diffrt.export.precision import INT8_FLOAT_ATTENTION, INT8_KEEP_LAYERS, quantize_int8

    rng, graphs = np.random.default_rng(1), {}
    for name, keep in (("qdq-float-attention", INT8_FLOAT_ATTENTION), ("qdq", INT8_KEEP_LAYERS)):
        out = cache / f"unet-{name}" / "model.onnx"
        start = time.perf_counter()
        if not out.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            quantize_int8(path, out, [feeds(32, rng) for _ in range(calibration)], keep)
        graphs[name] = out, round(time.perf_counter() - start, 1)
    return graphs


def compile_variants(path: Path, qdq: dict[str, tuple[Path, float]], size: int, calibration: int,
                     threads: int | None) -> tuple[dict, dict]:
    """{variant: compiled model} at one static size, and the seconds each took to make (quantize + compile)."""
    import openvino as ov

    from diffrt.runtime.backends.openvino import read_onnx

    core, rng = ov.Core(), np.random.default_rng(1)
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "bf16",
              **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
    compiled, seconds = {}, {}
    for name in ("bf16", "int8", "int8-hybrid", *qdq):
        start = time.perf_counter()
        model = read_onnx(qdq[name][0] if name in qdq else path)
        model.reshape({k: list(v.shape) for k, v in feeds(size, rng).items()})
        if name in ("int8", "int8-hybrid"):
            model = quantized(model, [feeds(size, rng) for _ in range(calibration)], hybrid=name == "int8-hybrid")
        compiled[name] = core.compile_model(model, "CPU", config)
        seconds[name] = round(time.perf_counter() - start + (qdq[name][1] if name in qdq else 0), 1)
        del model
    return compiled, seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--sizes", default="32,64", help="latent sizes (32 = 256x256 images)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--calibration", type=int, default=8, help="calibration inputs per size")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    path = export_unet(make_checkpoint(args.cache / "checkpoint"), args.cache / "unet-mha", "mha")
    qdq, rows = qdq_graphs(path, args.cache, args.calibration), []
    for size in (int(s) for s in args.sizes.split(",")):
        compiled, made = compile_variants(path, qdq, size, args.calibration, args.threads)
        inputs = feeds(size, np.random.default_rng(0))
        outs = {name: np.array(list(c(inputs).values())[0]) for name, c in compiled.items()}  # also the warm-up
        times = interleaved({name: (lambda c=c, f=inputs: c(f)) for name, c in compiled.items()}, args.runs)
        med = {k: float(np.median(v)) for k, v in times.items()}
        ref = np.abs(outs["bf16"]).max()
        rows.append({"latent_size": size, "median_s": med, "runs_s": times, "made_s": made,
                     "speedup_over_bf16": {k: med["bf16"] / v for k, v in med.items()},
                     "rel_max_diff_vs_bf16": {k: float(np.abs(o - outs["bf16"]).max() / ref) for k, o in outs.items()}})
        del compiled
    unet_report(rows, args.json, "OpenVINO CPU")
    names = list(rows[0]["median_s"])
    print("| latents | " + " | ".join(f"{n} s (x bf16)" for n in names) + " |")
    for r in rows:
        print(f"| {r['latent_size']}x{r['latent_size']} | " + " | ".join(
            f"{r['median_s'][n]:.3f} ({r['speedup_over_bf16'][n]:.2f}x)" for n in names) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
