"""The HTTP service: OpenAI's images API and AUTOMATIC1111's txt2img over one batched pipeline, with health and
Prometheus metrics. `create_app(...)` is an ASGI app factory; `diffrt serve` runs it on uvicorn."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from diffrt.runtime.errors import UserError

from .batcher import Batcher, Job, QueueFull, RequestBatcher, ShuttingDown, StepBatcher
from .metrics import Metrics

LOG = logging.getLogger("diffrt.serve")
MAX_BODY = 32_000_000  # bytes: an image-to-image body carries its image
OPEN_ROUTES = ("/", "/health", "/metrics")  # no API key needed: the page itself holds nothing
PAGE = Path(__file__).with_name("page.html")


@dataclass
class ServeOptions:
    model: Path | None = None
    backend: str = "auto"
    threads: int | None = None
    max_batch: int = 4
    max_wait_ms: float = 50
    max_queue: int = 64
    timeout_s: float = 600
    api_key: str | None = None
    lora_dir: Path | None = None  # LoRAs a request may name (NAME.safetensors)
    batching: str = "auto"  # "step", "request", or auto: step where the UNet takes one timestep per row
    warm_up: bool = False  # run every batch size up to max_batch once before answering ready
    release_memory: bool = True  # RSS back near idle after each request (onnxruntime's CPU arena shrinks)
    residency: str | None = None  # sequential: one stage's engines open at a time (Pipeline's)
    memory_budget: float | None = None  # GB the process plans each request to fit (Pipeline's)
    cache: str | None = None  # DeepCache (Pipeline's): its graphs opened, the interval for requests naming none


BATCHING = ("auto", "step", "request")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}

    def __reduce__(self):  # rebuilt whole on the far side of a process boundary (a Ray replica's answer)
        return ApiError, (self.status, self.message, self.param, self.headers)


def step_needs_rows() -> str:
    from diffrt.runtime.families import PER_ROW_FIX

    return f"step-level batching needs a UNet that takes one timestep per row: {PER_ROW_FIX}; or use --batching request"


def error_body(message: str, kind: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


class Service:
    """The loaded pipeline, its batcher and metrics; requests become jobs."""

    def __init__(self, options: ServeOptions) -> None:
        self.options, self.metrics = options, Metrics()
        self.pipe = None
        self.load_error: str | None = None
        self.batcher: Batcher | None = None  # made once the model is loaded: its UNet decides what auto batching is
        self.a1111_options: dict[str, Any] = {}  # set by POST /sdapi/v1/options over a1111.default_options
        from .jobs import JobStore

        self.jobs = JobStore(self)

    def live_only(self, what: str) -> None:
        """Nothing to refuse: jobs, streaming, previews and interrupt all work on a local service."""

    def load(self) -> None:
        from diffrt.runtime.pipeline import Pipeline

        try:
            pipe = Pipeline.from_package(self.options.model, backend=self.options.backend, threads=self.options.threads,
                                         release_memory=self.options.release_memory, residency=self.options.residency,
                                         memory_budget=self.options.memory_budget, cache=self.options.cache)
            self.batcher = self.make_batcher(pipe)
            if self.options.warm_up:
                self.warm_up(pipe)
            self.pipe = pipe
        except Exception as exc:  # reported by /health; the process stays up for an operator to see why
            self.load_error = f"{type(exc).__name__}: {exc}"

    def warm_up(self, pipe: Any) -> None:
        """One step of every batch size up to max_batch at the model's default size, guided as by default: a backend
        that compiles per input shape (ov-cpu) has then compiled what serving at that size meets."""
        for n in range(1, self.options.max_batch + 1):
            pipe([""] * n, steps=1, seed=0)

    def make_batcher(self, pipe: Any) -> Batcher:
        """Step-level batching where the UNet takes one timestep per row (auto), else request-level."""
        o = self.options
        if o.batching not in BATCHING:
            raise UserError(f"unknown batching {o.batching!r}; use {', '.join(BATCHING)}")
        if o.batching == "step" and not pipe.per_row_timesteps:
            raise UserError(step_needs_rows())
        common = {"max_batch": o.max_batch, "max_wait": o.max_wait_ms / 1000, "max_queue": o.max_queue,
                  "on_batch": self.record_batch}
        if o.batching == "request" or not pipe.per_row_timesteps:
            return RequestBatcher(**common, run=self.run_batch)
        return StepBatcher(**common, begin=self.begin_job, step=self.step_jobs, finish=self.finish_job,
                           on_step=self.record_step)

    @property
    def batching(self) -> str | None:
        return None if self.batcher is None else "step" if isinstance(self.batcher, StepBatcher) else "request"

    @property
    def name(self) -> str:
        return self.pipe.package.name if self.pipe else "loading"

    def run_batch(self, jobs: list[Job]) -> list[Any]:
        """Every job's images from one pipeline call (runs in the batcher's thread); the call stops early when every
        job is given up (Cancelled) or interrupted (the images as they stand)."""
        from diffrt.runtime.stream import Cancelled

        stream = self.pipe.begin(request_of(jobs, jobs[0].settings))
        offset = 0
        for job in jobs:
            job.stream, job.offset = stream, offset
            offset += len(job.prompts)
        while not stream.done:
            self.pipe.step([stream])
            for job in jobs:
                job.step, job.total = stream.i, stream.total
                job.keep_snapshot()
            if all(job.cancelled for job in jobs):
                raise Cancelled(f"every request of the batch went away at step {stream.i}")
            if all(job.cancelled or job.interrupted for job in jobs):
                stream.stop()
        result = self.pipe.finish(stream)
        self.metrics.batch_images.observe(sum(len(j.prompts) for j in jobs))
        return self.split(jobs, result)

    def split(self, jobs: list[Job], result: Any) -> list[Any]:
        """Each job's (image, settings) pairs from one pipeline result; its stage times into the metrics."""
        for stage in ("text_encoder", "vae_decode"):
            self.metrics.stage.labels(stage).observe(result.timings[stage])
        self.metrics.stage.labels("unet").observe(sum(result.timings["unet"]))
        out, start = [], 0
        for job in jobs:
            out.append([(result.images[i], result.image_settings(i)) for i in range(start, start + len(job.prompts))])
            start += len(job.prompts)
        return out

    def begin_job(self, job: Job) -> Any:
        """Step-level batching: the job's stream, its prompts encoded (its LoRAs are those of the running jobs)."""
        return self.pipe.begin(request_of([job], job.settings))

    def step_jobs(self, jobs: list[Job]) -> None:
        self.pipe.step([j.stream for j in jobs])
        for job in jobs:
            if job.interrupted:
                job.stream.stop()
            job.step, job.total = job.stream.i, job.stream.total
            job.keep_snapshot()

    def interrupt(self) -> int:
        """A1111's interrupt: every running job stops at its next step and answers with its images as they stand."""
        running = self.batcher.running if self.batcher else []
        for job in running:
            job.interrupted = True
        return len(running)

    def preview(self, job: Job) -> list[Any] | None:
        """Quick images of a running job's latents as they stand (None before its first step)."""
        stream = job.stream
        if stream is None or self.pipe is None or job.step == 0:
            return None
        x = stream.x[job.offset:job.offset + len(job.prompts)]
        return self.pipe.preview(x, stream.req.width, stream.req.height)

    def finish_job(self, job: Job) -> Any:
        return self.split([job], self.pipe.finish(job.stream))[0]

    def record_step(self, jobs: list[Job]) -> None:
        self.metrics.batch_images.observe(sum(len(j.prompts) for j in jobs))

    def progress(self) -> dict[str, Any]:
        """Step i of n of the oldest running job and of each (jobs, by id), and how many jobs run and wait."""
        running = self.batcher.running if self.batcher else []
        step, total = (running[0].step, running[0].total) if running else (0, 0)
        return {"step": step, "total": total, "running": len(running), "queued": len(self.batcher.queue) if self.batcher else 0,
                "jobs": [{"id": j.id, "step": j.step, "total": j.total} for j in running]}

    def record_batch(self, jobs: list[Job], seconds: float) -> None:
        for job in jobs:
            self.metrics.queue_wait.observe(job.started - job.enqueued)
        self.metrics.images.inc(sum(len(j.prompts) for j in jobs))

    def check(self, job: Job) -> None:
        """Refuse a job before it is queued (the pipeline's own checks), so that one bad request never fails a batch
        it shares."""
        if self.pipe is None:
            raise ApiError(503, "the model is still loading; retry shortly", headers={"Retry-After": "5"})
        from diffrt.runtime.schedulers import short_name

        request = request_of([job], job.settings)
        req, sched = self.pipe.check(request, self.pipe.source_pixels(request))
        self.pipe.check_loras(list(job.settings.get("loras", ())))
        # the package's defaults in place: requests that differ only by leaving one out share a batch
        job.settings.update(width=req.width, height=req.height, steps=req.steps, scheduler=short_name(sched),
                            prompt_syntax=req.prompt_syntax)
        job.chunks = self.pipe.chunk_count(job.prompts + job.negatives, req.prompt_syntax)

    def describe(self) -> dict[str, Any]:
        """What /health and A1111's model list say of this instance."""
        pkg = self.pipe.package if self.pipe else None
        return {"name": self.name, "model_hash": pkg.model_hash if pkg else None, "root": str(pkg.root) if pkg else None,
                "backend": self.pipe.backend if self.pipe else None, "queue": len(self.batcher.queue) if self.batcher else 0,
                "batching": self.batching, "controlnets": controlnet_hashes(pkg) if pkg else {},
                "ready": self.pipe is not None, "load_error": self.load_error}

    async def admit(self, job: Job) -> None:
        """The job checked (in a worker thread: a LoRA cache miss merges weights for seconds) before it is queued."""
        await asyncio.to_thread(self.check, job)

    async def run(self, job: Job) -> list[tuple[Any, dict]]:
        """The job's images, checked, queued and batched, or an ApiError saying why not (timeout included)."""
        await self.admit(job)
        return await self.wait(job)

    async def wait(self, job: Job) -> list[tuple[Any, dict]]:
        """An admitted job queued and batched; its images, or an ApiError saying why not (timeout included)."""
        self.metrics.queue_depth.set(len(self.batcher.queue) + 1)
        try:
            return await asyncio.wait_for(self.batcher.submit(job), self.options.timeout_s)
        except QueueFull:
            raise ApiError(429, f"the queue is full ({self.options.max_queue} requests); retry later",
                           headers={"Retry-After": "2"}) from None
        except asyncio.TimeoutError:
            raise ApiError(504, f"the request took longer than {self.options.timeout_s:g} s") from None
        except ShuttingDown:
            raise ApiError(503, "the server is shutting down; retry on another instance", headers={"Retry-After": "5"}) from None
        finally:
            self.metrics.queue_depth.set(len(self.batcher.queue))

    async def generate(self, job: Job, request: Request) -> list[tuple[Any, dict]]:
        """The job's images; its work is given up when the client disconnects or the timeout passes."""
        return await until_disconnect(self.run(job), request)


async def until_disconnect(work, request: Request):
    """Await work, cancelling it when the client goes away (then one log line, and a 499 that nobody reads)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(watch_disconnect(request, task))
    try:
        return await task
    except asyncio.CancelledError:
        if not (watcher.done() and not watcher.cancelled() and watcher.result()):
            raise  # cancelled from elsewhere (the server stopping)
        LOG.warning("%s %s: the client went away; its work stopped at the next step", request.method, request.url.path)
        raise ApiError(499, "the client closed the request") from None
    finally:
        watcher.cancel()


async def watch_disconnect(request: Request, task: asyncio.Future) -> bool:
    """Cancel task when the client goes away (checked every 0.2 s); whether it did."""
    while not task.done():
        if await request.is_disconnected():
            task.cancel()
            return True
        await asyncio.sleep(0.2)
    return False


def with_loras(options: ServeOptions, prompt: str, named: dict[str, float]) -> tuple[str, tuple]:
    """The prompt without its <lora:NAME:SCALE> tags, and the LoRAs the tags and the request's loras field name."""
    from diffrt.runtime.lora import named_loras, prompt_loras

    prompt, tagged = prompt_loras(prompt)
    folder = Path(options.lora_dir) if options.lora_dir else None
    return prompt, tuple(named_loras(folder, tagged + list(named.items())))


def encode(image, settings: dict | None, fmt: str = "png") -> str:
    """The image as base64 in fmt, with its settings in the metadata (None: none, for a preview)."""
    from diffrt.runtime.images import encoded

    pil_format = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt]
    image, options = encoded(image, pil_format, settings) if settings is not None else (image.convert("RGB"), {})
    buffer = BytesIO()
    image.save(buffer, format=pil_format, **options)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def controlnet_hashes(package: Any) -> dict[str, str]:
    """The package's ControlNets and the first 8 hex digits of each graph's sha256 (A1111's model list shows them)."""
    files = package.manifest.get("files", {})
    return {n: files.get(f"controlnet/{n}/model.onnx", {}).get("sha256", "")[:8] for n in package.controlnets()}


def image_from(data: Any, field: str) -> Any:
    """A Pillow image from base64 (or a data: URL) or uploaded bytes, refused in one line naming the field."""
    from PIL import Image, UnidentifiedImageError

    try:
        raw = data if isinstance(data, bytes) else base64.b64decode(str(data).split(",", 1)[-1], validate=True)
        with Image.open(BytesIO(raw)) as image:
            image.load()
            return image.copy()
    except (ValueError, OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ApiError(400, f"{field} is not an image diffrt can read ({type(exc).__name__}); send a PNG, JPEG or WebP"
                       + (" as base64" if not isinstance(data, bytes) else ""), field) from None


def validated(schema: Any, data: Any) -> Any:
    """data validated by a pydantic schema, a failure answered as a body's would be (422 naming the field)."""
    from fastapi.exceptions import RequestValidationError
    from pydantic import ValidationError

    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


def request_of(jobs: list[Job], settings: dict[str, Any]) -> Any:
    """One GenerationRequest for jobs sharing a pipeline call: their prompts, negatives, seeds and guidance scales
    (None: the package's default) in order, the shared settings, the LoRAs they name."""
    from diffrt.runtime.request import GenerationRequest

    shared = {k: v for k, v in settings.items() if k != "loras"}
    return GenerationRequest([p for j in jobs for p in j.prompts], [n for j in jobs for n in j.negatives],
                             seeds=[s for j in jobs for s in j.seeds],
                             guidance_scale=[j.guidance for j in jobs for _ in j.prompts],
                             loras=list(settings.get("loras", ())), **shared)


def seeds_from(seed: int | None, count: int) -> list[int]:
    from diffrt.runtime.request import image_seeds

    return image_seeds(seed, count)


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        kind = "rate_limit_error" if exc.status == 429 else "invalid_request_error" if exc.status < 500 else "server_error"
        return JSONResponse(error_body(exc.message, kind, exc.param), exc.status, headers=exc.headers)

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "invalid_request_error"), 400)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(f"the body is not valid JSON ({first.get('msg')})", "invalid_request_error"), 400)
        return JSONResponse(error_body(f"{field or 'body'}: {first.get('msg')}", "invalid_request_error", field), 422)


class Guard:
    """Plain ASGI middleware (it leaves the app's view of client disconnects intact): body size cap, API key,
    request counts by route template (one label for paths no route matches, so unknown paths add no series) and
    status."""

    def __init__(self, app, service: Service, routes: list) -> None:
        self.app, self.service, self.routes = app, service, routes

    def route_of(self, scope) -> str:
        from starlette.routing import Match

        for route in self.routes:
            if route.matches(scope)[0] != Match.NONE:
                return getattr(route, "path", "other")
        return "unmatched"

    def refusal(self, scope) -> JSONResponse | None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        length = headers.get("content-length", "0")
        if length.isdigit() and int(length) > MAX_BODY:
            return JSONResponse(error_body(f"the body is over {MAX_BODY} bytes", "invalid_request_error"), 413)
        key = self.service.options.api_key
        given = headers.get("authorization", "").removeprefix("Bearer ").strip() or headers.get("x-api-key")
        if key and scope["path"] not in OPEN_ROUTES and not hmac.compare_digest((given or "").encode(), key.encode()):
            return JSONResponse(error_body("a valid API key is needed (Authorization: Bearer KEY)", "authentication_error"), 401)
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self.refusal(scope)
            if refusal is not None:
                return await refusal(scope, receive, sending)
            await self.app(scope, receive, sending)
        finally:
            self.service.metrics.requests.labels(self.route_of(scope), str(status[0])).inc()


def add_plumbing(app: FastAPI, service: Service) -> None:
    """The guard middleware; /health, /metrics and the progress stream."""
    app.add_middleware(Guard, service=service, routes=app.router.routes)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE.read_text(encoding="utf-8")

    @app.get("/health")
    async def health() -> JSONResponse:
        info = service.describe()
        if info["load_error"]:
            return JSONResponse({"status": "failed", "error": info["load_error"]}, 500)
        if not info["ready"]:
            return JSONResponse({"status": "loading"}, 503)
        return JSONResponse({"status": "ok", "model": info["name"], "backend": info["backend"], "queue": info["queue"],
                             "batching": info.get("batching"),
                             **({"replicas": info["replicas"]} if "replicas" in info else {})})

    @app.get("/v1/progress/stream")
    async def progress_stream(request: Request) -> StreamingResponse:
        """Server-sent events: the running batch's step every 0.25 s, until nothing has run or waited for a second."""

        async def events():
            idle_since = None
            deadline = time.monotonic() + service.options.timeout_s
            while time.monotonic() < deadline and not await request.is_disconnected():
                state = service.progress()
                yield f"data: {json.dumps(state)}\n\n"
                busy = state["running"] or state["queued"]
                idle_since = None if busy else idle_since or time.monotonic()
                if idle_since and time.monotonic() - idle_since > 1.0:
                    return
                await asyncio.sleep(0.25)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def create_app(options: ServeOptions | None = None, **kwargs: Any) -> FastAPI:
    """The ASGI app; the model loads in the background at startup (/health says 503 until it is ready)."""
    service = Service(options or ServeOptions(**kwargs))

    async def load() -> None:
        await asyncio.to_thread(service.load)
        if service.batcher:
            service.batcher.start()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.loading = asyncio.get_running_loop().create_task(load())
        yield
        if service.batcher:
            await service.batcher.stop()

    return build_app(service, lifespan)


def build_app(service: Any, lifespan: Any = None) -> FastAPI:
    """The routes over a service: a local Service, or a Ray ingress's stand-in for replicas elsewhere (which has the
    same describe, generate, progress, options and metrics)."""
    app = FastAPI(title="diffrt", lifespan=lifespan)
    app.state.service = service
    add_error_handlers(app)
    add_plumbing(app, service)
    from .a1111 import add_a1111_routes
    from .controlnet import add_controlnet_routes
    from .jobs import add_job_routes
    from .openai_api import add_openai_routes

    add_openai_routes(app, service)
    add_a1111_routes(app, service)
    add_controlnet_routes(app, service)
    add_job_routes(app, service)
    return app
