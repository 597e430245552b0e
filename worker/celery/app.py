"""The Celery app of a blipq worker: ``celery -A worker.celery.app worker``.

The composition root: configuration is read from the environment when Celery first needs it
(at worker start), never at import; the start-up hook builds the process's objects (the engine
with its loaded models, the chunk runner, the reaper) once, before any message is consumed, and
the tasks reach them through ``services()``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from celery import Celery, signals
from kombu import Queue

from producer.protocol.celeryconf import (
    backend_url,
    celery_config,
    queue_arguments,
    sentinel_options,
)
from producer.protocol.connect import redis_client
from producer.protocol.jobs import model_of
from producer.protocol.keys import TASK_RUN_JOB, queue_for
from worker import heap
from worker.celery import patches
from worker.celery.chunks import ChunkRunner
from worker.delivery.reaper import Reaper
from worker.engine import Engine
from worker.settings import Settings, get_settings

log = logging.getLogger(__name__)


def build_config() -> dict[str, Any]:
    settings = get_settings()
    # One queue per served model: a job waits in the queue of the model it names, so it reaches
    # only a worker that serves that model (whatever its kind).
    queues = [
        Queue(
            queue_for(name),
            routing_key=queue_for(name),
            queue_arguments=queue_arguments(settings),
        )
        for name in settings.serve
    ]
    return {
        **celery_config(settings),
        # Celery's Redis backend, storing a job's result, its stream event and the clearing of
        # its bookkeeping in one round trip (worker.celery.backend).
        "result_backend": backend_url(
            settings,
            "worker.celery.backend:WorkerResultBackend",
            "worker.celery.backend:WorkerSentinelResultBackend",
        ),
        "task_queues": queues,
        "task_default_queue": queues[0].name,
        # Threads: I/O concurrency for S3 fetches while one model thread batches across them;
        # the model lives in this one process, so no CUDA state crosses a fork.
        "worker_pool": "threads",
        # Refused messages (not JSON, pickle) become invalid_job results, not silence.
        "worker_consumer": "worker.celery.refused:BlipqConsumer",
        "worker_concurrency": settings.worker_concurrency,
        # One prefetched message per thread: enough for batches to fill, no hoarding.
        "worker_prefetch_multiplier": 1,
        # Ack after the result is stored; a worker dying mid-batch gets its messages redelivered.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "broker_transport_options": {
            **sentinel_options(settings),
            "visibility_timeout": settings.visibility_timeout_s,
            # Sweep for messages abandoned by dead workers every few seconds (kombu's default
            # sweeps about every 100 s), so redelivery follows the visibility timeout closely.
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s // 2)),
            "unacked_restore_throttle": 1,
            # A worker killed while sweeping holds the sweep mutex until it expires.
            "unacked_mutex_expire": max(5, min(300, settings.visibility_timeout_s)),
        },
        "worker_send_task_events": settings.task_events,
        "task_send_sent_event": False,
        "worker_hijack_root_logger": True,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }


patches.apply()
app = Celery("blipq", include=["worker.celery.tasks"])
app.add_defaults(build_config)


@dataclass(frozen=True, slots=True)
class Services:
    """What one worker process builds at start and its tasks use."""

    settings: Settings
    engine: Engine
    chunks: ChunkRunner
    reaper: Reaper | None

    def stop(self) -> None:
        if self.reaper is not None:
            self.reaper.stop()
        self.chunks.close()
        self.engine.stop()


_services: Services | None = None
_lock = threading.Lock()


def services() -> Services:
    """The process's services; they exist from the start-up hook on (``start``)."""
    if _services is None:
        raise RuntimeError("the blipq worker has not started: its models are not loaded")
    return _services


def start(settings: Settings, node: str | None = None) -> Services:
    """Load the models, start the model thread and the reaper (once per process)."""
    global _services
    with _lock:
        if _services is None:
            quiet_task_logs(settings)
            patches.limit_decompression(settings.max_message_bytes)
            engine = Engine.start(settings, worker_name=node)
            chunks = ChunkRunner(
                engine,
                threads=settings.worker_concurrency,
                backend=app.backend,
                send_task=app.send_task,
            )
            _services = Services(settings, engine, chunks, _start_reaper(engine, settings))
        return _services


def _start_reaper(engine: Engine, settings: Settings) -> Reaper | None:
    """The ledger's reaper, on a Redis broker (RabbitMQ does not lose taken messages)."""
    if not settings.effective_broker_url.startswith(
        ("redis://", "rediss://", "unix://", "sentinel://")
    ):
        return None
    backend: Any = app.backend

    def resend(job_id: str, kwargs: dict[str, Any]) -> None:
        queue = queue_for(model_of(kwargs.get("job")))
        app.send_task(TASK_RUN_JOB, kwargs=kwargs, task_id=job_id, queue=queue, routing_key=queue)

    reaper = Reaper(
        engine.redis,
        resend,
        reap_after_s=settings.reap_after_s,
        interval_s=settings.reap_interval_s,
        result_key=lambda job_id: backend.get_key_for_task(job_id).decode(),
        broker=redis_client(settings.effective_broker_url, settings.redis_master_name),
    )
    reaper.start()
    return reaper


def quiet_task_logs(settings: Settings) -> None:
    """Celery's per-message INFO lines off unless ``log_every_task``. Called before the consumer
    builds its message handlers and the tasks their tracers: both decide once whether to log
    every message at INFO."""
    level = logging.NOTSET if settings.log_every_task else logging.WARNING
    for name in _PER_TASK_LOGGERS:
        logging.getLogger(name).setLevel(level)


_PER_TASK_LOGGERS = ("celery.app.trace", "celery.worker.strategy")


@signals.celeryd_after_setup.connect
def _start(sender: Any = None, **_: Any) -> None:
    """Load and warm up every served model after logging is set up, before consuming starts.
    ``sender`` is the node name (``name@host``): results name their worker by it."""
    start(get_settings(), node=str(sender) if sender else None)


@signals.worker_ready.connect
def _settle(**_: Any) -> None:
    """The consumer is up: what start-up made stays, so the collector stops walking it."""
    heap.settle()


@signals.worker_shutdown.connect
def _stop(**_: Any) -> None:
    global _services
    with _lock:
        if _services is not None:
            _services.stop()
            _services = None
