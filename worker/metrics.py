"""Prometheus metrics of a worker, served over HTTP on ``BLIPQ_METRICS_PORT``.

One registry per runtime (not the global default), so tests and embedded runtimes never
collide; blipq's names are prefixed ``blipq_``, durations are in seconds (Prometheus' base
unit), and the registry also carries the standard ``process_*`` and ``python_*`` collectors.
Per-item figures (queue wait, fetch, a job's whole time) are observed once per job, per-batch
figures (the forward pass, the batch size) once per batch.

A split worker (``worker.split``) observes per-item figures in its intake processes and
per-batch ones in its model process: each child writes its values to files in one directory
(prometheus_client's multiprocess mode, ``PROMETHEUS_MULTIPROC_DIR``, set by the launcher), and
the launcher serves their sum on the one port (``serve_processes``), with each process's memory
and CPU time (``ProcessesCollector``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from producer.protocol.jobs import JobResult

DEFAULT_PORT = 9464
"""The port deploy/ serves metrics on: not 9100, node_exporter's, which GPU hosts usually run."""

_SECONDS_BUCKETS = (
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_ITEM = ["kind", "model"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.jobs = Counter("blipq_jobs", "Finished jobs.", [*_ITEM, "status"], registry=r)
        self.errors = Counter(
            "blipq_errors", "Failed jobs by error code.", [*_ITEM, "code"], registry=r
        )
        self.queue_wait = Histogram(
            "blipq_queue_wait_seconds",
            "Per job: submission to start.",
            _ITEM,
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.fetch = Histogram(
            "blipq_fetch_seconds",
            "Per job: S3 fetch, decode and preprocessing.",
            _ITEM,
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.job = Histogram(
            "blipq_job_seconds",
            "Per job: submission to result, ok or not.",
            _ITEM,
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "blipq_inference_seconds",
            "Per batch: one forward pass (a model's batch may serve several kinds).",
            ["model"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "blipq_batch_size",
            "Per batch: items in one forward pass.",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.model_load = Gauge(
            "blipq_model_load_seconds",
            "Load plus warm-up time.",
            ["model"],
            registry=r,
            multiprocess_mode="mostrecent",  # the model process's, in a split worker
        )
        self.gpu_memory = Gauge(
            "blipq_gpu_memory_bytes",
            "CUDA memory allocated (peak since start).",
            ["kind"],
            registry=r,
            multiprocess_mode="mostrecent",
        )

    def observe(self, result: JobResult) -> None:
        """One finished job (per-item figures)."""
        labels = (result.kind, result.model or "unknown")
        self.jobs.labels(*labels, result.status).inc()
        self.job.labels(*labels).observe(result.timings.total_ms / 1000)
        self.queue_wait.labels(*labels).observe(result.timings.queue_wait_ms / 1000)
        if result.error is not None:
            self.errors.labels(*labels, result.error.code.value).inc()
            return
        self.fetch.labels(*labels).observe(result.timings.fetch_ms / 1000)

    def observe_batch(self, model: str, size: int, seconds: float) -> None:
        """One forward pass (per-batch figures)."""
        self.batch_size.labels(model).observe(size)
        self.inference.labels(model).observe(seconds)

    def update_gpu(self) -> None:
        import torch

        if torch.cuda.is_available():
            self.gpu_memory.labels("allocated").set(torch.cuda.memory_allocated())
            self.gpu_memory.labels("peak").set(torch.cuda.max_memory_allocated())

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)


MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
"""Where prometheus_client (multiprocess mode) writes a process's values: set for each child of
a split worker, read by prometheus_client when it is imported."""


class ProcessesCollector(Collector):
    """Resident memory and CPU time of each process of a split worker, by role (``process``:
    ``model``, ``intake-0``, ...), read from ``/proc`` at each scrape (Linux)."""

    def __init__(self, processes: Callable[[], dict[str, int]]) -> None:
        self.processes = processes
        self._ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        memory = GaugeMetricFamily(
            "blipq_process_resident_memory_bytes",
            "Resident memory of each process of a split worker.",
            labels=["process"],
        )
        cpu = CounterMetricFamily(
            "blipq_process_cpu_seconds",
            "User and system CPU time of each process of a split worker.",
            labels=["process"],
        )
        for role, pid in sorted(self.processes().items()):
            try:
                rss = resident_bytes(pid)
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, ValueError):
                continue  # ended between the listing and the scrape
            memory.add_metric([role], rss)
            cpu.add_metric([role], (int(fields[11]) + int(fields[12])) / self._ticks)
        yield memory
        yield cpu


def resident_bytes(pid: int) -> int:
    """A process's resident memory (``VmRSS`` of ``/proc/PID/status``), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for process {pid}")


def serve_processes(
    port: int, addr: str, directory: str, processes: Callable[[], dict[str, int]]
) -> None:
    """Serve the metrics every process wrote to ``directory`` (summed; gauges: the latest
    value) and each process's memory and CPU time, on one port."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    registry.register(ProcessesCollector(processes))
    start_http_server(port, addr=addr, registry=registry)
