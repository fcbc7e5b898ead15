"""OpenAI's images API: /v1/models and /v1/images/generations, answered whole or streamed as server-sent events
(`stream: true`: `partial_images` previews, then each image), as the official SDK reads them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from .app import ApiError, Service, encode, error_body, image_from, seeds_from, validated, with_loras
from .batcher import Job
from .controlnet import openai_controls
from .jobs import POLL_S, sse, thumbnail
from .schemas import OpenAIEditRequest, OpenAIImageRequest


def size_conditioning(body: OpenAIImageRequest) -> dict[str, Any]:
    """SDXL's size conditioning when the request sets it (the pipeline refuses it for other families)."""
    given = {"original_size": body.original_size, "crops_coords_top_left": body.crops_coords_top_left}
    return {k: tuple(v) for k, v in given.items() if v is not None and tuple(v) != (0, 0)}


def openai_job(service: Service, body: OpenAIImageRequest) -> Job:
    """The job an images request asks for (refused when it names another model)."""
    if body.model not in (None, service.name):
        raise ApiError(400, f"model {body.model!r} is not served here; GET /v1/models lists {service.name!r}", "model")
    if body.response_format not in (None, "b64_json"):
        raise ApiError(400, f"response_format {body.response_format!r} is not served: diffrt answers with the image itself "
                            "(b64_json) and hosts no image URLs; leave it out or send b64_json", "response_format")
    width, height = body.dimensions()
    prompt, loras = with_loras(service.options, body.prompt, body.loras)
    return Job([prompt] * body.n, [body.negative_prompt] * body.n, seeds_from(body.seed, body.n),
               {"steps": body.steps, "scheduler": body.scheduler, "width": width, "height": height, "rng": body.rng,
                "clip_skip": body.clip_skip, "prompt_syntax": body.prompt_syntax, "true_cfg_scale": body.true_cfg_scale,
                "loras": loras, **size_conditioning(body), **({"cache": body.cache} if body.cache else {}),
                **({"control": openai_controls(service, body.control)} if body.control else {})},
               body.guidance_scale)


def openai_answer(body: OpenAIImageRequest):
    """The images as OpenAI's images API answers them (with the fields diffrt ignored, if any, under info)."""
    def answer(images: list[tuple[Any, dict]]) -> dict:
        out = {"created": int(time.time()), "output_format": body.output_format,
               "data": [{"b64_json": encode(img, s, body.output_format), "revised_prompt": body.prompt} for img, s in images]}
        if body.ignored():
            out["info"] = {"ignored": body.ignored()}
        return out

    return answer


def image_event(kind: str, b64: str, body: OpenAIImageRequest, size: str, **extra: Any) -> str:
    prefix = "image_edit" if isinstance(body, OpenAIEditRequest) else "image_generation"
    data = {"type": f"{prefix}.{kind}", "b64_json": b64, "created_at": int(time.time()), "size": size,
            "quality": "auto", "background": "opaque", "output_format": body.output_format, **extra}
    return sse(data, data["type"])


async def stream_images(service: Service, job: Job, body: OpenAIImageRequest) -> AsyncIterator[str]:
    """The admitted job's events: its partial images (latents the worker kept at steps spread over the run, so
    none is missed however fast the steps), then each image completed; an error event if it fails. Leaving early
    (the client went away) cancels the job."""
    job.partial_images = body.partial_images
    task = asyncio.ensure_future(service.wait(job))
    sent = 0
    try:
        while not task.done() or sent < len(job.snapshots):
            if sent < len(job.snapshots):
                _, latents = job.snapshots[sent]
                req = job.stream.req
                images = await asyncio.to_thread(service.pipe.preview, latents, req.width, req.height)
                for image in images:
                    yield image_event("partial_image", encode(thumbnail(image), None, body.output_format), body,
                                      f"{req.width}x{req.height}", partial_image_index=sent)
                sent += 1
                continue
            await asyncio.wait({task}, timeout=POLL_S)
        for image, settings in task.result():
            info = {"info": {"ignored": body.ignored()}} if body.ignored() else {}
            yield image_event("completed", encode(image, settings, body.output_format), body,
                              f"{settings['width']}x{settings['height']}", **info)
    except ApiError as exc:
        yield sse({"type": "error", **error_body(exc.message, "server_error")}, "error")
    except Exception as exc:  # the pipeline's own refusal or failure mid-way, as one error event
        yield sse({"type": "error", **error_body(str(exc), "server_error")}, "error")
    finally:
        if not task.done():
            task.cancel()


def repainted(mask: Any) -> Any:
    """OpenAI's mask convention (fully transparent pixels are repainted) as diffrt's (white repaints)."""
    from PIL import Image

    if "A" not in mask.getbands():
        raise ApiError(400, "mask must be a PNG with an alpha channel: its transparent pixels are repainted", "mask")
    alpha = np.asarray(mask.getchannel("A"))
    return Image.fromarray(np.where(alpha < 128, 255, 0).astype(np.uint8))


async def edit_request(service: Service, request: Request) -> tuple[OpenAIEditRequest, Job]:
    """The edit form's fields validated, and the job: inpainting where a mask (or the image's own transparency)
    says what to repaint, else image-to-image of the whole image."""
    form = await request.form()
    images = [v for k, v in form.multi_items() if k in ("image", "image[]")]
    if len(images) != 1 or isinstance(images[0], str):
        raise ApiError(400, f"send one image file (multipart field image); got {len(images)}", "image")
    body = validated(OpenAIEditRequest, {k: v for k, v in form.multi_items() if isinstance(v, str)})
    image = image_from(await images[0].read(), "image")
    mask_file = form.get("mask")
    if mask_file is not None and not isinstance(mask_file, str):
        mask = repainted(image_from(await mask_file.read(), "mask"))
    elif "A" in image.getbands() and np.asarray(image.getchannel("A")).min() < 128:
        mask = repainted(image)  # no mask: the image's own transparency says what to repaint, as OpenAI's does
    else:
        mask = None
    if body.size is not None and body.dimensions() != image.size:
        raise ApiError(400, f"size {body.size} differs from the image's {image.width}x{image.height}; leave size out "
                            "(the image's size is the output's) or resize the image", "size")
    job = openai_job(service, body)
    strength = body.strength or (1.0 if mask is not None else 0.8)
    job.settings.update(width=None, height=None, image=image.convert("RGB"), strength=strength, mask=mask,
                        mask_blur=body.mask_blur if mask is not None else 0.0)
    if mask is not None and mask.size != image.size:
        raise ApiError(400, f"mask is {mask.width}x{mask.height} and the image {image.width}x{image.height}; send "
                            "them the same size", "mask")
    return body, job


async def answered(service: Service, job: Job, body: OpenAIImageRequest, request: Request) -> Any:
    """The images whole, or (stream) as server-sent events once the job is admitted."""
    if not body.stream:
        return openai_answer(body)(await service.generate(job, request))
    service.live_only("streaming")
    await service.admit(job)  # a refusal is a plain 4xx answer, before the stream starts
    return StreamingResponse(stream_images(service, job, body), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


def add_openai_routes(app: FastAPI, service: Service) -> None:
    @app.get("/v1/models")
    async def models() -> dict:
        model = {"id": service.name, "object": "model", "created": 0, "owned_by": "diffrt"}
        if service.pipe is not None:  # what guidance_scale means for this model
            model.update(family=service.pipe.family.name, guidance=service.pipe.family.guidance_note)
        return {"object": "list", "data": [model]}

    @app.post("/v1/images/generations")
    async def generations(body: OpenAIImageRequest, request: Request) -> Any:
        return await answered(service, openai_job(service, body), body, request)

    @app.post("/v1/images/edits")
    async def edits(request: Request) -> Any:
        """Image-to-image or inpainting from a multipart form: image, optional mask (transparent = repaint), prompt."""
        body, job = await edit_request(service, request)
        return await answered(service, job, body, request)
