"""Prometheus metrics of a worker, served over HTTP on ``BLIPQ_METRICS_PORT``.

One registry per runtime (not the global default), so tests and embedded runtimes never
collide; names are prefixed ``blipq_``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from producer.protocol.jobs import JobResult

_MS_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Counter("blipq_jobs", "Finished jobs.", ["kind", "model", "status"], registry=r)
        self.errors = Counter("blipq_errors", "Failed jobs by error code.", ["code"], registry=r)
        self.batch_size = Histogram(
            "blipq_batch_size",
            "Items per forward pass.",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "blipq_queue_wait_ms", "Submission to start.", ["kind"], buckets=_MS_BUCKETS, registry=r
        )
        self.fetch = Histogram(
            "blipq_fetch_ms",
            "S3 fetch, decode and preprocessing.",
            ["kind"],
            buckets=_MS_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "blipq_inference_ms",
            "Forward pass of the batch an item ran in.",
            ["model"],
            buckets=_MS_BUCKETS,
            registry=r,
        )
        self.model_load = Gauge(
            "blipq_model_load_seconds", "Load plus warm-up time.", ["model"], registry=r
        )
        self.gpu_memory = Gauge(
            "blipq_gpu_memory_bytes",
            "CUDA memory allocated (peak since start).",
            ["kind"],
            registry=r,
        )

    def observe(self, result: JobResult) -> None:
        model = result.model or "unknown"
        self.jobs.labels(result.kind, model, result.status).inc()
        if result.error is not None:
            self.errors.labels(result.error.code.value).inc()
            return
        self.queue_wait.labels(result.kind).observe(result.timings.queue_wait_ms)
        self.fetch.labels(result.kind).observe(result.timings.fetch_ms)
        self.inference.labels(model).observe(result.timings.inference_ms)

    def observe_batch(self, model: str, size: int) -> None:
        self.batch_size.labels(model).observe(size)

    def update_gpu(self) -> None:
        import torch

        if torch.cuda.is_available():
            self.gpu_memory.labels("allocated").set(torch.cuda.memory_allocated())
            self.gpu_memory.labels("peak").set(torch.cuda.max_memory_allocated())

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)
