"""Text-to-image over a model package: tokenizer -> text encoder -> numpy scheduler loop around the UNet -> VAE."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import __version__
from .engines import OrtEngine, resolve_backend, timestep_feed
from .errors import UserError
from .package import Package, load_package
from .schedulers import make_scheduler, short_name
from .tokenizer import ClipTokenizer

MAX_STEPS = 1000


class NonFiniteError(UserError):
    """A stage produced NaN or inf."""

MAX_SIDE = 4096
MAX_IMAGES = 64


@dataclass
class Result:
    """Images, the same as float arrays in [0, 1] (n, H, W, 3), the settings that reproduce them, and stage timings
    (seconds; unet and scheduler per step, the scheduler's including the loop's own Python)."""

    images: list[Image.Image]
    array: np.ndarray
    settings: dict[str, Any]
    timings: dict[str, Any] = field(default_factory=dict)


def nearest_sizes(value: int, multiple: int) -> str:
    lo = max(multiple, value // multiple * multiple)
    hi = lo + multiple if lo < value else lo
    return f"{lo}" if lo == hi else f"{lo} or {hi}"


def check_request(width: int, height: int, steps: int, num_images: int, guidance: float, multiple: int) -> None:
    """Refuse settings the models cannot take, each with its fix."""
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, (int, np.integer)) or value < multiple or value > MAX_SIDE or value % multiple:
            near = nearest_sizes(int(value), multiple) if isinstance(value, (int, np.integer)) and value > 0 else multiple
            raise UserError(f"{name} {value} is not a multiple of {multiple} between {multiple} and {MAX_SIDE}; "
                            f"use {near}")
    if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= MAX_STEPS:
        raise UserError(f"steps must be a whole number from 1 to {MAX_STEPS}, not {steps!r}")
    if not isinstance(num_images, (int, np.integer)) or not 1 <= num_images <= MAX_IMAGES:
        raise UserError(f"the number of images must be from 1 to {MAX_IMAGES}, not {num_images!r}")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise UserError(f"guidance scale must be a finite number, not {guidance!r}")


class Pipeline:
    """Load once, call many times; every engine is created at load.

    Every stage's output is checked for NaN and inf (reduced-precision graphs can overflow); with
    fp32_fallback the stage is rerun, then kept, on the package's float32 copy of that graph.
    cuda_graph (ort-cuda) captures the UNet, the one stage called every step, as a CUDA graph per shape.
    graph_cache is a folder for onnxruntime's optimized graphs: the first load writes them, later loads skip
    graph optimization (most of a large model's session creation)."""

    def __init__(self, package: Package, backend: str = "auto", threads: int | None = None, fp32_fallback: bool = False,
                 cuda_graph: bool = False, graph_cache: Path | None = None) -> None:
        self.package = package
        self.backend = resolve_backend(backend)
        self.threads = threads
        self.fp32_fallback = fp32_fallback
        self.cuda_graph = cuda_graph
        self.graph_cache = Path(graph_cache) if graph_cache else None
        self.tokenizer = ClipTokenizer.from_folder(package.root / "tokenizer", package.text_max_length)
        if self.backend == "trt":
            from .trt_backend import open_engines

            precision = "int8" if package.precision("unet") == "int8" else "fp16"
            engines = open_engines(package.root, precision, ("text_encoder", "unet", "vae_decoder"))
            self.text_encoder, self.unet, self.vae_decoder = (engines[c] for c in ("text_encoder", "unet", "vae_decoder"))
            self.fell_back: list[str] = []
            return
        self.text_encoder = self._engine("text_encoder")
        self.unet = self._engine("unet")
        self.vae_decoder = self._engine("vae_decoder")
        self.fell_back: list[str] = []

    def _engine(self, name: str, fallback: bool = False) -> OrtEngine:
        path = self.package.fallback(name) if fallback else self.package.component(name)
        return OrtEngine(path, self.backend, self.threads, cuda_graph=self.cuda_graph and name == "unet",
                         graph_cache=self.graph_cache)

    def _guarded(self, name: str, feeds: dict[str, Any], output: str, where: str) -> np.ndarray:
        """Run stage `name`; on NaN/inf, fall back to its float32 graph or stop with an error that says what to do."""
        out = getattr(self, name).run(feeds)[output]
        if np.isfinite(out).all():
            return out
        precision = self.package.precision(name)
        if not self.fp32_fallback or name in self.fell_back:
            hint = ("retry with --fp32-fallback (Pipeline(fp32_fallback=True)) to rerun it in float32, or use the fp32 package"
                    if name not in self.fell_back else "the float32 graph overflows too: check the inputs and the model")
            raise NonFiniteError(f"the {name} ({precision}) produced NaN or inf {where}; {hint}")
        if not self.package.has_fallback(name):
            raise NonFiniteError(f"the {name} ({precision}) produced NaN or inf {where} and the package keeps no float32 copy "
                                 f"of it; use the fp32 package, or or re-quantize without --no-fallback")
        warnings.warn(f"{name} ({precision}) produced NaN or inf {where}; rerunning it in float32", stacklevel=3)
        setattr(self, name, self._engine(name, fallback=True))
        self.fell_back.append(name)
        return self._guarded(name, feeds, output, where)

    @classmethod
    def from_package(cls, path: str | Path | None = None, backend: str = "auto", threads: int | None = None,
                     verify_hashes: bool = False, fp32_fallback: bool = False, cuda_graph: bool = False,
                     graph_cache: str | Path | None = None) -> Pipeline:
        """Open a package folder (the bundled default model when path is None)."""
        if path is None:
            from .bundled import bundled_model

            path = bundled_model()
        return cls(load_package(path, hashes=verify_hashes), backend, threads, fp32_fallback, cuda_graph,
                   Path(graph_cache) if graph_cache else None)

    def __call__(self, prompt: str, negative_prompt: str = "", steps: int | None = None,
                 guidance_scale: float | None = None, scheduler: str | None = None, seed: int | None = None,
                 width: int | None = None, height: int | None = None, num_images: int = 1,
                 latents: np.ndarray | None = None, progress: Callable[[int, int], None] | None = None) -> Result:
        pkg, d = self.package, self.package.defaults
        steps = d["steps"] if steps is None else steps
        guidance = d["guidance_scale"] if guidance_scale is None else guidance_scale
        width, height = width or d["width"], height or d["height"]
        check_request(width, height, steps, num_images, guidance, pkg.vae_scale_factor)
        if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
            raise UserError("prompt and negative prompt must be text")
        try:
            sched = make_scheduler(scheduler or d.get("scheduler"), pkg.scheduler_config)
            sched.set_timesteps(steps)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % 2**32)
        rng = np.random.default_rng(seed)
        shape = (num_images, pkg.latent_channels, height // pkg.vae_scale_factor, width // pkg.vae_scale_factor)
        if latents is None:
            latents = rng.standard_normal(shape, dtype=np.float32)
        elif latents.shape != shape:
            raise UserError(f"latents have shape {latents.shape}; {width}x{height} with {num_images} image(s) needs {shape}")
        timings: dict[str, Any] = {"unet": [], "scheduler": []}
        clock = time.perf_counter()
        text = self._encode_prompt(prompt, negative_prompt, num_images, guidance > 1.0, timings)
        x = self._denoise(sched, latents, text, guidance, rng, timings, progress)
        array = self._decode(x, timings)
        start = time.perf_counter()
        images = [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]
        timings["postprocess"] = time.perf_counter() - start
        timings["total"] = time.perf_counter() - clock
        settings = {"prompt": prompt, "negative_prompt": negative_prompt, "steps": steps, "guidance_scale": guidance,
                    "scheduler": short_name(sched), "seed": seed, "width": width, "height": height,
                    "num_images": num_images, "model": pkg.name, "model_hash": pkg.model_hash,
                    "backend": self.backend, "diffrt": __version__}
        return Result(images, array, settings, timings)

    def _encode_prompt(self, prompt: str, negative_prompt: str, num_images: int, guided: bool, timings: dict) -> Any:
        """Text embeddings for the UNet, [negative] * n + [prompt] * n when guided, already in the UNet's input form."""
        start = time.perf_counter()
        prompts = ([negative_prompt] * num_images if guided else []) + [prompt] * num_images
        ids = self.tokenizer(prompts)
        timings["tokenize"] = lap = time.perf_counter() - start
        spec = self.text_encoder.inputs["input_ids"]
        text = self._guarded("text_encoder", {"input_ids": ids.astype(spec.dtype)}, "last_hidden_state", "on the prompt")
        text = self.unet.to_device(text)
        timings["text_encoder"] = time.perf_counter() - start - lap
        return text

    def _denoise(self, sched, latents: np.ndarray, text: Any, guidance: float, rng: np.random.Generator, timings: dict,
                 progress: Callable[[int, int], None] | None) -> np.ndarray:
        """The scheduler loop around the UNet, classifier-free guidance batched into one call per step."""
        guided, n = guidance > 1.0, len(latents)
        t_spec, s_spec = self.unet.inputs["timestep"], self.unet.inputs["sample"]
        x = latents.astype(np.float32) * np.float32(sched.init_noise_sigma)
        for i, t in enumerate(sched.timesteps):
            start = time.perf_counter()
            model_in = sched.scale_model_input(np.concatenate([x, x]) if guided else x, t)
            feeds = {"sample": model_in.astype(s_spec.dtype), "timestep": timestep_feed(t_spec, t, len(model_in)),
                     "encoder_hidden_states": text}
            called = time.perf_counter()
            out = self._guarded("unet", feeds, "out_sample", f"at step {i + 1} of {len(sched.timesteps)}").astype(np.float32)
            returned = time.perf_counter()
            if guided:
                out = out[:n] + np.float32(guidance) * (out[n:] - out[:n])
            x = sched.step(out, t, x, rng)
            timings["unet"].append(returned - called)
            timings["scheduler"].append(time.perf_counter() - returned + called - start)
            if progress:
                progress(i + 1, len(sched.timesteps))
        return x

    def _decode(self, x: np.ndarray, timings: dict) -> np.ndarray:
        """Images as floats in [0, 1], (n, H, W, 3). One image per VAE call: the decoder's activations are the largest
        of the pipeline (SD 1.5 at 512², fp16 on onnxruntime CUDA: 8 GB for 4 images at once, 2 GB one by one) and
        its time does not depend on batching."""
        start = time.perf_counter()
        latent_in = (x / np.float32(self.package.vae_scaling_factor)).astype(self.vae_decoder.inputs["latent_sample"].dtype)
        decoded = np.concatenate([self._guarded("vae_decoder", {"latent_sample": latent_in[i:i + 1]}, "sample",
                                                "decoding the latents") for i in range(len(latent_in))])
        timings["vae_decode"] = time.perf_counter() - start
        return np.clip(decoded.astype(np.float32) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
