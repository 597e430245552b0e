"""Waiting for the results of a growing set of jobs on one subscription."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import redis

from producer.bulk.state import _str
from producer.jobs import JobResult

if TYPE_CHECKING:
    from producer.client import Client


class _Waiter:
    """Waits for results of a growing set of jobs: subscribe, then MGET, then messages.

    The same publish-on-store logic as ``Client.results``, but keys are added as jobs are sent,
    on one subscription, so a slow item never holds back the others.
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._redis: redis.Redis = client._redis
        self._backend: Any = client._app.backend
        self._pending: dict[str, str] = {}  # result key -> job id
        self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, job_ids: Sequence[str]) -> list[JobResult]:
        """Watch these jobs; return the results of those already finished."""
        keys = {self._backend.get_key_for_task(job_id).decode(): job_id for job_id in job_ids}
        if not keys:
            return []
        self._pending.update(keys)
        try:
            self._pubsub.subscribe(*keys)
            return self._read(list(keys))
        except redis.ConnectionError:
            return self._reconnect()

    def wait(self, timeout: float) -> list[JobResult]:
        """Results that arrive within ``timeout`` seconds (all that are ready, at least one)."""
        if not self._pending:
            time.sleep(timeout)
            return []
        found: list[JobResult] = []
        try:
            message = self._pubsub.get_message(timeout=timeout)
            while message is not None:
                result = self._take(_str(message["channel"]), message["data"])
                if result is not None:
                    found.append(result)
                message = self._pubsub.get_message(timeout=0)
        except redis.ConnectionError:
            time.sleep(min(timeout, 1.0))
            found += self._reconnect()
        return found

    def drop(self, job_id: str) -> None:
        """Stop watching a job."""
        key = self._backend.get_key_for_task(job_id).decode()
        if self._pending.pop(key, None) is not None:
            self._pubsub.unsubscribe(key)

    def _read(self, keys: list[str]) -> list[JobResult]:
        found = []
        for key, raw in zip(keys, self._redis.mget(keys), strict=True):
            result = self._take(key, raw)
            if result is not None:
                found.append(result)
        return found

    def _take(self, key: str, raw: bytes | str | None) -> JobResult | None:
        job_id = self._pending.get(key)
        if job_id is None:
            return None
        result = self._client._to_result(job_id, raw)
        if result is not None:
            del self._pending[key]
            self._pubsub.unsubscribe(key)
        return result

    def _reconnect(self) -> list[JobResult]:
        """Redis restarted or the network blinked: subscribe again and re-read what is stored."""
        self._pubsub.close()
        self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        try:
            keys = list(self._pending)
            self._pubsub.subscribe(*keys)
            return self._read(keys)
        except redis.ConnectionError:
            return []

    def close(self) -> None:
        self._pubsub.close()
