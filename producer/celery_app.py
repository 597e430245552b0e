"""A producer-side Celery app for Celery's own tools, without the worker's dependencies (torch,
models): ``celery -A producer.celery_app flower`` (or ``inspect``, ``control``, ``events``).

Configured like every producer from ``BLIPQ_REDIS_URL`` / ``BLIPQ_BROKER_URL`` (the settings are
read when Celery first asks for ``app``, not at import). It registers no tasks: the tools see
blipq's by the names and one-line descriptions the messages and events carry.
"""

from __future__ import annotations

from functools import cache

from celery import Celery

from producer.protocol.celeryconf import make_app
from producer.protocol.settings import ClientSettings


@cache
def _app() -> Celery:
    return make_app(ClientSettings(), name="blipq-tools")


def __getattr__(name: str) -> Celery:
    if name == "app":
        return _app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
