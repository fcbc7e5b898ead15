"""OpenAI's images API: /v1/models and /v1/images/generations, answered whole or streamed as server-sent events
(`stream: true`: `partial_images` previews, then each image), as the official SDK reads them."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from .app import ApiError, Service, encode, error_body, seeds_from, with_loras
from .batcher import Job
from .jobs import POLL_S, sse, thumbnail
from .schemas import OpenAIImageRequest


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
                "loras": loras, **size_conditioning(body)},
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


def partial_due(done: int, total: int, sent: int, wanted: int) -> bool:
    """Whether the next of `wanted` partial images is due: they fall evenly between the first step and the last."""
    return sent < wanted and total > 0 and done < total and done >= math.ceil(total * (sent + 1) / (wanted + 1))


def image_event(kind: str, b64: str, body: OpenAIImageRequest, size: str, **extra: Any) -> str:
    data = {"type": f"image_generation.{kind}", "b64_json": b64, "created_at": int(time.time()), "size": size,
            "quality": "auto", "background": "opaque", "output_format": body.output_format, **extra}
    return sse(data, data["type"])


async def stream_images(service: Service, job: Job, body: OpenAIImageRequest) -> AsyncIterator[str]:
    """The admitted job's events: partial images as its steps pass their marks, then each image completed; an
    error event if it fails. Leaving early (the client went away) cancels the job."""
    task = asyncio.ensure_future(service.wait(job))
    sent = 0
    try:
        while not task.done():
            if partial_due(job.step, job.total, sent, body.partial_images):
                images = await asyncio.to_thread(service.preview, job)
                size = f"{job.stream.req.width}x{job.stream.req.height}"
                for image in images or []:
                    yield image_event("partial_image", encode(thumbnail(image), None, body.output_format), body, size,
                                      partial_image_index=sent)
                sent += 1
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


def add_openai_routes(app: FastAPI, service: Service) -> None:
    @app.get("/v1/models")
    async def models() -> dict:
        model = {"id": service.name, "object": "model", "created": 0, "owned_by": "diffrt"}
        if service.pipe is not None:  # what guidance_scale means for this model
            model.update(family=service.pipe.family.name, guidance=service.pipe.family.guidance_note)
        return {"object": "list", "data": [model]}

    @app.post("/v1/images/generations")
    async def generations(body: OpenAIImageRequest, request: Request) -> Any:
        job = openai_job(service, body)
        if not body.stream:
            return openai_answer(body)(await service.generate(job, request))
        service.live_only("streaming")
        await service.admit(job)  # a refusal is a plain 4xx answer, before the stream starts
        return StreamingResponse(stream_images(service, job, body), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
