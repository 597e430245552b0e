"""Client: submit jobs, wait for one result, or stream many as they complete."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import redis
from celery import states

from producer import ledger
from producer.chunks import encode_chunk, group_messages
from producer.config import ClientSettings
from producer.constants import (
    CHUNK_JOBS_HEADER,
    MAX_JOBS_PER_MESSAGE,
    TASK_RUN_CHUNK,
    TASK_RUN_JOB,
    queue_for,
)
from producer.errors import ResultTimeout
from producer.jobs import JOB_KINDS, AnyJob, ErrorCode, JobResult, decode_result, encode_job
from producer.stream import StreamEvent, follow
from producer.transport import make_app
from producer.waiting import ResultWaiter

if TYPE_CHECKING:
    from producer.bulk import BulkRun

# How many result keys one results() call subscribes to at a time.
_SUBSCRIBE_CHUNK = 1000
_IDLE_WAITERS = 8  # finished waiters kept for reuse
# kombu's Redis transport keeps priorities 3, 6, 9 in sub-queues named queue + sep + step.
_PRIORITY_SEP = "\x06\x16"


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
        self._app = make_app(self.settings)
        self._redis = redis.Redis.from_url(self.settings.redis_url)
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
        self._send_chunk([(job, job_id)], producer=None)
        return job_id

    def submit_many(self, jobs: Iterable[AnyJob], *, per_message: int | None = None) -> list[str]:
        """Send many jobs: per chunk of ``submit_chunk`` jobs, one round trip for the ledger
        and one for the messages (kombu's publish batch pipelines the LPUSHes).

        ``per_message`` (default ``jobs_per_message``): jobs of one kind carried by one broker
        message (``producer.chunks``); every job still gets its own id, result and event.
        """
        pending = [(job, str(uuid.uuid4())) for job in jobs]
        chunk = self.settings.submit_chunk
        with self._app.producer_or_acquire() as producer:
            for start in range(0, len(pending), chunk):
                with producer.batch(max_size=chunk):
                    self._send_chunk(
                        pending[start : start + chunk], producer=producer, per_message=per_message
                    )
        return [job_id for _, job_id in pending]

    def _send(self, job: AnyJob, job_id: str, producer: Any) -> None:
        """Send one job under a given id (ledger write included)."""
        self._send_chunk([(job, job_id)], producer=producer)

    def _send_chunk(
        self, jobs: list[tuple[AnyJob, str]], producer: Any, per_message: int | None = None
    ) -> None:
        """Send one round trip's jobs: the ledger entries, then the messages (a job alone, or
        chunk messages of up to ``per_message`` jobs of one kind)."""
        size = per_message or self.settings.jobs_per_message
        if not 1 <= size <= MAX_JOBS_PER_MESSAGE:
            raise ValueError(f"per_message must be 1-{MAX_JOBS_PER_MESSAGE}, not {size}")
        now = time.time()
        messages = [
            (job, job_id, {"job": encode_job(job), "submitted_at": now}) for job, job_id in jobs
        ]
        # The ledger first: a job is on record before any worker can take it. Its entry holds
        # the job as a message of its own, which is how the reaper sends a lost one again.
        pipe = self._redis.pipeline(transaction=False)
        # Scores rise by a microsecond per job so that ledger order is queue (FIFO) order.
        ledger.record(
            pipe,
            [(job_id, kwargs, now + i * 1e-6) for i, (_, job_id, kwargs) in enumerate(messages)],
        )
        pipe.execute()
        for group in group_messages(messages, lambda message: message[0].kind, size):
            queue = queue_for(group[0][0].kind)
            if len(group) == 1:
                _, job_id, kwargs = group[0]
                self._app.send_task(
                    TASK_RUN_JOB,
                    kwargs=kwargs,
                    task_id=job_id,
                    queue=queue,
                    routing_key=queue,
                    producer=producer,
                    # What Flower and `celery inspect` show. Celery's default is a repr of
                    # the whole job: a second copy in every message, 15 % of a submit's time.
                    argsrepr="()",
                    kwargsrepr=f"{group[0][0].kind} job on {group[0][0].image}",
                )
                continue
            ids = [job_id for _, job_id, _ in group]
            self._app.send_task(
                TASK_RUN_CHUNK,
                kwargs=encode_chunk([(job_id, kw["job"]) for _, job_id, kw in group], now),
                task_id=str(uuid.uuid4()),
                queue=queue,
                routing_key=queue,
                producer=producer,
                headers={CHUNK_JOBS_HEADER: ids},
                ignore_result=True,  # results are stored per job, under the jobs' ids
                argsrepr="()",
                kwargsrepr=f"chunk of {len(group)} {group[0][0].kind} jobs",
            )

    # --- results ---------------------------------------------------------------------------------

    def result(self, job_id: str, timeout: float | None = None) -> JobResult:
        """Wait for the result of one job; raise ResultTimeout after ``timeout`` seconds."""
        for result in self.results([job_id], timeout=timeout):
            return result
        raise ResultTimeout(f"no result for job {job_id} within {timeout}s")  # pragma: no cover

    def results(self, job_ids: Sequence[str], timeout: float | None = None) -> Iterator[JobResult]:
        """Yield results as they complete (any order); ResultTimeout if some are still missing.

        Uses the result backend's own publish-on-store (see ``producer.waiting``): subscribe
        first, then read what is already stored, then wait for messages.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        for start in range(0, len(job_ids), _SUBSCRIBE_CHUNK):
            waiter = self._borrow_waiter()
            try:
                yield from waiter.add(job_ids[start : start + _SUBSCRIBE_CHUNK])
                while len(waiter):
                    wait = 1.0 if deadline is None else deadline - time.monotonic()
                    if wait <= 0:
                        raise ResultTimeout(f"{len(waiter)} results still pending")
                    yield from waiter.wait(min(wait, 1.0))
            finally:
                # Also when the caller stops early (``result`` takes one and returns).
                self._give_back(waiter)

    def waiter(self) -> ResultWaiter:
        """A subscription that waits for the results of the jobs added to it."""
        return ResultWaiter(self._redis, self._app.backend, self._to_result)

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

    def _to_result(self, job_id: str, raw: bytes | str | None) -> JobResult | None:
        """The final result in a stored meta record, or None while the job is not done."""
        if raw is None:
            return None
        backend: Any = self._app.backend
        meta = backend.decode_result(raw)
        if meta.get("status") not in states.READY_STATES:
            return None
        if meta.get("status") == states.SUCCESS:
            return decode_result(meta["result"])
        detail = meta.get("result") or {}
        message = detail.get("exc_message") if isinstance(detail, dict) else str(detail)
        return JobResult.failure(
            job_id, "unknown", ErrorCode.INTERNAL, f"task {meta.get('status')}: {message}"
        )

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

    def bulk(
        self,
        jobs: Iterable[AnyJob | str] | Mapping[str, AnyJob | str],
        *,
        run_id: str | None = None,
        kind: str = "caption",
        options: Mapping[str, Any] | None = None,
        max_pending: int = 2000,
        chunk: int | None = None,
        per_message: int | None = None,
        idle_timeout_s: float | None = None,
        force: bool = False,
    ) -> BulkRun:
        """Start or resume a bulk run (``producer.bulk``): iterate it for results, poll
        ``progress()``. Image URIs become ``kind`` jobs with ``options``; a mapping names items.
        The same ``run_id`` (default: derived from the inputs) skips what an earlier start did.
        ``per_message``: jobs per broker message (default ``jobs_per_message``), as in submit_many.
        """
        from producer.bulk import start_run

        return start_run(
            self,
            jobs,
            run_id=run_id,
            kind=kind,
            options=options,
            max_pending=max_pending,
            chunk=chunk,
            per_message=per_message,
            idle_timeout_s=idle_timeout_s,
            force=force,
        )

    def queue_depths(self) -> dict[str, int]:
        """Messages waiting in each blipq queue (Redis broker; priority sub-queues summed)."""
        broker = redis.Redis.from_url(self.settings.effective_broker_url)
        try:
            depths = {}
            for kind in JOB_KINDS:
                queue = queue_for(kind)
                names = [queue] + [f"{queue}{_PRIORITY_SEP}{step}" for step in (3, 6, 9)]
                depths[queue] = sum(int(broker.llen(name)) for name in names)
            return depths
        finally:
            broker.close()

    def worker_activity(self, timeout: float = 1.0) -> dict[str, tuple[int, int]]:
        """Per worker: (reserved, active) job counts, from Celery's remote control."""
        inspect = self._app.control.inspect(timeout=timeout)
        reserved = inspect.reserved() or {}
        active = inspect.active() or {}
        return {
            name: (len(reserved.get(name) or []), len(active.get(name) or []))
            for name in set(reserved) | set(active)
        }

    def close(self) -> None:
        with self._waiters_lock:
            idle, self._idle_waiters = self._idle_waiters, []
        for waiter in idle:
            waiter.close()
        self._redis.close()
        self._app.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
