"""The `diffrt` command: generate images; export, benchmark and inspect models."""

from __future__ import annotations

import os
import signal
import sys

from .interrupt import exit_quietly_on_ctrl_c

if __name__ == "__main__" or os.path.basename(sys.argv[0]) == "diffrt":
    exit_quietly_on_ctrl_c()  # while the command still loads; main() hands Ctrl-C back to Python

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

from .cli_control import add_controlnet_commands  # noqa: E402
from .errors import UserError  # noqa: E402


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def positive_int(text: str) -> int:
    value = whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be 1 or more")
    return value


def width_height(text: str) -> tuple[int, int]:
    """WIDTHxHEIGHT, each a positive multiple of 8."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 512x512") from None
    if min(width, height) < 8 or width % 8 or height % 8:
        raise argparse.ArgumentTypeError(f"{text!r}: width and height must be positive multiples of 8")
    return width, height


def number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_number(text: str) -> float:
    value = number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value:g} must be more than 0")
    return value


def add_memory_args(g) -> None:
    """--memory-budget and --residency (generate and serve)."""
    g.add_argument("--memory-budget", type=positive_number, metavar="GB", help="CPU backends: plan each request to fit "
                   "this much memory (the whole process): engines all open, one stage's at a time, the VAE in tiles, the "
                   "fastest plan predicted to fit; a request that fits none is refused, naming the budget it needs")
    g.add_argument("--residency", choices=("resident", "sequential"), help="resident: every stage's engine open for the "
                   "process's life (default); sequential: each stage's opened when it starts, closed when the next opens "
                   "(less memory, each request opens and compiles them again)")


def add_cache_arg(g, what: str) -> None:
    """--cache (generate, serve, bench)."""
    g.add_argument("--cache", metavar="deepcache[:N]|fbcache[:T]", help="step caching, opt-in (default: exact): DeepCache "
                   "(UNets) runs the full UNet every N steps (default 3) and only its shallow branch between, reusing the "
                   "deep features; First-Block Cache (SD3, FLUX) skips the transformer's other blocks while its first "
                   "block's residual changes by less than T (default 0.05); faster, slightly different images; "
                   f"{what} (the package needs `diffrt deepcache add PACKAGE` / `diffrt fbcache add PACKAGE`)")


def seed_value(text: str) -> int:
    value = whole(text)
    if not -1 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{value} is outside 0 .. 2**63-1 (-1: random)")
    return value


def pair(separator: str, first: str, second: str):
    """An argparse type for two whole numbers written FIRST<separator>SECOND, returned as they are written."""
    def parse(text: str) -> tuple[int, int]:
        parts = str(text).lower().split(separator)
        if len(parts) != 2:
            raise argparse.ArgumentTypeError(f"{text!r} is not {first}{separator}{second}")
        return whole(parts[0]), whole(parts[1])

    return parse


def scheduler_name(text: str) -> str:
    from .schedulers import SHORT_NAMES, canonical_name

    name = canonical_name(text)
    if name is None:
        raise argparse.ArgumentTypeError(f"unknown scheduler {text!r}; choose one of {', '.join(SHORT_NAMES)} (or a "
                                         "diffusers class or AUTOMATIC1111 name such as 'Euler a')")
    return name


def cmd_generate(args: argparse.Namespace) -> int:
    import warnings
    from dataclasses import replace

    from .budget import PLANS
    from .images import output_paths, save_image
    from .pipeline import Pipeline
    from .progress import ProgressBar
    from .request import check_text, image_seeds

    request, made_from = generation_request(args)
    if request.prompt is None:
        raise UserError("give a prompt (or --from IMAGE to make an image again)")
    check_text(request.prompt, "prompt")
    check_text(request.negative_prompt, "negative prompt")
    seeds = image_seeds(request.seed, request.num_images)
    paths = output_paths(args.output, seeds, args.overwrite)  # refuse a bad -o before any work
    check_preview(args.preview, args.preview_every)
    pipe = Pipeline.from_package(args.model, backend=args.backend, threads=args.threads, verify_hashes=args.verify,
                                 fp32_fallback=args.fp32_fallback, cuda_graph=args.cuda_graph, graph_cache=args.graph_cache,
                                 gpu_mem_limit=int(args.gpu_mem_limit * 2**30) if args.gpu_mem_limit else None,
                                 precision=args.precision, loras=request.loras, residency=args.residency,
                                 memory_budget=args.memory_budget, cache=request.cache)
    result = pipe(replace(request, seed=seeds[0], loras=None),
                  callback=step_callback(None if args.quiet else ProgressBar("denoising, UNet calls"), args.preview,
                                         args.preview_every))
    for i, (image, path) in enumerate(zip(result.images, paths)):
        save_image(image, path, result.image_settings(i))
        print(path)
    if "memory_plan" in result.settings:
        s = result.settings
        print(f"diffrt: memory budget {s['memory_budget']:g} GB: plan {s['memory_plan']} "
              f"({PLANS[s['memory_plan']].describe()}), predicted peak {s['predicted_peak_gb']:.1f} GB", file=sys.stderr)
    if request.seed is None or request.seed == -1:
        print(f"diffrt: random seed {seeds[0]}" + (f" (images: {seeds[0]}..{seeds[-1]})" if len(seeds) > 1 else ""),
              file=sys.stderr)
    for key in ("image_sha256", "mask_sha256"):
        if made_from.get(key) and result.settings.get(key) != made_from[key]:
            warnings.warn(f"the {key.split('_')[0]} {result.settings.get(key.replace('sha256', 'path'))} is not the one "
                          f"{args.from_image} was made from (its pixels changed), so the image differs", stacklevel=1)
    return 0


def check_preview(path: Path | None, every: int | None) -> None:
    """Refuse a preview file that cannot be written, or --preview-every without --preview, before any work."""
    from .images import FORMATS, check_writable

    if path is None:
        if every is not None:
            raise UserError("--preview-every sets how often --preview FILE is rewritten: give --preview, or leave it out")
        return
    if path.is_dir() or not path.parent.is_dir():
        raise UserError(f"preview {path} must be a file in an existing folder")
    if path.suffix.lower() not in FORMATS:
        raise UserError(f"preview {path} must end in .png, .jpg or .webp")
    check_writable(path.parent, "--preview")


def step_callback(bar, preview: Path | None, every: int | None):
    """The generate command's step callback: the progress bar every step, the preview file rewritten every
    `every` steps and after the last (None when there is neither)."""
    from .images import save_image
    from .preview import strip

    if bar is None and preview is None:
        return None

    def on_step(progress) -> None:
        if bar is not None:
            bar(progress.step, progress.total, progress.eta)
        if preview is not None and (progress.step % (every or 1) == 0 or progress.step == progress.total):
            save_image(strip(progress.preview()), preview, None)

    return on_step


# generate's options -> GenerationRequest's fields (an option left out keeps --from's value, else the default)
OPTION_FIELDS = {"prompt": "prompt", "negative": "negative_prompt", "steps": "steps", "guidance": "guidance_scale",
                 "scheduler": "scheduler", "seed": "seed", "width": "width", "height": "height", "n": "num_images",
                 "rng": "rng", "clip_skip": "clip_skip", "prompt_syntax": "prompt_syntax",
                 "guidance_rescale": "guidance_rescale", "true_cfg": "true_cfg_scale", "image": "image",
                 "strength": "strength", "mask": "mask", "mask_blur": "mask_blur", "decoder": "decoder",
                 "vae_tiling": "vae_tiling", "cache": "cache"}


def generation_request(args: argparse.Namespace):
    """The request the options make, over an image's saved settings with --from (options given win), and those
    settings ({} without --from)."""
    from dataclasses import replace

    from .images import read_settings
    from .lora import parse_choice
    from .request import GenerationRequest
    from .schedulers import scheduler_names

    settings = read_settings(args.from_image) if args.from_image else {}
    check_image_options(args, bool(settings.get("image_sha256")), bool(settings.get("mask_sha256")))
    replaced = (*(("loras",) if args.lora is not None else ()), *(("control",) if args.control is not None else ()),
                *(("image", "mask") if args.image is not None else ()),
                *(("mask",) if args.mask is not None else ()))
    base = GenerationRequest.from_settings(settings, replaced) if settings else GenerationRequest(None)
    given = {name: getattr(args, option) for option, name in OPTION_FIELDS.items() if getattr(args, option) is not None}
    if args.resize:
        given["resize"] = True
    if args.lora is not None:
        given["loras"] = [parse_choice(x) for x in args.lora]
    if args.original_size:
        given["original_size"] = tuple(args.original_size[::-1])  # the option is WxH, the setting (height, width)
    if args.crop_top_left:
        given["crops_coords_top_left"] = tuple(args.crop_top_left)
    if args.control is not None:
        from .control import ControlInput

        given["control"] = [ControlInput.parse(x) for x in args.control]
    for option, name in (("control_start", "control_start"), ("control_end", "control_end")):
        if getattr(args, option) is not None:
            given[name] = getattr(args, option)
    if args.guess_mode:
        given["guess_mode"] = True
    if args.image is not None and args.mask is None:  # a new source replaces the recorded one, mask included
        base.mask_blur = 0.0
    request = replace(base, **given)
    if settings and request.scheduler not in (None, *scheduler_names()):
        raise UserError(f"{args.from_image} was made with scheduler {request.scheduler!r}, which this diffrt does not have")
    if settings and request.original_size == (request.height, request.width):
        request.original_size = None
    return request, settings


def check_image_options(args: argparse.Namespace, recorded_image: bool = False, recorded_mask: bool = False) -> None:
    """Refuse image-to-image options given without an image (--image, or one recorded in --from's settings): they
    would be ignored without a word (a mask without an image is refused by the pipeline)."""
    given = [flag for flag, value in (("--strength", args.strength is not None), ("--mask-blur", args.mask_blur),
                                      ("--resize", args.resize)) if value]
    if args.image is None and not recorded_image and given:
        one = len(given) == 1
        raise UserError(f"{', '.join(given)} only appl{'ies' if one else 'y'} to image-to-image: give --image IN.png, "
                        f"or leave {'it' if one else 'them'} out")
    if args.mask_blur and args.mask is None and not (recorded_mask and args.image is None):
        raise UserError("--mask-blur blurs the edge of an inpainting mask: give --mask MASK.png, or leave it out")


def require(extra: str, *modules: str) -> None:
    """Refuse before any work when an optional part's libraries are missing, naming the extra that installs them."""
    from importlib.util import find_spec

    missing = [m for m in modules if find_spec(m) is None]
    if missing:
        raise UserError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed; this command needs "
                        f'`pip install "diffrt[{extra}]"`')


def cmd_export(args: argparse.Namespace) -> int:
    require("export", "torch", "diffusers", "transformers", "onnx")
    from diffrt.export import ExportOptions, export_package

    from .lora import parse_choice

    components = tuple(args.components.split(",")) if args.components else None
    loras = [parse_choice(x) for x in args.lora or []]
    options = ExportOptions(components=components, loras=loras, opset=args.opset, exporter=args.exporter,
                            attention=args.attention, overwrite=args.overwrite, check=not args.no_check, weights_fp16=args.weights_fp16,
                            weights_fp32=args.weights_fp32,
                            name=args.name, controlnets=list(args.controlnet or []))
    if args.tiny_vae is not None and not (args.tiny_vae / "config.json").is_file():  # refused before the long export
        raise UserError(f"--tiny-vae {args.tiny_vae} has no config.json; give the folder of an AutoencoderTiny (TAESD)")
    export_package(args.checkpoint, args.out, options)
    if args.tiny_vae is not None:
        from diffrt.export.tiny_vae import add_tiny_vae

        add_tiny_vae(Path(args.out), args.tiny_vae, log=lambda m: print(m, file=sys.stderr))
    return 0


def cmd_tiny_vae(args: argparse.Namespace) -> int:
    require("export", "torch", "diffusers", "onnx")
    from diffrt.export.tiny_vae import add_tiny_vae

    add_tiny_vae(args.package, args.folder, log=lambda m: print(m, file=sys.stderr))
    print(args.package)
    return 0


def cmd_step_cache(args: argparse.Namespace) -> int:
    require("lora", "onnx")
    if args.method == "deepcache":
        from diffrt.export.deepcache import add_deepcache as add
    else:
        from diffrt.export.fbcache import add_fbcache as add

    add(args.package, log=lambda m: print(m, file=sys.stderr))
    print(args.package)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    require("export", "torch", "onnx")
    from diffrt.export.precision import FP16_KEEP_OPS, INT8_KEEP_LAYERS, QuantizeOptions, quantize_package

    split = lambda text: tuple(t for t in text.split(",") if t)  # noqa: E731
    keep_ops = split(args.keep_fp32_ops) if args.keep_fp32_ops is not None else FP16_KEEP_OPS
    keep_layers = split(args.keep_fp32_layers) if args.keep_fp32_layers is not None else INT8_KEEP_LAYERS
    options = QuantizeOptions(precision=args.precision, keep_fp32_ops=keep_ops,
                              keep_fp32_components=split(args.keep_fp32_components), keep_fp32_layers=keep_layers,
                              calibration_prompts=args.calibration_prompts, keep_fallback=not args.no_fallback,
                              accept_quality=args.accept_quality, overwrite=args.overwrite, steps=args.steps,
                              size=args.size, gate_seeds=args.gate_seeds, adherence=args.adherence,
                              cuda_fusions=args.cuda_fusions)
    if args.precision.endswith("-weights"):
        from diffrt.export.ov_weights import compress_package

        compress_package(args.package, args.out, args.precision, options, log=lambda m: print(m, file=sys.stderr))
    else:
        quantize_package(args.package, args.out, options, log=lambda m: print(m, file=sys.stderr))
    print(args.out)
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from diffrt.export.trt_build import BuildOptions, build_engines, check_trt_package
    from diffrt.runtime.backends.tensorrt import import_tensorrt

    check_trt_package(args.package)
    import_tensorrt()
    options = BuildOptions(precision=args.precision, batch=args.batch, size=args.size, static=args.static,
                           timing_cache=args.timing_cache, version_compatible=args.version_compatible, opt_level=args.opt_level,
                           workspace_gb=args.workspace, refittable=args.refittable)
    for path in build_engines(args.package, options, log=lambda m: print(m, file=sys.stderr)):
        print(path)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from .budget import memory_table
    from .doctor import available_backends, check_backends, format_report, machine_report

    report = machine_report()
    table = memory_table(args.memory, available_backends(report)) if args.memory else []  # a bad folder: refused first
    checks = check_backends(args.check, available_backends(report), args.steps) if args.check else None
    print("\n".join([format_report(report, checks), *table]))
    return 0 if not checks or all(c["ok"] for c in checks.values()) else 1


def cmd_bench(args: argparse.Namespace) -> int:
    require("bench", "matplotlib", "psutil")
    if str(args.package) == "sd15" or args.baseline:
        require("export", "torch", "diffusers", "transformers", "onnx")
    from diffrt.benchmarks.bench import benchmark, config_from_args, write_outputs

    cfg = config_from_args(args)
    if str(cfg.package) == "sd15":
        from diffrt.benchmarks.sd15 import prepare_package

        cfg.package, cfg.checkpoint = prepare_package()
    result = benchmark(cfg, log=lambda m: print(m, file=sys.stderr))
    for path in write_outputs(result, cfg.out):
        print(path)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    require("serve", "fastapi", "uvicorn", "pydantic", "prometheus_client")
    check_ray_options(args)
    if args.ray:
        require("ray", "ray")
    import uvicorn

    from diffrt.serve import ServeOptions, create_app

    from .package import load_package

    if args.memory_budget is not None:  # a budget no plan fits is refused before the server starts
        from .backends.registry import candidates
        from .budget import budget_residency
        from .bundled import bundled_model

        backend = next((b for b in candidates(args.backend) if not b.missing()), candidates(args.backend)[0])
        budget_residency(load_package(args.model or bundled_model()), backend, backend.compute_precision("auto", "fp32"),
                         args.memory_budget)
    if args.model is not None:
        package = load_package(args.model)  # a bad --model is refused here, before the server starts
        if args.batching == "step" and package.per_row_timesteps() is False:
            from diffrt.serve.app import step_needs_rows

            raise UserError(step_needs_rows())
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"diffrt: warning: serving on {args.host} without --api-key: anyone who reaches it can use it", file=sys.stderr)
    options = ServeOptions(model=args.model, backend=args.backend, threads=args.threads, max_batch=args.max_batch,
                           max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, timeout_s=args.timeout,
                           api_key=args.api_key or os.environ.get("DIFFRT_API_KEY"), lora_dir=args.lora_dir,
                           batching=args.batching, warm_up=args.warm_up, release_memory=not args.keep_memory,
                           residency=args.residency, memory_budget=args.memory_budget, cache=args.cache)
    if args.ray:
        from diffrt.serve.ray_app import run_on_ray

        return run_on_ray(options, args.host, args.port, args.address, args.replicas, args.autoscale)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"diffrt serve: http://{host}:{args.port}/ (web page; OpenAI API at /v1, AUTOMATIC1111's at /sdapi/v1), "
          f"model {args.model or 'the bundled shapes-tiny'}, backend {args.backend}, "
          f"{args.batching}-level batching", file=sys.stderr, flush=True)
    uvicorn.run(create_app(options), host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=30)
    return 0


def check_ray_options(args: argparse.Namespace) -> None:
    """--replicas, --autoscale and --address go with --ray; one of --replicas and --autoscale; MIN-MAX well formed."""
    given = [f"--{name}" for name in ("replicas", "autoscale", "address") if getattr(args, name) is not None]
    if given and not args.ray:
        raise UserError(f"{given[0]} is a Ray Serve option; add --ray")
    if args.replicas is not None and args.autoscale is not None:
        raise UserError("give --replicas or --autoscale, not both")
    if args.autoscale is not None:
        lo, sep, hi = args.autoscale.partition("-")
        if not (sep and lo.isdigit() and hi.isdigit() and 1 <= int(lo) <= int(hi)):
            raise UserError(f"--autoscale {args.autoscale!r} must be MIN-MAX with 1 <= MIN <= MAX, e.g. 1-4")


def add_serve(sub) -> None:
    from .backends.registry import BACKENDS

    s = sub.add_parser("serve", help="HTTP image service: OpenAI and AUTOMATIC1111 APIs, health, metrics (needs diffrt[serve])")
    s.add_argument("--model", type=Path, help="model package folder (default: the bundled model)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine only)")
    s.add_argument("--port", type=positive_int, default=7860, help="default %(default)s")
    s.add_argument("--backend", choices=BACKENDS, default="auto", help="default auto")
    s.add_argument("--threads", type=positive_int, help="CPU threads for onnxruntime (default: all cores)")
    s.add_argument("--max-batch", type=positive_int, default=4, help="images per UNet call (default %(default)s)")
    s.add_argument("--batching", choices=("auto", "step", "request"), default="auto",
                   help="step: a request joins the running ones at their next step; request: requests that arrive "
                   "together run together; auto (default): step where the model's UNet takes one timestep per row")
    add_memory_args(s)
    add_cache_arg(s, "a request's \"cache\" field picks its own setting, or none")
    s.add_argument("--keep-memory", action="store_true", help="keep what onnxruntime's CPU memory arena holds after a "
                   "request: the next request's first step is faster (no memory to fault in again), but the server's RSS "
                   "stays at its peak (default: the arena shrinks after each request; OpenVINO hands memory back either way)")
    s.add_argument("--warm-up", action="store_true", help="before answering ready, run every batch size up to --max-batch "
                   "once at the model's default size (ov-cpu compiles per shape: it then never compiles while serving "
                   "that size)")
    s.add_argument("--max-wait-ms", type=number, default=50, help="request-level batching: how long a request waits "
                   "for others to batch with (default %(default)s)")
    s.add_argument("--max-queue", type=positive_int, default=64, help="queued requests before answering 429 (default %(default)s)")
    s.add_argument("--timeout", type=positive_number, default=600, help="seconds a request may take (default %(default)s)")
    s.add_argument("--lora-dir", type=Path, help="LoRAs requests may name (<lora:NAME:SCALE> in the prompt, or a loras "
                   "field): NAME.safetensors files in this folder")
    s.add_argument("--api-key", help="require this key (Authorization: Bearer KEY); env DIFFRT_API_KEY")
    r = s.add_argument_group("scale-out on Ray Serve (needs diffrt[ray])")
    r.add_argument("--ray", action="store_true", help="serve through Ray Serve: one ingress, model replicas on the cluster")
    r.add_argument("--replicas", type=positive_int, help="model replicas (default 1), each with --threads CPU threads (default 1)")
    r.add_argument("--autoscale", metavar="MIN-MAX", help="let Ray scale the replicas between MIN and MAX by queued requests")
    r.add_argument("--address", help="join this Ray cluster (auto, or ray://HOST:10001) instead of starting one here")
    s.set_defaults(func=cmd_serve)


def cmd_info(args: argparse.Namespace) -> int:
    """A package's contents, or an image's settings and the command that makes it again."""
    import json

    from .images import read_settings

    if args.path.is_file():
        settings = read_settings(args.path)
        print(json.dumps(settings, indent=1, ensure_ascii=False))
        from .bundled import BUNDLED_NAME

        model = settings.get("model")
        print(f"make it again: diffrt generate --from {args.path}"
              + (f" --model PACKAGE   (the package of model {model})" if model and model != BUNDLED_NAME else ""))
        return 0
    from .backends.engine_store import list_engines
    from .package import load_package

    pkg = load_package(args.path)
    size = sum(p.stat().st_size for p in pkg.root.rglob("*") if p.is_file())
    print(f"{pkg.root}: {pkg.name}, family {pkg.manifest.get('family', 'unknown')}, {size / 1e6:.1f} MB")
    for comp, entry in pkg.manifest.get("components", {}).items():
        print(f"  {comp}: {entry.get('precision', 'fp32')}, attention {entry.get('attention', 'unrecorded')}"
              + (", float32 fallback kept" if entry.get("fallback") else "")
              + (", CUDA fusions: runs on --backend ort-cuda only" if entry.get("providers") else "")
              + (", DeepCache graphs (--cache deepcache[:N])" if entry.get("deepcache") else "")
              + (", First-Block Cache graphs (--cache fbcache[:T])" if entry.get("fbcache") else ""))
    print("  defaults: " + ", ".join(f"{k} {v}" for k, v in pkg.defaults.items()))
    quality = pkg.manifest.get("quality")
    if quality:
        from .trust import cpu_kind

        gates = [(b, g) for b, g in (("ort-cpu", quality), ("ov-cpu", quality.get("ov-cpu"))) if g]
        print("  gates against float32: " + ", ".join(f"{b} ({g.get('computes', pkg.precision('unet'))}) "
                                                      f"{g['psnr_db_min']:.1f} dB" for b, g in gates)
              + f", measured on {quality.get('cpu', 'a CPU not recorded')} ({quality.get('cpu_kind', 'kind not recorded')}); "
              f"this CPU is {cpu_kind()} (docs/cpu-kinds.md)")
    if pkg.manifest.get("loras"):
        print("  LoRAs merged at export: " + ", ".join(f"{x['file']}:{x['scale']:g}" for x in pkg.manifest["loras"]))
    engines = list_engines(pkg.root)
    print("  TensorRT engines: " + (", ".join(f"{e.component}.{e.precision} ({e.plan.parent.name})" for e in engines)
                                  if engines else "none built"))
    return 0


def cmd_samplers(args: argparse.Namespace) -> int:
    from .schedulers import sampler_table

    print("\n".join(sampler_table()))
    print("--scheduler takes any of these names (short, AUTOMATIC1111 or diffusers class, any case); a class name keeps "
          "the package's scheduler config as it is. Samplers with 2 calls/step run 2 UNet calls per step "
          "(--steps 10 is 19 calls).")
    return 0


def bundled_defaults() -> dict:
    """The bundled model's defaults, for --help (a package given with --model brings its own)."""
    import json

    from .bundled import bundled_model

    try:
        return json.loads((bundled_model() / "diffrt.json").read_text())["defaults"]
    except (UserError, OSError, ValueError, KeyError):
        return {}


def add_generate(sub) -> None:
    d = bundled_defaults()
    own = "default: the model's own" + ("; the bundled model's is {}" if d else "{}")
    g = sub.add_parser("generate", help="generate images from a prompt")
    g.add_argument("prompt", nargs="?", help="what to draw (may be left out with --from)")
    g.add_argument("--model", type=Path, help="model package folder (default: the bundled shapes-tiny model)")
    g.add_argument("--negative", help="negative prompt: what to steer away from (default: none)")
    g.add_argument("--steps", type=positive_int, help=own.format(d.get("steps", "")))
    g.add_argument("--guidance", type=number, help="classifier-free guidance scale, 0 or more; 1 or less turns it off; "
                   + own.format(d.get("guidance_scale", "")))
    g.add_argument("--scheduler", type=scheduler_name, metavar="S",
                   help="ddim, pndm, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, lcm, a diffusers class or an "
                        f"AUTOMATIC1111 name (\"Euler a\"), any case; {own.format(d.get('scheduler', ''))}")
    g.add_argument("--seed", type=seed_value, help="first image's seed; image i gets seed + i (default or -1: random, printed)")
    g.add_argument("--rng", choices=("numpy", "torch-cpu", "torch-cuda"),
                   help="what draws the noise from each seed: numpy (default), or what torch.randn draws on a CPU or CUDA "
                        "generator, to make the image diffusers or AUTOMATIC1111 (RNG source CPU / GPU) made from that seed")
    g.add_argument("--guidance-rescale", type=number, metavar="R",
                   help="0..1: rescale the guided prediction's spread to the prompt's (diffusers' guidance_rescale; "
                        "0.7 for SD 2.x v-prediction models trained with zero terminal SNR; default 0)")
    g.add_argument("--true-cfg", type=number, metavar="S",
                   help="FLUX: classifier-free guidance with --negative on top of the distilled guidance (diffusers' "
                        "true_cfg_scale; above 1 with a negative prompt, twice the transformer rows; default 1, off)")
    g.add_argument("--prompt-syntax", choices=("a1111", "plain"),
                   help="a1111 (default for SD 1.x/2.x/SDXL): (word:1.2), [word], BREAK and prompts of any length as "
                        "AUTOMATIC1111 reads them; plain (the only one for SD3 and FLUX): as diffusers reads them, cut at "
                        "the text encoders' lengths with a warning")
    g.add_argument("--clip-skip", type=positive_int, metavar="N",
                   help="take the text encoder's N-th layer from the end (AUTOMATIC1111's Clip skip; default 1, the last)")
    g.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                   help="apply a LoRA (.safetensors) at this scale (default 1) without re-export; repeat for several")
    g.add_argument("--original-size", type=pair("x", "WIDTH", "HEIGHT"), metavar="WxH",
                   help="SDXL: the size the image is conditioned as coming from (default: its own size)")
    g.add_argument("--crop-top-left", type=pair(",", "TOP", "LEFT"), metavar="TOP,LEFT",
                   help="SDXL: the crop offset the image is conditioned on (default 0,0: uncropped)")
    g.add_argument("--width", type=positive_int, help=own.format(d.get("width", "")))
    g.add_argument("--height", type=positive_int, help=own.format(d.get("height", "")))
    g.add_argument("-n", type=positive_int, help="number of images (default 1)")
    g.add_argument("--image", type=Path, help="image-to-image: start from this image (its size is the output's)")
    g.add_argument("--strength", type=number, help="image-to-image: how much of the schedule repaints the "
                   "image, above 0 to 1 (default 0.8)")
    g.add_argument("--mask", type=Path, help="inpainting: white repaints, black keeps (with --image; same size)")
    g.add_argument("--mask-blur", type=number, metavar="PX", help="inpainting: blur the mask's edge by PX "
                   "pixels first (default 0)")
    g.add_argument("--resize", action="store_true", help="image-to-image: scale an image whose sides are not multiples "
                   "of the model's factor down to the nearest ones (default: refuse it)")
    g.add_argument("--from", dest="from_image", type=Path, metavar="IMAGE",
                   help="take the settings an image made by diffrt was saved with (options given here win)")
    from .backends.registry import BACKENDS

    g.add_argument("--backend", choices=BACKENDS, default="auto", help="default auto: the fastest present (ort-cuda on an "
                   "NVIDIA GPU, else ov-cpu where OpenVINO is installed, else ort-cpu)")
    g.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="compute precision on ov-cpu (default auto: bf16 where the CPU has AMX or AVX-512-BF16, else fp32)")
    g.add_argument("--threads", type=positive_int, help="CPU threads for onnxruntime (default: all cores)")
    g.add_argument("--verify", action="store_true", help="check every package file's sha256 before loading")
    g.add_argument("--fp32-fallback", action="store_true", help="rerun a reduced-precision stage in float32 if it makes NaN/inf")
    g.add_argument("--cuda-graph", action="store_true", help="ort-cuda: replay the UNet from a CUDA graph per shape")
    g.add_argument("--gpu-mem-limit", type=positive_number, metavar="GB", help="ort-cuda: cap each engine's CUDA memory arena")
    g.add_argument("--graph-cache", type=Path, metavar="DIR", default=os.environ.get("DIFFRT_GRAPH_CACHE") or None,
                   help="keep onnxruntime's optimized graphs here; later loads skip optimization (env DIFFRT_GRAPH_CACHE)")
    g.add_argument("-o", "--output", help="a .png, .jpg or .webp file (several images: name-0, name-1, ...) or a folder "
                   "for numbered names 00001-<seed>.png (default: the current folder)")
    g.add_argument("--overwrite", action="store_true", help="replace existing output files (default: refuse)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g.add_argument("--preview", type=Path, metavar="FILE", help="rewrite this .png/.jpg/.webp with a quick preview of "
                   "the image(s) as they are denoised (written whole each time: a viewer that reloads shows it live)")
    g.add_argument("--preview-every", type=positive_int, metavar="N", help="rewrite --preview every N steps (default 1)")
    g.add_argument("--decoder", choices=("vae", "tiny"), help="the final decode: vae (default, the model's) or tiny (the "
                   "package's tiny decoder, `diffrt tiny-vae add`: much faster, rougher; for few-step models)")
    g.add_argument("--vae-tiling", choices=("auto", "on", "off"), help="run the VAE in overlapping tiles, blended as "
                   "diffusers' enable_tiling(): less memory at large sizes, slightly different pixels (default auto: "
                   "tiles above 1024x1024 pixels)")
    g.add_argument("--control", action="append", metavar="NAME:IMAGE[:SCALE]", help="steer with the package's ControlNet "
                   "NAME and its control map IMAGE (canny=PHOTO: the map made from a photo by OpenCV's Canny) at SCALE "
                   "(default 1); repeat for several, their residuals summed")
    g.add_argument("--control-start", type=number, metavar="F", help="the fraction of the steps where ControlNets start (default 0)")
    g.add_argument("--control-end", type=number, metavar="F", help="the fraction of the steps where they stop (default 1)")
    g.add_argument("--guess-mode", action="store_true", help="ControlNets on the prompt's half only, ramped from the "
                   "shallow residuals to the deep ones (diffusers' guess mode; A1111's \"ControlNet is more important\")")
    add_memory_args(g)
    add_cache_arg(g, "recorded with the image")
    g.set_defaults(func=cmd_generate)


def add_export(sub) -> None:
    e = sub.add_parser("export", help="export a diffusers checkpoint folder to a model package (needs diffrt[export])")
    e.add_argument("checkpoint", help="diffusers checkpoint folder (model_index.json, unet/, vae/, text_encoder/, ...)")
    e.add_argument("out", help="package folder to write")
    e.add_argument("--components", default=None, help="comma-separated (text_encoder,text_encoder_2,unet,vae_decoder,"
                   "vae_encoder); default: every one the checkpoint has")
    e.add_argument("--opset", type=positive_int, default=17, help="ONNX opset (default %(default)s)")
    e.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                   help="merge a LoRA (.safetensors) into the weights at this scale (default 1); repeat for several")
    e.add_argument("--exporter", choices=("auto", "torchscript", "dynamo"), default="auto",
                   help="default auto: TorchScript, dynamo for a model over 4 GB of float32 weights (SDXL's UNet), whose "
                   "export needs about half the memory")
    e.add_argument("--attention", choices=("auto", "mha", "plain"), default="auto",
                   help="mha: onnxruntime's fused attention (fast on GPUs, CUDA graphs); plain: MatMul/Softmax, for TensorRT "
                        "(default auto: mha with torchscript, plain with dynamo)")
    e.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    e.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-PyTorch check")
    e.add_argument("--weights-fp16", action="store_true", help="store weights as float16 (half the size), compute in float32")
    e.add_argument("--weights-fp32", action="store_true", help="a large model's 16-bit weights (SD3, FLUX: streamed from "
                   "the checkpoint) written as float32 instead of 16-bit behind Casts: twice the disk, and OpenVINO "
                   "(ov-cpu) then holds under half the memory (SD3.5-medium's MMDiT 7.6 GB against 15.6)")
    e.add_argument("--name", help="model name recorded in the manifest and in image metadata (default: OUT's name)")
    e.add_argument("--tiny-vae", type=Path, metavar="DIR", help="also add this AutoencoderTiny (TAESD, TAESDXL, TAESD3, "
                   "TAEF1 folder) as the package's tiny decoder: previews, and `generate --decoder tiny`")
    e.add_argument("--controlnet", type=Path, action="append", metavar="DIR", help="also add this diffusers ControlNetModel "
                   "folder (named after the folder; repeat for several): the UNet then takes ControlNet residuals")
    e.set_defaults(func=cmd_export)


def add_tiny_vae(sub) -> None:
    t = sub.add_parser("tiny-vae", help="add a tiny decoder (TAESD) to a package (needs diffrt[export])")
    actions = t.add_subparsers(dest="action", required=True, parser_class=Parser, help="add: export a tiny decoder into a package")
    a = actions.add_parser("add", help="export an AutoencoderTiny folder into the package as its tiny decoder")
    a.add_argument("package", type=Path, help="model package folder")
    a.add_argument("folder", type=Path, help="AutoencoderTiny folder (config.json and weights: TAESD, TAESDXL, TAESD3, TAEF1)")
    a.set_defaults(func=cmd_tiny_vae)


def add_step_caches(sub) -> None:
    for method, name, denoiser, parts, families in (
            ("deepcache", "DeepCache", "UNet", "full and shallow graphs", "SD 1.x/2.x, SDXL; any precision"),
            ("fbcache", "First-Block Cache", "transformer", "head, tail and output graphs", "SD3/3.5, FLUX.1")):
        d = sub.add_parser(method, help=f"add {name}'s graphs to a package (for --cache {method}; needs onnx)")
        actions = d.add_subparsers(dest="action", required=True, parser_class=Parser,
                                   help=f"add: cut the graphs from the {denoiser}")
        a = actions.add_parser("add", help=f"cut {name}'s {parts} from the package's {denoiser} (no re-export, no "
                               "weights copied)")
        a.add_argument("package", type=Path, help=f"model package folder ({families})")
        a.set_defaults(func=cmd_step_cache, method=method)


def add_quantize(sub) -> None:
    q = sub.add_parser("quantize", help="fp16 or int8 copy of an fp32 package, with quality gates (needs diffrt[export])")
    q.add_argument("package", type=Path, help="an fp32 package folder written by diffrt export")
    q.add_argument("out", type=Path, help="package folder to write")
    q.add_argument("--precision", choices=("fp16", "int8", "int8-weights", "int4-weights"), required=True,
                   help="fp16 (any GPU), int8 (QDQ UNet), or int8-weights / int4-weights (ov-cpu: the text encoders' and "
                   "the denoiser's matrix products with compressed weights, for less memory; needs diffrt[nncf])")
    q.add_argument("--keep-fp32-ops", help="fp16: op types left in float32, comma-separated (default: the normalizations, "
                   "Softmax, Pow and ReduceMean)")
    q.add_argument("--keep-fp32-components", default="", help="fp16: components left in float32, e.g. vae_decoder")
    q.add_argument("--keep-fp32-layers", help="int8: layers (module-path fragments, comma-separated) left unquantized "
                   "(default: time_embedding,time_proj,conv_in,conv_out; add norm,attn,proj_in,proj_out if the gate is missed)")
    q.add_argument("--calibration-prompts", type=positive_int, default=8, help="int8: prompts whose trajectories calibrate "
                   "(default %(default)s)")
    q.add_argument("--steps", type=positive_int, help="steps per trajectory (default: the package's)")
    q.add_argument("--size", type=width_height, help="WIDTHxHEIGHT of the calibration and gate images (default: the "
                   "package's; calibrate at the size you will generate)")
    q.add_argument("--gate-seeds", type=positive_int, default=2, help="seeds per gate prompt (default %(default)s)")
    q.add_argument("--no-fallback", action="store_true", help="do not keep the float32 graphs for the NaN/inf fallback")
    q.add_argument("--adherence", action="store_true", help="also gate on the shapes model's prompt-adherence scores")
    q.add_argument("--cuda-fusions", action="store_true", help="fp16: fuse the UNet and VAE decoder for onnxruntime's CUDA "
                   "provider (GroupNorm, NHWC convolutions, ...; checked on the CPU); the package then runs on --backend ort-cuda only")
    q.add_argument("--accept-quality", action="store_true", help="write the package even if it misses its quality gate")
    q.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    q.set_defaults(func=cmd_quantize)


def add_build(sub) -> None:
    t = sub.add_parser("build", help="build TensorRT engines for this GPU (needs diffrt[trt])")
    t.add_argument("package", type=Path, help="package folder; engines go to its engines/ folder")
    t.add_argument("--precision", choices=("fp16", "int8", "fp32"), default="fp16", help="default %(default)s")
    t.add_argument("--batch", default="1", help="images per request: N or N-M (guidance doubles the UNet's batch; "
                   "default %(default)s)")
    t.add_argument("--size", help="WIDTHxHEIGHT or MIN-MAX (default: the package's size)")
    t.add_argument("--static", action="store_true", help="one fixed shape (enables CUDA graphs)")
    t.add_argument("--timing-cache", type=Path, help="TensorRT timing cache file, read and updated")
    t.add_argument("--version-compatible", action="store_true", help="engines the lean runtime (tensorrt_lean) can run")
    t.add_argument("--refittable", action="store_true", help="text encoder and UNet engines whose weights LoRAs can "
                   "change at run time (TensorRT's Refitter) without a rebuild")
    t.add_argument("--opt-level", type=int, default=3, choices=range(0, 6), help="builder optimization level (default 3)")
    t.add_argument("--workspace", type=positive_number, default=4.0, help="GB (default %(default)s)")
    t.set_defaults(func=cmd_build)


def add_bench(sub) -> None:
    b = sub.add_parser("bench", help="latency benchmark, optionally side by side with diffusers")
    b.add_argument("package", nargs="?", type=Path, help="package folder, `sd15` (full-size SD 1.5, random weights), "
                   "default the bundled model")
    from .backends.registry import BACKENDS

    b.add_argument("--backend", choices=BACKENDS, default="auto", help="default auto")
    b.add_argument("--steps", type=positive_int, help="default: the package's")
    b.add_argument("--size", type=width_height, help="WIDTHxHEIGHT (default: the package's)")
    b.add_argument("--batch", default="1", help="batch sizes, comma-separated (e.g. 1,4; default 1)")
    b.add_argument("--runs", type=positive_int, default=5, help="timed runs (default 5)")
    b.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    b.add_argument("--scheduler", type=scheduler_name, metavar="S", help="default: the package's")
    b.add_argument("--guidance", type=number, help="default: the package's")
    b.add_argument("--threads", type=positive_int, help="CPU threads for onnxruntime (default: all cores)")
    b.add_argument("--cuda-graph", action="store_true", help="ort-cuda: replay the UNet from a CUDA graph per shape")
    b.add_argument("--graph-cache", type=Path, metavar="DIR",
                   help="also time a cold start that loads onnxruntime's optimized graphs from DIR")
    b.add_argument("--baseline", help="run these side by side, comma-separated: diffusers (float32 on the CPU, float16 "
                   "on a GPU; needs diffrt[export]), diffusers-bf16 (bfloat16 on the CPU), and the CPU peers "
                   "openvino-genai, openvino-genai-int8, openvino-genai-hybrid, optimum, stable-diffusion-cpp (set up as "
                   "docs/benchmarks.md#peers says)")
    b.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="OpenVINO's compute precision on --backend ov-cpu (default auto: bf16 where the CPU has it)")
    b.add_argument("--checkpoint", type=Path, help="diffusers checkpoint for the baseline (default: the package's source)")
    b.add_argument("--image", type=Path, help="benchmark image-to-image from this picture (the VAE encoder is timed too)")
    b.add_argument("--strength", type=number, default=0.6, help="with --image (default %(default)s): "
                   "int(strength x steps) UNet steps run")
    b.add_argument("--control", action="append", metavar="NAME:IMAGE[:SCALE]", help="run the package's ControlNet NAME on "
                   "IMAGE each step (timed apart from the UNet; diffusers' ControlNet pipeline as the baseline)")
    add_cache_arg(b, "timed beside the exact path, with its PSNR against the exact image")
    b.add_argument("--tiny-decoder", action="store_true", help="also time diffrt with the package's tiny decoder (`diffrt "
                   "tiny-vae add`) for the final decode, beside the VAE's, with its PSNR against that image")
    b.add_argument("--no-cold-start", action="store_true", help="skip the fresh-process runs")
    b.add_argument("--out", type=Path, default=Path("bench-out"), help="report folder (default %(default)s)")
    b.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="diffrt", description="Torch-free Stable Diffusion runtime and export toolchain.")
    from . import __version__

    p.add_argument("--version", action="version", version=f"diffrt {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_generate(sub)
    add_export(sub)
    add_tiny_vae(sub)
    add_step_caches(sub)
    add_controlnet_commands(sub, Parser)
    add_quantize(sub)
    add_build(sub)
    dr = sub.add_parser("doctor", help="what this machine offers; with --check, every backend compared")
    dr.add_argument("--check", type=Path, metavar="PACKAGE", help="run every usable path (backend and precision) on "
                    "the gate prompts against the package's float32 graphs, hold each to its gate and keep the verdicts "
                    "for this machine (exit 1 when one fails)")
    dr.add_argument("--steps", type=int, help="sampling steps of the check's images (default: the package's)")
    dr.add_argument("--memory", type=Path, metavar="PACKAGE", help="print the package's predicted peak memory per size "
                    "under each plan (--memory-budget chooses among them)")
    dr.set_defaults(func=cmd_doctor)
    add_bench(sub)
    add_serve(sub)
    sub.add_parser("samplers", help="the samplers (--scheduler names) with their AUTOMATIC1111 and diffusers names"
                   ).set_defaults(func=cmd_samplers)
    i = sub.add_parser("info", help="what a package holds, or the settings an image was made with")
    i.add_argument("path", type=Path, help="a package folder, or an image made by diffrt generate")
    i.set_defaults(func=cmd_info)
    return p


def _terminate(signum, frame):
    raise KeyboardInterrupt  # so a `kill` cleans up like Ctrl-C: no half-written package or image is left


def _plain_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one plain line (no source line), after the progress bar's line if one is open."""
    from . import progress

    progress.end_line()
    print(f"diffrt: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    import warnings

    from . import progress

    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here Ctrl-C unwinds, so partial files are removed
    signal.signal(signal.SIGTERM, _terminate)
    warnings.showwarning = _plain_warning
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UserError as exc:
        progress.end_line()
        print(f"diffrt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        progress.end_line()
        print("diffrt: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        progress.end_line()
        print("diffrt: error: out of memory; use a smaller size, fewer images or a smaller model", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of our output stopped early (`diffrt samplers | head`): end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
