"""Thin Celery tasks: decode the message, hand it to the runtime, return the JobResult as JSON."""

from __future__ import annotations

import logging
from typing import Any, cast

from celery import Task, states

from producer.constants import DEAD_LETTER, TASK_RUN_JOB
from producer.errors import Retryable
from producer.jobs import ErrorCode, JobResult, encode_result
from worker.app import app
from worker.results import WorkerResultBackend
from worker.runtime import Runtime, get_runtime

log = logging.getLogger(__name__)

# Seconds before retry n of a transient failure (capped exponential backoff).
_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)


class JobTask(Task):  # type: ignore[type-arg]
    acks_late = True
    reject_on_worker_lost = True

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        # Celery stored the result, announced it and cleared the job's bookkeeping in one go
        # (worker.results) before this runs and before the message is acked; a message sent with
        # ignore_result skips that store, and gets its answer here instead.
        if self.request.ignore_result:
            cast(WorkerResultBackend, self.backend).answer(task_id, retval)


@app.task(base=JobTask, bind=True, name=TASK_RUN_JOB, max_retries=None)  # type: ignore[untyped-decorator]
def run_job(self: JobTask, job: Any = None, submitted_at: float | None = None) -> dict[str, Any]:
    runtime = get_runtime()
    job_id = str(self.request.id)
    with runtime.quarantine.shared():
        earlier = runtime.deliveries.begin(job_id)
        if not earlier:
            return _run(self, runtime, job_id, job, submitted_at)
    # A redelivery: an earlier start did not finish (its worker was killed, or lost its
    # connection, while the job was in flight).
    stored = self.backend.get_task_meta(job_id)
    if stored.get("status") == states.SUCCESS:
        return dict(stored["result"])
    if earlier >= runtime.settings.max_deliveries:
        return _poison(runtime, job_id, job, earlier)
    # A suspect: it runs alone in this process, so a crash it causes counts against it alone.
    log.warning("job %s: %d earlier start(s) did not finish; running it alone", job_id, earlier)
    with runtime.quarantine.alone():
        runtime.deliveries.restart(job_id)
        return _run(self, runtime, job_id, job, submitted_at)


def _run(
    task: JobTask, runtime: Runtime, job_id: str, job: Any, submitted_at: float | None
) -> dict[str, Any]:
    try:
        result = runtime.handle(job_id, job, submitted_at)
    except Retryable as exc:
        attempt = task.request.retries
        if attempt + 1 < runtime.settings.s3_max_attempts:
            runtime.deliveries.finished(job_id)
            countdown = _BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)]
            log.info(
                "job %s: %s; attempt %d, again in %.0f s",
                job_id,
                exc.message,
                attempt + 1,
                countdown,
            )
            raise task.retry(exc=exc, countdown=countdown) from exc
        result = JobResult.failure(
            job_id,
            _kind(job),
            ErrorCode.STORAGE_UNAVAILABLE,
            f"{exc.message} (gave up after {attempt + 1} attempts)",
            worker=runtime.worker_name,
        )
    return encode_result(result)


def _poison(runtime: Runtime, job_id: str, job: Any, starts: int) -> dict[str, Any]:
    reason = (
        f"started {starts} times without finishing (it kills or stalls workers); "
        f"not run again, payload moved to the {DEAD_LETTER} list"
    )
    runtime.deliveries.dead_letter(job_id, job, reason)
    result = JobResult.failure(
        job_id, _kind(job), ErrorCode.POISON, reason, worker=runtime.worker_name
    )
    return encode_result(result)


def _kind(job: Any) -> str:
    return str(job.get("kind", "unknown")) if isinstance(job, dict) else "unknown"
