"""Results and events to Redis: one stream entry per finished job, for web backends to follow."""

from __future__ import annotations

import json
import logging
from typing import Any

import redis

from producer.constants import RESULTS_STREAM

log = logging.getLogger(__name__)


class Publisher:
    """Appends finished results to the capped results stream."""

    def __init__(self, client: redis.Redis, *, maxlen: int, stream: str = RESULTS_STREAM) -> None:
        self._redis = client
        self._maxlen = maxlen
        self.stream = stream

    def publish(self, result: dict[str, Any]) -> None:
        """Append one event; the result itself is already in the result backend."""
        fields = {
            "job_id": str(result.get("job_id", "")),
            "kind": str(result.get("kind", "")),
            "status": str(result.get("status", "")),
            "result": json.dumps(result, separators=(",", ":")),
        }
        self._redis.xadd(self.stream, fields, maxlen=self._maxlen, approximate=True)  # type: ignore[arg-type]
