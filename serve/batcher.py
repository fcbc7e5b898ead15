"""Request-level dynamic batching: jobs that can share UNet calls (same size, steps and scheduler; guidance may
differ per image) are
gathered for at most max_wait seconds, up to max_batch images, and run as one pipeline call. Each image keeps its own
seed, so it equals what the request alone would give. A lone job under a load of one request at a time (the last
batch held one job) starts at once: waiting for company that never comes would only add latency."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """The queue holds max_queue jobs already."""


class ShuttingDown(Exception):
    """The server stopped before the job ran."""


class Cancelled(Exception):
    """Every job of a running batch was given up by its client: the pipeline stops at the next step."""


@dataclass
class Job:
    """One request: its images' prompts, negative prompts and seeds, and the settings shared by a batch."""

    prompts: list[str]
    negatives: list[str]
    seeds: list[int]
    settings: dict[str, Any]  # steps, scheduler, width, height (None: the model's default), shared by a batch
    guidance: float | None = None  # the job's own (None: the model's default)
    chunks: int = 1  # 75-token chunks of its longest prompt: a batch shares one embedding length, so one count
    id: int = field(default_factory=itertools.count(1).__next__)
    future: asyncio.Future = None
    enqueued: float = field(default_factory=time.perf_counter)
    started: float | None = None
    step: int = 0
    total: int = 0
    cancelled: bool = False

    def key(self) -> tuple:
        return (*sorted(self.settings.items()), ("chunks", self.chunks))


@dataclass
class Batcher:
    """One worker runs the pipeline (in a thread, so the server keeps answering) on batches of compatible jobs."""

    run: Callable[[list[Job]], list[Any]]  # makes every job's images in one call; returns one result per job
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
        """Cancel what is still queued, let the running batch finish, and end the worker."""
        for job in self.queue:
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
                if job.future.done() or job.cancelled:
                    continue
                if isinstance(result, Exception):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
