"""The kombu fix: a channel of a detached connection raises ConnectionError, not AttributeError."""

from __future__ import annotations

import importlib

import pytest
import redis
from kombu.transport import redis as kombu_redis

import worker.kombu_fixes


class _DetachedTransport:
    client = None  # what kombu's Connection._do_close_transport leaves behind


def test_a_detached_channel_raises_the_error_celery_recovers_from() -> None:
    channel = object.__new__(kombu_redis.Channel)
    channel.connection = _DetachedTransport()
    with pytest.raises(redis.ConnectionError, match="closed"):
        channel._connparams()


def test_the_fix_is_applied_once() -> None:
    patched = kombu_redis.Channel._connparams
    importlib.reload(worker.kombu_fixes)  # a second import must not wrap the wrapper
    assert kombu_redis.Channel._connparams is patched
    # ... nor make the wrapper call itself: it still calls kombu's own method.
    assert worker.kombu_fixes._original is not patched
    assert not getattr(worker.kombu_fixes._original, "_blipq_fix", False)
