"""Thin Celery tasks: decode the message, hand it to the runtime, return the JobResult as JSON."""

from __future__ import annotations

from typing import Any

from celery import Task

from producer.constants import TASK_RUN_JOB
from producer.errors import Retryable
from producer.jobs import ErrorCode, JobResult, encode_result
from worker.app import app
from worker.runtime import get_runtime

# Seconds before retry n of a transient failure (capped exponential backoff).
_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)


class JobTask(Task):  # type: ignore[type-arg]
    acks_late = True
    reject_on_worker_lost = True

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        # Runs after the result is stored and before the message is acked.
        get_runtime().publisher.publish(retval)


@app.task(base=JobTask, bind=True, name=TASK_RUN_JOB, max_retries=None)  # type: ignore[untyped-decorator]
def run_job(self: JobTask, job: Any = None, submitted_at: float | None = None) -> dict[str, Any]:
    runtime = get_runtime()
    job_id = str(self.request.id)
    try:
        result = runtime.handle(job_id, job, submitted_at)
    except Retryable as exc:
        attempt = self.request.retries
        if attempt + 1 < runtime.settings.s3_max_attempts:
            countdown = _BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)]
            raise self.retry(exc=exc, countdown=countdown) from exc
        kind = job.get("kind", "unknown") if isinstance(job, dict) else "unknown"
        result = JobResult.failure(
            job_id,
            str(kind),
            ErrorCode.STORAGE_UNAVAILABLE,
            f"{exc.message} (gave up after {attempt + 1} attempts)",
            worker=runtime.worker_name,
        )
    return encode_result(result)
