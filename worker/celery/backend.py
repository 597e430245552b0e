"""The worker's result backend: a job's answer in one Redis round trip.

Celery's Redis backend stores a result in two round trips (a GET, so that a stored success is
never overwritten, then SET and PUBLISH), and the worker then announced it on the results stream
and cleared its start counter and ledger entry in two more. ``answer`` does all of it in one
atomic script (``Publisher.answer``), for every job's result: a job of its own (Celery stores
its result through ``_store_result``), a job of a chunk, a refused message. The stored form is
Celery's own, so producers read it as any Celery result: SUCCESS for an ok result, FAILURE for an
error result, whose exception (``JobFailed``) carries the JobResult as its one argument.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from celery import states
from celery.backends.redis import SentinelBackend
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str

from producer.protocol.celeryconf import ResultBackend
from producer.protocol.errors import JobFailed
from producer.protocol.keys import TASK_RUN_JOB
from worker.delivery.publish import Publisher
from worker.settings import get_settings


class WorkerResultBackend(ResultBackend):
    """``producer.protocol.celeryconf.ResultBackend``, answering jobs in one round trip."""

    @cached_property
    def publisher(self) -> Publisher:
        settings = get_settings()
        return Publisher(
            self.client, maxlen=settings.stream_maxlen, expires_s=settings.result_expires_s
        )

    def answer(self, job_id: str, result: dict[str, Any], request: Any = None) -> bool:
        """Store a job's result, announce it once, clear its bookkeeping; True if stored here
        (False: a final state, success or failure, was stored before, and stays).

        An ok result is stored as Celery's SUCCESS, an error result as its FAILURE."""
        state: str = states.SUCCESS
        value: Any = result
        if result.get("status") == "error":
            state, value = states.FAILURE, self.prepare_exception(JobFailed(result))
        meta = self._get_result_meta(  # type: ignore[attr-defined]
            result=value, state=state, traceback=None, request=request
        )
        meta["task_id"] = job_id
        stored = self.encode(meta)
        if isinstance(stored, str) and len(stored) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError("value too large for Redis backend")
        key = bytes_to_str(self.get_key_for_task(job_id))
        return bool(self.ensure(self._answer, (job_id, result, key, stored)))

    def _answer(self, job_id: str, result: dict[str, Any], key: str, stored: str | bytes) -> bool:
        return self.publisher.answer(
            job_id,
            result,
            key=key,
            stored=stored,
            stored_expires_s=self.expires,  # type: ignore[attr-defined]
        )

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        if getattr(request, "task", None) == TASK_RUN_JOB:
            answer = stored_answer({"status": state, "result": result})
            if answer is not None:  # not a retry, nor an exception of the task's own
                self.answer(bytes_to_str(task_id), answer, request)
                return result
        return super()._store_result(  # type: ignore[misc]
            task_id, result, state, traceback, request=request, **kwargs
        )


def stored_answer(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The JobResult (encoded) in a stored or storing record, or None where there is none: an
    ok result stored as SUCCESS, an error result as the FAILURE of a ``JobFailed``, in Celery's
    serialized form or as the exception itself (``decode_result`` makes one of the form)."""
    status, value = meta.get("status"), meta.get("result")
    if status == states.SUCCESS and isinstance(value, dict):
        return value
    if status != states.FAILURE:
        return None
    if isinstance(value, JobFailed):
        return value.result
    if (
        isinstance(value, dict)
        and value.get("exc_type") == JobFailed.__qualname__
        and value.get("exc_module") == JobFailed.__module__
    ):
        args = value.get("exc_message")
        if isinstance(args, list | tuple) and args and isinstance(args[0], dict):
            return dict(args[0])
    return None


class WorkerSentinelResultBackend(WorkerResultBackend, SentinelBackend):  # type: ignore[misc]
    """``WorkerResultBackend`` on the master a set of Redis Sentinels names (``sentinel://``)."""
