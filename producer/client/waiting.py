"""Waiting for stored job results: one Redis subscription for a growing set of jobs.

The result backend publishes each result on its key's channel as it stores it. A waiter
subscribes first, then reads what is already stored (MGET), then takes messages, so no result can
slip between the two. Pub/sub is fire-and-forget, though: redis-py silently reconnects and
resubscribes a subscription after a Redis restart, and a result published before that is never
delivered. So a waiter that has heard nothing for ``sweep_s`` reads every pending key again.
While Redis cannot be reached, ``down_for`` says for how long: callers decide when a restart
has become an outage (``Client.results`` raises ``RedisUnavailable``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis

from producer.protocol.jobs import JobResult
from producer.protocol.keys import text

SWEEP_S = 2.0  # silence after which every pending key is read again
_MGET_CHUNK = 1000

ToResult = Callable[[str, "bytes | str | None"], "JobResult | None"]
"""(job id, stored value or None) -> the job's result, or None while it is not done."""

ResultKey = Callable[[str], str]
"""Job id -> the Redis key its result is stored under."""


class ResultWaiter:
    """Results of the jobs added so far, as they are stored (any order, each once)."""

    def __init__(
        self,
        client: redis.Redis,
        result_key: ResultKey,
        to_result: ToResult,
        *,
        sweep_s: float = SWEEP_S,
    ) -> None:
        self._redis = client
        self.key = result_key
        self._to_result = to_result
        self._sweep_s = sweep_s
        self._pending: dict[str, str] = {}  # result key -> job id
        self._finished: list[str] = []  # keys to unsubscribe from, in one command
        self._pubsub = self._subscription()
        self._last_read = time.monotonic()
        self._down_since: float | None = None
        self.last_error = ""  # the last connection error, while Redis cannot be reached

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, job_ids: Sequence[str]) -> list[JobResult]:
        """Watch these jobs; return the results of those already finished."""
        keys = {self.key(job_id): job_id for job_id in job_ids}
        if not keys:
            return []
        self._pending.update(keys)
        try:
            self._pubsub.subscribe(*keys)
            found = self._read(list(keys))
        except redis.ConnectionError as exc:
            self._lost(exc)
            return self._reconnect()
        self._unsubscribe_finished()
        return found

    def wait(self, timeout: float) -> list[JobResult]:
        """Results stored within ``timeout`` seconds: all that are ready, maybe none."""
        if not self._pending:
            time.sleep(timeout)
            return []
        found: list[JobResult] = []
        try:
            message = self._pubsub.get_message(timeout=timeout)
            while message is not None:
                result = self._take(text(message["channel"]), message["data"])
                if result is not None:
                    found.append(result)
                message = self._pubsub.get_message(timeout=0)
            if not found and time.monotonic() - self._last_read >= self._sweep_s:
                found = self._read(list(self._pending))
        except redis.ConnectionError as exc:
            self._lost(exc)
            time.sleep(min(timeout, 1.0))
            found += self._reconnect()
        self._unsubscribe_finished()
        return found

    def drop(self, job_id: str) -> None:
        """Stop watching a job."""
        key = self.key(job_id)
        if self._pending.pop(key, None) is not None:
            self._pubsub.unsubscribe(key)

    def down_for(self) -> float:
        """Seconds since Redis was last found unreachable, with no answer from it since; 0.0
        while it answers."""
        return 0.0 if self._down_since is None else time.monotonic() - self._down_since

    def _lost(self, exc: Exception) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
        self.last_error = str(exc)

    def idle(self) -> bool:
        """Nothing pending, every finished key unsubscribed: as good as new, minus a connect."""
        return not self._pending and not self._finished

    def close(self) -> None:
        self._pubsub.close()

    def _subscription(self) -> Any:
        return self._redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]

    def _read(self, keys: list[str]) -> list[JobResult]:
        found = []
        for start in range(0, len(keys), _MGET_CHUNK):
            chunk = keys[start : start + _MGET_CHUNK]
            for key, raw in zip(chunk, self._redis.mget(chunk), strict=True):
                result = self._take(key, raw)
                if result is not None:
                    found.append(result)
        self._last_read = time.monotonic()
        self._down_since = None
        return found

    def _take(self, key: str, raw: bytes | str | None) -> JobResult | None:
        job_id = self._pending.get(key)
        if job_id is None:
            return None
        result = self._to_result(job_id, raw)
        if result is not None:
            del self._pending[key]
            self._finished.append(key)
        return result

    def _unsubscribe_finished(self) -> None:
        """One UNSUBSCRIBE for every key finished since the last (not one per result)."""
        keys, self._finished = self._finished, []
        if keys:
            # after a reconnect, the next subscription has only the pending keys
            with contextlib.suppress(redis.ConnectionError):
                self._pubsub.unsubscribe(*keys)

    def _reconnect(self) -> list[JobResult]:
        """Redis restarted or the network blinked: subscribe again and re-read what is stored."""
        self._pubsub.close()
        self._pubsub = self._subscription()
        self._finished.clear()
        try:
            keys = list(self._pending)
            self._pubsub.subscribe(*keys)
            return self._read(keys)
        except redis.ConnectionError as exc:
            self._lost(exc)
            return []
