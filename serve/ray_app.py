"""diffrt's service on Ray Serve: one ingress deployment with the same routes as `diffrt serve`, and model replicas
that each load the package once and batch with the same Batcher. Ray's router picks a replica per request; its
autoscaler sizes the replicas by queued requests.

    serve run diffrt.serve.ray_app:app model=DIR [replicas=N | autoscale=MIN-MAX] [threads=T]
    serve deploy serve/ray-config.yaml                      # the same, from Ray's own config file
    diffrt serve --ray --model DIR --replicas 2             # starts (or joins, --address) a cluster, then runs it
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from diffrt.runtime.errors import UserError

from .app import ApiError, ServeOptions, Service, build_app
from .batcher import Job
from .metrics import Metrics

RETRY = {"Retry-After": "2"}


@serve.deployment(name="Replica", max_ongoing_requests=16, health_check_period_s=5)
class Replica:
    """One model replica: a local Service (pipeline, batcher, checks) answering the ingress."""

    def __init__(self, options: dict) -> None:
        self.service = Service(ServeOptions(**options))
        self.service.load()
        if self.service.load_error:
            raise RuntimeError(self.service.load_error)  # Ray reports the replica as failed, with this reason
        self.started = False

    async def generate(self, job: dict) -> list[tuple[Any, dict]]:
        if not self.started:  # the batcher's worker lives on this replica's event loop
            self.service.batcher.start()
            self.started = True
        return await self.service.run(Job(**job))

    def describe(self) -> dict:
        return {**self.service.describe(), "pid": os.getpid()}

    def check_health(self) -> None:
        if self.service.pipe is None:
            raise RuntimeError("the model is not loaded")


class RemoteService:
    """What the routes need of a service, answered by the replicas through a deployment handle."""

    def __init__(self, replicas: DeploymentHandle, options: ServeOptions) -> None:
        self.replicas, self.options, self.metrics = replicas, options, Metrics()
        self.info: dict | None = None
        self.in_flight = 0
        self.a1111_options: dict[str, Any] = {}

    def live_only(self, what: str) -> None:
        """Refuse what needs a job's steps in this process (they run on a replica elsewhere)."""
        raise ApiError(501, f"{what} is not available through Ray Serve yet; use `diffrt serve` for it")

    @property
    def name(self) -> str:
        return self.info["name"] if self.info else "loading"

    def describe(self) -> dict:
        if self.info is None:
            return {"name": "loading", "model_hash": None, "root": None, "backend": None, "queue": self.in_flight,
                    "ready": False, "load_error": None}
        return {**self.info, "queue": self.in_flight}

    async def refresh(self) -> None:
        """Ask a replica what it serves (until one answers: replicas may still be loading)."""
        while self.info is None:
            try:
                self.info = {k: v for k, v in (await self.replicas.describe.remote()).items() if k != "pid"}
            except Exception:  # not up yet
                await asyncio.sleep(0.5)

    def progress(self) -> dict[str, int]:
        return {"step": 0, "total": 0, "running": self.in_flight, "queued": 0}

    async def generate(self, job: Job, request) -> list[tuple[Any, dict]]:
        """The job run on a replica; a replica lost mid-request is a retryable 503, never a hang."""
        payload = {"prompts": job.prompts, "negatives": job.negatives, "seeds": job.seeds, "settings": job.settings,
                   "guidance": job.guidance}
        response = self.replicas.generate.remote(payload)
        self.in_flight += 1
        try:
            return await asyncio.wait_for(until_gone(response, request), self.options.timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            raise ApiError(504, f"the request took longer than {self.options.timeout_s:g} s") from None
        except Exception as exc:
            raise as_api_error(exc) from None
        finally:
            self.in_flight -= 1


def as_api_error(exc: Exception) -> ApiError:
    """A replica's refusal as it was raised there (Ray wraps it), or a retryable 503 when the replica itself failed
    (its process died or was restarted under the request)."""
    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, ApiError):
        return ApiError(cause.status, cause.message, cause.param, cause.headers)
    if isinstance(cause, UserError):
        return ApiError(400, str(cause))
    return ApiError(503, f"a model replica failed while serving the request ({type(exc).__name__}); retry", headers=RETRY)


async def until_gone(response, request):
    """The replica's answer; cancelled on the replica when the client goes away."""
    async def answer():
        return await response

    task = asyncio.ensure_future(answer())
    while not task.done():
        if await request.is_disconnected():
            response.cancel()
            task.cancel()
            break
        await asyncio.wait({task}, timeout=0.2)
    return await task


@serve.deployment(name="Ingress", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    """The HTTP ingress: the routes of `diffrt serve` over the replicas (no model here, so no CPU reserved)."""

    def __init__(self, replicas: DeploymentHandle, options: dict) -> None:
        self.service = RemoteService(replicas, ServeOptions(**options))

    def __serve_build_asgi_app__(self):
        @asynccontextmanager
        async def lifespan(app):
            asyncio.get_running_loop().create_task(self.service.refresh())
            yield

        return build_app(self.service, lifespan)


def replica_options(args: dict) -> dict:
    """Ray options of the model deployment: a fixed count or an autoscaling range, and each replica's CPUs/GPUs."""
    threads = int(args.get("threads") or 1)
    actor: dict[str, Any] = {"num_cpus": threads}
    if args.get("gpus_per_replica"):
        actor["num_gpus"] = float(args["gpus_per_replica"])
    if args.get("autoscale"):
        lo, _, hi = str(args["autoscale"]).partition("-")
        scaling = {"min_replicas": int(lo), "max_replicas": int(hi or lo), "target_ongoing_requests": 2,
                   "upscale_delay_s": 2, "downscale_delay_s": 30}
        return {"autoscaling_config": scaling, "ray_actor_options": actor}
    return {"num_replicas": int(args.get("replicas") or 1), "ray_actor_options": actor}


def app(args: dict) -> serve.Application:
    """The application builder `serve run diffrt.serve.ray_app:app model=DIR ...` calls."""
    known = {f.name for f in dataclasses.fields(ServeOptions)}
    options = {k: v for k, v in args.items() if k in known and v is not None}
    options["threads"] = int(args.get("threads") or 1)
    for key in ("model", "lora_dir"):  # replicas may start in another folder (or on another node, where it must exist)
        if options.get(key):
            options[key] = str(Path(options[key]).resolve())
    for key, kind in (("max_batch", int), ("max_wait_ms", float), ("max_queue", int), ("timeout_s", float)):
        if key in options:
            options[key] = kind(options[key])
    replicas = Replica.options(**replica_options(args)).bind(options)
    return Ingress.bind(replicas, options)


def run_on_ray(options: ServeOptions, host: str, port: int, address: str | None, replicas: int | None,
               autoscale: str | None) -> int:
    """`diffrt serve --ray`: start (or join) a cluster, deploy, serve until Ctrl-C or SIGTERM, then shut down."""
    import signal
    import sys

    import ray

    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    signal.signal(signal.SIGTERM, stop)  # Ray's driver installs its own (which aborts); a stop shuts down cleanly
    try:
        serve.start(http_options={"host": host, "port": port})
        args = {**dataclasses.asdict(options), "replicas": replicas, "autoscale": autoscale}
        serve.run(app(args), name="diffrt", route_prefix="/")
        shape = f"autoscaling {autoscale}" if autoscale else f"{replicas or 1} replica(s)"
        print(f"diffrt: serving on http://{host}:{port} through Ray Serve, {shape}; Ctrl-C stops it", file=sys.stderr)
        while True:
            signal.pause()
    except KeyboardInterrupt:
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()


def stop(signum, frame) -> None:
    raise KeyboardInterrupt
