"""Jobs that outlive their request: `POST /v1/jobs` answers at once with an id, the job is followed to its end in
the background, and its state, progress, queue position, preview and images are read by id (JSON or server-sent
events) until it is cancelled or, finished, kept for a bounded time and count."""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from .batcher import Job

KEEP_S = 600  # how long a finished job is kept for its client to read
KEEP_COUNT = 200  # and how many at most
POLL_S = 0.1  # how often a stream looks for a new step
PREVIEW_SIDE = 512  # previews over HTTP are at most this many pixels on their longer side


@dataclass
class Tracked:
    """A job followed in the background: its task, where it stands, and its API's answer once done."""

    job: Job
    answer: Callable[[list[tuple[Any, dict]]], dict]  # the images as the request's API answers them
    created: float = field(default_factory=time.time)
    task: asyncio.Task | None = None
    state: str = "queued"  # queued, running, succeeded, failed, cancelled
    result: dict | None = None
    error: dict | None = None
    finished: float | None = None


class JobStore:
    """The jobs a service follows, by id; finished ones are dropped after KEEP_S seconds or past KEEP_COUNT."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self.jobs: OrderedDict[str, Tracked] = OrderedDict()

    def start(self, job: Job, answer: Callable[[list[tuple[Any, dict]]], dict]) -> Tracked:
        """Follow an admitted job to its end in the background."""
        self.prune()
        tracked = Tracked(job, answer)
        self.jobs[job.id] = tracked
        tracked.task = asyncio.get_running_loop().create_task(self._follow(tracked))
        return tracked

    async def _follow(self, tracked: Tracked) -> None:
        from .app import ApiError, error_body

        try:
            images = await self.service.wait(tracked.job)
            tracked.result, tracked.state = tracked.answer(images), "succeeded"
        except asyncio.CancelledError:
            tracked.state = "cancelled"
        except ApiError as exc:
            tracked.state, tracked.error = "failed", error_body(exc.message, "server_error")["error"]
        except Exception as exc:  # the pipeline's refusal or failure, reported to whoever reads the job
            tracked.state, tracked.error = "failed", error_body(str(exc), "server_error")["error"]
        finally:
            tracked.finished = time.time()

    def get(self, job_id: str) -> Tracked:
        from .app import ApiError

        self.prune()
        if job_id not in self.jobs:
            raise ApiError(404, f"no job {job_id!r} (finished jobs are kept {KEEP_S} s)", "id")
        return self.jobs[job_id]

    def cancel(self, job_id: str) -> Tracked:
        """Cancel a queued or running job (a running one stops at its next step); a finished one is left as it is."""
        tracked = self.get(job_id)
        if tracked.task is not None and not tracked.task.done():
            tracked.task.cancel()
        return tracked

    def prune(self) -> None:
        now = time.time()
        done = [k for k, t in self.jobs.items() if t.finished is not None]
        for key in done:
            if now - self.jobs[key].finished > KEEP_S or len(self.jobs) > KEEP_COUNT:
                del self.jobs[key]

    def state(self, tracked: Tracked) -> str:
        if tracked.finished is None and tracked.job.started is not None:
            return "running"
        return tracked.state

    def position(self, tracked: Tracked) -> int | None:
        """Jobs ahead of it in the queue (0: next), None when it is not queued."""
        queue = self.service.batcher.queue if self.service.batcher else []
        return queue.index(tracked.job) if tracked.job in queue else None

    async def view(self, tracked: Tracked, preview: bool = True) -> dict[str, Any]:
        """What GET /v1/jobs/{id} answers: state, progress, queue position, a preview while it runs, the result."""
        job, state = tracked.job, self.state(tracked)
        view = {"id": job.id, "object": "job", "state": state, "created": int(tracked.created), "step": job.step,
                "total": job.total, "progress": job.step / job.total if job.total else 0.0,
                "eta_s": eta(job), "queue_position": self.position(tracked), "seeds": job.seeds}
        if preview and state == "running":
            view["preview"] = await self.preview_b64(job)
        if tracked.result is not None:
            view["result"] = tracked.result
        if tracked.error is not None:
            view["error"] = tracked.error
        return view

    async def preview_b64(self, job: Job) -> list[str] | None:
        """The job's preview images as base64 PNGs, at most PREVIEW_SIDE on a side (None before its first step)."""
        from .app import encode

        images = await asyncio.to_thread(self.service.preview, job)
        if images is None:
            return None
        return [encode(thumbnail(im), None) for im in images]

    async def events(self, tracked: Tracked, is_gone: Callable[[], Any]) -> AsyncIterator[str]:
        """Server-sent events: the job's view each time its state or step changes, the last one when it ends."""
        last = None
        while not await is_gone():
            job = tracked.job
            now = (self.state(tracked), job.step, self.position(tracked))
            if now != last:
                last = now
                yield sse(await self.view(tracked), "job")
            if tracked.finished is not None:
                return
            await asyncio.sleep(POLL_S)


def eta(job: Job) -> float | None:
    """Seconds its remaining steps should take at its rate so far (None before a step is done)."""
    if not job.step or job.started is None or not job.total:
        return None
    spent = time.perf_counter() - job.started
    return round(spent / job.step * (job.total - job.step), 2)


def thumbnail(image: Any) -> Any:
    if max(image.size) <= PREVIEW_SIDE:
        return image
    copy = image.copy()
    copy.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    return copy


def sse(data: dict, event: str | None = None) -> str:
    """One server-sent event."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n"


def job_request(data: Any, api: str | None) -> tuple[str, Any]:
    """Which API a job's body is written for (api, else guessed from A1111's own fields) and the body validated."""
    from .app import ApiError, validated
    from .schemas import OpenAIImageRequest, Txt2ImgRequest

    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object: an OpenAI images request or an A1111 txt2img request")
    if api not in (None, "openai", "a1111"):
        raise ApiError(400, f"api {api!r} is not known; use openai or a1111", "api")
    kind = api or ("a1111" if A1111_FIELDS & set(data) else "openai")
    return kind, validated(Txt2ImgRequest if kind == "a1111" else OpenAIImageRequest, data)


A1111_FIELDS = {"cfg_scale", "sampler_name", "sampler_index", "batch_size", "n_iter", "width", "height", "override_settings"}


def add_job_routes(app: Any, service: Any) -> None:
    from .a1111 import txt2img_answer, txt2img_job
    from .openai_api import openai_answer, openai_job

    @app.post("/v1/jobs", status_code=202)
    async def create(request: Request, api: str | None = None) -> dict:
        """Queue a job (an OpenAI images body or an A1111 txt2img body) and answer at once with its id."""
        from .app import ApiError

        service.live_only("jobs")
        try:
            data = await request.json()
        except ValueError as exc:
            raise ApiError(400, f"the body is not valid JSON ({exc})") from None
        kind, body = job_request(data, api)
        job = txt2img_job(service, body) if kind == "a1111" else openai_job(service, body)
        await service.admit(job)
        answer = txt2img_answer(service, body, job) if kind == "a1111" else openai_answer(body)
        return await service.jobs.view(service.jobs.start(job, answer))

    @app.get("/v1/jobs")
    async def listing() -> dict:
        store = service.jobs
        return {"object": "list", "data": [{"id": k, "state": store.state(t)} for k, t in store.jobs.items()]}

    @app.get("/v1/jobs/{job_id}")
    async def read(job_id: str, preview: bool = True) -> dict:
        return await service.jobs.view(service.jobs.get(job_id), preview)

    @app.get("/v1/jobs/{job_id}/events")
    async def events(job_id: str, request: Request) -> StreamingResponse:
        tracked = service.jobs.get(job_id)
        return StreamingResponse(service.jobs.events(tracked, request.is_disconnected), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.delete("/v1/jobs/{job_id}")
    async def cancel(job_id: str) -> JSONResponse:
        tracked = service.jobs.cancel(job_id)
        if tracked.task is not None:
            await asyncio.wait({tracked.task}, timeout=5)
        return JSONResponse(await service.jobs.view(tracked, preview=False))
