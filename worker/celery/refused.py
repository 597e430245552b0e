"""Whatever arrives on a blipq queue is answered or dead-lettered, never raised into Celery.

Celery's consumer drops some bad messages after logging them (a body that is not JSON, a refused
content type such as pickle) and raises on others: a JSON body that is not ``[args, kwargs,
embed]`` makes Celery's request handling raise ``ValueError``, which restarts the consumer and
puts the message back for the next worker to crash on. Here every message is checked before
Celery builds a request from it (the tasks' ``Strategy``, Celery's public hook for per-task
message handling), and whatever still raises while the consumer handles a message is caught
around its task handler:

- the message's jobs (its own id, or a chunk message's ``CHUNK_JOBS_HEADER``) get an
  ``invalid_job`` result each: stored, announced on the results stream, cleared from the ledger;
- a description of the message, its body capped, goes to ``blipq:dead``;
- the message is acknowledged.

Only blipq's own task names are accepted (``TASK_RUN_JOB``, ``TASK_RUN_CHUNK``): Celery's
built-in tasks (``celery.accumulate``, ``celery.chord_unlock`` ...) are refused like unknown ones.
The body is never deserialized with anything but JSON.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from celery.worker.consumer import Consumer
from celery.worker.strategy import default as default_strategy

from producer.protocol.chunks import MAX_JOB_ID_CHARS, message_job_ids
from producer.protocol.jobs import ErrorCode, JobResult, encode_result
from producer.protocol.keys import TASK_RUN_CHUNK, TASK_RUN_JOB
from worker.celery.app import services

log = logging.getLogger(__name__)

BLIPQ_TASKS = frozenset({TASK_RUN_JOB, TASK_RUN_CHUNK})
"""The only task names a blipq worker accepts."""

TASK_KWARGS: dict[str, frozenset[str]] = {
    TASK_RUN_JOB: frozenset({"job", "submitted_at"}),
    TASK_RUN_CHUNK: frozenset({"jobs", "submitted_at"}),
}
"""The keyword arguments each task takes; anything else is refused."""

BODY_PREFIX_BYTES = 200
"""How much of a refused message's body its dead-letter record keeps."""

_EMBED_REFUSED = ("callbacks", "errbacks", "chain", "chord")
"""Celery workflow fields that would make a worker run other tasks: blipq messages carry none."""


class BlipqConsumer(Consumer):  # type: ignore[misc]
    def update_strategies(self) -> None:
        super().update_strategies()
        strategies: dict[str, Any] = self.__dict__["strategies"]
        for name in list(strategies):
            if name not in BLIPQ_TASKS:
                del strategies[name]  # Celery's built-in tasks: refused like unknown ones

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
        handler = super().create_task_handler(*args, **kwargs)
        connection_errors = tuple(self.__dict__["connection_errors"])

        def on_task_received(message: Any) -> Any:
            try:
                return handler(message)
            except connection_errors:
                raise  # the broker went away: Celery reconnects, the message comes back
            except Exception as exc:  # anything else is the message's fault: answer it
                refuse(self.app, message, f"message refused: {type(exc).__name__}: {exc}")
                return None

        return on_task_received

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        refuse(self.app, message, f"message body could not be decoded as JSON: {exc}")

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        refuse(self.app, message, f"message refused: {exc}")

    def on_unknown_message(self, body: Any, message: Any) -> None:
        refuse(self.app, message, "not a Celery task message (no task name in its headers)")

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        headers = message.headers if isinstance(message.headers, Mapping) else {}
        refuse(self.app, message, f"task {str(headers.get('task'))!r:.100} is not a blipq task")


def guarded_strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., Any]:
    """The tasks' ``Strategy``: Celery's default one, behind a check of the whole message."""
    handle = default_strategy(task, app, consumer, **kwargs)

    def on_message(message: Any, body: Any, ack: Any, reject: Any, cbs: Any, **kw: Any) -> Any:
        problem = message_problem(task.name, message)
        if problem is not None:
            refuse(app, message, problem)
            return None
        return handle(message, body, ack, reject, cbs, **kw)

    return on_message


def message_problem(task_name: str, message: Any) -> str | None:
    """Why a message for a blipq task cannot be run as sent; None when it can."""
    if message.errors:  # kombu could not inflate or decode it (e.g. over max_message_bytes)
        return f"message body could not be read: {message.errors[0][1]}"
    try:
        payload = message.decode()
    except Exception as exc:
        return f"message body could not be decoded as JSON: {type(exc).__name__}: {exc}"
    headers = message.headers if isinstance(message.headers, Mapping) else {}
    return body_problem(task_name, payload) or header_problem(headers, datetime.now(UTC))


def body_problem(task_name: str, payload: object) -> str | None:
    """Why a decoded body is not a call of the task as blipq sends it; None if it is."""
    if not isinstance(payload, list | tuple) or len(payload) != 3:
        return f"message body is {_shape(payload)}, not Celery's [args, kwargs, embed]"
    args, kwargs, embed = payload
    if not isinstance(args, list | tuple):
        return f"message args are {_shape(args)}, not a list"
    if args:
        return f"{task_name} takes no positional arguments, got {len(args)}"
    if not isinstance(kwargs, Mapping):
        return f"message kwargs are {_shape(kwargs)}, not an object"
    if embed is not None and not isinstance(embed, Mapping):
        return f"message embed is {_shape(embed)}, not an object"
    for field in _EMBED_REFUSED:
        if embed and embed.get(field):
            return f"blipq messages carry no {field}"
    return kwargs_problem(task_name, kwargs)


def kwargs_problem(task_name: str, kwargs: Mapping[str, Any]) -> str | None:
    """Why a message's keyword arguments are not the task's; None if they are."""
    unexpected = sorted(str(k) for k in kwargs if k not in TASK_KWARGS[task_name])
    if unexpected:
        return f"{task_name} takes no keyword arguments {unexpected[:5]}"
    submitted = kwargs.get("submitted_at")
    if submitted is not None and not _finite_number(submitted):
        return f"submitted_at is {_shape(submitted)}, not a Unix time"
    if task_name == TASK_RUN_CHUNK and not isinstance(kwargs.get("jobs"), list):
        return f"a chunk message's jobs are {_shape(kwargs.get('jobs'))}, not a list"
    return None


def header_problem(headers: Mapping[str, Any], now: datetime) -> str | None:
    """Why a message's headers cannot be honoured; None if they can."""
    job_id = headers.get("id")
    if not isinstance(job_id, str) or not 0 < len(job_id) <= MAX_JOB_ID_CHARS:
        return f"the message id is {_shape(job_id)}, not a string of 1-{MAX_JOB_ID_CHARS} chars"
    retries = headers.get("retries", 0)
    if retries is not None and (not isinstance(retries, int) or isinstance(retries, bool)):
        return f"the retries header is {_shape(retries)}, not a count"
    if retries is not None and retries < 0:
        return "the retries header is negative"
    limits = headers.get("timelimit")
    if limits is not None and not (
        isinstance(limits, list | tuple)
        and len(limits) == 2
        and all(v is None or _finite_number(v) for v in limits)
    ):
        return f"the timelimit header is {_shape(limits)}, not [soft, hard]"
    for name in ("eta", "expires"):
        value = headers.get(name)
        if value is None:
            continue
        when = _moment(value)
        if when is None:
            return f"the {name} header {str(value)!r:.60} is not an ISO 8601 time"
        if name == "expires" and when < now:
            return f"the message expired at {when.isoformat()} before it was taken"
    return None


def refuse(app: Any, message: Any, reason: str) -> None:
    """Answer a message's jobs with ``invalid_job``, dead-letter its description, ack it."""
    headers = message.headers if isinstance(message.headers, Mapping) else {}
    try:
        # A blipq message's jobs; for any other message the id its headers name, if usable, so
        # a sender of a misnamed task is answered too.
        job_ids = message_job_ids(headers) or _usable_id(headers.get("id"))
        engine = services().engine
        for job_id in job_ids:
            result = encode_result(
                JobResult.failure(
                    job_id, "unknown", ErrorCode.INVALID_JOB, reason, worker=engine.worker_name
                )
            )
            app.backend.answer(job_id, result)  # stored, announced, cleared from the ledger
        body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
        described: dict[str, Any] = {
            "task": str(headers.get("task"))[:100],
            "content_type": message.content_type,
            "body_prefix": repr(body[:BODY_PREFIX_BYTES]),
            "body_bytes": len(body),
        }
        if job_ids:
            described["jobs"] = job_ids[:20]
        message_id = headers.get("id")
        name = message_id[:MAX_JOB_ID_CHARS] if isinstance(message_id, str) else "unknown"
        engine.deliveries.dead_letter(name, described, reason)
        log.warning("message %s refused and answered: %s", name, reason)
    except Exception:  # Redis gone: the message is still bad; log it rather than loop on it
        log.exception("a refused message could not be answered: %s", reason)
    try:
        message.ack()
    except Exception:
        log.warning("a refused message could not be acknowledged", exc_info=True)


def _usable_id(value: object) -> list[str]:
    return [value] if isinstance(value, str) and 0 < len(value) <= MAX_JOB_ID_CHARS else []


def _shape(value: object) -> str:
    if isinstance(value, str):
        return f"a string ({value[:40]!r})"
    if isinstance(value, list | tuple):
        return f"a list of {len(value)}"
    return "null" if value is None else f"a {type(value).__name__}"


def _finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _moment(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
