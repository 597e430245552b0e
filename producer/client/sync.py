"""Client: submit jobs, wait for one result, or stream many as they complete."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import redis

from producer.client.sender import Sender
from producer.client.stream import StreamEvent, follow
from producer.client.waiting import ResultWaiter
from producer.protocol.connect import redis_client
from producer.protocol.errors import RedisUnavailable, ResultTimeout
from producer.protocol.jobs import AnyJob, JobResult
from producer.protocol.keys import (
    KOMBU_BINDING_PREFIX,
    KOMBU_PRIORITY_SEP,
    KOMBU_PRIORITY_STEPS,
    QUEUE_PREFIX,
    model_of_queue,
    queue_for,
    text,
)
from producer.protocol.settings import ClientSettings

# How many result keys one results() call subscribes to at a time.
_SUBSCRIBE_CHUNK = 1000
_IDLE_WAITERS = 8  # finished waiters kept for reuse


class Client:
    """The producer's handle on blipq. Thread-safe: share one per process."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        broker_url: str | None = None,
        settings: ClientSettings | None = None,
    ) -> None:
        base = settings or ClientSettings()
        overrides: dict[str, Any] = {}
        if redis_url is not None:
            overrides["redis_url"] = redis_url
        if broker_url is not None:
            overrides["broker_url"] = broker_url
        self.settings = base.model_copy(update=overrides) if overrides else base
        self.sender = Sender(self.settings)
        """Records and sends jobs, reads their results: what bulk runs and AsyncClient use."""
        self._redis = self.sender.redis
        # Waiters whose jobs are all done, kept subscribed-to-nothing for the next ``results``:
        # a waiter of its own per call opened a connection (connect + HELLO) per call.
        self._idle_waiters: list[ResultWaiter] = []
        self._waiters_lock = threading.Lock()

    @classmethod
    def from_env(cls) -> Client:
        """Build a client from ``BLIPQ_*`` environment variables."""
        return cls(settings=ClientSettings())

    # --- sending ---------------------------------------------------------------------------------

    def submit(self, job: AnyJob, *, job_id: str | None = None) -> str:
        """Send one job; return its id (the Celery task id)."""
        job_id = job_id or str(uuid.uuid4())
        self.sender.send([(job, job_id)])
        return job_id

    def submit_many(self, jobs: Iterable[AnyJob], *, per_message: int | None = None) -> list[str]:
        """Send many jobs: per chunk of ``submit_chunk`` jobs, one round trip for the ledger
        and one for the messages (kombu's publish batch pipelines the LPUSHes).

        ``per_message`` (default ``jobs_per_message``): jobs of one kind carried by one broker
        message (``producer.protocol.chunks``); every job still gets its own id, result and event.
        """
        pending = [(job, str(uuid.uuid4())) for job in jobs]
        self.sender.send(pending, per_message=per_message)
        return [job_id for _, job_id in pending]

    # --- results ---------------------------------------------------------------------------------

    def result(self, job_id: str, timeout: float | None = None) -> JobResult:
        """Wait for the result of one job; raise ResultTimeout after ``timeout`` seconds."""
        for result in self.results([job_id], timeout=timeout):
            return result
        raise ResultTimeout(f"no result for job {job_id} within {timeout}s")  # pragma: no cover

    def results(self, job_ids: Sequence[str], timeout: float | None = None) -> Iterator[JobResult]:
        """Yield results as they complete (any order); ResultTimeout if some are still missing.

        RedisUnavailable (not ResultTimeout) once Redis has been unreachable for
        ``redis_down_s`` seconds, or at the timeout if it is unreachable then: a restart shorter
        than that is ridden out, nothing lost. Uses the result backend's own publish-on-store
        (see ``producer.client.waiting``): subscribe first, then read what is already stored,
        then wait for messages.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        for start in range(0, len(job_ids), _SUBSCRIBE_CHUNK):
            waiter = self._borrow_waiter()
            try:
                yield from waiter.add(job_ids[start : start + _SUBSCRIBE_CHUNK])
                while len(waiter):
                    wait = 1.0 if deadline is None else deadline - time.monotonic()
                    down = waiter.down_for()
                    if down >= self.settings.redis_down_s or (down and wait <= 0):
                        raise RedisUnavailable(
                            self.settings.redis_url,
                            f"{down:.1f} s without an answer: {waiter.last_error}",
                        )
                    if wait <= 0:
                        raise ResultTimeout(f"{len(waiter)} results still pending")
                    yield from waiter.wait(min(wait, 1.0))
            finally:
                # Also when the caller stops early (``result`` takes one and returns).
                self._give_back(waiter)

    def waiter(self) -> ResultWaiter:
        """A subscription that waits for the results of the jobs added to it."""
        return self.sender.waiter()

    def _borrow_waiter(self) -> ResultWaiter:
        with self._waiters_lock:
            if self._idle_waiters:
                return self._idle_waiters.pop()
        return self.waiter()

    def _give_back(self, waiter: ResultWaiter) -> None:
        """Keep a waiter with nothing pending (a few: one per thread waiting at once)."""
        if waiter.idle():
            with self._waiters_lock:
                if len(self._idle_waiters) < _IDLE_WAITERS:
                    self._idle_waiters.append(waiter)
                    return
        waiter.close()  # a timeout or an early stop: its subscriptions go with it

    def stream(
        self,
        *,
        group: str,
        consumer: str,
        from_start: bool = False,
        block_ms: int = 1000,
        idle_stop: bool = False,
    ) -> Iterator[StreamEvent]:
        """Follow finished jobs on the results stream as one consumer of a consumer group.

        At-least-once and resumable: an event is acknowledged when the next one is requested,
        and a restarted consumer first gets back the events it had not finished.
        """
        return follow(
            self._redis,
            group=group,
            consumer=consumer,
            from_start=from_start,
            block_ms=block_ms,
            idle_stop=idle_stop,
        )

    def queue_depths(self) -> dict[str, int]:
        """Messages waiting in each model's queue (Redis broker; priority sub-queues summed).

        Every queue a worker or producer has declared is listed (0 when empty), and every queue
        holding messages, so jobs for a model that no live worker serves wait visibly.
        """
        broker = redis_client(self.settings.effective_broker_url, self.settings.redis_master_name)
        try:
            return queue_depths(broker)
        finally:
            broker.close()

    def worker_activity(self, timeout: float = 1.0) -> dict[str, tuple[int, int]]:
        """Per worker: (reserved, active) job counts, from Celery's remote control."""
        inspect = self.sender.app.control.inspect(timeout=timeout)
        reserved = inspect.reserved() or {}
        active = inspect.active() or {}
        return {
            name: (len(reserved.get(name) or []), len(active.get(name) or []))
            for name in set(reserved) | set(active)
        }

    def queue_consumers(self, timeout: float = 1.0) -> dict[str, int]:
        """Per queue: how many live workers consume it (Celery's remote control)."""
        answers = self.sender.app.control.inspect(timeout=timeout).active_queues() or {}
        counts: dict[str, int] = {}
        for queues in answers.values():
            for queue in queues or []:
                name = str(queue.get("name", "")) if isinstance(queue, dict) else ""
                counts[name] = counts.get(name, 0) + 1
        return counts

    def close(self) -> None:
        with self._waiters_lock:
            idle, self._idle_waiters = self._idle_waiters, []
        for waiter in idle:
            waiter.close()
        self.sender.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def queue_depths(broker: redis.Redis) -> dict[str, int]:
    """Messages waiting in each blipq queue, by queue name, sorted: the queues declared on the
    broker (kombu's bindings; a worker declares those of the models it serves) and those that
    hold messages (a queue no worker serves too)."""
    models: set[str] = set()
    for key in broker.scan_iter(match=f"{QUEUE_PREFIX}*", count=1000):
        model = model_of_queue(text(key))
        if model is not None:
            models.add(model)
    for key in broker.scan_iter(match=f"{KOMBU_BINDING_PREFIX}{QUEUE_PREFIX}*", count=1000):
        model = model_of_queue(text(key)[len(KOMBU_BINDING_PREFIX) :])
        if model is not None:
            models.add(model)
    depths = {}
    for model in sorted(models):
        queue = queue_for(model)
        names = [queue, *(f"{queue}{KOMBU_PRIORITY_SEP}{n}" for n in KOMBU_PRIORITY_STEPS)]
        pipe = broker.pipeline(transaction=False)
        for name in names:
            pipe.llen(name)
        depths[queue] = sum(int(n) for n in pipe.execute())
    return depths
