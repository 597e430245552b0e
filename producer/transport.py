"""The Celery configuration producers and workers share: JSON only, where results live."""

from __future__ import annotations

from typing import Any

from celery import Celery

from producer.config import ClientSettings


def celery_config(settings: ClientSettings) -> dict[str, Any]:
    """Settings both sides must agree on. Pickle is never accepted, on either side."""
    return {
        "broker_url": settings.effective_broker_url,
        "result_backend": settings.redis_url,
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
