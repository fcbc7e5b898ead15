"""Latency benchmark: per stage, percentiles, images/s, cold start and peak RSS; diffusers side by side.

    diffrt bench [PACKAGE | sd15] [--steps N] [--size WxH] [--batch 1,4] [--runs N] [--warmup N]
                 [--baseline diffusers] [--out DIR]

With --baseline diffusers, diffusers (its DiffusionPipeline: SD or SDXL) runs on the checkpoint the package was exported
from, with the same latents, steps and scheduler, interleaved run by run with diffrt so machine noise hits both,
on the same kind of device: the CPU in float32 beside ort-cpu, the GPU beside ort-cuda and trt (float16 there
unless the package is float32).
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np

from diffrt.runtime.doctor import psnr
from diffrt.runtime.errors import UserError
from diffrt.runtime.pipeline import Pipeline

from .machine import describe, gpu_memory_used_mb
from .peers import PEERS, make_peer
from .peers import missing as peer_missing

PROMPT = "a small red circle on a blue background, top left"


@dataclass
class BenchConfig:
    package: Path | None = None
    backend: str = "auto"
    steps: int | None = None
    width: int | None = None
    height: int | None = None
    batches: list[int] = field(default_factory=lambda: [1])
    runs: int = 5
    warmup: int = 1
    scheduler: str | None = None
    guidance: float | None = None
    baseline: str | None = None  # comma-separated: diffusers, diffusers-bf16 (CPU), and the peers (peers.py)
    checkpoint: Path | None = None
    precision: str = "auto"  # diffrt's compute precision on ov-cpu
    image: Path | None = None  # image-to-image from this picture (the VAE encoder timed too)
    strength: float = 0.6
    threads: int | None = None
    cuda_graph: bool = False
    graph_cache: Path | None = None
    cold_start: bool = True
    prompt: str = PROMPT
    out: Path = Path("bench-out")
    control: list[str] = field(default_factory=list)  # NAME:IMAGE[:SCALE]: ControlNets of the package, timed per step
    cache: str | None = None  # deepcache[:N]: diffrt with step caching, timed beside the exact path
    tiny_decoder: bool = False  # also diffrt with the package's tiny decoder for the final decode, beside the VAE's


def stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, np.float64)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
            "mean": float(a.mean()), "min": float(a.min()), "max": float(a.max()), "n": len(a)}


BASELINES = ("diffusers", "diffusers-bf16", *PEERS)
CPU_BACKENDS = ("ort-cpu", "ov-cpu")


def baselines(cfg: BenchConfig) -> list[str]:
    names = [b.strip() for b in cfg.baseline.split(",")] if cfg.baseline else []
    unknown = [b for b in names if b not in BASELINES]
    if unknown:
        raise UserError(f"unknown baseline {unknown[0]!r}; use {', '.join(BASELINES)} (several: comma-separated)")
    why = next((peer_missing(b) for b in names if b in PEERS and peer_missing(b)), None)
    if why:
        raise UserError(why)
    return names


def baseline_placement(backend: str, unet_precision: str, baseline: str = "diffusers",
                       precision: str = "fp32") -> tuple[str, str]:
    """(torch device, torch dtype name) for diffusers beside a diffrt backend: the same kind of device, and the
    package's precision where torch has it (int8 packages are compared with float16 on the GPU); diffusers-bf16 is
    diffusers in bfloat16 on the CPU, what a user of a CPU with AMX or AVX-512-BF16 would pick. OpenVINO GenAI runs
    in diffrt's own OpenVINO precision, optimum in float32 (onnxruntime's CPU provider)."""
    if baseline in PEERS:
        if backend not in CPU_BACKENDS:
            raise UserError(f"--baseline {baseline} is a CPU runtime; benchmark it beside --backend ov-cpu or ort-cpu")
        return "cpu", precision if baseline.startswith("openvino-genai") else "fp32"  # optimum: onnxruntime's CPU provider
    if baseline == "diffusers-bf16":
        if backend not in CPU_BACKENDS:
            raise UserError("--baseline diffusers-bf16 is the CPU baseline; on a GPU use --baseline diffusers (float16)")
        return "cpu", "bfloat16"
    if backend in CPU_BACKENDS:
        return "cpu", "float32"
    return "cuda", "float32" if backend == "ort-cuda" and unet_precision == "fp32" else "float16"


# diffusers' modules and the bench's stage each times as: a family's text encoders are one stage, its denoiser "unet"
STAGES = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder", "text_encoder_3": "text_encoder",
          "unet": "unet", "transformer": "unet", "controlnet": "controlnet"}


def left_out(checkpoint: Path) -> dict[str, None]:
    """SD3's T5 where the checkpoint was saved without it (diffusers then needs text_encoder_3=None said outright)."""
    index = json.loads((checkpoint / "model_index.json").read_text())
    if not index.get("_class_name", "").startswith("StableDiffusion3"):
        return {}
    return {k: None for k in ("text_encoder_3", "tokenizer_3") if (index.get(k) or [None])[0] is None}


class Diffusers:
    """The baseline: diffusers on the same weights, timed per stage with module hooks."""

    def __init__(self, checkpoint: Path, threads: int | None, device: str = "cpu", dtype: str = "float32",
                 controlnets: list[Path] | None = None) -> None:
        import torch
        from diffusers import AutoPipelineForText2Image, ControlNetModel

        if threads:
            torch.set_num_threads(threads)
        self.torch, self.device, self.dtype = torch, device, getattr(torch, dtype)
        start = time.perf_counter()
        nets = [ControlNetModel.from_pretrained(c, torch_dtype=self.dtype) for c in controlnets or []]
        control = {"controlnet": nets[0] if len(nets) == 1 else nets} if nets else {}
        # SD or SDXL, or their ControlNet pipelines
        self.pipe = AutoPipelineForText2Image.from_pretrained(checkpoint, torch_dtype=self.dtype, **control,
                                                              **left_out(checkpoint)).to(device)
        self.scheduler_config = dict(self.pipe.scheduler.config)  # the checkpoint's, which each sampler is built over
        self.pipe.set_progress_bar_config(disable=True)
        self.load_seconds = time.perf_counter() - start
        self.stages: dict[str, list[tuple[Any, Any]]] = {}  # (start mark, end mark) per call
        for name, stage in STAGES.items():
            if getattr(self.pipe, name, None) is not None:
                self._hook(stage, getattr(self.pipe, name))
        self.pipe.vae.decode = self._timed("vae_decode", self.pipe.vae.decode)
        self.pipe.vae.encode = self._timed("vae_encode", self.pipe.vae.encode)

    def _timed(self, name: str, method):
        """method, its calls recorded as stage `name` (the VAE's encode and decode are methods, not forward passes)."""
        def timed(*args, **kwargs):
            start = self._mark()
            out = method(*args, **kwargs)
            self.stages.setdefault(name, []).append((start, self._mark()))
            return out

        return timed

    def img2img(self):
        """diffusers' image-to-image pipeline over the same modules (the hooks stay on them)."""
        from diffusers import AutoPipelineForImage2Image

        if not hasattr(self, "_img2img"):
            self._img2img = AutoPipelineForImage2Image.from_pipe(self.pipe)
            self._img2img.set_progress_bar_config(disable=True)
        self._img2img.scheduler = self.pipe.scheduler
        return self._img2img

    def _mark(self) -> Any:
        """A point in time: on the GPU a CUDA event in the stream, so that timing a stage does not stall the queue."""
        if self.device != "cuda":
            return time.perf_counter()
        event = self.torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _seconds(self, start: Any, end: Any) -> float:
        """Seconds between two marks; on the GPU only once both events have run (after the images reached the host)."""
        return start.elapsed_time(end) / 1000 if self.device == "cuda" else end - start

    def _hook(self, name: str, module) -> None:
        marks: list[Any] = []
        module.register_forward_pre_hook(lambda *a: marks.append(self._mark()))
        module.register_forward_hook(lambda *a: self.stages.setdefault(name, []).append((marks.pop(), self._mark())))

    def __call__(self, cfg: BenchConfig, scheduler: str, steps: int, guidance: float, latents: np.ndarray, width: int,
                 height: int) -> dict[str, Any]:
        import diffusers

        from diffrt.runtime.schedulers import SHORT_NAMES

        cls, overrides = SHORT_NAMES[scheduler]
        self.pipe.scheduler = getattr(diffusers, cls.class_name).from_config({**self.scheduler_config, **overrides})
        self.stages = {}
        start = time.perf_counter()
        with self.torch.no_grad():
            if cfg.image:
                images = self.img2img()([cfg.prompt] * len(latents), image=picture(cfg.image, width, height),
                                        strength=cfg.strength, num_inference_steps=steps, guidance_scale=guidance,
                                        generator=self.torch.Generator().manual_seed(0), **eta(self.img2img(), cls)).images
            else:
                images = self.pipe([cfg.prompt] * len(latents), num_inference_steps=steps, guidance_scale=guidance,
                                   width=width, height=height, **eta(self.pipe, cls),
                                   latents=self.torch.from_numpy(latents).to(self.device, self.dtype),
                                   **control_arguments(cfg, width, height)).images
        for image in images:
            image.save(BytesIO(), format="PNG")
        total = time.perf_counter() - start
        calls = {k: [self._seconds(a, b) for a, b in v] for k, v in self.stages.items()}
        stages = {k: float(np.sum(v)) for k, v in calls.items()}
        stages["other"] = total - sum(stages.values())
        return {"total": total, "stages": stages, "unet_calls": calls.get("unet", [])}


def eta(pipe, sampler) -> dict[str, float]:
    """The sampler's eta for a pipeline that takes one (SD3's and FLUX's do not)."""
    return {"eta": getattr(sampler, "eta", 0.0)} if "eta" in inspect.signature(pipe.__call__).parameters else {}


def control_inputs(cfg: BenchConfig) -> list[Any]:
    from diffrt.runtime.control import ControlInput

    return [ControlInput.parse(spec) for spec in cfg.control]


def control_arguments(cfg: BenchConfig, width: int, height: int) -> dict[str, Any]:
    """diffusers' ControlNet pipeline arguments for the bench's --control (images as diffrt reads them)."""
    if not cfg.control:
        return {}
    units = control_inputs(cfg)
    images = [picture(Path(u.image), width, height) for u in units]
    one = len(units) == 1
    return {"image": images[0] if one else images,
            "controlnet_conditioning_scale": units[0].scale if one else [u.scale for u in units]}


def picture(path: Path, width: int, height: int):
    """The bench's input image, at the size benchmarked."""
    from PIL import Image

    return Image.open(path).convert("RGB").resize((width, height))


def variants(cfg: BenchConfig) -> dict[str, dict[str, Any]]:
    """diffrt's exact path and the faster, inexact ones asked for beside it (each its request settings)."""
    exact = {"cache": "none"} if cfg.cache else {}
    found = {"diffrt": exact}
    if cfg.cache:
        found[f"diffrt+{cfg.cache}"] = {"cache": cfg.cache}
    if cfg.tiny_decoder:
        found["diffrt+tiny-decoder"] = {**exact, "decoder": "tiny"}
    return found


class Peers:
    """The bench's peers, each made (exported, compiled: OpenVINO GenAI's shapes are static) once per batch size."""

    def __init__(self, pipe: Pipeline, cfg: BenchConfig, scheduler: str, guidance: float, width: int, height: int) -> None:
        from diffrt.runtime.schedulers import canonical_name

        self.pipe, self.cfg, self.guidance, self.size = pipe, cfg, guidance, (width, height)
        self.scheduler = canonical_name(scheduler) or scheduler
        self.made: dict[tuple[str, int], Any] = {}
        self.load_seconds: dict[str, float] = {}

    def __call__(self, name: str, batch: int) -> Any:
        if (name, batch) not in self.made:
            checkpoint = baseline_checkpoint(self.pipe, self.cfg) if name != "optimum" else None
            self.made[name, batch] = make_peer(name, checkpoint, self.pipe.package.root, self.pipe.precision,
                                               self.scheduler, self.cfg.threads, batch, *self.size, self.guidance)
            self.load_seconds[name] = self.made[name, batch].load_seconds
        return self.made[name, batch]


def run_diffrt(pipe: Pipeline, cfg: BenchConfig, scheduler: str, steps: int, guidance: float, latents: np.ndarray,
               width: int, height: int, variant: dict[str, Any] | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    given = {"image": picture(cfg.image, width, height), "strength": cfg.strength} if cfg.image else \
        {"width": width, "height": height, "latents": latents}
    result = pipe(cfg.prompt, steps=steps, guidance_scale=guidance, scheduler=scheduler, seed=0, num_images=len(latents),
                  control=control_inputs(cfg) or None, **(variant or {}), **given)
    encode = time.perf_counter()
    for image in result.images:
        image.save(BytesIO(), format="PNG")
    end = time.perf_counter()
    t = result.timings
    stages = {"tokenize": t["tokenize"], "text_encoder": t["text_encoder"], "unet": float(np.sum(t["unet"])),
              **({"controlnet": float(np.sum(t["controlnet"]))} if "controlnet" in t else {}),
              "scheduler_and_loop": float(np.sum(t["scheduler"])), "vae_decode": t["vae_decode"],
              "postprocess": t["postprocess"], "image_encode": end - encode,
              **({"vae_encode": t["vae_encode"]} if "vae_encode" in t else {})}
    stages["other"] = (end - start) - sum(stages.values())
    return {"total": end - start, "stages": stages, "unet_calls": t["unet"], "scheduler_steps": t["scheduler"],
            "pixels": result.array}


def cold_start(cfg: BenchConfig, impl: str, package: Path, checkpoint: Path | None, scheduler: str, steps: int,
               guidance: float, width: int, height: int, placement: tuple[str, str]) -> dict[str, Any]:
    """Process start to first image written, in a fresh interpreter; its own peak RSS, and the GPU memory it held."""
    out = Path(tempfile.mkdtemp()) / "cold.png"
    if impl.startswith("diffrt"):
        cache = ["--graph-cache", str(cfg.graph_cache)] if impl == "diffrt_graph_cache" else []
        body = (f"from diffrt.runtime.cli import main\n"
                f"main(['generate', {cfg.prompt!r}, '--model', {str(package)!r}, '--steps', '{steps}', '--guidance', "
                f"'{guidance}', '--scheduler', {scheduler!r}, '--width', '{width}', '--height', '{height}', '--seed', '0', "
                f"'--backend', {cfg.backend!r}, '--precision', {cfg.precision!r}, '-q', '-o', {str(out)!r}, *{cache!r}])\n")
    elif impl in PEERS:
        body = ("from pathlib import Path\nfrom diffrt.benchmarks.peers import make_peer\n"
                f"p = make_peer({impl!r}, {str(checkpoint)!r} and Path({str(checkpoint)!r}), Path({str(package)!r}), {placement[1]!r}, "
                f"{scheduler!r}, {cfg.threads!r}, 1, {width}, {height}, {guidance})\n"
                f"p({cfg.prompt!r}, {steps}, {guidance}, 1, {width}, {height})\n"
                f"open({str(out)!r}, 'wb').write(b'done')\n")
    else:
        device, dtype = placement
        body = ("import torch, diffusers\n"
                "from diffrt.runtime.schedulers import SHORT_NAMES\n"
                f"p = diffusers.DiffusionPipeline.from_pretrained({str(checkpoint)!r}, torch_dtype=torch.{dtype})"
                f".to({device!r})\n"
                "p.set_progress_bar_config(disable=True)\n"
                f"cls, over = SHORT_NAMES[{scheduler!r}]\n"
                "p.scheduler = getattr(diffusers, cls.class_name).from_config({**p.scheduler.config, **over})\n"
                f"p({cfg.prompt!r}, num_inference_steps={steps}, guidance_scale={guidance}, width={width}, height={height},"
                f" generator=torch.Generator().manual_seed(0)).images[0].save({str(out)!r})\n")
    fresh = run_fresh(body + "import time\nprint('FIRST_IMAGE', time.time())\n")
    if fresh.proc.returncode or not out.is_file():
        raise UserError(f"cold-start run of {impl} failed: {fresh.proc.stderr.strip().splitlines()[-1:]}")
    return {"seconds": fresh.value("FIRST_IMAGE") - fresh.started, "peak_rss_mb": fresh.peak_rss_mb,
            "gpu_memory_mb": fresh.gpu_mb}


@dataclass
class Fresh:
    """A fresh interpreter's run: its result, wall-clock start, peak RSS (MB, nan if it failed) and, where nvidia-smi
    sees a GPU, the GPU memory it held when it ended (the card's used memory then, less that before it started)."""

    proc: subprocess.CompletedProcess
    started: float
    peak_rss_mb: float
    gpu_mb: float | None

    def value(self, tag: str) -> float:
        return printed(self.proc.stdout, tag)


def printed(stdout: str, tag: str) -> float:
    """The number a run printed after `tag` (nan if it printed none)."""
    return float(stdout.split(tag)[-1].split()[0]) if tag in stdout else float("nan")


def run_fresh(code: str) -> Fresh:
    """Run Python code in a fresh interpreter (what it times ends before the memory readings added here)."""
    gpu_before = gpu_memory_used_mb()
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a child would report its parent's peak
    code += "\nprint('MAXRSS', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n"
    if gpu_before is not None:
        code += "from diffrt.benchmarks.machine import gpu_memory_used_mb\nprint('GPUMB', gpu_memory_used_mb())\n"
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    gpu_mb = printed(proc.stdout, "GPUMB") - gpu_before if gpu_before is not None and "GPUMB" in proc.stdout else None
    return Fresh(proc, started, printed(proc.stdout, "MAXRSS") / 1024, gpu_mb)


def baseline_checkpoint(pipe: Pipeline, cfg: BenchConfig) -> Path:
    path = cfg.checkpoint or Path(pipe.package.manifest.get("source", {}).get("checkpoint", ""))
    if not path or not (Path(path) / "model_index.json").is_file():
        where = f"{path} has no model_index.json" if path else "the package does not name it"
        raise UserError(f"--baseline {cfg.baseline} needs the diffusers checkpoint this package was exported from ({where}); "
                        "pass --checkpoint DIR")
    return Path(path)


def benchmark(cfg: BenchConfig, log=print) -> dict[str, Any]:
    """Run the whole benchmark; returns {machine, settings, records, summary}."""
    start = time.perf_counter()
    pipe = Pipeline.from_package(cfg.package, backend=cfg.backend, threads=cfg.threads, cuda_graph=cfg.cuda_graph,
                                 precision=cfg.precision, cache=cfg.cache)
    load_seconds = time.perf_counter() - start
    d = pipe.package.defaults
    steps, guidance = cfg.steps or d["steps"], d["guidance_scale"] if cfg.guidance is None else cfg.guidance
    scheduler = cfg.scheduler or d["scheduler"]
    width, height = cfg.width or d["width"], cfg.height or d["height"]
    placements = {b: baseline_placement(pipe.backend, pipe.package.precision("unet"), b, pipe.precision)
                  for b in baselines(cfg)}
    nets = [Path(pipe.package.manifest["components"][f"controlnet/{u.name}"]["source"]) for u in control_inputs(cfg)]
    refs = {b: Diffusers(baseline_checkpoint(pipe, cfg), cfg.threads, *where, controlnets=nets)
            for b, where in placements.items() if b not in PEERS}
    impls = {name: lambda lat, v=v: run_diffrt(pipe, cfg, scheduler, steps, guidance, lat, width, height, v)
             for name, v in variants(cfg).items()}
    for b, ref in refs.items():
        impls[b] = lambda lat, ref=ref: ref(cfg, scheduler, steps, guidance, lat, width, height)
    peers = Peers(pipe, cfg, scheduler, guidance, width, height)
    for b in placements:
        if b in PEERS:
            impls[b] = lambda lat, b=b: peers(b, len(lat))(cfg.prompt, steps, guidance, len(lat), width, height)
    records: list[dict[str, Any]] = [{"kind": "load", "impl": "diffrt", "seconds": load_seconds}]
    records += [{"kind": "load", "impl": b, "seconds": ref.load_seconds} for b, ref in refs.items()]
    f = pipe.package.vae_scale_factor
    for batch in cfg.batches:
        latents = np.random.default_rng(batch).standard_normal((batch, pipe.package.latent_channels, height // f, width // f),
                                                              dtype=np.float32)
        for fn in impls.values():
            for _ in range(cfg.warmup):
                fn(latents)
        for run in range(cfg.runs):
            records += timed_run(impls, batch, run, latents)
            log(f"batch {batch} run {run + 1}/{cfg.runs}: " + ", ".join(
                f"{rec['impl']} {rec['seconds']:.3f} s" for rec in records[-len(impls):]))
    records += [{"kind": "load", "impl": b, "seconds": s} for b, s in peers.load_seconds.items()]
    if cfg.cold_start and not cfg.image and not cfg.control:  # start-up is measured on plain text-to-image runs
        cold = [name for name in impls if "+" not in name]
        if cfg.graph_cache:
            cold.insert(1, "diffrt_graph_cache")
        for name in cold:
            where = placements.get(name, ("cpu", "float32"))
            if name == "diffrt_graph_cache":  # the first such load optimizes and saves; the one timed loads the saved graphs
                cold_start(cfg, name, pipe.package.root, None, scheduler, steps, guidance, width, height, where)
            checkpoint = baseline_checkpoint(pipe, cfg) if name in placements and name != "optimum" else None
            r = cold_start(cfg, name, pipe.package.root, checkpoint,
                           peers.scheduler if name in PEERS else scheduler, steps, guidance, width, height, where)
            records.append({"kind": "cold_start", "impl": name, **r})
            log(f"cold start {name}: {r['seconds']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB")
    settings = {"package": str(pipe.package.root), "model": pipe.package.name, "backend": pipe.backend, "steps": steps,
                "guidance_scale": guidance, "scheduler": scheduler, "width": width, "height": height, "batches": cfg.batches,
                "runs": cfg.runs, "warmup": cfg.warmup, "threads": cfg.threads, "baseline": cfg.baseline,
                "cuda_graph": cfg.cuda_graph, "control": cfg.control, "graph_cache": str(cfg.graph_cache) if cfg.graph_cache else None,
                "precision": pipe.computes, "baselines": {b: {"device": d, "dtype": t} for b, (d, t) in placements.items()},
                "baseline_device": next(iter(placements.values()))[0] if refs else None,
                "baseline_dtype": next(iter(placements.values()))[1] if refs else None}
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": describe(), "settings": settings, "records": records,
            "summary": summarise(records)}


def timed_run(impls: dict[str, Any], batch: int, run: int, latents: np.ndarray) -> list[dict[str, Any]]:
    """One run of every implementation, in turn (reversed every other run); a cached diffrt's PSNR against the exact
    image of the same run."""
    order = list(impls) if run % 2 == 0 else list(impls)[::-1]
    done = {name: impls[name](latents) for name in order}
    records = []
    for name in order:
        r = done[name]
        records.append({"kind": "e2e", "impl": name, "batch": batch, "run": run, "seconds": r["total"],
                        "stages": r["stages"], "unet_calls": r["unet_calls"], "scheduler_steps": r.get("scheduler_steps")})
        if name.startswith("diffrt+"):
            records[-1]["psnr_vs_exact"] = psnr(r["pixels"], done["diffrt"]["pixels"])
    return records


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"e2e": {}, "stages": {}, "cold_start": {}, "load": {}}
    for rec in records:
        if rec["kind"] in ("cold_start", "load"):
            out[rec["kind"]][rec["impl"]] = {k: v for k, v in rec.items() if k not in ("kind", "impl")}
    keys = sorted({(r["impl"], r["batch"]) for r in records if r["kind"] == "e2e"})
    for impl, batch in keys:
        rs = [r for r in records if r["kind"] == "e2e" and r["impl"] == impl and r["batch"] == batch]
        s = stats([r["seconds"] for r in rs])
        s["images_per_s"] = batch / s["mean"]
        if "psnr_vs_exact" in rs[0]:
            s["psnr_vs_exact"] = float(np.mean([r["psnr_vs_exact"] for r in rs]))
        out["e2e"][f"{impl}/b{batch}"] = s
        stages = {k: float(np.mean([r["stages"][k] for r in rs])) for k in rs[0]["stages"]}
        unet_call = float(np.mean([c for r in rs for c in r["unet_calls"]])) if rs[0]["unet_calls"] else None
        entry = {"mean_seconds": stages, "unet_call": unet_call, "unet_calls_per_run": len(rs[0]["unet_calls"])}
        if rs[0].get("scheduler_steps") and unet_call:
            entry["scheduler_step_share_of_unet_call"] = float(np.mean([c for r in rs for c in r["scheduler_steps"]])) / unet_call
        out["stages"][f"{impl}/b{batch}"] = entry
    ratios = {}
    for key, s in out["e2e"].items():
        impl, batch = key.split("/")
        for base in BASELINES:
            if impl.startswith("diffrt") and f"{base}/{batch}" in out["e2e"]:
                name = "e2e_speedup" if base == "diffusers" else f"e2e_speedup_vs_{base}"
                name = name if impl == "diffrt" else f"{impl}:{name}"
                ratios[f"{name}/{batch}"] = out["e2e"][f"{base}/{batch}"]["p50"] / s["p50"]
        if impl.startswith("diffrt+"):
            ratios[f"{impl}:speedup_vs_exact/{batch}"] = out["e2e"][f"diffrt/{batch}"]["p50"] / s["p50"]
    cs = out["cold_start"]
    for peer in PEERS:
        if "diffrt" in cs and peer in cs:
            ratios[f"peak_rss_ratio_vs_{peer}"] = cs["diffrt"]["peak_rss_mb"] / cs[peer]["peak_rss_mb"]
    if "diffrt" in cs and "diffusers" in cs:
        ratios["cold_start_ratio"] = cs["diffrt"]["seconds"] / cs["diffusers"]["seconds"]
        ratios["peak_rss_ratio"] = cs["diffrt"]["peak_rss_mb"] / cs["diffusers"]["peak_rss_mb"]
        if cs["diffrt"].get("gpu_memory_mb") and cs["diffusers"].get("gpu_memory_mb"):
            ratios["gpu_memory_ratio"] = cs["diffrt"]["gpu_memory_mb"] / cs["diffusers"]["gpu_memory_mb"]
    if "diffrt_graph_cache" in cs and "diffusers" in cs:
        ratios["cold_start_ratio_graph_cache"] = cs["diffrt_graph_cache"]["seconds"] / cs["diffusers"]["seconds"]
    out["ratios"] = ratios
    return out


def write_outputs(result: dict[str, Any], out: Path) -> list[Path]:
    """results.json (every record), report.md (tables) and report.png (stages and latency distribution)."""
    from .report import markdown, plot

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "report.md", out / "report.png"]
    paths[0].write_text(json.dumps(result, indent=1, default=str) + "\n")
    paths[1].write_text(markdown(result))
    plot(result, paths[2])
    return paths


def config_from_args(args) -> BenchConfig:
    width, height = args.size or (None, None)  # parsed by the CLI's width_height
    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        raise UserError(f"--batch {args.batch!r} is not a list of whole numbers, e.g. 1,4") from None
    if any(b < 1 for b in batches):
        raise UserError("--batch sizes must be 1 or more")
    return BenchConfig(package=args.package, backend=args.backend, steps=args.steps, width=width, height=height,
                       batches=batches, runs=args.runs, warmup=args.warmup, scheduler=args.scheduler, guidance=args.guidance,
                       baseline=args.baseline, checkpoint=args.checkpoint, threads=args.threads, cuda_graph=args.cuda_graph,
                       precision=args.precision, image=args.image, strength=args.strength,
                       graph_cache=args.graph_cache, cold_start=not args.no_cold_start, out=args.out,
                       control=list(args.control or []), cache=args.cache, tiny_decoder=args.tiny_decoder)


__all__ = ["BenchConfig", "benchmark", "write_outputs", "config_from_args"]
