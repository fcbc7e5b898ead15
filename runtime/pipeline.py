"""Text-to-image over a model package: tokenizer -> text encoder -> numpy scheduler loop around the UNet -> VAE."""

from __future__ import annotations

import json
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import __version__, deepcache, fbcache, stepcache, tiling
from .backends.engine import Engine
from .backends.registry import REGISTRY, Backend, EngineOptions, candidates
from .budget import GB, PLANS, Plan, budget_residency, check_budget, check_fits, predict, round_up
from .control import CONTROL, Controls, Unit, check_units
from .deepcache import FEATURE
from .errors import UserError
from .families import family_for, one_per_row
from .generators import ImageGenerators
from .img2img import Inpainting, blurred, image_input, latents_from, mask_input, strength_timesteps
from .lora import LoraChoice, LoraSets, restored
from .package import Package, load_package
from .preview import FIT_IMAGES, FIT_LATENT_SIDE, TINY, LatentRGB, Progress, fitting_images, to_images
from .prompts import chunked
from .request import (
    GenerationRequest,
    Request,
    check_clip_skip,
    check_request,
    check_rescale,
    check_rng,
    check_seeds,
    check_size_conditioning,
    check_true_cfg,
    expand_prompts,
    image_seeds,
    make_checked_scheduler,
    per_image,
    size_note,
)
from .residency import DENOISING, Shelf, StageEngine
from .residency import MODES as RESIDENCIES
from .schedulers import short_name
from .stream import Cancelled, NonFiniteError, Stream, check_joinable, joined_rows
from .tiling import MODES as TILING_MODES
from .tiling import Tiles

SHALLOW = "unet_shallow"  # DeepCache's shallow branch, as a stage's engine
CACHE_STAGES = {SHALLOW: "shallow", fbcache.TAIL: "tail", fbcache.OUT: "out"}  # step caching's engines: their graphs


def pixels_hash(array: np.ndarray) -> str:
    """A short sha256 of an input image's (or mask's) pixels as the pipeline used them, for the metadata."""
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(array, np.float32).tobytes()).hexdigest()[:12]


@dataclass
class Result:
    """Images, the same as float arrays in [0, 1] (n, H, W, 3), the settings that reproduce them, and stage timings
    (seconds; unet and scheduler per step, the scheduler's including the loop's own Python), and the final latents
    (n, C, h, w) before the VAE's scaling (diffusers' output_type="latent").

    settings describe the whole call (`seed` is the first image's); `image_settings(i)` those that make image i
    again alone (its own prompt and seed)."""

    images: list[Image.Image]
    array: np.ndarray
    settings: dict[str, Any]
    timings: dict[str, Any] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)
    negatives: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    guidances: list[float] = field(default_factory=list)
    latents: np.ndarray | None = None

    def image_settings(self, i: int) -> dict[str, Any]:
        return {**self.settings, "prompt": self.prompts[i], "negative_prompt": self.negatives[i], "seed": self.seeds[i],
                "guidance_scale": self.guidances[i], "image_index": i}

    def save(self, path: str | Path | None = None, overwrite: bool = False) -> list[Path]:
        """Write every image (PNG, JPEG or WebP by the suffix) with its settings in the metadata: path itself for one
        image, path-0, path-1, ... for several, numbered names (00001-<seed>.png) in a folder; returns the paths."""
        from .images import output_paths, save_image

        paths = output_paths(path, self.seeds, overwrite)
        for i, (image, target) in enumerate(zip(self.images, paths)):
            save_image(image, target, self.image_settings(i))
        return paths


class Pipeline:
    """Load once, call many times; every engine is created at load.

    Every stage's output is checked for NaN and inf (reduced-precision graphs can overflow); with
    fp32_fallback the stage is rerun, then kept, on the package's float32 copy of that graph.
    cuda_graph (ort-cuda) captures the UNet, the one stage called every step, as a CUDA graph per shape.
    graph_cache is a folder for onnxruntime's optimized graphs: the first load writes them, later loads skip
    graph optimization (most of a large model's session creation). gpu_mem_limit (bytes, ort-cuda) caps each
    engine's CUDA memory arena. release_memory hands host memory back at the end of each request (a server's RSS
    returns near idle) where the backend keeps it otherwise: onnxruntime's CPU arena shrinks after the last
    denoiser and decoder calls (the steps before them reuse it). residency "sequential" opens a stage's engines
    when the stage starts and closes them when another stage's open (residency.py): one stage's weights at a time."""

    def __init__(self, package: Package, backend: str = "auto", threads: int | None = None, fp32_fallback: bool = False,
                 cuda_graph: bool = False, graph_cache: Path | None = None, gpu_mem_limit: int | None = None,
                 precision: str = "auto", loras: list[LoraChoice] | None = None, gated: bool = True,
                 release_memory: bool = False, residency: str | None = None, memory_budget: float | None = None,
                 cache: str | None = None) -> None:
        self.package = package
        self.options = EngineOptions(threads, cuda_graph, Path(graph_cache) if graph_cache else None, gpu_mem_limit,
                                     fp32_fallback, release_memory)
        self.runner, self.precision = self._choose(backend, precision, gated)
        self.backend = self.runner.name
        self.budget = None if memory_budget is None else check_budget(memory_budget)
        self.shelf = self._shelf(residency or self._budget_residency())
        self.family = family_for(package)
        self.cache = stepcache.parse_cache(cache)  # the step caching of requests that name none (exact by default)
        cut = stepcache.graphs(package, self.family, self.runner, self.options, self.cache.method) if self.cache.method else None
        self.deep_graphs = cut if self.cache.method == "deepcache" else None  # DeepCache's full and shallow UNets
        self.fbc_graphs = cut if self.cache.method == "fbcache" else None  # First-Block Cache's head, tail and out
        self.loras: list[LoraChoice] = list(loras or [])
        self.lora_sets = LoraSets(package.root, self._lora_targets())
        self.fallback_lora_sets = LoraSets(package.root, self._lora_targets(fallback=True))
        self.lora_weights = self.check_loras(self.loras)
        self.stages = self.family.stages()  # what text-to-image runs
        self.tokenizers = self.family.tokenizers()
        self.tokenizer = self.tokenizers[0]
        self.fell_back: list[str] = []
        self.text_encoder_2: Engine | None = None
        self.opened_controlnets: list[str] = []
        for name, engine in self._open_engines().items():
            setattr(self, name, engine)
        self.unet_shallow = self._engine(SHALLOW) if self.deep_graphs else None  # DeepCache's shallow branch
        self.transformer_tail, self.transformer_out = (self._engine(fbcache.TAIL), self._engine(fbcache.OUT)) \
            if self.fbc_graphs else (None, None)  # First-Block Cache's other blocks and output head
        self.vae_encoder: Engine | None = None  # opened on the first image-to-image call
        # the package's tiny decoder (TAESD, `diffrt tiny-vae add`): previews, and decoder="tiny"
        self.tiny_vae_decoder = self._engine(TINY, lazy=False) if package.has(TINY) and self.runner.opener else None
        self._latent_rgb: LatentRGB | None = None  # the preview map, learnt from each decode (preview.py)
        self._fitting = threading.Lock()
        self._running = threading.Lock()
        self._joined: tuple[list[Stream], dict[str, Any]] = ([], {})  # the last streams stepped together, their text
        # ControlNets: each opened on its first use, as an attribute named by its component (controlnet/<name>)
        self.controls = Controls([tuple(r) for r in package.manifest["components"]["unet"]["residuals"]],
                                 self._control_inputs, self._run_control) if package.takes_control() else None

    def _choose(self, backend: str, precision: str, gated: bool) -> tuple[Backend, str]:
        """The backend and what it computes in: a named backend, refused where this CPU has no reason to trust its
        path (trust.py); auto, the first of auto_order() that takes the options and is trusted. gated=False skips
        trust (the gate measurements themselves)."""
        from .trust import refusal, verdict

        refusals, untrusted = [], []
        for runner in candidates(backend):
            try:
                runner.check_options(self.options)
                why = runner.missing()
                if why:
                    raise UserError(why)
                computed = runner.compute_precision(precision, self.package.precision(self.package.denoiser))
            except UserError as exc:
                refusals.append(str(exc))
                continue
            path = runner.computes(computed, self.package.precision(self.package.denoiser))
            found = verdict(self.package, runner.name, path)
            if found.trusted or not gated:
                if untrusted:
                    warnings.warn(f"auto runs {runner.name} ({path}): {'; '.join(untrusted)}", stacklevel=3)
                return runner, computed
            refusals.append(refusal(self.package, runner.name, path, found.why))
            untrusted.append(f"{runner.name} ({path}) is not trusted on this CPU ({found.why}; `diffrt doctor --check "
                             f"{self.package.root}` measures it here)")
        raise UserError(refusals[0])

    def _shelf(self, residency: str) -> Shelf | None:
        """What keeps sequential residency's one group of engines open (None: every engine stays open)."""
        if residency not in RESIDENCIES:
            raise UserError(f"residency must be one of {', '.join(RESIDENCIES)}, not {residency!r}")
        if residency == "resident":
            return None
        if self.runner.opener is None:
            raise UserError(f"the {self.runner.name} backend opens its engines together, so it cannot hold one stage at "
                            "a time; leave residency resident on it")
        return Shelf()

    def _budget_residency(self) -> str:
        """resident, or sequential where only that fits the budget at the model's own size (refused where neither does)."""
        if self.budget is None:
            return "resident"
        return budget_residency(self.package, self.runner, self.precision, self.budget)

    def plan(self, req: Request) -> tuple[Plan, float] | None:
        """The memory budget's plan for a request and its predicted peak (bytes), or None without a budget; refused in
        one line, naming the budget it would need, where no plan of this pipeline's residency fits."""
        if self.budget is None:
            return None
        rows = len(req.prompts) * (2 if req.guided else 1)
        peaks = {p: predict(self.package, self.runner.name, self.precision, p, req.width, req.height, rows)
                 for p in PLANS.values() if p.residency == self.residency and not (p.tiled and req.vae_tiling == "off")}
        for chosen, peak in peaks.items():
            if peak <= self.budget * GB:
                return chosen, peak
        least = min(peaks.values())
        lean = PLANS["sequential+tiled" if req.vae_tiling != "off" else "sequential"]
        other = predict(self.package, self.runner.name, self.precision, lean, req.width, req.height, rows)
        hint = (f"; one stage at a time (--residency sequential) it needs about {other / GB:.1f} GB"
                if self.residency == "resident" and other < 0.9 * least else "")
        raise UserError(f"{req.width}x{req.height} with {len(req.prompts)} image(s) needs about {least / GB:.1f} GB under "
                        f"the leanest plan, over the memory budget of {self.budget:g} GB; give --memory-budget "
                        f"{round_up(least)} or more, a smaller size, or fewer images{hint}")

    @property
    def residency(self) -> str:
        return "resident" if self.shelf is None else "sequential"

    def _open_engines(self) -> dict[str, Engine]:
        """Every stage's engine on the chosen backend: one construction path, options a backend cannot honour refused."""
        components = self.package.manifest.get("components", {})
        cuda_only = [c for c in self.stages if components.get(c, {}).get("providers") == ["CUDAExecutionProvider"]]
        if cuda_only and not self.runner.cuda_fusions:
            fused = next(b.name for b in REGISTRY.values() if b.cuda_fusions)
            raise UserError(f"this package's {', '.join(cuda_only)} run(s) on onnxruntime's CUDA provider only (the graphs "
                            f"carry CUDA fusions); use --backend {fused} on an NVIDIA GPU, or the plain fp16 package")
        # a backend that opens engines only together (TensorRT: one stream, one device-memory block sized at the start)
        # opens the ControlNets' with the stages; the others open each on its first use
        together = [] if self.runner.opener else [f"{CONTROL}{n}" for n in self.package.controlnets()]
        if self.shelf is not None:  # each opened when its stage first runs
            return {c: self._engine(c) for c in self.stages}
        engines = self.runner.open_stages(self.package.root, self.package.precision(self.package.denoiser),
                                          {c: self._graph(c) for c in (*self.stages, *together)}, self.precision,
                                          self.options, self.lora_weights)
        self.opened_controlnets = together
        return engines

    def close(self) -> None:
        """Release every engine (device memory, CUDA graphs); the pipeline cannot be called after."""
        for name in self.stages:
            getattr(self, name).close()
        for extra in (self.vae_encoder, self.tiny_vae_decoder, self.unet_shallow, self.transformer_tail, self.transformer_out,
                      *(getattr(self, c) for c in self.opened_controlnets)):
            if extra is not None:
                extra.close()
        shared = getattr(self.denoiser, "shared", None)
        if shared is not None:
            shared.free()

    def _engine(self, name: str, fallback: bool = False, lazy: bool = True) -> Engine:
        """A stage's engine on this pipeline's backend with the applied LoRAs: its own graph, or its float32 copy; with
        sequential residency (and lazy), one that opens when its stage runs."""
        if fallback:
            path, precision, weights = self.package.fallback(name), "fp32", self.fallback_lora_sets.weights(self.loras).get(name)
        else:
            path, precision, weights = self._graph(name), self.precision, self.lora_weights.get(name)
        opener = lambda: self.runner.open(path, name, precision, self.options, weights)  # noqa: E731
        if self.shelf is None or not lazy:
            return opener()
        group = DENOISING if name in (self.family.denoiser, *CACHE_STAGES) or name.startswith(CONTROL) else name
        return StageEngine(name, group, opener, self.shelf)

    def _graph(self, name: str) -> Path:
        """The graph a stage runs: its component's, or with step caching the denoiser's cut graphs (DeepCache's full
        and shallow UNets; First-Block Cache's head, tail and out)."""
        cut = self.deep_graphs or self.fbc_graphs
        if cut and name in (self.family.denoiser, *CACHE_STAGES):
            return cut[CACHE_STAGES.get(name, "full" if self.deep_graphs else "head")]
        return self.package.component(name)

    def use_float32(self) -> None:
        """Run every stage on the package's float32 graphs (the reference quantized paths are held to); refused in one
        line where a reduced-precision stage kept no float32 copy."""
        for name in self.stages:
            if self.package.precision(name) == "fp32":
                continue
            if not self.package.has_fallback(name):
                raise UserError(f"{self.package.root} keeps no float32 copy of its {name} (quantized with --no-fallback), "
                                "so there is nothing to compare it with; check the fp32 package it was made from")
            getattr(self, name).close()
            setattr(self, name, self._engine(name, fallback=True))

    def _lora_targets(self, fallback: bool = False) -> dict[str, Path]:
        """The graphs a LoRA may change: the text encoder(s) and the UNet (or their float32 copies)."""
        path = self.package.fallback if fallback else self.package.component
        return {c: path(c) for c in (*self.family.encoders, self.family.denoiser)}

    def check_loras(self, loras: list[LoraChoice]) -> dict[str, dict[str, np.ndarray]]:
        """The merged weights of a LoRA set (computed, or kept from an earlier use), refused in one line when the set
        cannot be applied (files, layers, a float16-weights package on onnxruntime, a family without LoRAs)."""
        if loras and not self.family.loras:
            raise UserError(f"LoRAs on {self.family.name} models are not supported yet; generate without --lora")
        if loras and self.deep_graphs:
            raise UserError("LoRAs with --cache deepcache are not supported yet; leave one of them out")
        weights = self.lora_sets.weights(list(loras))
        if not self.runner.fp16_weight_overrides and any(k.endswith("__fp16") for w in weights.values() for k in w):
            raise UserError("this package stores its weights as float16 behind Casts (`diffrt export --weights-fp16`), "
                            "which onnxruntime folds before a LoRA's values reach them; use a package exported without "
                            "--weights-fp16, --backend ov-cpu, or merge the LoRA at export (--lora)")
        return weights

    def set_loras(self, loras: list[LoraChoice]) -> None:
        """Apply another set of LoRAs (each a file and scale; [] for none) without re-export: the merged weights are
        computed in numpy (the last few sets are kept) and the changed graphs' engines made again over them (a stage
        that fell back to float32 stays there) or refitted in place. On a bad LoRA, or an engine that fails to open,
        nothing changes."""
        if LoraSets.key(list(loras)) == LoraSets.key(self.loras):
            return
        weights = self.check_loras(loras)
        before = (self.loras, self.lora_weights)
        self.loras, self.lora_weights = list(loras), weights
        try:
            opened = self._swap_weights(set(weights) | set(before[1]), before[1])
        except BaseException:
            self.loras, self.lora_weights = before
            raise
        for name, engine in opened.items():
            getattr(self, name).close()
            setattr(self, name, engine)

    def _swap_weights(self, changed: set[str], before: dict[str, dict[str, np.ndarray]]) -> dict[str, Engine]:
        """The changed stages' weights moved to self.lora_weights: refitted in place (undone on a failure), or new
        engines returned for the caller to put in place (closed on a failure)."""
        done: dict[str, Engine] = {}
        try:
            for name in sorted(changed):
                if self.runner.lora == "refit":  # the engine's own values for what only the old set changed
                    getattr(self, name).refit(restored(self.package.component(name), self.lora_weights.get(name, {}),
                                                       before.get(name, {})))
                    done[name] = getattr(self, name)
                else:
                    done[name] = self._engine(name, fallback=name in self.fell_back)
        except BaseException:
            for name, engine in done.items():
                if self.runner.lora == "refit":
                    engine.refit(restored(self.package.component(name), before.get(name, {}),
                                          self.lora_weights.get(name, {})))
                else:
                    engine.close()
            raise
        return {} if self.runner.lora == "refit" else done

    def _control_engine(self, component: str) -> Engine:
        """A ControlNet's engine, opened on its first use."""
        if component not in self.opened_controlnets:
            setattr(self, component, self._engine(component))
            self.opened_controlnets.append(component)
        return getattr(self, component)

    def _control_inputs(self, component: str) -> dict[str, Any]:
        return self._control_engine(component).inputs

    def _run_control(self, component: str, feeds: dict[str, Any]) -> list[np.ndarray]:
        assert self.controls is not None
        return self._guarded_outputs(component, feeds, tuple(self.controls.names), "on the control image")

    def _guarded(self, name: str, feeds: dict[str, Any], output: str, where: str, release: bool = False) -> np.ndarray:
        return self._guarded_outputs(name, feeds, (output,), where, release)[0]

    def _guarded_outputs(self, name: str, feeds: dict[str, Any], outputs: tuple[str, ...], where: str,
                         release: bool = False) -> list[np.ndarray]:
        """Run stage `name`; on NaN/inf, fall back to its float32 graph or stop with an error that says what to do.
        release: the request's last call of this stage (with release_memory, its host memory is handed back)."""
        with self._running:  # one engine call at a time: a preview's fit may come from another thread (a server's)
            engine = getattr(self, name)
            ran = engine.run(feeds, release=True) if release and self.options.release_memory else engine.run(feeds)
        out = [ran[o] for o in outputs]
        if all(np.isfinite(o).all() for o in out):
            return out
        precision = self.package.precision(name)
        if not self.options.fp32_fallback or name in self.fell_back:
            hint = ("retry with --fp32-fallback (Pipeline(fp32_fallback=True)) to rerun it in float32, or use the fp32 package"
                    if name not in self.fell_back else "the float32 graph overflows too: check the inputs and the model")
            raise NonFiniteError(f"the {name} ({precision}) produced NaN or inf {where}; {hint}")
        if not self.package.has_fallback(name):
            raise NonFiniteError(f"the {name} ({precision}) produced NaN or inf {where} and the package keeps no float32 copy "
                                 f"of it; use the fp32 package, or re-quantize without --no-fallback")
        warnings.warn(f"{name} ({precision}) produced NaN or inf {where}; rerunning it in float32", stacklevel=3)
        fallback = self._engine(name, fallback=True)
        getattr(self, name).close()
        setattr(self, name, fallback)
        self.fell_back.append(name)
        return self._guarded_outputs(name, feeds, outputs, where, release)

    @classmethod
    def from_package(cls, path: str | Path | None = None, backend: str = "auto", threads: int | None = None,
                     verify_hashes: bool = False, fp32_fallback: bool = False, cuda_graph: bool = False,
                     graph_cache: str | Path | None = None, gpu_mem_limit: int | None = None,
                     precision: str = "auto", loras: list[LoraChoice] | None = None, gated: bool = True,
                     release_memory: bool = False, residency: str | None = None,
                     memory_budget: float | None = None, cache: str | None = None) -> Pipeline:
        """Open a package folder (the bundled default model when path is None)."""
        if path is None:
            from .bundled import bundled_model

            path = bundled_model()
        return cls(load_package(path, hashes=verify_hashes), backend, threads, fp32_fallback, cuda_graph,
                   Path(graph_cache) if graph_cache else None, gpu_mem_limit, precision, loras, gated, release_memory,
                   residency, memory_budget, cache)

    def __call__(self, prompt: str | list[str] | GenerationRequest, negative_prompt: str | list[str] = "",
                 callback: Callable[[Progress], Any] | None = None, callback_every: int = 1, **settings: Any) -> Result:
        """Images for prompt (or each of a list of prompts, or a GenerationRequest): `begin` (which documents the
        settings), every step, `finish`. callback(Progress) is called every callback_every steps and after the last
        (steps done, total, seconds, the latents and preview() of them); when it returns False the call stops there
        and raises Cancelled."""
        if callback_every < 1:
            raise UserError(f"callback_every is {callback_every}; it counts steps, 1 or more")
        stream = self.begin(prompt, negative_prompt, **settings)
        while not stream.done:
            self.step([stream])
            if callback and (stream.i % callback_every == 0 or stream.done) and callback(self.progress(stream)) is False:
                raise Cancelled(f"cancelled by the callback at step {stream.i} of {stream.total}")
        return self.finish(stream)

    def progress(self, stream: Stream) -> Progress:
        """Where a stream stands, with a preview of its latents as they are now (made only when asked for)."""
        x, req = stream.x, stream.req
        return Progress(stream.i, stream.total, stream.step_seconds, x, lambda: self.preview(x, req.width, req.height))

    def preview(self, latents: np.ndarray, width: int, height: int) -> list[Image.Image]:
        """Quick images (width x height) of the sampler's latents mid-loop: the package's tiny decoder where it has
        one, else a linear latent->RGB map fitted to its VAE (preview.py)."""
        if self.tiny_vae_decoder is not None:
            rgb = np.concatenate([self._guarded(TINY, self.family.vae_feeds(self.tiny_vae_decoder, z[None]), "sample",
                                                "previewing") for z in latents])
            return to_images(np.clip(rgb.astype(np.float32) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1), width, height)
        with self._fitting:
            if self._latent_rgb is None or not self._latent_rgb.has_prior:
                self._fit_prior()
            rgb = self._latent_rgb(self.family.vae_input(latents))
        return to_images(rgb, width, height)

    def _fit_prior(self) -> None:
        """The preview map's prior: smooth images through the VAE encoder's mean (where the package and backend have
        one), and random latents, each decoded again."""
        f, channels = self.package.vae_scale_factor, self.package.latent_channels
        noise = np.random.default_rng(0).standard_normal((FIT_IMAGES, channels, FIT_LATENT_SIDE, FIT_LATENT_SIDE))
        sets = [self.family.vae_input(noise.astype(np.float32))]
        if self.package.has("vae_encoder") and self.runner.image_to_image:
            params = self._guarded("vae_encoder", self.family.encoder_feeds(self._encoder(), fitting_images(FIT_LATENT_SIDE * f)),
                                   self.family.encoder_output, "fitting the preview map")
            sets.append(params[:, :channels].astype(np.float32))
        self._latent_rgb = self._latent_rgb or LatentRGB(channels)
        for latents in sets:
            decoded = np.concatenate([self._guarded("vae_decoder", self.family.vae_feeds(self.vae_decoder, z[None]),
                                                    self.family.vae_output, "fitting the preview map") for z in latents])
            self._latent_rgb.learn(latents, decoded, "prior")

    def begin(self, prompt: str | list[str] | GenerationRequest, negative_prompt: str | list[str] = "",
              **settings: Any) -> Stream:
        """Start a call: checked, its start latents drawn and its prompts encoded, ready for `step`. The settings are
        GenerationRequest's fields (or one GenerationRequest in place of the prompt). Image i gets seed + i (seed None
        or -1: random), so any image can be made again alone; seeds (and guidance_scale as a list) give every image's
        own (a server batching requests); steps and num_images also go by diffusers' names. With image (a Pillow
        image or a path), image-to-image: the image's latents noised to the step that strength selects, the rest of
        the steps run; with mask too (white = repaint), inpainting, by a 9-channel inpainting UNet or by blending for
        an ordinary one. rng "torch-cpu" or "torch-cuda" draws each image's noise as torch.randn on a generator of
        that device seeded with the image's seed (diffusers' generator=torch.Generator(device).manual_seed(seed), A1111's
        RNG source CPU / GPU). prompt_syntax "a1111" (default) reads prompts as AUTOMATIC1111 does ((word:1.2),
        [word], BREAK, any length), "plain" as diffusers does (as written, cut at the text encoder's length);
        clip_skip N takes the text encoder's N-th layer from the end (A1111's "Clip skip"; diffusers' clip_skip is N -
        1). guidance_rescale (0..1) brings the guided prediction's spread back towards the prompt's (diffusers'). SDXL
        models also take original_size (height, width; default the image's own) and crops_coords_top_left. loras (files
        and scales) switches the applied LoRAs first (None: keep those applied, [] none; see set_loras)."""
        request = prompt if isinstance(prompt, GenerationRequest) else GenerationRequest.of(prompt, negative_prompt,
                                                                                           **settings)
        if request.loras is not None:
            self.set_loras(list(request.loras))
        pixels = self.source_pixels(request)
        req, sched = self.check(request, pixels)
        rng = ImageGenerators(req.seeds, req.rng)
        timings: dict[str, Any] = {"unet": [], "scheduler": []}
        if self.shelf is not None:  # what opening engines again costs this request (finish adds the rest)
            timings["load"] = -self.shelf.load_seconds
        clock = time.perf_counter()
        mask = None if request.mask is None else blurred(request.mask, request.mask_blur)
        timesteps, x, inpaint = self._start(sched, req, request.strength, pixels, mask, request.latents, rng, timings)
        host_cond = self._encode_prompt(req, timings)
        cond = {k: self.denoiser.to_device(v) for k, v in host_cond.items()}
        source = {} if pixels is None else self._source(request, pixels, inpaint)
        return Stream(req, sched, timesteps, x, cond, host_cond, rng, inpaint, timings, clock, source)

    def source_pixels(self, request: GenerationRequest) -> np.ndarray | None:
        """The image-to-image source as the VAE takes it, its size checked against the request's (None without one);
        a server passes it to `check`."""
        if request.image is None:
            if request.mask is not None:
                raise UserError("a mask needs an image to repaint (--image)")
            defaults = {f.name: f.default for f in fields(GenerationRequest)}
            for name in ("strength", "resize", "mask_blur"):
                if getattr(request, name) != defaults[name]:
                    raise UserError(f"{name.replace('_', ' ')} only applies to image-to-image: give an image (--image), "
                                    "or leave it out")
            return None
        if request.mask is None and request.mask_blur:
            raise UserError("mask blur blurs the edge of an inpainting mask: give a mask (--mask), or leave it out")
        pixels = image_input(request.image, self.family.size_multiple, request.resize)
        height, width = pixels.shape[2:]
        if (request.width or width, request.height or height) != (width, height):
            raise UserError(f"the image is {width}x{height}; leave out width and height with an image")
        return pixels

    def _source(self, request: GenerationRequest, pixels: np.ndarray, inpaint: Inpainting | None) -> dict[str, Any]:
        """Image-to-image settings for the images' metadata: what --from needs to take the same source again."""
        image, mask = request.image, request.mask
        source = {"mode": "inpaint" if mask is not None else "img2img", "strength": request.strength,
                  "image": Path(image).name if isinstance(image, (str, Path)) else "image", "image_sha256": pixels_hash(pixels),
                  **({"image_path": str(Path(image).resolve())} if isinstance(image, (str, Path)) else {}),
                  **({"resize": True} if request.resize else {})}
        if inpaint is not None:
            source.update({"mask_sha256": pixels_hash(inpaint.mask[:1]), "mask_blur": request.mask_blur,
                           **({"mask_path": str(Path(mask).resolve())} if isinstance(mask, (str, Path)) else {})})
        return source

    def finish(self, stream: Stream) -> Result:
        """The stream's images decoded, with the settings that make each again (or the error that stopped it)."""
        if stream.error is not None:
            raise stream.error
        req, sched, timings, pkg = stream.req, stream.sched, stream.timings, self.package
        prompts, negatives = req.prompts, req.negatives
        tiles = None if req.decoder == "tiny" else self._tiled(req.vae_tiling, req.width, req.height)
        array = self._decode(stream.x, timings, tiny=req.decoder == "tiny", tiles=tiles)
        start = time.perf_counter()
        images = [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]
        timings["postprocess"] = time.perf_counter() - start
        timings["total"] = time.perf_counter() - stream.clock
        if self.shelf is not None:
            timings["load"] = timings.get("load", 0.0) + self.shelf.load_seconds
        settings = {"prompt": prompts[0], "negative_prompt": negatives[0], "steps": req.steps, "guidance_scale": req.guidances[0],
                    "scheduler": short_name(sched), "seed": req.seeds[0], "width": req.width, "height": req.height,
                    "num_images": len(prompts), "rng": req.rng, "clip_skip": req.clip_skip, "prompt_syntax": req.prompt_syntax,
                    "guidance_rescale": req.guidance_rescale, **self.family.size_settings(req), **self._lora_settings(),
                    **({"true_cfg_scale": req.true_cfg_scale} if req.true_cfg_scale != 1.0 else {}),
                    **({"decoder": "tiny"} if req.decoder == "tiny" else {}),
                    **({"cache": req.cache.label, f"full_{self.family.denoiser}_steps": stream.full_steps}
                       if req.cache.method else {}),
                    **({"vae_tiling": req.vae_tiling} if req.vae_tiling != "auto" else {}),
                    **({"vae_tiled": True} if self._tiled(req.vae_tiling, req.width, req.height) else {}),
                    **({"control": [u.record for u in req.control]} if req.control else {}),
                    **({"residency": self.residency} if self.shelf is not None else {}), **self._budget_settings(req),
                    "model": pkg.name, "model_hash": pkg.model_hash,
                    "backend": self.runner.name, "precision": self.computes, "diffrt": __version__, **stream.source}
        return Result(images, array, settings, timings, prompts, negatives, req.seeds, req.guidances, stream.x)

    def _budget_settings(self, req: Request) -> dict[str, Any]:
        """The memory budget, the plan it chose and the predicted peak, for the metadata."""
        planned = self.plan(req)
        if planned is None:
            return {}
        return {"memory_budget": self.budget, "memory_plan": planned[0].name, "predicted_peak_gb": round(planned[1] / GB, 2)}

    def _lora_settings(self) -> dict[str, Any]:
        """The applied LoRAs as an image's settings record them: labels to read, files and scales to apply again."""
        if not self.loras:
            return {}
        return {"loras": [c.label for c in self.loras],
                "lora_files": [{"path": str(c.path.resolve()), "scale": c.scale} for c in self.loras]}

    @property
    def denoiser(self) -> Engine:
        """The engine the sampling loop calls (the UNet, or a DiT family's transformer)."""
        return getattr(self, self.family.denoiser)

    @property
    def computes(self) -> str:
        """The UNet's precision as recorded with each image: on ov-cpu a quantized package's own (int8, fp16) with
        OpenVINO's precision for the float rest, e.g. int8+bf16; elsewhere the precision it runs in."""
        weights = self.package.openvino_weights(self.package.denoiser) if self.runner.openvino_ir else None
        if weights:  # int8-weights+bf16: the matrix products' weights compressed, the rest in OpenVINO's precision
            return f"{weights}-weights+{self.precision}"
        return self.runner.computes(self.precision, self.package.precision(self.package.denoiser))

    @property
    def per_row_timesteps(self) -> bool:
        """Whether the UNet takes one timestep per batch row, so streams at different steps can share a call."""
        return self.runner.per_row_timesteps and one_per_row(self.denoiser.inputs["timestep"])

    def step(self, streams: list[Stream]) -> None:
        """One UNet call for every stream's next step, then each stream's guidance and scheduler step. Streams at
        different steps, of different schedules and guidance, share the call when they have the same size and text
        length and the UNet takes one timestep per row (per_row_timesteps). A stream whose own step fails (its
        scheduler's NaN) is done, with the error that `finish` raises."""
        if len(streams) > 1:
            check_joinable(streams)
        inputs, t, seconds = joined_rows(streams)
        first = streams[0]
        where = f"at step {first.i + 1} of {first.total}" if len(streams) == 1 else f"on {len(streams)} requests' step"
        last = all(s.i + 1 >= s.total for s in streams)  # every stream's last step: the call after which memory goes back
        sample = np.concatenate(inputs) if len(inputs) > 1 else inputs[0]
        called = time.perf_counter()
        residuals = self._residuals(streams, sample, t)
        if residuals is not None:  # what the ControlNets took, apart from the UNet's time
            control_seconds, called = time.perf_counter() - called, time.perf_counter()
            for s in streams:
                s.timings.setdefault("controlnet", []).append(control_seconds)
        out = self._denoise(streams, sample, t, residuals, where, last).astype(np.float32)
        unet_seconds, start = time.perf_counter() - called, 0
        for stream, rows, own in zip(streams, inputs, seconds):
            try:
                stream.advance(out[start:start + len(rows)], unet_seconds, own)
            except UserError as exc:  # this stream's own failure: the others sharing the call go on
                stream.error = exc
            start += len(rows)

    def _denoise(self, streams: list[Stream], sample: np.ndarray, t: float | np.ndarray, residuals: dict[str, Any] | None,
                 where: str, last: bool) -> np.ndarray:
        """The denoiser's output for the joined rows: the UNet or transformer; with DeepCache its full graph (the streams
        keep its deep features) or, between full steps, the shallow branch over the features kept; with First-Block
        Cache the head, the tail where a stream's first-block residual moved, and the output head (fbcache.py)."""
        cond, name, output = self._joined_cond(streams), self.family.denoiser, self.family.denoiser_output
        if self.fbc_graphs is not None:
            stages = {"head": name, "tail": fbcache.TAIL, "out": fbcache.OUT}

            def run_parts(part: str, feeds: dict[str, Any], outputs: tuple[str, ...]) -> list[np.ndarray]:
                engine = getattr(self, stages[part])
                return self._guarded_outputs(stages[part], {k: v for k, v in feeds.items() if k in engine.inputs}, outputs,
                                             where, last)

            run = lambda feeds: fbcache.denoise(streams, feeds, run_parts, output, self.family.guidance == "embedded")  # noqa: E731
            return self.family.denoise(self.denoiser, run, sample, t, cond, residuals)
        if self.deep_graphs is not None and not deepcache.refresh(streams):
            shallow = self.unet_shallow
            run = lambda feeds: self._guarded(SHALLOW, deepcache.shallow_feeds(shallow, feeds), output, where, last)  # noqa: E731
            return self.family.denoise(shallow, run, sample, t, cond, {**(residuals or {}), FEATURE: deepcache.kept(streams)})

        def run(feeds: dict[str, Any]) -> np.ndarray:
            if self.deep_graphs is None:
                return self._guarded(name, feeds, output, where, last)
            out, feature = self._guarded_outputs(name, feeds, (output, FEATURE), where, last)
            deepcache.keep(streams, feature)
            return out

        return self.family.denoise(self.denoiser, run, sample, t, cond, residuals)

    def _residuals(self, streams: list[Stream], sample: np.ndarray, t: float | np.ndarray) -> dict[str, Any] | None:
        """The UNet's ControlNet residuals for this step (zeros where no ControlNet acts); None for a UNet without."""
        if self.controls is None:
            return None
        active = [s for s in streams if s.req.control]
        host = {} if not active else streams[0].host_cond if len(streams) == 1 else {
            k: np.concatenate([s.host_cond[k] for s in streams]) for k in streams[0].host_cond}
        return self.controls.residuals(streams, sample, t, host)

    def _joined_cond(self, streams: list[Stream]) -> dict[str, Any]:
        """The streams' text inputs side by side, made once per set of streams (the engine skips copying an input
        that is the same array as on its last call)."""
        if len(streams) == 1:
            return streams[0].cond
        last = self._joined[0]  # the streams themselves, held: an id() of a finished one could be a new one's
        if len(last) != len(streams) or any(a is not b for a, b in zip(last, streams)):
            first = streams[0].host_cond
            self._joined = (list(streams), {k: self.denoiser.to_device(np.concatenate([s.host_cond[k] for s in streams]))
                                            for k in first})
        return self._joined[1]

    def check(self, request: GenerationRequest, pixels: np.ndarray | None = None) -> tuple[Request, Any]:
        """The request resolved against the package's defaults and checked, and its scheduler; refused in one line
        when it cannot run here (a server checks a request with it before queueing it). pixels: an image-to-image
        source, whose size the request takes."""
        pkg, given = self.package, request
        self.family.refuse(request)
        if pixels is not None:
            given = replace(request, width=pixels.shape[3], height=pixels.shape[2])
        r = given.with_defaults(pkg.defaults)
        check_request(r.width, r.height, r.steps, r.num_images, r.guidance_scale, self.family.size_multiple)
        prompts, negatives = expand_prompts(r.prompt, r.negative_prompt, r.num_images)
        seeds = image_seeds(r.seed, len(prompts)) if r.seeds is None else check_seeds(r.seeds, len(prompts))
        layers = self.family.layers([getattr(self, e) for e in self.family.encoders])
        original_size, crop = check_size_conditioning(r.original_size, r.crops_coords_top_left, self.family.size_conditioning)
        req = Request(prompts, negatives, seeds, r.steps, per_image(r.guidance_scale, len(prompts)), r.width, r.height,
                      rng=check_rng(r.rng), clip_skip=check_clip_skip(r.clip_skip, layers),
                      prompt_syntax=self.family.prompt_syntax(r.prompt_syntax), guidance_rescale=check_rescale(r.guidance_rescale),
                      original_size=original_size, crops_coords_top_left=crop, source=request,
                      cfg=self.family.guidance == "cfg", true_cfg_scale=check_true_cfg(r.true_cfg_scale),
                      decoder=self._check_decoder(r.decoder), control=self._check_control(r),
                      vae_tiling=self._check_tiling(r.vae_tiling), cache=self._check_cache(r.cache))
        planned = self.plan(req)
        if planned and planned[0].tiled and req.vae_tiling == "auto":
            req.vae_tiling = "on"
        sched = make_checked_scheduler(r.scheduler, pkg.scheduler_config, r.steps,
                                       self.family.image_seq_len(r.width, r.height), self.family.sigmas(r.steps))
        self._check_fits(req)
        return req, sched

    def _check_cache(self, cache: str | None) -> stepcache.CacheChoice:
        """A request's step caching: its own, or the pipeline's where it names none; refused where the pipeline was not
        opened with that method's graphs."""
        choice = self.cache if cache is None else stepcache.parse_cache(cache)
        opened = "deepcache" if self.deep_graphs else "fbcache" if self.fbc_graphs else None
        if choice.method and choice.method != opened:
            name = stepcache.METHODS[choice.method][2]
            raise UserError(f"cache {cache!r} needs the pipeline opened with {name}'s graphs (--cache {choice.method} on "
                            f"generate or serve, Pipeline(cache='{choice.method}'); the package gets them with `diffrt "
                            f"{choice.method} add PACKAGE`); leave cache out")
        return choice

    def _check_control(self, r: GenerationRequest) -> list[Unit]:
        """The request's ControlNets checked and their images prepared at its size (control.check_units)."""
        if not r.control:
            if r.guess_mode or (r.control_start, r.control_end) != (0.0, 1.0):
                raise UserError("control start, control end and guess mode set how ControlNets act: give one with "
                                "--control NAME:IMAGE (control=[ControlInput(...)]), or leave them out")
            return []
        if self.controls is None:
            raise UserError(f"{self.package.name}'s UNet takes no ControlNet residuals: export the model with `diffrt "
                            "export CKPT OUT --controlnet DIR`, or add one with `diffrt controlnet add PACKAGE DIR`")
        return check_units(list(r.control), self.package.controlnets(), r.width, r.height, r.control_start,
                           r.control_end, r.guess_mode)

    def _check_tiling(self, mode: str) -> str:
        if mode not in TILING_MODES:
            raise UserError(f"VAE tiling must be one of {', '.join(TILING_MODES)}, not {mode!r}")
        if mode == "on" and self.tiles is None:
            raise UserError(f"{self.package.name} has no vae_decoder/config.json, which sets the VAE's tile size; "
                            "re-export it with this diffrt, or leave VAE tiling off")
        return mode

    @cached_property
    def tiles(self) -> Tiles | None:
        """The VAE's tile sides (from its config, as diffusers reads them); None where the package has no config."""
        path = self.package.root / "vae_decoder" / "config.json"
        return Tiles.of(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None

    def _tiled(self, mode: str, width: int, height: int) -> Tiles | None:
        """The tiles to run the VAE in for an image of this size, or None to run it whole."""
        return self.tiles if self.tiles is not None and self.tiles.needed(mode, width, height) else None

    def _check_decoder(self, decoder: str) -> str:
        """vae (the model's own) or tiny (the package's TAESD: a fast, rougher final decode)."""
        if decoder not in ("vae", "tiny"):
            raise UserError(f"unknown decoder {decoder!r}; use vae (the model's) or tiny (the package's tiny decoder)")
        if decoder == "tiny" and self.tiny_vae_decoder is None:
            raise UserError(f"{self.package.name} has no tiny decoder on the {self.runner.name} backend; add one with "
                            "`diffrt tiny-vae add PACKAGE TAESD_FOLDER`, or use --decoder vae")
        return decoder

    def _fitting_plan(self, req: Request) -> Plan:
        """The plan a request runs under: the budget's, else this pipeline's residency with the request's tiling."""
        planned = self.plan(req)
        if planned:
            return planned[0]
        return PLANS[self.residency + ("+tiled" if self._tiled(req.vae_tiling, req.width, req.height) else "")]

    def _check_fits(self, req: Request) -> None:
        """Refuse what this backend cannot hold: more text than its engines take, attention larger than this host's
        memory; warn of a size far from the model's own."""
        if not self.runner.text_chunks and self.chunk_count(req.prompts + req.negatives, req.prompt_syntax) > 1:
            raise UserError(f"the {self.runner.name} engines take one 75-token chunk of text (their profiles fix the "
                            "sequence length); shorten the prompt (or drop BREAK), or use --backend ort-cuda")
        if self.runner.device == "cpu":
            rows, plan = len(req.prompts) * (2 if req.guided else 1), self._fitting_plan(req)
            too_big = check_fits(lambda w, h: predict(self.package, self.runner.name, self.precision, plan, w, h, rows),
                                 req.width, req.height, 8 * self.package.vae_scale_factor)
            if too_big:
                d = self.package.defaults
                raise UserError(f"{too_big}; this model was made for {d['width']}x{d['height']}")
        note = size_note(self.package.defaults, req.width, req.height)
        if note:
            warnings.warn(note, stacklevel=4)

    def _start(self, sched, req: Request, strength: float, pixels: np.ndarray | None, mask: Any,
               latents: np.ndarray | None, rng: ImageGenerators, timings: dict) -> tuple[np.ndarray, np.ndarray, Any]:
        """(timesteps to run, starting latents, inpainting state): pure noise for text-to-image, the image's noised
        latents for image-to-image, and for inpainting also what the loop needs to keep the unmasked region."""
        n = len(req.prompts)
        shape = self.family.latent_shape(n, req.width, req.height)
        if pixels is not None and latents is not None:
            raise UserError("give an image or initial latents, not both")
        if latents is not None and latents.shape != shape:
            raise UserError(f"latents have shape {latents.shape}; {req.width}x{req.height} with {n} image(s) needs {shape}")
        if mask is not None and not self.family.inpainting:
            raise UserError(f"inpainting on {self.family.name} models is not built yet (diffusers' inpainting pipeline "
                            "for them is not matched); use image-to-image without --mask")
        if self.family.takes_mask(self.denoiser) and mask is None:
            raise UserError("this is an inpainting model (its UNet takes a mask): give an image and a mask (--image, --mask)")
        if pixels is None:
            if mask is not None:
                raise UserError("a mask needs an image to repaint (--image)")
            start = rng.standard_normal(shape, dtype=np.float32) if latents is None else latents.astype(np.float32)
            return sched.timesteps, start * np.float32(sched.init_noise_sigma), None
        timesteps, _ = strength_timesteps(sched, req.steps, strength, self.family.exact_strength)
        tiles = self._tiled(req.vae_tiling, req.width, req.height)
        if mask is None:
            start = self._encode_image(pixels, n, rng, timings, tiles)
            return timesteps, sched.add_noise(start, rng.standard_normal(start.shape, dtype=np.float32)), None
        x, inpaint = self._start_inpainting(sched, pixels, mask_input(mask, req.width, req.height), strength == 1.0,
                                            n, rng, timings, tiles)
        return timesteps, x, inpaint

    def _encode_prompt(self, req: Request, timings: dict) -> dict[str, Any]:
        """The denoiser's text inputs (negatives then prompts when guided), already in its input form."""
        start = time.perf_counter()
        cond = self.family.encode(self._guarded_outputs, [getattr(self, e) for e in self.family.encoders], self.tokenizers,
                                  req, timings)
        cond = {k: v.astype(self.denoiser.inputs[k].dtype) for k, v in cond.items()}
        timings["text_encoder"] = time.perf_counter() - start - timings["tokenize"]
        return cond

    def chunk_count(self, prompts: list[str], syntax: str = "a1111") -> int:
        """How many 75-token chunks the longest of the prompts takes (what its embedding's length is)."""
        return max(len(chunked(self.tokenizer, p).ids) for p in prompts) if syntax == "a1111" else 1

    def embed(self, prompts: list[str], clip_skip: int = 1, syntax: str = "a1111") -> np.ndarray:
        """(len(prompts), 77 k, hidden) float32: the text encoder(s)' hidden states as the denoiser takes them
        (Family.embed)."""
        return self.family.embed(self._guarded_outputs, [getattr(self, e) for e in self.family.encoders], self.tokenizers,
                                 prompts, clip_skip, syntax)[0]

    def _encode_image(self, pixels: np.ndarray, count: int, rng: ImageGenerators, timings: dict,
                      tiles: Tiles | None = None) -> np.ndarray:
        """The image's latents for each of count images: one encoder call (one a tile with tiles), a sample of its
        distribution per image."""
        start = time.perf_counter()
        if not self.runner.image_to_image:
            raise UserError(f"image-to-image on the {self.runner.name} backend is not built yet; use --backend ort-cuda or ort-cpu")
        if not self.package.has("vae_encoder"):
            raise UserError(f"the model {self.package.name} has no VAE encoder, which image-to-image and inpainting need; "
                            "use a package exported with it (`diffrt export CHECKPOINT OUT` writes one by default)")
        def run(part: np.ndarray, last: bool = True) -> np.ndarray:
            return self._guarded("vae_encoder", self.family.encoder_feeds(self._encoder(), part), self.family.encoder_output,
                                 "encoding the image", release=last)

        params = tiling.encode(lambda part: run(part, False), pixels, tiles) if tiles else run(pixels)
        latents = latents_from(np.repeat(params, count, axis=0), self.package.vae_scaling_factor, rng,
                               self.package.vae_shift_factor)
        timings["vae_encode"] = time.perf_counter() - start
        return latents

    def _encoder(self) -> Engine:
        """The VAE encoder's engine, opened on first use."""
        if self.vae_encoder is None:
            self.vae_encoder = self._engine("vae_encoder")
        return self.vae_encoder

    def _start_inpainting(self, sched, pixels: np.ndarray, mask: np.ndarray, from_noise: bool, count: int,
                           rng: ImageGenerators, timings: dict, tiles: Tiles | None) -> tuple[np.ndarray, Inpainting]:
        """Start latents and what the loop needs, drawing noise in diffusers' order: the image's latent sample (unless
        a 9-channel UNet starts from pure noise), the start noise, the masked image's latent sample."""
        nine = self.family.takes_mask(self.denoiser)
        image_latents = None if nine and from_noise else self._encode_image(pixels, count, rng, timings, tiles)
        f = self.package.vae_scale_factor
        noise = rng.standard_normal(self.family.latent_shape(count, pixels.shape[3], pixels.shape[2]), dtype=np.float32)
        x = noise * np.float32(sched.init_noise_sigma) if from_noise else sched.add_noise(image_latents, noise)
        masked = self._encode_image(pixels * (mask < 0.5), count, rng, timings, tiles)
        inpaint = Inpainting(np.repeat(mask[:, :, ::f, ::f], count, axis=0), masked if nine else None,
                             None if nine else image_latents, noise)
        return x.astype(np.float32), inpaint

    def _decode(self, x: np.ndarray, timings: dict, tiny: bool = False, tiles: Tiles | None = None) -> np.ndarray:
        """Images as floats in [0, 1], (n, H, W, 3), by the VAE decoder (or the tiny one, which takes the sampler's
        latents as they are), in tiles where given. One image per call: the decoder's activations are the largest of
        the pipeline (SD 1.5 at 512², fp16 on onnxruntime CUDA: 8 GB for 4 images at once, 2 GB one by one) and its
        time does not depend on batching."""
        start = time.perf_counter()
        name, latent_in = (TINY, x) if tiny else ("vae_decoder", self.family.vae_input(x))
        output = "sample" if tiny else self.family.vae_output

        def run(z: np.ndarray, last: bool = False) -> np.ndarray:
            return self._guarded(name, self.family.vae_feeds(getattr(self, name), z), output, "decoding the latents", last)

        decoded = np.concatenate([tiling.decode(run, latent_in[i:i + 1], tiles) if tiles else
                                  run(latent_in[i:i + 1], i == len(latent_in) - 1) for i in range(len(latent_in))])
        timings["vae_decode"] = time.perf_counter() - start
        if not tiny:
            with self._fitting:  # previews learn from what the VAE made
                self._latent_rgb = self._latent_rgb or LatentRGB(self.package.latent_channels)
                self._latent_rgb.learn(latent_in, decoded)
        return np.clip(decoded.astype(np.float32) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
