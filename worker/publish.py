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
from producer.constants import DEAD_LETTER, DELIVERIES_KEY, PUBLISHED_KEY, RESULTS_STREAM

# Atomic: announce a job on the stream only the first time it finishes (a redelivered job that
# finishes again stores the same result but adds no second event).
_PUBLISH_ONCE = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*',
                    'job_id', ARGV[3], 'kind', ARGV[4], 'status', ARGV[5], 'result', ARGV[6])
end
return false
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

    def publish(self, result: dict[str, Any]) -> bool:
        """Append one event unless this job was already announced; True if appended."""
        job_id = str(result.get("job_id", ""))
        added = self._publish_once(
            keys=[PUBLISHED_KEY.format(job_id=job_id), self.stream],
            args=[
                self._expires_s,
                self._maxlen,
                job_id,
                str(result.get("kind", "")),
                str(result.get("status", "")),
                json.dumps(result, separators=(",", ":")),
            ],
        )
        return bool(added)


class DeliveryGuard:
    """Counts unfinished starts of each job; moves poison jobs to the dead-letter list."""

    def __init__(self, client: redis.Redis, *, expires_s: int) -> None:
        self._redis = client
        self._expires_s = expires_s

    def begin(self, job_id: str) -> int:
        """How many earlier starts of this job did not finish. 0: a first delivery, now
        recorded as started; otherwise nothing is recorded until ``restart``."""
        key = DELIVERIES_KEY.format(job_id=job_id)
        pipe = self._redis.pipeline()  # MULTI: the SET and the GET see the same state
        pipe.set(key, 1, nx=True, ex=self._expires_s)
        pipe.get(key)
        first, count = pipe.execute()
        return 0 if first else int(count or 0)

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
