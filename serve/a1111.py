"""AUTOMATIC1111's web UI API: txt2img, progress with a preview, interrupt and skip, options, and the lists that
front-ends probe when they connect (models, samplers, schedulers, LoRAs, scripts, flags)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request

from diffrt.runtime.errors import UserError

from .app import ApiError, ServeOptions, Service, encode, image_from, seeds_from, with_loras
from .batcher import Job
from .controlnet import a1111_controls
from .jobs import eta, thumbnail
from .schemas import RANDN_SOURCES, A1111Overrides, Img2ImgRequest, Txt2ImgRequest

FORMATS = {"png": "png", "jpg": "jpeg", "jpeg": "jpeg", "webp": "webp"}  # samples_format -> the encoder's name
FILLS = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}  # A1111's inpainting_fill


def default_options(service: Service) -> dict[str, Any]:
    """The A1111 options diffrt keeps, as GET /sdapi/v1/options first answers them."""
    return {"sd_model_checkpoint": service.name, "CLIP_stop_at_last_layers": 1, "randn_source": "numpy",
            "samples_format": "png"}


def lora_files(options: ServeOptions) -> list[dict[str, str]]:
    """The LoRAs a request may name: the server's --lora-dir files, as A1111's /sdapi/v1/loras lists them."""
    folder = Path(options.lora_dir) if options.lora_dir else None
    files = sorted(folder.glob("*.safetensors")) if folder and folder.is_dir() else []
    return [{"name": f.stem, "alias": f.stem, "path": str(f)} for f in files]


def a1111_sampler(sampler: str | None, schedule: str | None) -> str | None:
    """diffrt's scheduler for A1111's sampler_name and scheduler (schedule type) fields; a bad pair is a 400."""
    from diffrt.runtime.schedulers import a1111_scheduler

    try:
        return a1111_scheduler(sampler, schedule)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def check_checkpoint(service: Service, name: str | None, where: str) -> None:
    """A checkpoint named by options or override_settings must be the served one (its name, or A1111's title)."""
    if name and name.split(" [")[0] != service.name:
        raise ApiError(400, f"{where}: {name!r} is not served here; this server serves {service.name!r} only", where)


def txt2img_job(service: Service, body: Txt2ImgRequest) -> Job:
    """The job a txt2img body asks for: its override_settings over the server's options."""
    options, given = {**default_options(service), **service.a1111_options}, body.override_settings
    check_checkpoint(service, given.sd_model_checkpoint, "override_settings.sd_model_checkpoint")
    count = body.batch_size * body.n_iter
    prompt, loras = with_loras(service.options, body.prompt, body.loras)
    controls = a1111_controls(service, body.scripts(), body.init_images[0] if isinstance(body, Img2ImgRequest) else None)
    return Job([prompt] * count, [body.negative_prompt] * count, seeds_from(body.seed, count),
               {"steps": body.steps, "scheduler": a1111_sampler(body.sampler(), body.scheduler), "width": body.width,
                "height": body.height, "rng": RANDN_SOURCES[given.randn_source or options["randn_source"]],
                "clip_skip": given.CLIP_stop_at_last_layers or options["CLIP_stop_at_last_layers"], "loras": loras,
                **({"control": controls} if controls else {})},
               body.cfg_scale)


def img2img_job(service: Service, body: Img2ImgRequest) -> Job:
    """txt2img's job with the image (resized to width x height when they are given and differ, A1111's resize_mode
    0), the mask (white repaints; inverted with inpainting_mask_invert) and the strength."""
    from PIL import Image, ImageOps

    job = txt2img_job(service, body)
    image = image_from(body.init_images[0], "init_images")
    size = (body.width or image.width, body.height or image.height)
    if size != image.size:
        if body.resize_mode != 0:
            raise ApiError(400, f"resize_mode {body.resize_mode} is not built: diffrt resizes the image to width x height "
                                "(0, just resize); send resize_mode 0, or an image of that size", "resize_mode")
        image = image.convert("RGB").resize(size, Image.Resampling.LANCZOS)
    mask = None
    if body.mask:
        if body.inpainting_fill != 1:
            raise ApiError(400, f"inpainting_fill {body.inpainting_fill} ({FILLS[body.inpainting_fill]}) is not built: "
                                "diffrt repaints the masked area from the image (1, original); send 1", "inpainting_fill")
        if body.inpaint_full_res:
            raise ApiError(400, "inpaint_full_res (the masked area alone, at full resolution) is not built; send "
                                "inpaint_full_res false: the whole image is inpainted", "inpaint_full_res")
        mask = image_from(body.mask, "mask").convert("L")
        mask = ImageOps.invert(mask) if body.inpainting_mask_invert else mask
        mask = mask if mask.size == image.size else mask.resize(image.size, Image.Resampling.NEAREST)
    job.settings.update(width=None, height=None, image=image, strength=body.denoising_strength, mask=mask,
                        mask_blur=body.mask_blur if mask is not None else 0.0)
    return job


def txt2img_answer(service: Service, body: Txt2ImgRequest, job: Job):
    """The images as A1111's txt2img answers them, in the samples format the options or the body choose."""
    from diffrt.runtime.schedulers import A1111_NAMES

    a1111_name = {short: label for label, short in A1111_NAMES.items()}
    chosen = body.override_settings.samples_format or {**default_options(service), **service.a1111_options}["samples_format"]

    def answer(images: list[tuple[Any, dict]]) -> dict:
        first, count = images[0][1], len(images)
        info = {"prompt": body.prompt, "all_prompts": job.prompts, "negative_prompt": body.negative_prompt,
                "all_negative_prompts": job.negatives, "seed": job.seeds[0], "all_seeds": job.seeds,
                "subseed": -1, "all_subseeds": [-1] * count, "steps": first["steps"], "cfg_scale": first["guidance_scale"],
                "sampler_name": a1111_name.get(first["scheduler"], first["scheduler"]), "width": first["width"],
                "height": first["height"], "sd_model_name": service.name, "sd_model_hash": first["model_hash"][:10],
                "batch_size": body.batch_size, "infotexts": [parameters(s) for _, s in images], "ignored": body.ignored(),
                **({"interrupted_at_step": first["interrupted_at_step"]} if "interrupted_at_step" in first else {})}
        return {"images": [encode(img, s, FORMATS[chosen]) for img, s in images],
                "parameters": body.model_dump(exclude={"init_images", "mask"}),
                "info": json.dumps(info)}

    return answer


def parameters(settings: dict) -> str:
    from diffrt.runtime.images import parameters_text

    return parameters_text(settings)


async def progress_answer(service: Service, skip_current_image: bool) -> dict[str, Any]:
    """/sdapi/v1/progress: the oldest running job's progress, ETA and preview, as A1111 answers it."""
    import asyncio

    running = service.batcher.running if service.batcher else []
    queued = len(service.batcher.queue) if service.batcher else 0
    job = running[0] if running else None
    done = job.step / job.total if job and job.total else 0.0
    left = eta(job) if job else None
    image = None
    if job is not None and not skip_current_image:
        previews = await asyncio.to_thread(service.preview, job)
        image = encode(thumbnail(previews[0]), None) if previews else None
    state = {"skipped": False, "interrupted": bool(job and job.interrupted), "stopping_generation": False,
             "job": job.id if job else "", "job_count": len(running) + queued, "job_no": 0,
             "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "sampling_step": job.step if job else 0,
             "sampling_steps": job.total if job else 0}
    return {"progress": done, "eta_relative": left or 0.0, "state": state, "current_image": image, "textinfo": None,
            "current_task": job.id if job else None}


def add_a1111_routes(app: FastAPI, service: Service) -> None:
    from diffrt.runtime.schedulers import A1111_NAMES, SCHEDULE_TYPES, SHORT_NAMES, is_flow_config, samplers_for

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(body: Txt2ImgRequest, request: Request) -> dict:
        job = txt2img_job(service, body)
        return txt2img_answer(service, body, job)(await service.generate(job, request))

    @app.post("/sdapi/v1/img2img")
    async def img2img(body: Img2ImgRequest, request: Request) -> dict:
        job = img2img_job(service, body)
        return txt2img_answer(service, body, job)(await service.generate(job, request))

    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False) -> dict:
        service.live_only("progress with previews")
        return await progress_answer(service, skip_current_image)

    @app.post("/sdapi/v1/interrupt")
    async def interrupt() -> dict:
        """Every running job stops at its next step and answers with its images as they stand."""
        service.live_only("interrupt")
        return {"interrupted": service.interrupt()}

    @app.post("/sdapi/v1/skip")
    async def skip() -> dict:
        """A1111 skips the current image of a batch; diffrt runs a batch's images together, so this ends them."""
        service.live_only("skip")
        return {"interrupted": service.interrupt()}

    @app.get("/sdapi/v1/options")
    async def options() -> dict:
        return {**default_options(service), **service.a1111_options}

    @app.post("/sdapi/v1/options")
    async def set_options(body: A1111Overrides) -> dict:
        given = body.model_dump(exclude_unset=True, exclude_none=True)
        check_checkpoint(service, given.pop("sd_model_checkpoint", None), "sd_model_checkpoint")
        known = {k: v for k, v in given.items() if k in A1111Overrides.model_fields}
        service.a1111_options.update(known)
        return {"ignored": sorted(set(given) - set(known))}

    @app.get("/sdapi/v1/cmd-flags")
    async def cmd_flags() -> dict:
        o = service.options
        return {"api": True, "nowebui": False, "ckpt": str(o.model) if o.model else None, "lora_dir": str(o.lora_dir or ""),
                "api_auth": bool(o.api_key), "backend": o.backend, "batching": o.batching}

    @app.get("/sdapi/v1/scripts")
    async def scripts() -> dict:
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/script-info")
    async def script_info() -> list:
        return []

    @app.get("/sdapi/v1/embeddings")
    async def embeddings() -> dict:
        return {"loaded": {}, "skipped": {}}

    @app.get("/sdapi/v1/upscalers")
    async def upscalers() -> list:
        return []

    @app.get("/sdapi/v1/loras")
    async def loras() -> list:
        return lora_files(service.options)

    @app.get("/sdapi/v1/samplers")
    async def samplers() -> list:
        """The samplers that fit the served model (flow-matching or discrete-time), as A1111 lists them."""
        config = service.pipe.package.scheduler_config if service.pipe else {}
        fitting = samplers_for(flow=is_flow_config(config))
        return [{"name": label, "aliases": [short, SHORT_NAMES[short][0].class_name], "options": {}}
                for label, short in A1111_NAMES.items() if short in fitting]

    @app.get("/sdapi/v1/schedulers")
    async def schedulers() -> list:
        return [{"name": kind, "label": kind.title()} for kind in SCHEDULE_TYPES]

    @app.get("/sdapi/v1/sd-models")
    async def sd_models() -> list:
        info = service.describe()
        return [{"title": info["name"], "model_name": info["name"], "hash": (info["model_hash"] or "")[:8] or None,
                 "sha256": None, "filename": info["root"], "config": None}]
