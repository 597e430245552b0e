"""Find jobs a dying consumer took off a Redis queue and lost, and send them again.

A job is lost when it is old (submitted, or last sent on by a worker, more than ``reap_after_s``
ago), has no result, is not held unacknowledged by any consumer (kombu puts those back itself
after the visibility timeout; a held chunk message holds every job its header lists), and is no
longer in its queue. Queues are FIFO, so "no longer in the queue" is: the oldest message still
waiting in the job's own queue (the queue of the model its ledger payload names) was submitted
after it. Each job is judged against its own queue only, so a backlog in a queue no worker serves
does not hold back the recovery of jobs lost from other queues.

A running job is always held (acks are late: a job's message is acknowledged after its result is
stored, and a chunk message after all of its jobs are answered), so a start counter
(``DELIVERIES_KEY``) says nothing here: a job whose earlier start never finished (its worker was
killed) comes back to its queue after the visibility timeout and can be lost again between BRPOP
and kombu recording it, still carrying that counter.

The unacknowledged set and the queues are read at different moments, so a message on its way from
one to the other can look lost; what looks lost is checked against the unacknowledged set once
more after a short pause. Sending a job twice is harmless (results are stored under the job id,
events are deduped); losing one is not.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from producer.protocol import ledger
from producer.protocol.chunks import message_job_ids
from producer.protocol.jobs import model_of
from producer.protocol.keys import (
    KOMBU_UNACKED,
    LEDGER,
    LEDGER_PAYLOADS,
    REAPER_LOCK,
    queue_for,
    text,
)

log = logging.getLogger(__name__)

Resend = Callable[[str, dict[str, Any]], None]
_SCAN = 500
_RECHECK_AFTER_S = 0.5  # far longer than a message takes from BRPOP to the unacked set


class Reaper:
    def __init__(
        self,
        client: redis.Redis,
        resend: Resend,
        *,
        reap_after_s: float,
        interval_s: float,
        result_key: Callable[[str], str],
        clock: Callable[[], float] = time.time,
        broker: redis.Redis | None = None,
    ) -> None:
        """``client`` holds the ledger and the results; ``broker`` (default: the same Redis)
        the queues and kombu's unacknowledged set."""
        self._redis = client
        self._broker = broker if broker is not None else client
        self._resend = resend
        self._after = reap_after_s
        self._interval = interval_s
        self._result_key = result_key
        self._now = clock
        self._stop = threading.Event()

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._loop, name="blipq-reaper", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                if self._redis.set(REAPER_LOCK, "1", nx=True, ex=max(1, int(self._interval))):
                    self.reap_once()
            except redis.RedisError:
                log.warning("reaper: Redis unavailable, will retry", exc_info=True)

    def reap_once(self) -> list[str]:
        """One sweep; returns the ids sent again."""
        old: list[Any] = self._redis.zrangebyscore(
            LEDGER, "-inf", self._now() - self._after, start=0, num=_SCAN, withscores=True
        )
        if not old:
            return []
        candidates = {text(job_id): score for job_id, score in old}
        ids = list(candidates)
        finished = self._redis.mget([self._result_key(i) for i in ids])
        pipe = self._redis.pipeline(transaction=False)
        for job_id, result in zip(ids, finished, strict=True):
            if result is not None:
                ledger.forget(pipe, job_id)  # done; the worker died before clearing the ledger
        pipe.execute()
        held = self._unacked_ids()
        unheld = [
            job_id
            for job_id, result in zip(ids, finished, strict=True)
            if result is None and job_id not in held
        ]
        queues = self._queues_of(unheld)
        oldest = {queue: self._oldest_waiting(queue) for queue in set(queues.values())}
        lost = [job_id for job_id in unheld if candidates[job_id] < oldest[queues[job_id]]]
        if lost:
            # A message taken off its queue after the unacknowledged set was read, and recorded
            # there only after its queue was read, looks lost: look again once it has landed
            # (and, in case it has finished since, for its result).
            self._stop.wait(_RECHECK_AFTER_S)
            held = self._unacked_ids()
            lost = [job_id for job_id in lost if job_id not in held]
            done = self._redis.mget([self._result_key(i) for i in lost]) if lost else []
            lost = [job_id for job_id, result in zip(lost, done, strict=True) if result is None]
        return [job_id for job_id in lost if self._send_again(job_id)]

    def _send_again(self, job_id: str) -> bool:
        raw = self._redis.hget(LEDGER_PAYLOADS, job_id)
        if raw is None:
            return False
        kwargs = json.loads(raw)
        log.warning("reaper: job %s was lost by a consumer; sending it again", job_id)
        self._redis.zadd(LEDGER, {job_id: self._now()})  # not again before another full wait
        self._resend(job_id, kwargs)
        return True

    def _unacked_ids(self) -> set[str]:
        ids = set()
        for raw in self._broker.hvals(KOMBU_UNACKED):
            try:
                ids.update(message_job_ids(json.loads(raw)[0]["headers"]))
            except (ValueError, KeyError, IndexError, TypeError):
                continue
        return ids

    def _queues_of(self, job_ids: list[str]) -> dict[str, str]:
        """Each job's queue: that of the model its ledger payload names."""
        if not job_ids:
            return {}
        payloads = self._redis.hmget(LEDGER_PAYLOADS, job_ids)
        queues = {}
        for job_id, raw in zip(job_ids, payloads, strict=True):
            try:
                payload = json.loads(raw).get("job") if raw is not None else None
            except (ValueError, AttributeError):
                payload = None
            queues[job_id] = queue_for(model_of(payload))
        return queues

    def _oldest_waiting(self, queue: str) -> float:
        """Submission time of the oldest message still waiting in a queue (inf if none)."""
        raw = self._broker.lindex(queue, -1)
        if raw is None:
            return float("inf")
        try:
            # A chunk's jobs were recorded in order: its first job is its oldest.
            job_id = message_job_ids(json.loads(raw)["headers"])[0]
        except (ValueError, KeyError, IndexError, TypeError):
            return float("-inf")  # cannot tell: assume nothing is lost
        score = self._redis.zscore(LEDGER, job_id)
        return score if score is not None else float("-inf")
