"""The `diffrt` command: generate images; export, benchmark and inspect models."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from . import __version__
from .engines import BACKENDS
from .errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be 1 or more")
    return value


def number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def seed_value(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{value} is outside 0 .. 2**63-1")
    return value


def cmd_generate(args: argparse.Namespace) -> int:
    from .images import output_paths, save_png
    from .pipeline import Pipeline
    from .progress import ProgressBar

    count = args.n
    out = args.output or "diffrt.png"
    paths = output_paths(out, count)  # refuse a bad -o before any work
    pipe = Pipeline.from_package(args.model, backend=args.backend, threads=args.threads, verify_hashes=args.verify,
                                 fp32_fallback=args.fp32_fallback, cuda_graph=args.cuda_graph, graph_cache=args.graph_cache)
    result = pipe(args.prompt, negative_prompt=args.negative, steps=args.steps, guidance_scale=args.guidance,
                  scheduler=args.scheduler, seed=args.seed, width=args.width, height=args.height, num_images=count,
                  progress=None if args.quiet else ProgressBar("denoising"))
    for i, (image, path) in enumerate(zip(result.images, paths)):
        save_png(image, path, {**result.settings, "image_index": i})
        print(path)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from diffrt.export import ExportOptions, export_package

    options = ExportOptions(components=tuple(args.components.split(",")), opset=args.opset, exporter=args.exporter,
                            attention=args.attention, overwrite=args.overwrite, check=not args.no_check, weights_fp16=args.weights_fp16,
                            name=args.name)
    export_package(args.checkpoint, args.out, options)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from diffrt.export.precision import QuantizeOptions, quantize_package

    split = lambda text: tuple(t for t in text.split(",") if t)  # noqa: E731
    options = QuantizeOptions(precision=args.precision, keep_fp32_ops=split(args.keep_fp32_ops),
                              keep_fp32_components=split(args.keep_fp32_components), keep_fp32_layers=split(args.keep_fp32_layers),
                              calibration_prompts=args.calibration_prompts, keep_fallback=not args.no_fallback,
                              accept_quality=args.accept_quality, overwrite=args.overwrite, steps=args.steps,
                              adherence=args.adherence)
    quantize_package(args.package, args.out, options, log=lambda m: print(m, file=sys.stderr))
    print(args.out)
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from diffrt.export.trt_build import BuildOptions, build_engines
    from diffrt.runtime.trt_backend import import_tensorrt

    import_tensorrt()
    options = BuildOptions(precision=args.precision, batch=args.batch, size=args.size, static=args.static,
                           timing_cache=args.timing_cache, version_compatible=args.version_compatible, opt_level=args.opt_level,
                           workspace_gb=args.workspace)
    for path in build_engines(args.package, options, log=lambda m: print(m, file=sys.stderr)):
        print(path)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import available_backends, check_backends, format_report, machine_report

    report = machine_report()
    checks = check_backends(args.check, available_backends(report)) if args.check else None
    print(format_report(report, checks))
    return 0 if not checks or all(c["ok"] for c in checks.values()) else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from diffrt.benchmarks.bench import benchmark, config_from_args, write_outputs

    cfg = config_from_args(args)
    if str(cfg.package) == "sd15":
        from diffrt.benchmarks.sd15 import prepare_package

        cfg.package, cfg.checkpoint = prepare_package()
    result = benchmark(cfg, log=lambda m: print(m, file=sys.stderr))
    for path in write_outputs(result, cfg.out):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .schedulers import scheduler_names

    p = Parser(prog="diffrt", description="Torch-free Stable Diffusion runtime and export toolchain.")
    p.add_argument("--version", action="version", version=f"diffrt {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    g = sub.add_parser("generate", help="generate images from a prompt")
    g.add_argument("prompt")
    g.add_argument("--model", type=Path, help="model package folder (default: the bundled shapes-tiny model)")
    g.add_argument("--negative", default="", help="negative prompt")
    g.add_argument("--steps", type=positive_int)
    g.add_argument("--guidance", type=number, help="classifier-free guidance scale; 1 or less turns it off")
    g.add_argument("--scheduler", choices=scheduler_names(), metavar="S",
                   help=f"one of {', '.join(scheduler_names()[:7])} or a diffusers class name")
    g.add_argument("--seed", type=seed_value)
    g.add_argument("--width", type=positive_int)
    g.add_argument("--height", type=positive_int)
    g.add_argument("-n", type=positive_int, default=1, help="number of images")
    g.add_argument("--backend", choices=BACKENDS, default="auto")
    g.add_argument("--threads", type=positive_int, help="CPU threads for onnxruntime")
    g.add_argument("--verify", action="store_true", help="check every package file's sha256 before loading")
    g.add_argument("--fp32-fallback", action="store_true", help="rerun a reduced-precision stage in float32 if it makes NaN/inf")
    g.add_argument("--cuda-graph", action="store_true", help="ort-cuda: replay the UNet from a CUDA graph per shape")
    g.add_argument("--graph-cache", type=Path, metavar="DIR", default=os.environ.get("DIFFRT_GRAPH_CACHE") or None,
                   help="keep onnxruntime's optimized graphs here; later loads skip optimization (env DIFFRT_GRAPH_CACHE)")
    g.add_argument("-o", "--output", help="PNG path (default diffrt.png; several images get -0, -1, ...)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("export", help="export a diffusers checkpoint folder to a model package (needs diffrt[export])")
    e.add_argument("checkpoint", help="diffusers checkpoint folder (model_index.json, unet/, vae/, text_encoder/, ...)")
    e.add_argument("out", help="package folder to write")
    e.add_argument("--components", default="text_encoder,unet,vae_decoder,vae_encoder")
    e.add_argument("--opset", type=positive_int, default=17)
    e.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript")
    e.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    e.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-PyTorch check")
    e.add_argument("--attention", choices=("auto", "mha", "plain"), default="auto",
                   help="mha: onnxruntime's fused attention (fast on GPUs, CUDA graphs); plain: MatMul/Softmax, for TensorRT "
                        "(auto: mha with torchscript, plain with dynamo)")
    e.add_argument("--weights-fp16", action="store_true", help="store weights as float16 (half the size), compute in float32")
    e.add_argument("--name", help="model name recorded in the manifest and in image metadata (default: OUT's name)")
    e.set_defaults(func=cmd_export)

    from diffrt.export.precision import FP16_KEEP_OPS, INT8_KEEP_LAYERS

    q = sub.add_parser("quantize", help="fp16 or int8 copy of an fp32 package, with quality gates (needs diffrt[export])")
    q.add_argument("package", type=Path)
    q.add_argument("out", type=Path)
    q.add_argument("--precision", choices=("fp16", "int8"), required=True)
    q.add_argument("--keep-fp32-ops", default=",".join(FP16_KEEP_OPS), help="fp16: op types left in float32")
    q.add_argument("--keep-fp32-components", default="", help="fp16: components left in float32, e.g. vae_decoder")
    q.add_argument("--keep-fp32-layers", default=",".join(INT8_KEEP_LAYERS),
                   help="int8: layers (module-path fragments) left unquantized")
    q.add_argument("--calibration-prompts", type=positive_int, default=8, help="int8: prompts whose trajectories calibrate")
    q.add_argument("--steps", type=positive_int, help="steps per trajectory (default: the package's)")
    q.add_argument("--no-fallback", action="store_true", help="do not keep the float32 graphs for the NaN/inf fallback")
    q.add_argument("--adherence", action="store_true", help="also gate on the shapes model's prompt-adherence scores")
    q.add_argument("--accept-quality", action="store_true", help="write the package even if it misses its quality gate")
    q.add_argument("--overwrite", action="store_true")
    q.set_defaults(func=cmd_quantize)

    t = sub.add_parser("build", help="build TensorRT engines for this GPU (needs diffrt[trt])")
    t.add_argument("package", type=Path)
    t.add_argument("--precision", choices=("fp16", "int8", "fp32"), default="fp16")
    t.add_argument("--batch", default="1", help="images per request: N or N-M (guidance doubles the UNet's batch)")
    t.add_argument("--size", help="WIDTHxHEIGHT or MIN-MAX (default: the package's size)")
    t.add_argument("--static", action="store_true", help="one fixed shape (enables CUDA graphs)")
    t.add_argument("--timing-cache", type=Path)
    t.add_argument("--version-compatible", action="store_true", help="engines the lean runtime (tensorrt_lean) can run")
    t.add_argument("--opt-level", type=int, default=3, choices=range(0, 6))
    t.add_argument("--workspace", type=number, default=4.0, help="GB")
    t.set_defaults(func=cmd_build)

    dr = sub.add_parser("doctor", help="what this machine offers; with --check, every backend compared")
    dr.add_argument("--check", type=Path, metavar="PACKAGE")
    dr.set_defaults(func=cmd_doctor)

    b = sub.add_parser("bench", help="latency benchmark, optionally side by side with diffusers")
    b.add_argument("package", nargs="?", type=Path, help="package folder, `sd15` (full-size SD 1.5, random weights), "
                   "default the bundled model")
    b.add_argument("--backend", choices=BACKENDS, default="auto")
    b.add_argument("--steps", type=positive_int)
    b.add_argument("--size", help="WIDTHxHEIGHT")
    b.add_argument("--batch", default="1", help="batch sizes, comma-separated (e.g. 1,4)")
    b.add_argument("--runs", type=positive_int, default=5)
    b.add_argument("--warmup", type=int, default=1)
    b.add_argument("--scheduler", choices=scheduler_names(), metavar="S")
    b.add_argument("--guidance", type=number)
    b.add_argument("--threads", type=positive_int)
    b.add_argument("--cuda-graph", action="store_true", help="ort-cuda: replay the UNet from a CUDA graph per shape")
    b.add_argument("--graph-cache", type=Path, metavar="DIR",
                   help="also time a cold start that loads onnxruntime's optimized graphs from DIR")
    b.add_argument("--baseline", choices=("diffusers",))
    b.add_argument("--checkpoint", type=Path, help="diffusers checkpoint for the baseline (default: the package's source)")
    b.add_argument("--no-cold-start", action="store_true", help="skip the fresh-process runs")
    b.add_argument("--out", type=Path, default=Path("bench-out"))
    b.set_defaults(func=cmd_bench)
    return p


def _terminate(signum, frame):
    raise KeyboardInterrupt  # so a `kill` cleans up like Ctrl-C: no half-written package or image is left


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"diffrt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffrt: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("diffrt: error: out of memory; use a smaller size, fewer images or a smaller model", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
