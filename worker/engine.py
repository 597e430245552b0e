"""The engine: one decoded message in, one JobResult out. No Celery here.

``Engine.start`` loads and warms up the served models, starts the model thread (which owns every
model and runs the batcher) and builds the object reader and the delivery bookkeeping; every
dependency can be given instead, so tests run it in-process. Many threads call ``handle`` at
once; the Celery layer (``worker.celery``) only decodes messages and hands them here.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import Any

import redis
import torch

from producer.protocol.errors import JobFailure, Retryable
from producer.protocol.jobs import ErrorCode, JobResult, Timings, decode_job
from worker import images
from worker.delivery.policy import DeliveryPolicy
from worker.delivery.publish import DeliveryGuard, Publisher
from worker.delivery.quarantine import Quarantine
from worker.metrics import Metrics
from worker.modelhost import Done, ModelHost, ModelPort
from worker.models import ModelRunner, Placement
from worker.models.registry import load_runner, runner_class
from worker.settings import Settings
from worker.storage import ObjectReader

log = logging.getLogger(__name__)


class Engine:
    """Turns one decoded message into one JobResult; many threads call ``handle`` at once."""

    def __init__(
        self,
        settings: Settings,
        runners: dict[str, ModelRunner[Any]],
        *,
        objects: ObjectReader,
        redis_client: redis.Redis,
        worker_name: str | None = None,
        model: ModelPort | None = None,
    ) -> None:
        self.settings = settings
        self.runners = runners
        self.objects = objects
        expires = settings.result_expires_s
        self.redis = redis_client
        self.publisher = Publisher(redis_client, maxlen=settings.stream_maxlen, expires_s=expires)
        self.deliveries = DeliveryGuard(redis_client, expires_s=expires)
        self.policy = DeliveryPolicy(
            max_attempts=settings.s3_max_attempts,
            max_deliveries=settings.max_deliveries,
            # Celery's node name where there is one (what Flower and its events show).
            worker=worker_name or f"{socket.gethostname()}:{os.getpid()}",
        )
        self.quarantine = Quarantine()  # suspects (redelivered after a crash) run alone
        self.limits = objects.limits
        self.metrics = Metrics()
        # The models run here (a model thread) or in the model process (worker.remote).
        self.model: ModelPort = model or ModelHost(settings, runners, self.metrics)
        self.worker_name = self.policy.worker

    @classmethod
    def start(cls, settings: Settings, *, worker_name: str | None = None) -> Engine:
        """Load the models and start the model thread; or, in an intake process of
        ``blipq-worker`` (``BLIPQ_MODEL_SOCKET`` set), load what ``prepare`` needs and reach
        the model process through its socket (``worker.split.remote``)."""
        configure_process(settings)
        model: ModelPort | None = None
        if settings.model_socket:
            from worker.split.remote import RemoteModel

            runners, load_s = load_runners(settings, intake=True)
            model = RemoteModel(settings.model_socket, connect_s=settings.model_connect_s)
        else:
            runners, load_s = load_runners(settings)
        engine = cls(
            settings,
            runners,
            objects=ObjectReader.from_settings(settings),
            redis_client=settings.redis(),
            worker_name=worker_name,
            model=model,
        )
        if not settings.model_socket:  # in a split worker: the model process and the launcher
            for name, seconds in load_s.items():
                engine.metrics.model_load.labels(name).set(seconds)
            if settings.metrics_port:
                engine.metrics.serve(settings.metrics_port, settings.metrics_addr)
        engine.model.start()
        return engine

    def stop(self) -> None:
        self.model.stop(timeout=30)

    # --- one job ---------------------------------------------------------------------------------

    def handle(
        self, job_id: str, payload: object, submitted_at: float | None, *, alone: bool = False
    ) -> JobResult:
        """Run one job to a result. Raises only Retryable (the task layer retries it).
        ``alone``: a suspect (``worker.delivery.quarantine``), run in a batch of its own."""
        started = time.perf_counter()
        queue_wait_ms = max(0.0, (time.time() - submitted_at) * 1000) if submitted_at else 0.0
        kind = payload.get("kind", "unknown") if isinstance(payload, dict) else "unknown"
        model = payload.get("model") if isinstance(payload, dict) else None
        extra: dict[str, Any] = {"model": model, "worker": self.worker_name}
        try:
            result = self._run(job_id, payload, started, submitted_at, alone)
        except Retryable:
            raise
        except JobFailure as exc:
            result = JobResult.failure(job_id, str(kind), ErrorCode(exc.code), exc.message, **extra)
        except Exception as exc:
            log.exception("job %s failed in the model", job_id)
            result = JobResult.failure(
                job_id, str(kind), ErrorCode.MODEL_ERROR, f"{type(exc).__name__}: {exc}", **extra
            )
        if not result.ok:
            total_ms = (time.perf_counter() - started) * 1000
            timings = Timings(queue_wait_ms=queue_wait_ms, total_ms=total_ms + queue_wait_ms)
            result = result.model_copy(update={"timings": timings})
        self.metrics.observe(result)
        return result

    def _run(
        self, job_id: str, payload: object, started: float, submitted_at: float | None, alone: bool
    ) -> JobResult:
        job = decode_job(payload)
        if job.expired(time.time(), submitted_at):
            raise JobFailure(
                "the job's deadline passed before it could run", code=ErrorCode.EXPIRED
            )
        runner = self.runners.get(job.model)
        if runner is None or job.kind not in runner.kinds:
            raise JobFailure(
                f"model {job.model!r} is not served here for {job.kind} jobs; "
                f"served: {sorted(self.runners)}",
                code=ErrorCode.UNKNOWN_MODEL,
            )
        queue_wait_ms = max(0.0, (time.time() - submitted_at) * 1000) if submitted_at else 0.0
        self.model.preparing(runner.name, 1)
        try:
            data = self.objects.read(job.image_ref)
            image = images.decode(data, self.limits, self._draft_side(runner))
            item = runner.prepare(job, image)
            fetched = time.perf_counter()
            key: tuple[Any, ...] = (runner.name, runner.group_key(item))
            if alone:  # its own group: no other job shares its batch, in any process
                key = (*key, ("alone", job_id))
        except BaseException:
            self.model.preparing(runner.name, -1)  # its preparation ended without an item
            raise
        future = self.model.submit(key, item)  # which ends its preparation
        try:
            done: Done = future.result(timeout=self.settings.task_time_limit_s)
        except FuturesTimeout as exc:
            future.cancel()
            raise JobFailure(
                f"no model output within {self.settings.task_time_limit_s}s", code=ErrorCode.TIMEOUT
            ) from exc
        total_ms = (time.perf_counter() - started) * 1000
        return JobResult(
            job_id=job_id,
            kind=job.kind,
            status="ok",
            output=done.output.output,
            model=runner.name,
            timings=Timings(
                queue_wait_ms=queue_wait_ms,
                fetch_ms=(fetched - started) * 1000,
                inference_ms=done.inference_ms,
                total_ms=total_ms + queue_wait_ms,
            ),
            batch_size=done.batch_size,
            worker=self.worker_name,
        )

    def _draft_side(self, runner: ModelRunner[Any]) -> int | None:
        side = runner.input_side()
        if not side or not self.settings.jpeg_draft:
            return None
        return images.draft_side(side)


def load_runners(
    settings: Settings, *, intake: bool = False
) -> tuple[dict[str, ModelRunner[Any]], dict[str, float]]:
    """Load (and warm up) every served model; seconds per model. ``intake``: only what
    ``prepare`` needs, on the CPU (an intake process; the model process runs the models)."""
    placement = Placement.from_settings(settings)
    if intake:
        placement = Placement(torch.device("cpu"), torch.float32)
    runners: dict[str, ModelRunner[Any]] = {}
    load_s: dict[str, float] = {}
    for spec in settings.served():
        started = time.perf_counter()
        if intake:
            runners[spec.name] = runner_class(spec.family)(spec, placement)
            runners[spec.name].load_prepare()
        else:
            runners[spec.name] = load_runner(
                spec, placement, warmup=settings.warmup, sdpa=settings.sdpa_attention
            )
        load_s[spec.name] = time.perf_counter() - started
    for runner in runners.values():
        runner.bind(runners, settings)
    return runners, load_s


def configure_process(settings: Settings) -> None:
    """Process-wide knobs: torch's thread count and how often Python hands the GIL over."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    # One process runs the Celery consumer loop, dozens of fetch/decode threads and the model
    # thread. A thread back from I/O waits for the GIL up to the switch interval while another
    # runs Python: at Python's 5 ms that convoy keeps the consumer loop (which reads every
    # message) waiting; 0.5 ms gave +15 % null-model images/s (benchmarks/throughput.py).
    sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
