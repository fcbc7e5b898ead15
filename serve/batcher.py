"""Dynamic batching of a server's jobs; each image keeps its own seed, so it equals what the request alone gives.

Request-level (RequestBatcher): jobs that can share UNet calls (same size, steps and scheduler; guidance may differ
per image) are gathered for at most max_wait seconds, up to max_batch images, and run as one pipeline call. A lone
job under a load of one request at a time (the last batch held one job) starts at once: waiting for company that
never comes would only add latency.

Step-level (StepBatcher): a job starts at once, and a job arriving while others denoise joins them at the next step,
up to max_batch images: the UNet takes one timestep per row, so rows at different steps (and of different step
counts and schedulers) share each call. A finished job leaves at once; a job whose client went away leaves at the
next step."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """The queue holds max_queue jobs already."""


class ShuttingDown(Exception):
    """The server stopped before the job ran."""


@dataclass
class Job:
    """One request: its images' prompts, negative prompts and seeds, and the settings shared by a batch."""

    prompts: list[str]
    negatives: list[str]
    seeds: list[int]
    settings: dict[str, Any]  # steps, scheduler, width, height (None: the model's default), shared by a batch
    guidance: float | None = None  # the job's own (None: the model's default)
    chunks: int = 1  # 75-token chunks of its longest prompt: a batch shares one embedding length, so one count
    id: str = field(default_factory=lambda: f"job-{uuid.uuid4().hex[:16]}")
    future: asyncio.Future = None
    enqueued: float = field(default_factory=time.perf_counter)
    started: float | None = None
    step: int = 0
    total: int = 0
    cancelled: bool = False  # its client went away, or cancelled it: it stops at the next step
    interrupted: bool = False  # A1111's interrupt: it stops at the next step and answers with the images as they are

    stream: Any = None  # the denoising state between steps (shared by a request-level batch)
    offset: int = 0  # where its images' rows start in that stream
    partial_images: int = 0  # latents kept at this many steps spread over the run, for streamed previews
    snapshots: list = field(default_factory=list)  # (step, its images' latents) at those steps

    def keep_snapshot(self) -> None:
        """After a step (in the worker): keep the job's latents when the step is one of its partial images' marks."""
        n, k = self.total, self.partial_images
        if k and self.step < n and self.step in {math.ceil(n * (j + 1) / (k + 1)) for j in range(k)}:
            self.snapshots.append((self.step, self.stream.x[self.offset:self.offset + len(self.prompts)].copy()))

    def key(self) -> tuple:
        """What jobs sharing a pipeline call must have in common."""
        return (*sorted(self.settings.items()), ("chunks", self.chunks))

    def step_key(self) -> tuple:
        """What jobs sharing one UNet step must have in common: the latent size, text length and applied LoRAs."""
        s = self.settings
        return s["width"], s["height"], s.get("loras", ()), self.chunks

    def settle(self, result: Any) -> None:
        """Hand the job's result (or the exception it ended with) to its request, unless the request is gone."""
        if self.future.done() or self.cancelled:
            return
        if isinstance(result, Exception):
            self.future.set_exception(result)
        else:
            self.future.set_result(result)


@dataclass
class Batcher:
    """One worker runs the pipeline (in a thread, so the server keeps answering) on batches of compatible jobs; the
    subclasses say how jobs are batched."""

    max_batch: int = 4
    max_wait: float = 0.05
    max_queue: int = 64
    on_batch: Callable[[list[Job], float], None] | None = None
    queue: list[Job] = field(default_factory=list)
    running: list[Job] = field(default_factory=list)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    worker: asyncio.Task | None = None
    last_batch_jobs: int = 0

    def start(self) -> None:
        self.worker = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        """Cancel what is still queued or running, and end the worker."""
        for job in self.queue + self.running:
            if not job.future.done():
                job.future.set_exception(ShuttingDown())
        self.queue.clear()
        if self.worker:
            self.worker.cancel()
            await asyncio.gather(self.worker, return_exceptions=True)

    async def submit(self, job: Job) -> Any:
        if len(self.queue) >= self.max_queue:
            raise QueueFull
        job.future = asyncio.get_running_loop().create_future()
        self.queue.append(job)
        self.wakeup.set()
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:  # the client went away: drop the job, or mark it so its batch can stop early
            job.cancelled = True
            if job in self.queue:
                self.queue.remove(job)
            raise

    async def _work(self) -> None:
        raise NotImplementedError


@dataclass
class RequestBatcher(Batcher):
    run: Callable[[list[Job]], list[Any]] | None = None  # makes every job's images in one call; one result per job

    def _take(self) -> list[Job]:
        """The oldest job and the queued jobs that fit its batch, in arrival order."""
        first, batch, images = self.queue[0], [], 0
        for job in list(self.queue):
            if job.key() == first.key() and images + len(job.prompts) <= max(self.max_batch, len(first.prompts)):
                batch.append(job)
                images += len(job.prompts)
                self.queue.remove(job)
        return batch

    async def _work(self) -> None:
        while True:
            if not self.queue:
                self.wakeup.clear()
                await self.wakeup.wait()
            if len(self.queue) > 1 or self.last_batch_jobs > 1:
                await asyncio.sleep(max(0.0, self.max_wait - (time.perf_counter() - self.queue[0].enqueued)))
            if not self.queue:
                continue
            batch = self._take()
            self.running, self.last_batch_jobs = batch, len(batch)
            started = time.perf_counter()
            for job in batch:
                job.started = started
            try:
                results = await asyncio.to_thread(self.run, batch)
            except Exception as exc:  # reported to each job's request; the worker goes on
                results = [exc] * len(batch)
            finally:
                self.running = []
            if self.on_batch:
                self.on_batch(batch, time.perf_counter() - started)
            for job, result in zip(batch, results):
                job.settle(result)


@dataclass
class StepBatcher(Batcher):
    begin: Callable[[Job], Any] | None = None  # the job's stream: checked, its prompts encoded (run in the thread)
    step: Callable[[list[Job]], None] | None = None  # one UNet step for every running job's stream
    finish: Callable[[Job], Any] | None = None  # the job's result from its finished stream
    on_step: Callable[[list[Job]], None] | None = None

    def _fits(self, job: Job) -> bool:
        """Whether job may join the running ones: same step key and max_batch images (a lone job may exceed it)."""
        if not self.running:
            return True
        images = sum(len(j.prompts) for j in self.running)
        return job.step_key() == self.running[0].step_key() and images + len(job.prompts) <= self.max_batch

    async def _admit(self) -> None:
        """Queued jobs that fit the running set, oldest first, the first of an empty set setting its key; none after
        one that cannot join, so that it is not passed over for ever."""
        for job in list(self.queue):
            if job not in self.queue:  # its client went away while an earlier job's prompts were encoded
                continue
            if not self._fits(job):
                break
            self.queue.remove(job)
            job.started = time.perf_counter()
            try:
                job.stream = await asyncio.to_thread(self.begin, job)
            except Exception as exc:  # this job's own failure (its prompts); the others go on
                job.settle(exc)
                continue
            self.running.append(job)

    def _steps(self) -> None:
        """Steps of the running jobs (in the worker's thread, without going back to the event loop between them)
        until one is done or given up, or a job waits to join."""
        while True:
            self.step(self.running)
            if self.on_step:
                self.on_step(self.running)
            if self._joinable() or any(j.stream.done or j.cancelled for j in self.running):
                return

    def _joinable(self) -> bool:
        """Whether the oldest queued job could join the running ones now (read from the worker's thread)."""
        queue = list(self.queue)
        return bool(queue) and self._fits(queue[0])

    async def _work(self) -> None:
        while True:
            if not self.queue and not self.running:
                self.wakeup.clear()
                await self.wakeup.wait()
            self.running = [j for j in self.running if not j.cancelled]
            if self.queue:
                await self._admit()
            if not self.running:
                continue
            try:
                await asyncio.to_thread(self._steps)
            except Exception as exc:  # a failed UNet call fails the jobs in it; the worker goes on
                for job in self.running:
                    job.settle(exc)
                self.running = []
                continue
            for job in [j for j in self.running if j.stream.done]:
                self.running.remove(job)
                try:
                    result = await asyncio.to_thread(self.finish, job)
                except Exception as exc:
                    result = exc
                job.settle(result)
                if self.on_batch:
                    self.on_batch([job], time.perf_counter() - job.started)
