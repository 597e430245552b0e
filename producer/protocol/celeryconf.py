"""The Celery configuration producers and workers share: JSON only, where results live."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.backends.redis import RedisBackend

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


RESULT_BACKEND = f"{__name__}:{ResultBackend.__name__}"


def celery_config(settings: ClientSettings) -> dict[str, Any]:
    """Settings both sides must agree on. Pickle is never accepted, on either side."""
    return {
        "broker_url": settings.effective_broker_url,
        # Celery's Redis backend, less the SUBSCRIBE it sends with every task (ResultBackend).
        "result_backend": f"{RESULT_BACKEND}+{settings.redis_url}",
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        "result_expires": settings.result_expires_s,
        "task_create_missing_queues": True,
        "broker_connection_retry_on_startup": True,
        "result_extended": False,
    }


def make_app(settings: ClientSettings, name: str = "blipq-producer") -> Celery:
    """A Celery app configured for blipq; producers never register tasks, they send by name."""
    app = Celery(name, set_as_current=False)
    app.conf.update(celery_config(settings))
    return app
