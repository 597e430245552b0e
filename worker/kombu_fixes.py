"""A fix for kombu's Redis transport after a lost broker connection (applied on import).

When Redis goes away, Celery's consumer collects the connection, which detaches the transport
(``transport.client = None``), then closes it. Anything that later touches a channel of that
old connection — closing it a second time, acking a message a task finished after the
reconnect — builds a new connection pool from ``transport.client`` and dies with
``AttributeError: 'NoneType' object has no attribute 'hostname'`` (kombu issue #582). Celery
treats that as unrecoverable and the worker shuts down. Measured: 3 of 12 Redis restarts under
load ended the worker this way.

Raising redis' ConnectionError instead makes it the error every caller already handles: a
failed close is ignored, a failed ack is logged, and the unacked message comes back after the
visibility timeout (the job's stored result makes the rerun a no-op).
"""

from __future__ import annotations

from typing import Any

import redis
from kombu.transport import redis as kombu_redis

_Channel: Any = kombu_redis.Channel
# On a second import (importlib.reload re-runs this in the same module namespace), the method
# is already the wrapper: keep calling the real one, or the wrapper would call itself.
_original = getattr(_Channel._connparams, "_blipq_original", _Channel._connparams)


def _connparams(self: Any, asynchronous: bool = False) -> Any:
    if self.connection is None or self.connection.client is None:
        raise redis.ConnectionError("this channel's broker connection is closed")
    return _original(self, asynchronous)


if not getattr(_Channel._connparams, "_blipq_fix", False):
    _connparams._blipq_fix = True  # type: ignore[attr-defined]
    _connparams._blipq_original = _original  # type: ignore[attr-defined]
    _Channel._connparams = _connparams
