"""The Sender: the one place jobs are recorded in the ledger and sent, and results are read.

``Client``, ``AsyncClient`` and bulk runs all send through a Sender: one Redis round trip for the
ledger entries of a batch of jobs, then the messages (a job alone, or chunk messages of several
jobs of one model and kind) to the queue of the jobs' model, by task name, JSON only, the task
id being the job id.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from celery import states

from producer.client.waiting import ResultWaiter
from producer.protocol import ledger
from producer.protocol.celeryconf import make_app
from producer.protocol.chunks import encode_chunk, group_messages
from producer.protocol.errors import JobFailed
from producer.protocol.jobs import AnyJob, ErrorCode, JobResult, decode_result, encode_job
from producer.protocol.keys import (
    CHUNK_JOBS_HEADER,
    MAX_JOBS_PER_MESSAGE,
    TASK_RUN_CHUNK,
    TASK_RUN_JOB,
    queue_for,
)
from producer.protocol.settings import ClientSettings

Pending = Sequence[tuple[AnyJob, str]]
"""Jobs to send, each with its id."""


class Sender:
    """Records jobs in the ledger, sends them to their queues, reads their stored results.

    Thread-safe: one per process is enough. ``redis`` is the results Redis (ledger, results,
    stream); the broker connection is Celery's.
    """

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self.app = make_app(settings)
        self.redis = settings.redis()
        self._backend: Any = self.app.backend

    def send(self, jobs: Pending, *, per_message: int | None = None) -> None:
        """Send jobs: per ``submit_chunk`` jobs one round trip for the ledger and one for the
        messages (kombu's publish batch pipelines the LPUSHes)."""
        chunk = self.settings.submit_chunk
        with self.app.producer_or_acquire() as producer:
            for start in range(0, len(jobs), chunk):
                part = jobs[start : start + chunk]
                with producer.batch(max_size=len(part)):
                    self.send_batch(part, producer=producer, per_message=per_message)

    def send_batch(self, jobs: Pending, *, producer: Any, per_message: int | None = None) -> None:
        """Send one round trip's jobs: the ledger entries, then the messages (a job alone, or
        chunk messages of up to ``per_message`` jobs of one queue)."""
        size = per_message or self.settings.jobs_per_message
        if not 1 <= size <= MAX_JOBS_PER_MESSAGE:
            raise ValueError(f"per_message must be 1-{MAX_JOBS_PER_MESSAGE}, not {size}")
        now = time.time()
        messages = [
            (job, job_id, {"job": encode_job(job), "submitted_at": now}) for job, job_id in jobs
        ]
        # The ledger first: a job is on record before any worker can take it. Its entry holds
        # the job as a message of its own, which is how the reaper sends a lost one again.
        pipe = self.redis.pipeline(transaction=False)
        # Scores rise by a microsecond per job so that ledger order is queue (FIFO) order.
        ledger.record(
            pipe,
            [(job_id, kwargs, now + i * 1e-6) for i, (_, job_id, kwargs) in enumerate(messages)],
        )
        pipe.execute()
        # A message's jobs share a model (its queue) and a kind.
        for group in group_messages(messages, lambda m: f"{m[0].model}\n{m[0].kind}", size):
            first = group[0][0]
            queue = queue_for(first.model)
            if len(group) == 1:
                _, job_id, kwargs = group[0]
                self.app.send_task(
                    TASK_RUN_JOB,
                    kwargs=kwargs,
                    task_id=job_id,
                    queue=queue,
                    routing_key=queue,
                    producer=producer,
                    # What Flower and `celery inspect` show. Celery's default is a repr of
                    # the whole job: a second copy in every message, 15 % of a submit's time.
                    argsrepr="()",
                    kwargsrepr=f"{first.kind} job on {first.image}",
                )
                continue
            ids = [job_id for _, job_id, _ in group]
            self.app.send_task(
                TASK_RUN_CHUNK,
                kwargs=encode_chunk([(job_id, kw["job"]) for _, job_id, kw in group], now),
                task_id=str(uuid.uuid4()),
                queue=queue,
                routing_key=queue,
                producer=producer,
                headers={CHUNK_JOBS_HEADER: ids},
                ignore_result=True,  # results are stored per job, under the jobs' ids
                argsrepr="()",
                kwargsrepr=f"chunk of {len(group)} {first.kind} jobs",
            )

    # --- results ---------------------------------------------------------------------------------

    def result_key(self, job_id: str) -> str:
        """The Redis key a job's result is stored under (Celery's ``celery-task-meta-<id>``)."""
        return str(self._backend.get_key_for_task(job_id).decode())

    def to_result(self, job_id: str, raw: bytes | str | None) -> JobResult | None:
        """The final result in a stored record, or None while the job is not done.

        An ok result is stored as Celery's SUCCESS, an error result as its FAILURE, the
        exception (``JobFailed``) carrying the JobResult. A stored value that is not a JobResult
        (a Celery task other than blipq's, a record written by something else) becomes an
        ``internal`` error result, never an exception.
        """
        if raw is None:
            return None
        try:
            meta = self._backend.decode_result(raw)
        except Exception as exc:
            return _unreadable(job_id, f"the stored result could not be decoded: {exc}")
        if not isinstance(meta, dict) or meta.get("status") not in states.READY_STATES:
            return None
        if meta.get("status") == states.SUCCESS:
            try:
                return decode_result(meta["result"])
            except Exception as exc:
                return _unreadable(job_id, f"the stored value is not a blipq result: {exc}")
        detail = meta.get("result") or {}
        if isinstance(detail, JobFailed):
            try:
                return decode_result(detail.result)
            except Exception as exc:
                return _unreadable(job_id, f"the stored failure is not a blipq result: {exc}")
        message = detail.get("exc_message") if isinstance(detail, dict) else str(detail)
        return _unreadable(job_id, f"task {meta.get('status')}: {message}")

    def waiter(self) -> ResultWaiter:
        """A subscription that waits for the results of the jobs added to it."""
        return ResultWaiter(self.redis, self.result_key, self.to_result)

    def close(self) -> None:
        self.redis.close()
        self.app.close()


def _unreadable(job_id: str, message: str) -> JobResult:
    return JobResult.failure(job_id, "unknown", ErrorCode.INTERNAL, message[:500])
