"""A Celery consumer that turns refused messages into error results instead of silence.

Celery drops a message whose body is not JSON, or whose content type is refused (pickle),
after logging it. A producer waiting on that job id would wait forever, so when the message
names a blipq job we store an ``invalid_job`` result under its id, announce it on the results
stream and dead-letter a safe description of it. The body is never deserialized.
"""

from __future__ import annotations

from typing import Any

from celery import states
from celery.worker.consumer import Consumer

from producer.constants import TASK_RUN_JOB
from producer.jobs import ErrorCode, JobResult, encode_result


class BlipqConsumer(Consumer):  # type: ignore[misc]
    def on_decode_error(self, message: Any, exc: Exception) -> None:
        _refuse(self.app, message, f"message body could not be decoded as JSON: {exc}")
        super().on_decode_error(message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        _refuse(self.app, message, f"message refused: {exc}")
        super().on_invalid_task(body, message, exc)


def _refuse(app: Any, message: Any, reason: str) -> None:
    headers = message.headers or {}
    job_id = headers.get("id")
    if headers.get("task") != TASK_RUN_JOB or not isinstance(job_id, str):
        return
    from worker.runtime import get_runtime

    runtime = get_runtime()
    result = encode_result(
        JobResult.failure(
            job_id, "unknown", ErrorCode.INVALID_JOB, reason, worker=runtime.worker_name
        )
    )
    app.backend.store_result(job_id, result, states.SUCCESS)
    runtime.publisher.publish(result)
    body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
    described = {"content_type": message.content_type, "body_prefix": repr(body[:200])}
    runtime.deliveries.dead_letter(job_id, described, reason)
