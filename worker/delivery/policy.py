"""The one delivery policy of single jobs and of the jobs of chunk messages.

A transient failure (the object store unreachable) is tried again after a capped exponential
backoff, up to ``s3_max_attempts`` tries, then answered ``storage_unavailable``. A job is judged
on its own deaths: a first start that did not finish (in a batch, perhaps beside the job that
really killed the worker) makes it a suspect, which then runs alone; a job that died
``max_deliveries`` times running alone is poison: dead-lettered and answered ``poison``, never
run again. A worker's death is seen as an unfinished start when the job comes back; the death
of a split worker's model process is seen at once, by the intake process that holds the job
(``DiedRunning``), and judged the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from producer.protocol.errors import Retryable
from producer.protocol.jobs import ErrorCode, JobResult
from producer.protocol.keys import DEAD_LETTER

BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
"""Seconds before try n + 1 of a transiently failing job."""


class DiedRunning(Retryable):
    """The process running the job's batch died while it ran (a split worker's model process;
    ``worker.split.remote``): this start did not finish. The job keeps its start count and runs
    again: a suspect, alone, counted only while alone, as after a worker's death."""


def kind_of(payload: object) -> str:
    """A job payload's kind, for an error result of a payload that may not be a job."""
    return str(payload.get("kind", "unknown")) if isinstance(payload, dict) else "unknown"


@dataclass(frozen=True, slots=True)
class DeliveryPolicy:
    max_attempts: int
    """Tries of a transiently failing job (``s3_max_attempts``)."""
    max_deliveries: int
    """Deaths running alone after which a job is poison (``max_deliveries``)."""
    worker: str
    """The worker's name, in the results this policy writes."""

    def retry_in(self, attempt: int) -> float | None:
        """Seconds before the next try after try ``attempt`` (0-based) failed transiently, or
        None when the job has had its tries."""
        if attempt + 1 >= self.max_attempts:
            return None
        return BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]

    def gave_up(self, job_id: str, payload: object, exc: Retryable, attempts: int) -> JobResult:
        """The answer of a job whose tries all failed transiently."""
        return JobResult.failure(
            job_id,
            kind_of(payload),
            ErrorCode.STORAGE_UNAVAILABLE,
            f"{exc.message} (gave up after {attempts} attempts)",
            worker=self.worker,
        )

    def is_poison(self, earlier_starts: int) -> bool:
        return alone_deaths(earlier_starts) >= self.max_deliveries

    def poison(self, job_id: str, payload: object, starts: int) -> tuple[JobResult, str]:
        """The answer of a poison job, and the reason recorded with it on the dead-letter list."""
        reason = (
            f"died {alone_deaths(starts)} times running alone, after a first start that did "
            "not finish either (it kills or stalls workers); "
            f"not run again, payload moved to the {DEAD_LETTER} list"
        )
        result = JobResult.failure(
            job_id, kind_of(payload), ErrorCode.POISON, reason, worker=self.worker
        )
        return result, reason


def alone_deaths(earlier_starts: int) -> int:
    """Deaths of a job while it ran alone, from its unfinished starts: every start after the
    first runs alone (quarantine), so all but the first count against the job."""
    return max(0, earlier_starts - 1)
