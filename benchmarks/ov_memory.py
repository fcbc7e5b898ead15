"""Memory of the SD 1.5 UNet compiled by OpenVINO's CPU plugin (bf16 on AMX), by the form of its source weights:
the fp32 package's graph, the same weights as fp16 (OpenVINO IR saved with compress_to_fp16) and the int8 package's
QDQ graph. Each compiles in a fresh process at 32x32 latents, batch 2; its RSS after compiling and after one call.
Then the whole pipeline (text encoder, UNet, VAE decoder) on each package, two 256x256 images in a fresh process: its
RSS after them and its peak, with diffrt handing back the mapped weight pages after compiling and without.

    python -m diffrt.benchmarks.ov_memory [--package .cache/sd15/package] [--int8 .cache/sd15/package-int8] [--json FILE]

Made for one question: can the bf16 path's peak RSS reach 0.6x diffusers fp32? The plugin keeps the source weights
beside its own packed copy, so the answer depends on the source weights' size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from .machine import describe
from .sd15 import DEFAULT_CACHE

CHILD = """
import json, sys, numpy as np, openvino as ov
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024
core = ov.Core()
model = core.read_model(sys.argv[1])
if len(sys.argv) > 2:  # save the fp16 form and read that instead
    ov.save_model(model, sys.argv[2], compress_to_fp16=True)
    del model
    model = core.read_model(sys.argv[2])
feeds = {"sample": np.zeros((2, 4, 32, 32), np.float32), "timestep": np.ones(2, np.float32),
         "encoder_hidden_states": np.zeros((2, 77, 768), np.float32)}
model.reshape({k: list(v.shape) for k, v in feeds.items()})
compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "bf16"})
del model
after_compile = rss()
compiled(feeds)
print(json.dumps({"rss_after_compile_mb": after_compile, "rss_after_call_mb": rss()}))
"""


PIPELINE = """
import contextlib, json, resource, sys
import diffrt.runtime.backends.openvino as backend
from diffrt.runtime.pipeline import Pipeline
if sys.argv[2] == "keep":
    backend.DroppingPages = lambda *paths: contextlib.nullcontext()
pipe = Pipeline.from_package(sys.argv[1], backend="ov-cpu")
for _ in range(2):
    pipe("a cat", steps=2, width=256, height=256, scheduler="euler")
rss = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024
print(json.dumps({"rss_after_two_images_mb": rss, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))
"""


def measure(args: list[str], code: str = CHILD) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", type=Path, default=DEFAULT_CACHE / "package")
    ap.add_argument("--int8", type=Path, default=DEFAULT_CACHE / "package-int8")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    fp32 = str(args.package / "unet" / "model.onnx")
    with tempfile.TemporaryDirectory() as tmp:
        rows = {"fp32 graph": measure([fp32]), "fp16 weights (IR)": measure([fp32, str(Path(tmp) / "unet.xml")]),
                "int8 QDQ graph": measure([str(args.int8 / "unet" / "model.onnx")])}
    pipelines = {f"{name}, pages {mode}": measure([str(package), mode], PIPELINE) for name, package in
                 (("bf16 (fp32 package)", args.package), ("int8+bf16 (int8 package)", args.int8)) for mode in ("dropped", "keep")}
    report = {"machine": describe(), "latents": "2x4x32x32", "rows": rows, "pipelines": pipelines}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print(f"{report['machine']['cpu']} | SD 1.5 UNet on OpenVINO CPU, bf16")
    print("| source weights | RSS after compile (MB) | after one call (MB) |")
    for name, r in rows.items():
        print(f"| {name} | {r['rss_after_compile_mb']} | {r['rss_after_call_mb']} |")
    print("| pipeline | RSS after two images (MB) | peak RSS (MB) |")
    for name, r in pipelines.items():
        print(f"| {name} | {r['rss_after_two_images_mb']} | {r['peak_rss_mb']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
