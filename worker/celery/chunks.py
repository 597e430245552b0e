"""Chunk messages on the worker: one broker message, many jobs, each answered on its own.

A chunk (``producer.protocol.chunks``) is expanded into its jobs. A pool of ``concurrency`` threads
runs them through ``Engine.handle`` (fetch, decode, then the batcher, where they batch with every
other producer's jobs), and each job's result is stored under its own id, announced on the stream
and cleared from the ledger as soon as it is ready, exactly as a job of its own would be. The
message is acknowledged after the last of its jobs has a result (or a message of its own, below).

A job of a chunk keeps the guarantees of a job of its own:

- Starts are counted per job, as the pool starts it (``DeliveryGuard.begin``), under the same
  ``Quarantine`` as single jobs; a job with earlier unfinished starts is a suspect and is sent on
  as a message of its own, where ``run_job`` judges it (stored result, poison, run alone).
- A transiently failing job is retried as a message of its own (Celery's retry is per message).
- A redelivered chunk (its worker died or lost its connection mid-chunk: the chunk's start
  marker is already set) is not run again: jobs whose result is stored are announced again
  (deduplicated) and cleared, every other job is sent on as a message of its own. So no answered
  job gets a second result, and a job that kills workers is isolated and counted alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery.exceptions import Reject

from producer.protocol.chunks import ChunkEntry, decode_chunk
from producer.protocol.errors import Retryable
from producer.protocol.jobs import ErrorCode, JobResult, encode_result, model_of
from producer.protocol.keys import CHUNK_STARTED_KEY, LEDGER, TASK_RUN_JOB, queue_for
from worker.celery.backend import stored_answer
from worker.delivery.policy import DiedRunning, kind_of
from worker.engine import Engine

log = logging.getLogger(__name__)


class ChunkRunner:
    """Expands chunk messages into jobs on a thread pool shared by every chunk of the process."""

    def __init__(
        self,
        engine: Engine,
        *,
        threads: int,
        backend: Any,
        send_task: Callable[..., Any],
    ) -> None:
        self.engine = engine
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="blipq-chunk")
        self._backend = backend  # the worker's result backend (worker.celery.backend)
        self._send_task = send_task

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def run(
        self, chunk_id: str, jobs: object, submitted_at: float | None, queue: str | None
    ) -> int:
        chunk = decode_chunk(jobs)
        if chunk.problems:
            reason = f"chunk message {chunk_id}: " + "; ".join(chunk.problems[:5])
            log.warning("%s", reason)
            self.engine.deliveries.dead_letter(chunk_id, {"problems": chunk.problems}, reason)
        if chunk.refusal is not None:
            for entry in chunk.entries:
                failure = JobResult.failure(
                    entry.job_id,
                    kind_of(entry.payload),
                    ErrorCode.INVALID_JOB,
                    chunk.refusal,
                    worker=self.engine.worker_name,
                )
                self._answer(entry.job_id, encode_result(failure))
            return len(chunk.entries)
        if not self._first_start(chunk_id):
            return self._split(chunk_id, chunk.entries, submitted_at, queue)
        futures = [
            self._pool.submit(self._one, entry, submitted_at, queue) for entry in chunk.entries
        ]
        answered, failures = 0, []
        for future in futures:
            try:
                answered += future.result()
            except Exception as exc:  # a Redis error, a bug: not a result for the job
                failures.append(exc)
        if failures:
            log.error("chunk %s: %d jobs failed without a result", chunk_id, len(failures))
            # Back to the queue: the redelivery answers what is stored and sends the rest alone.
            raise Reject(failures[0], requeue=True)
        return answered

    def _first_start(self, chunk_id: str) -> bool:
        """Mark the chunk started; False if it was started before (this is a redelivery)."""
        key = CHUNK_STARTED_KEY.format(chunk_id=chunk_id)
        # Kept until it expires: a chunk redelivered after its jobs were answered (the worker
        # died before acknowledging it) must not run them again.
        return bool(
            self.engine.redis.set(key, 1, nx=True, ex=self.engine.settings.result_expires_s)
        )

    def _one(self, entry: ChunkEntry, submitted_at: float | None, queue: str | None) -> int:
        """Run one job of a first delivery; 1 if it was answered here, 0 if sent on alone."""
        engine = self.engine
        job_id = entry.job_id
        with engine.quarantine.shared():
            if engine.deliveries.begin(job_id):
                # Started before and never finished: a suspect, for run_job to judge alone.
                self._send_alone(entry, submitted_at, queue)
                return 0
            try:
                result = engine.handle(job_id, entry.payload, submitted_at)
            except DiedRunning as exc:
                # The model process died in this job's batch: its start count stays, and
                # run_job judges it as a suspect.
                log.warning("job %s: %s; sent on alone", job_id, exc.message)
                self._send_alone(entry, submitted_at, queue)
                return 0
            except Retryable as exc:
                countdown = engine.policy.retry_in(0)
                if countdown is not None:
                    engine.deliveries.finished(job_id)
                    # Attempt 2 onwards, as run_job's retries: a message of its own.
                    log.info("job %s: %s; attempt 1, again alone", job_id, exc.message)
                    self._send_alone(entry, submitted_at, queue, countdown=countdown, retries=1)
                    return 0
                result = engine.policy.gave_up(job_id, entry.payload, exc, 1)
            self._answer(job_id, encode_result(result))
        return 1

    def _answer(self, job_id: str, result: dict[str, Any]) -> None:
        """Store, announce, clear (one round trip): what Celery does for a job of its own."""
        self._backend.answer(job_id, result)

    def _split(
        self,
        chunk_id: str,
        entries: Sequence[ChunkEntry],
        submitted_at: float | None,
        queue: str | None,
    ) -> int:
        """A redelivered chunk: announce the stored results, send every other job alone."""
        backend = self._backend
        stored = (
            backend.mget([backend.get_key_for_task(e.job_id) for e in entries]) if entries else []
        )
        answered = 0
        for entry, raw in zip(entries, stored, strict=True):
            meta = backend.decode_result(raw) if raw is not None else {}
            answer = stored_answer(meta)
            if answer is not None:
                self.engine.publisher.publish(answer)  # once: no second event
                self.engine.deliveries.completed(entry.job_id)
                answered += 1
            else:
                self._send_alone(entry, submitted_at, queue)
        log.warning(
            "chunk %s was redelivered: %d jobs already answered, %d sent on alone",
            chunk_id,
            answered,
            len(entries) - answered,
        )
        return answered

    def _send_alone(
        self,
        entry: ChunkEntry,
        submitted_at: float | None,
        queue: str | None,
        *,
        countdown: float | None = None,
        retries: int = 0,
    ) -> None:
        """Send one job of the chunk as a message of its own (its ledger entry stays)."""
        # The queue of the model the job names; one naming none goes back where the chunk was.
        named = isinstance(entry.payload, dict) and isinstance(entry.payload.get("model"), str)
        target = queue_for(model_of(entry.payload)) if named or not queue else queue
        # The message joins the far end of its queue, behind messages submitted after the job:
        # its ledger wait restarts now, or the reaper would take it for lost while it waits there.
        self.engine.redis.zadd(LEDGER, {entry.job_id: time.time()}, xx=True)
        self._send_task(
            TASK_RUN_JOB,
            kwargs={"job": entry.payload, "submitted_at": submitted_at},
            task_id=entry.job_id,
            queue=target,
            routing_key=target,
            countdown=countdown,
            retries=retries,
        )
