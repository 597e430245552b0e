"""The worker's result backend: a job's answer in one Redis round trip.

Celery's Redis backend stores a result in two round trips (a GET, so that a stored success is
never overwritten, then SET and PUBLISH), and the worker then announced it on the results stream
and cleared its start counter and ledger entry in two more. ``answer`` does all of it in one
atomic script (``Publisher.answer``), for every job's result: a job of its own (Celery stores
its result through ``_store_result``), a job of a chunk, a refused message. The stored form is
Celery's own, so producers read it as any Celery result.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from celery import states
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str

from producer.protocol.celeryconf import ResultBackend
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
        (False: a success was stored before, and stays)."""
        meta = self._get_result_meta(  # type: ignore[attr-defined]
            result=result, state=states.SUCCESS, traceback=None, request=request
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
        if state == states.SUCCESS and getattr(request, "task", None) == TASK_RUN_JOB:
            self.answer(bytes_to_str(task_id), result, request)
            return result
        return super()._store_result(  # type: ignore[misc]
            task_id, result, state, traceback, request=request, **kwargs
        )
