"""Results and events to Redis: one stream entry per finished job, for web backends to follow.

Also the delivery bookkeeping that keeps a job from being announced twice or from killing
workers forever: a start counter per job and a dead-letter list.
"""

from __future__ import annotations

import json
import time
from functools import cache
from pathlib import Path
from typing import Any

import redis

from producer.protocol import ledger
from producer.protocol.keys import (
    DEAD_LETTER,
    DELIVERIES_KEY,
    LEDGER,
    LEDGER_PAYLOADS,
    PUBLISHED_KEY,
    RESULTS_STREAM,
)


@cache
def lua(name: str) -> str:
    """A Redis script of ``worker/delivery/lua/`` (each file says what it does, atomically)."""
    return (Path(__file__).parent / "lua" / f"{name}.lua").read_text()


class Publisher:
    """Appends finished results to the capped results stream, once per job."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        maxlen: int,
        expires_s: int,
        stream: str = RESULTS_STREAM,
    ) -> None:
        self._redis = client
        self._maxlen = maxlen
        self._expires_s = expires_s
        self.stream = stream
        self._publish_once = client.register_script(lua("publish_once"))
        self._answer = client.register_script(lua("answer"))

    def publish(self, result: dict[str, Any]) -> bool:
        """Append one event unless this job was already announced; True if appended."""
        job_id = str(result.get("job_id", ""))
        added = self._publish_once(
            keys=[PUBLISHED_KEY.format(job_id=job_id), self.stream],
            args=self._event_args(job_id, result),
        )
        return bool(added)

    def answer(
        self,
        job_id: str,
        result: dict[str, Any],
        *,
        key: str,
        stored: str | bytes,
        stored_expires_s: int | None,
    ) -> bool:
        """Store a job's result (``stored``, Celery's encoding of it, under ``key``), announce it
        once, clear its start counter and ledger entry: atomically, in one round trip. True if
        this call stored the result (False: a success was stored before, and stays)."""
        done = self._answer(
            keys=[
                key,
                PUBLISHED_KEY.format(job_id=job_id),
                self.stream,
                DELIVERIES_KEY.format(job_id=job_id),
                LEDGER,
                LEDGER_PAYLOADS,
            ],
            args=[stored, stored_expires_s or 0, *self._event_args(job_id, result)],
        )
        return bool(done)

    def _event_args(self, job_id: str, result: dict[str, Any]) -> list[Any]:
        """A stream event's arguments: ARGV[1..6] of publish_once.lua, ARGV[3..8] of answer.lua."""
        return [
            self._expires_s,
            self._maxlen,
            job_id,
            str(result.get("kind", "")),
            str(result.get("status", "")),
            json.dumps(result, separators=(",", ":")),
        ]


class DeliveryGuard:
    """Counts unfinished starts of each job; moves poison jobs to the dead-letter list."""

    def __init__(self, client: redis.Redis, *, expires_s: int) -> None:
        self._redis = client
        self._expires_s = expires_s
        self._begin = client.register_script(lua("begin"))

    def begin(self, job_id: str) -> int:
        """How many earlier starts of this job did not finish. 0: a first delivery, now
        recorded as started; otherwise nothing is recorded until ``restart``."""
        return int(self._begin(keys=[DELIVERIES_KEY.format(job_id=job_id)], args=[self._expires_s]))

    def restart(self, job_id: str) -> int:
        """Record one more start of a job that was started before; return the starts so far."""
        key = DELIVERIES_KEY.format(job_id=job_id)
        pipe = self._redis.pipeline()
        pipe.incr(key)
        pipe.expire(key, self._expires_s)
        count, _ = pipe.execute()
        return int(count)

    def finished(self, job_id: str) -> None:
        """This start is over (it will be retried): clear the start counter only."""
        self._redis.delete(DELIVERIES_KEY.format(job_id=job_id))

    def completed(self, job_id: str) -> None:
        """The job's result is stored: clear its start counter and its ledger entry."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.delete(DELIVERIES_KEY.format(job_id=job_id))
        ledger.forget(pipe, job_id)
        pipe.execute()

    def dead_letter(self, job_id: str, payload: object, reason: str) -> None:
        record = {"job_id": job_id, "payload": payload, "reason": reason, "at": time.time()}
        self._redis.lpush(DEAD_LETTER, json.dumps(record, default=str))
