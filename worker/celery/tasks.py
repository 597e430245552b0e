"""Thin Celery tasks: decode the message, hand it to the engine, store the JobResult.

``blipq.run_job`` runs one job; ``blipq.run_chunk`` the jobs of a chunk message (through the
process's ``ChunkRunner``). Both follow one ``DeliveryPolicy``: transient failures retried with
backoff, then answered; a job whose earlier starts did not finish is a suspect, run alone, and
poison after dying ``max_deliveries`` times alone. A job whose result is an error raises
``JobFailed`` with it, so that Celery stores, reports and counts it as a failure
(``task-failed``, Flower's Failed, ``AsyncResult.state == "FAILURE"``); the stored record
carries the JobResult.
"""

from __future__ import annotations

import logging
from typing import Any, cast

from celery import Task

from producer.protocol.errors import JobFailed, Retryable
from producer.protocol.jobs import encode_result
from producer.protocol.keys import TASK_RUN_CHUNK, TASK_RUN_JOB
from worker.celery.app import app, services
from worker.celery.backend import WorkerResultBackend, stored_answer
from worker.delivery.policy import DiedRunning
from worker.engine import Engine

log = logging.getLogger(__name__)


class JobTask(Task):  # type: ignore[type-arg]
    # Every message is checked before Celery builds a request from it (worker.celery.refused).
    Strategy = "worker.celery.refused:guarded_strategy"
    acks_late = True
    reject_on_worker_lost = True
    # An error result is an expected failure: Celery logs it in one line, without a traceback.
    throws = (JobFailed,)

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        # Celery stored the result, announced it and cleared the job's bookkeeping in one go
        # (worker.celery.backend) before this runs and before the message is acked; a message
        # sent with ignore_result skips that store, and gets its answer here instead.
        if self.request.ignore_result:
            cast(WorkerResultBackend, self.backend).answer(task_id, retval)

    def on_failure(self, exc: Any, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        # As on_success: Celery stores no failure of a message sent with ignore_result.
        if self.request.ignore_result and isinstance(exc, JobFailed):
            cast(WorkerResultBackend, self.backend).answer(task_id, exc.result)


@app.task(base=JobTask, bind=True, name=TASK_RUN_JOB, max_retries=None)  # type: ignore[untyped-decorator]
def run_job(self: JobTask, job: Any = None, submitted_at: float | None = None) -> dict[str, Any]:
    result = _run_job(self, job, submitted_at)
    if result.get("status") == "error":
        raise JobFailed(result)
    return result


def _run_job(task: JobTask, job: Any, submitted_at: float | None) -> dict[str, Any]:
    job_id = str(task.request.id)
    while True:
        try:
            return _start(task, job_id, job, submitted_at)
        except DiedRunning as exc:
            # The model process died in this job's batch (it is started again): an unfinished
            # start, its count kept. The job is judged at once, here, as a redelivered one
            # would be: run alone, or dead-lettered. Neither a message round trip nor one of
            # the job's transient retries is spent on it.
            log.warning("job %s: %s; judged again here", job_id, exc.message)


def _start(task: JobTask, job_id: str, job: Any, submitted_at: float | None) -> dict[str, Any]:
    """One start of the job: a first one, or that of a suspect (raises ``DiedRunning``)."""
    engine = services().engine
    with engine.quarantine.shared():
        earlier = engine.deliveries.begin(job_id)
        if not earlier:
            return _run(task, engine, job_id, job, submitted_at)
    # An earlier start did not finish: this is a redelivery (its worker was killed, or lost its
    # connection, while the job was in flight), or the model process died running it.
    stored = stored_answer(task.backend.get_task_meta(job_id))
    if stored is not None:  # answered before: the same answer again (stored once)
        return dict(stored)
    if engine.policy.is_poison(earlier):
        result, reason = engine.policy.poison(job_id, job, earlier)
        engine.deliveries.dead_letter(job_id, job, reason)
        return encode_result(result)
    # A suspect: it runs alone in this process, so a crash it causes counts against it alone.
    log.warning("job %s: %d earlier start(s) did not finish; running it alone", job_id, earlier)
    with engine.quarantine.alone():
        engine.deliveries.restart(job_id)
        return _run(task, engine, job_id, job, submitted_at, alone=True)


def _run(
    task: JobTask,
    engine: Engine,
    job_id: str,
    job: Any,
    submitted_at: float | None,
    *,
    alone: bool = False,
) -> dict[str, Any]:
    try:
        result = engine.handle(job_id, job, submitted_at, alone=alone)
    except DiedRunning:
        raise  # judged again by _run_job
    except Retryable as exc:
        attempt = task.request.retries
        countdown = engine.policy.retry_in(attempt)
        if countdown is None:
            return encode_result(engine.policy.gave_up(job_id, job, exc, attempt + 1))
        engine.deliveries.finished(job_id)
        log.info(
            "job %s: %s; attempt %d, again in %.0f s", job_id, exc.message, attempt + 1, countdown
        )
        raise task.retry(exc=exc, countdown=countdown) from exc
    return encode_result(result)


class ChunkTask(Task):  # type: ignore[type-arg]
    Strategy = "worker.celery.refused:guarded_strategy"
    acks_late = True
    reject_on_worker_lost = True
    ignore_result = True  # results are stored per job, under the jobs' ids


@app.task(base=ChunkTask, bind=True, name=TASK_RUN_CHUNK)  # type: ignore[untyped-decorator]
def run_chunk(self: ChunkTask, jobs: Any = None, submitted_at: Any = None) -> int:
    """Run every job of a chunk message; return how many were answered here."""
    queue = (self.request.delivery_info or {}).get("routing_key")
    sent_at = float(submitted_at) if isinstance(submitted_at, int | float) else None
    return services().chunks.run(str(self.request.id), jobs, sent_at, queue)
