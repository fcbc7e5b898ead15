"""The runtimes a user would pick instead of diffrt, as `diffrt bench --baseline` peers, on the same checkpoint.

- openvino-genai: OpenVINO GenAI's Text2ImagePipeline on an OpenVINO export of the checkpoint made by optimum-intel
  (`optimum-cli export openvino --weight-format fp32`, cached beside the checkpoint), reshaped to the benchmarked size
  (static shapes) and compiled with diffrt's own OpenVINO precision hint; openvino-genai-int8 the same on an export
  whose weights NNCF compressed to int8 (`--weight-format int8`: GenAI's int8 that needs no calibration data);
  openvino-genai-hybrid on optimum-intel's hybrid quantization (NNCF: the denoiser's matrix products with int8
  weights, its other layers int8 in activations and weights, calibrated on diffrt quantize's own prompts; the other
  models int8 weights), GenAI's best int8 and the fair peer of diffrt's int8 package;
- optimum: optimum-onnx's ORTStableDiffusionPipeline on diffrt's own package (onnxruntime, CPU);
- stable-diffusion-cpp: stable-diffusion-cpp-python (stable-diffusion.cpp on ggml's CPU backend, float32 weights) on
  the checkpoint written as one original-layout file (ldm_checkpoint.py, kept beside it: stable-diffusion.cpp tells
  a model's version from the original tensor names, not from a diffusers folder).

Each runs the bench's prompt, size, steps, sampler and guidance; a peer draws its own start noise (the images differ,
the work does not). Set-up: docs/benchmarks.md (`bash benchmarks/peers_env.sh`)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from io import BytesIO
from pathlib import Path
from typing import Any

from diffrt.runtime.errors import UserError

PEERS = ("openvino-genai", "openvino-genai-int8", "openvino-genai-hybrid", "optimum", "stable-diffusion-cpp")
GENAI_WEIGHTS = {"openvino-genai": "fp32", "openvino-genai-int8": "int8", "openvino-genai-hybrid": "hybrid-int8"}
HYBRID_SAMPLES = 200  # optimum-intel's default: denoiser calls recorded while its pipeline runs the prompts
SETUP = "see docs/benchmarks.md#peers (`bash benchmarks/peers_env.sh`)"
# diffrt's sampler names -> stable-diffusion.cpp's sample_method and OpenVINO GenAI's Scheduler.Type
SDCPP_SAMPLERS = {"euler": "euler", "euler_a": "euler_a", "heun": "heun", "dpm2": "dpm2", "dpmpp_2m": "dpm++2m",
                  "lcm": "lcm"}
GENAI_SAMPLERS = {"euler": "EULER_DISCRETE", "euler_a": "EULER_ANCESTRAL_DISCRETE", "ddim": "DDIM", "pndm": "PNDM",
                  "lms": "LMS_DISCRETE", "lcm": "LCM", "flow_euler": "FLOW_MATCH_EULER_DISCRETE"}


def missing(peer: str) -> str | None:
    """Why a peer cannot run here (its library is not installed), with the fix; None when it can."""
    from importlib.util import find_spec

    needs = {"optimum": ("optimum.onnxruntime",), "stable-diffusion-cpp": ("stable_diffusion_cpp",)}.get(
        peer, ("openvino_genai", "optimum.intel"))
    try:
        absent = [m for m in needs if find_spec(m) is None]
    except ModuleNotFoundError:
        absent = list(needs)
    return f"--baseline {peer} needs {', '.join(absent)}, which is not installed; {SETUP}" if absent else None


def sampler(table: dict[str, str], peer: str, name: str) -> str:
    if name not in table:
        raise UserError(f"--baseline {peer} has no sampler like diffrt's {name!r}; use --scheduler "
                        f"{' or '.join(sorted(table))}")
    return table[name]


def timed(run) -> dict[str, Any]:
    """A peer's call, its images encoded as PNG as diffrt's are: the whole time, no stage split."""
    start = time.perf_counter()
    for image in run():
        image.save(BytesIO(), format="PNG")
    total = time.perf_counter() - start
    return {"total": total, "stages": {"other": total}, "unet_calls": []}


def genai_export(checkpoint: Path, weights: str = "fp32") -> Path:
    """The checkpoint exported for OpenVINO GenAI by optimum-intel (weights fp32, int8 compressed, or hybrid int8),
    made once beside it, in a process of its own."""
    out = checkpoint.parent / f"{checkpoint.name}-openvino-genai" / weights
    if (out / "model_index.json").is_file():
        return out
    cmd = [sys.executable, "-m", "optimum.commands.optimum_cli", "export", "openvino", "--model", str(checkpoint),
           "--task", "text-to-image", "--weight-format", weights, str(out)]
    if weights == "hybrid-int8":
        cmd = [sys.executable, "-c", f"from diffrt.benchmarks.peers import hybrid_export; hybrid_export({str(checkpoint)!r}, "
               f"{str(out)!r})"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode or not (out / "model_index.json").is_file():
        raise UserError(f"optimum-intel could not export {checkpoint} for OpenVINO GenAI: "
                        f"{(done.stderr.strip().splitlines() or ['no output'])[-1][:200]}")
    return out


def hybrid_export(checkpoint: str, out: str) -> None:
    """optimum-intel's hybrid int8 of the checkpoint (its calibration runs its own pipeline on our prompts at the
    denoiser's native size, up to 512x512, and its default steps)."""
    from optimum.exporters.openvino.__main__ import maybe_convert_tokenizers
    from optimum.intel import OVDiffusionPipeline, OVWeightQuantizationConfig

    from diffrt.export.precision import CALIBRATION_PROMPTS

    config = OVWeightQuantizationConfig(bits=8, quant_method="hybrid", dataset=list(CALIBRATION_PROMPTS),
                                        num_samples=HYBRID_SAMPLES)
    pipe = OVDiffusionPipeline.from_pretrained(checkpoint, export=True, quantization_config=config)
    pipe.save_pretrained(out)
    maybe_convert_tokenizers("diffusers", Path(out), pipe)  # GenAI reads OpenVINO tokenizers, as optimum-cli writes them


class GenAI:
    """OpenVINO GenAI's Text2ImagePipeline, static shapes, diffrt's OpenVINO precision hint."""

    def __init__(self, checkpoint: Path, precision: str, scheduler: str, batch: int, width: int, height: int,
                 guidance: float, weights: str = "fp32") -> None:
        import openvino_genai as genai

        start = time.perf_counter()
        self.folder = genai_export(checkpoint, weights)
        self.export_seconds = time.perf_counter() - start
        start = time.perf_counter()
        self.pipe = genai.Text2ImagePipeline(str(self.folder))
        kind = getattr(genai.Scheduler.Type, sampler(GENAI_SAMPLERS, "openvino-genai", scheduler))
        self.pipe.set_scheduler(genai.Scheduler.from_config(str(self.folder / "scheduler" / "scheduler_config.json"), kind))
        self.pipe.reshape(batch, height, width, guidance)
        self.pipe.compile("CPU", INFERENCE_PRECISION_HINT={"bf16": "bf16", "fp32": "f32"}[precision])
        self.load_seconds = time.perf_counter() - start

    def __call__(self, prompt: str, steps: int, guidance: float, batch: int, width: int, height: int) -> dict[str, Any]:
        from PIL import Image

        def run():
            out = self.pipe.generate(prompt, width=width, height=height, num_inference_steps=steps,
                                     guidance_scale=guidance, num_images_per_prompt=batch, rng_seed=0)
            return [Image.fromarray(a) for a in out.data]

        return timed(run)


class Optimum:
    """optimum-onnx's ORTStableDiffusionPipeline on diffrt's package (onnxruntime's CPU provider)."""

    def __init__(self, package: Path, scheduler: str, threads: int | None) -> None:
        import diffusers
        import onnxruntime as ort
        from optimum.onnxruntime import ORTStableDiffusionPipeline

        from diffrt.runtime.schedulers import SHORT_NAMES

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        start = time.perf_counter()
        self.pipe = ORTStableDiffusionPipeline.from_pretrained(package, provider="CPUExecutionProvider",
                                                              session_options=options)
        cls, overrides = SHORT_NAMES[scheduler]
        self.pipe.scheduler = getattr(diffusers, cls.class_name).from_config({**self.pipe.scheduler.config, **overrides})
        self.pipe.set_progress_bar_config(disable=True)
        self.load_seconds = time.perf_counter() - start

    def __call__(self, prompt: str, steps: int, guidance: float, batch: int, width: int, height: int) -> dict[str, Any]:
        return timed(lambda: self.pipe([prompt] * batch, num_inference_steps=steps, guidance_scale=guidance,
                                       width=width, height=height).images)


class StableDiffusionCpp:
    """stable-diffusion-cpp-python on the checkpoint's single original-layout file (float32 weights)."""

    def __init__(self, checkpoint: Path, scheduler: str, threads: int | None) -> None:
        from stable_diffusion_cpp import StableDiffusion

        from .ldm_checkpoint import write_single_file

        self.method = sampler(SDCPP_SAMPLERS, "stable-diffusion-cpp", scheduler)
        single = checkpoint.parent / f"{checkpoint.name}-ldm.safetensors"
        if not single.is_file():
            write_single_file(checkpoint, single)
        start = time.perf_counter()
        # its own default (-1) counts physical cores, one on a 2-vCPU machine: every core, as the others use
        self.pipe = StableDiffusion(model_path=str(single), wtype="f32", n_threads=threads or os.cpu_count() or -1,
                                    verbose=False)
        self.load_seconds = time.perf_counter() - start

    def __call__(self, prompt: str, steps: int, guidance: float, batch: int, width: int, height: int) -> dict[str, Any]:
        return timed(lambda: self.pipe.generate_image(prompt, width=width, height=height, cfg_scale=guidance,
                                                      sample_method=self.method, sample_steps=steps, seed=0,
                                                      batch_count=batch))


def make_peer(name: str, checkpoint: Path | None, package: Path, precision: str, scheduler: str, threads: int | None,
              batch: int, width: int, height: int, guidance: float) -> Any:
    """A peer ready to run (exported, loaded and compiled where it needs to be)."""
    if name == "optimum":
        from diffrt.runtime.package import load_package

        if load_package(package).takes_control():
            raise UserError("--baseline optimum: optimum's pipeline feeds no ControlNet residuals, which this package's "
                            "UNet takes; benchmark a package exported without --controlnet")
        return Optimum(package, scheduler, threads)
    assert checkpoint is not None
    if name == "stable-diffusion-cpp":
        return StableDiffusionCpp(checkpoint, scheduler, threads)
    return GenAI(checkpoint, precision, scheduler, batch, width, height, guidance, GENAI_WEIGHTS[name])
