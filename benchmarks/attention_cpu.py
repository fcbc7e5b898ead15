"""The SD 1.5 UNet on onnxruntime's CPU provider with each attention form diffrt exports: plain (MatMul/Softmax) and
fused (onnxruntime's MultiHeadAttention, the default since it runs fast on CUDA), side by side in one run.

    python -m diffrt.benchmarks.attention_cpu [--cache .cache/sd15] [--sizes 32,64] [--runs 3] [--json FILE]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .machine import unet_report
from .sd15 import DEFAULT_CACHE, make_checkpoint
from .timing import interleaved


def export_unet(ckpt: Path, out: Path, attention: str) -> Path:
    """The checkpoint's UNet alone, exported with one attention form (cached under out)."""
    if (out / "model.onnx").is_file():
        return out / "model.onnx"
    from diffrt.export.checkpoint import open_checkpoint
    from diffrt.export.graphs import export_component

    checkpoint = open_checkpoint(ckpt)
    return export_component("unet", checkpoint.load("unet"), checkpoint, out, 17, "torchscript", attention)[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--sizes", default="32,64", help="latent sizes (32 = 256x256 images)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    import onnxruntime as ort

    from diffrt.runtime.backends.onnxruntime import session_options

    ckpt = make_checkpoint(args.cache / "checkpoint")
    graphs = {form: export_unet(ckpt, args.cache / f"unet-{form}", form) for form in ("plain", "mha")}
    sessions = {form: ort.InferenceSession(str(g), session_options(args.threads), providers=["CPUExecutionProvider"])
                for form, g in graphs.items()}
    rng = np.random.default_rng(0)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        feeds = {"sample": rng.standard_normal((2, 4, size, size), dtype=np.float32), "timestep": np.array(500, np.float32),
                 "encoder_hidden_states": rng.standard_normal((2, 77, 768), dtype=np.float32)}
        outs = {form: s.run(None, feeds)[0] for form, s in sessions.items()}  # also the warm-up
        times = interleaved({form: (lambda s=s, f=feeds: s.run(None, f)) for form, s in sessions.items()}, args.runs)
        med = {k: float(np.median(v)) for k, v in times.items()}
        diff = float(np.abs(outs["mha"] - outs["plain"]).max() / np.abs(outs["plain"]).max())
        rows.append({"latent_size": size, "median_s": med, "runs_s": times, "plain_over_mha": med["plain"] / med["mha"],
                     "rel_max_diff": diff})
    unet_report(rows, args.json, "onnxruntime CPU")
    print("| latents | plain attention s | fused (mha) s | plain / mha | max rel diff |")
    for r in rows:
        print(f"| {r['latent_size']}x{r['latent_size']} | {r['median_s']['plain']:.3f} | {r['median_s']['mha']:.3f} | "
              f"{r['plain_over_mha']:.2f}x | {r['rel_max_diff']:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
