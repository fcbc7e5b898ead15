"""Prometheus metrics of one service instance (its own registry, so several apps in one process do not mix)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("diffrt_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.queue_depth = Gauge("diffrt_queue_depth", "jobs waiting for the pipeline", registry=r)
        self.batch_images = Histogram("diffrt_batch_images", "images per UNet call (request-level batching: per pipeline call)",
                                      buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)
        self.queue_wait = Histogram("diffrt_queue_wait_seconds", "time a job waited before its batch ran",
                                    buckets=STAGE_BUCKETS, registry=r)
        self.stage = Histogram("diffrt_stage_seconds", "pipeline stage time per batch", ["stage"], buckets=STAGE_BUCKETS,
                               registry=r)
        self.images = Counter("diffrt_images", "images generated", registry=r)
