"""The Celery app of a blipq worker: ``celery -A worker.app worker``.

Configuration is read from the environment when Celery first needs it (at worker start),
never at import. One process per GPU, a thread pool for I/O concurrency, one model thread.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, signals
from kombu import Queue

import worker.kombu_fixes  # noqa: F401  (patches kombu on import)
from producer.constants import queue_for
from producer.transport import celery_config
from worker.settings import Settings, get_settings

log = logging.getLogger(__name__)


def build_config() -> dict[str, Any]:
    settings = get_settings()
    queues = [
        Queue(queue_for(kind), routing_key=queue_for(kind)) for kind in settings.served_kinds()
    ]
    return {
        **celery_config(settings),
        # Celery's Redis backend, storing a job's result, its stream event and the clearing of
        # its bookkeeping in one round trip (worker.results).
        "result_backend": f"worker.results:WorkerResultBackend+{settings.redis_url}",
        "task_queues": queues,
        "task_default_queue": queues[0].name,
        # Threads: I/O concurrency for S3 fetches while one model thread batches across them;
        # the model lives in this one process, so no CUDA state crosses a fork.
        "worker_pool": "threads",
        # Refused messages (not JSON, pickle) become invalid_job results, not silence.
        "worker_consumer": "worker.consumer:BlipqConsumer",
        "worker_concurrency": settings.worker_concurrency,
        # One prefetched message per thread: enough for batches to fill, no hoarding.
        "worker_prefetch_multiplier": 1,
        # Ack after the result is stored; a worker dying mid-batch gets its messages redelivered.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "broker_transport_options": {
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


app = Celery("blipq", include=["worker.tasks", "worker.chunks"])
app.add_defaults(build_config)


@signals.celeryd_after_setup.connect
def _load_models(**_: Any) -> None:
    """Load and warm up every served model after logging is set up, before consuming starts."""
    from worker.runtime import start_runtime

    settings = get_settings()
    quiet_task_logs(settings)
    start_runtime(settings)


def quiet_task_logs(settings: Settings) -> None:
    """Celery's per-message INFO lines off unless ``log_every_task``. Called before the consumer
    builds its message handlers and the tasks their tracers: both decide once whether to log
    every message at INFO."""
    level = logging.NOTSET if settings.log_every_task else logging.WARNING
    for name in _PER_TASK_LOGGERS:
        logging.getLogger(name).setLevel(level)


_PER_TASK_LOGGERS = ("celery.app.trace", "celery.worker.strategy")


@signals.worker_shutdown.connect
def _stop_models(**_: Any) -> None:
    from worker.runtime import stop_runtime

    stop_runtime()
