"""The Celery configuration producers and workers share: JSON only, where results live."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.backends.redis import RedisBackend, SentinelBackend

from producer.protocol.connect import is_sentinel
from producer.protocol.settings import ClientSettings


class ResultBackend(RedisBackend):  # type: ignore[misc]
    """Celery's Redis result backend, without subscribing to each task's result as it is sent.

    Celery subscribes to a task's result channel while sending it, for ``AsyncResult.get``.
    blipq waits with ``producer.client.waiting`` instead, so that was a round trip in every submit
    (before the message went out) and a second, unread copy of every result on a connection
    of the producer's. Results are stored and published exactly as before.
    """

    def on_task_call(self, producer: Any, task_id: str) -> None:
        return None


class SentinelResultBackend(ResultBackend, SentinelBackend):  # type: ignore[misc]
    """``ResultBackend`` on the master a set of Redis Sentinels names (``sentinel://`` URLs)."""


RESULT_BACKEND = f"{__name__}:{ResultBackend.__name__}"
SENTINEL_RESULT_BACKEND = f"{__name__}:{SentinelResultBackend.__name__}"


def backend_url(settings: ClientSettings, plain: str, sentinel: str) -> str:
    """``result_backend``: the backend class ``plain`` or, for sentinel:// URLs, ``sentinel``."""
    cls = sentinel if is_sentinel(settings.redis_url) else plain
    return f"{cls}+{settings.redis_url}"


def is_amqp(url: str) -> bool:
    return url.startswith(("amqp://", "amqps://", "pyamqp://"))


def queue_arguments(settings: ClientSettings) -> dict[str, Any] | None:
    """How every blipq queue is declared: on RabbitMQ, a quorum queue (replicated, durable,
    with the broker's own delivery count); on Redis, as kombu does."""
    return {"x-queue-type": "quorum"} if is_amqp(settings.effective_broker_url) else None


def sentinel_options(settings: ClientSettings) -> dict[str, Any]:
    """What kombu's and Celery's Sentinel support need beside the URL: the master's name."""
    return {"master_name": settings.redis_master_name} if settings.redis_master_name else {}


def celery_config(settings: ClientSettings) -> dict[str, Any]:
    """Settings both sides must agree on. Pickle is never accepted, on either side."""
    return {
        "broker_url": settings.effective_broker_url,
        # Celery's Redis backend, less the SUBSCRIBE it sends with every task (ResultBackend).
        "result_backend": backend_url(settings, RESULT_BACKEND, SENTINEL_RESULT_BACKEND),
        "result_backend_transport_options": sentinel_options(settings),
        "broker_transport_options": sentinel_options(settings),
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        "result_expires": settings.result_expires_s,
        "task_create_missing_queues": True,
        "broker_connection_retry_on_startup": True,
        # RabbitMQ: the queues a producer creates when it sends (and the worker declares) are
        # quorum queues; both sides must declare them alike.
        **(
            {"task_create_missing_queue_type": "quorum", "task_default_queue_type": "quorum"}
            if is_amqp(settings.effective_broker_url)
            else {}
        ),
        "result_extended": False,
    }


def make_app(settings: ClientSettings, name: str = "blipq-producer") -> Celery:
    """A Celery app configured for blipq; producers never register tasks, they send by name."""
    app = Celery(name, set_as_current=False)
    app.conf.update(celery_config(settings))
    return app
