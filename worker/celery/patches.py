"""Patches to dependencies, in one place, applied explicitly at start (``apply()``).

Two changes to kombu's Redis transport:

1. After a lost broker connection. When Redis goes away, Celery's consumer collects the
connection, which detaches the transport (``transport.client = None``), then closes it. Anything
that later touches a channel of that old connection — closing it a second time, acking a message
a task finished after the reconnect — builds a new connection pool from ``transport.client`` and
dies with ``AttributeError: 'NoneType' object has no attribute 'hostname'`` (kombu issue #582).
Celery treats that as unrecoverable and the worker shuts down. Measured: 3 of 12 Redis restarts
under load ended the worker this way. Raising redis' ConnectionError instead makes it the error
every caller already handles: a failed close is ignored, a failed ack is logged, and the unacked
message comes back after the visibility timeout (the job's stored result makes the rerun a no-op).

2. One Redis client per channel. kombu builds a new ``redis.Redis`` for every acknowledgement and
every delivery it records as unacknowledged (``Channel.conn_or_acquire``), two per job, on the
same connection pool each time; redis-py's constructor fills a table of a few hundred response
callbacks. That was 5.8 % of the worker's GIL time under a burst of null-model jobs (py-spy
``--gil``). The channel now keeps one client (thread-safe: each command takes a pool connection)
and drops it with its pools, so a channel whose connection is gone still goes through fix 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from kombu.transport import redis as kombu_redis

_Channel: Any = kombu_redis.Channel
_CLIENT = "_blipq_client"
_originals: dict[str, Any] = {}
"""kombu's own methods, kept by ``apply`` before it replaces them."""


def _connparams(self: Any, asynchronous: bool = False) -> Any:
    if self.connection is None or self.connection.client is None:
        raise redis.ConnectionError("this channel's broker connection is closed")
    return _originals["_connparams"](self, asynchronous)


@contextmanager
def _conn_or_acquire(self: Any, client: Any = None) -> Iterator[Any]:
    if client:
        yield client
        return
    cached = self.__dict__.get(_CLIENT)
    if cached is None:
        cached = self.__dict__[_CLIENT] = self._create_client()
    yield cached


def _disconnect_pools(self: Any) -> None:
    self.__dict__.pop(_CLIENT, None)  # built on the pool that goes now
    _originals["_disconnect_pools"](self)


def _patch(name: str, wrapper: Any) -> None:
    current = getattr(_Channel, name)
    if getattr(current, "_blipq_fix", False):
        return  # applied already: never wrap a wrapper
    _originals[name] = current
    wrapper._blipq_fix = True
    setattr(_Channel, name, wrapper)


def apply() -> None:
    """Apply every patch (idempotent): before the worker's first broker connection."""
    _patch("_connparams", _connparams)
    _patch("conn_or_acquire", _conn_or_acquire)
    _patch("_disconnect_pools", _disconnect_pools)
