"""Results and events to Redis: one stream entry per finished job, for web backends to follow.

Also the delivery bookkeeping that keeps a job from being announced twice or from killing
workers forever: a start counter per job and a dead-letter list.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from producer import ledger
from producer.constants import (
    DEAD_LETTER,
    DELIVERIES_KEY,
    LEDGER,
    LEDGER_PAYLOADS,
    PUBLISHED_KEY,
    RESULTS_STREAM,
)

# Atomic: announce a job on the stream only the first time it finishes (a redelivered job that
# finishes again stores the same result but adds no second event).
_PUBLISH_ONCE = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*',
                    'job_id', ARGV[3], 'kind', ARGV[4], 'status', ARGV[5], 'result', ARGV[6])
end
return false
"""

# Atomic: a job's whole answer in one round trip (storing, announcing and clearing one by one took
# four). Store the result as Celery's Redis backend does (SET, then PUBLISH on the key's channel
# for waiters), except over a stored success, which Celery never overwrites either; announce it on
# the stream once, as _PUBLISH_ONCE; clear the job's start counter and its ledger entry (as
# ``ledger.forget``). Returns 1 if this call stored the result.
_ANSWER = """
local stored = false
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  stored = ok and type(meta) == 'table' and meta['status'] == 'SUCCESS'
end
if not stored then
  if tonumber(ARGV[2]) > 0 then
    redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  else
    redis.call('SET', KEYS[1], ARGV[1])
  end
  redis.call('PUBLISH', KEYS[1], ARGV[1])
end
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[3]) then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*',
             'job_id', ARGV[5], 'kind', ARGV[6], 'status', ARGV[7], 'result', ARGV[8])
end
redis.call('DEL', KEYS[4])
redis.call('ZREM', KEYS[5], ARGV[5])
redis.call('HDEL', KEYS[6], ARGV[5])
if stored then return 0 end
return 1
"""

# Atomic, one command with one reply (a MULTI of SET NX and GET took four replies to parse):
# record a first start and return 0, or return the earlier starts without recording this one.
_BEGIN = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
return tonumber(redis.call('GET', KEYS[1]) or '0')
"""


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
        self._publish_once = client.register_script(_PUBLISH_ONCE)
        self._answer = client.register_script(_ANSWER)

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
        """A stream event's arguments: ARGV[1..6] of _PUBLISH_ONCE, ARGV[3..8] of _ANSWER."""
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
        self._begin = client.register_script(_BEGIN)

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
