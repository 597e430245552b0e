"""A Celery consumer that turns refused messages into error results instead of silence.

Celery drops a message whose body is not JSON, or whose content type is refused (pickle),
after logging it. A producer waiting on that job id would wait forever, so when the message
names blipq jobs (its own id, or a chunk message's ``CHUNK_JOBS_HEADER``) we store an
``invalid_job`` result under each job's id, announce it on the results stream and dead-letter a
safe description of the message. The body is never deserialized.
"""

from __future__ import annotations

from typing import Any

from celery.worker.consumer import Consumer

from producer.protocol.chunks import message_job_ids
from producer.protocol.jobs import ErrorCode, JobResult, encode_result
from producer.protocol.keys import TASK_RUN_CHUNK
from worker.celery.app import services


class BlipqConsumer(Consumer):  # type: ignore[misc]
    def on_decode_error(self, message: Any, exc: Exception) -> None:
        _refuse(self.app, message, f"message body could not be decoded as JSON: {exc}")
        super().on_decode_error(message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        _refuse(self.app, message, f"message refused: {exc}")
        super().on_invalid_task(body, message, exc)


def _refuse(app: Any, message: Any, reason: str) -> None:
    headers = message.headers or {}
    job_ids = message_job_ids(headers)
    if not job_ids:
        return
    engine = services().engine
    for job_id in job_ids:
        result = encode_result(
            JobResult.failure(
                job_id, "unknown", ErrorCode.INVALID_JOB, reason, worker=engine.worker_name
            )
        )
        app.backend.answer(job_id, result)  # stored, announced, cleared from the ledger
    body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
    described = {"content_type": message.content_type, "body_prefix": repr(body[:200])}
    if headers.get("task") == TASK_RUN_CHUNK:
        described["jobs"] = job_ids
    engine.deliveries.dead_letter(str(headers.get("id")), described, reason)
