"""One root exception, a retryable signal, and the permanent failures that carry an error code."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit


class BlipqError(Exception):
    """Root of every exception blipq raises on purpose."""


class JobFailure(BlipqError):
    """A job cannot complete; ``code`` is one of ``producer.protocol.jobs.ErrorCode``'s values."""

    code: str = "internal"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class InvalidJob(JobFailure):
    """A payload failed validation. Keeps the raw payload for the dead-letter record."""

    code = "invalid_job"

    def __init__(self, message: str, *, raw: object = None) -> None:
        super().__init__(message)
        self.raw = raw


class Retryable(JobFailure):
    """A transient failure: the worker retries it with backoff before reporting it."""

    code = "storage_unavailable"


class ResultTimeout(BlipqError, TimeoutError):
    """No result arrived within the time the caller gave."""


class JobFailed(BlipqError):
    """A job ended with an error result (``result``: the encoded JobResult).

    The worker's task raises it so that Celery and the tools that read Celery (its events, so
    Flower; ``AsyncResult.state``) count the job as failed. The
    stored FAILURE record carries the JobResult as this exception's one argument, and producers
    read it back from there (``producer.client.sender.Sender.to_result``).
    """

    def __init__(self, result: Any = None) -> None:
        super().__init__(result)
        self.result: dict[str, Any] = result if isinstance(result, dict) else {}

    def __str__(self) -> str:
        error = self.result.get("error")
        if not isinstance(error, dict):
            return "the job failed"
        return f"{error.get('code')}: {error.get('message')}"

    def __repr__(self) -> str:
        return f"JobFailed({str(self)!r})"


class RedisUnavailable(BlipqError, ConnectionError):
    """The results Redis (or the Redis broker) cannot be reached. ``url`` has its password
    masked; the message says so too, and never carries the password."""

    def __init__(self, url: str, detail: str = "") -> None:
        self.url = masked_url(url)
        suffix = f": {detail}" if detail else ""
        super().__init__(f"Redis at {self.url} is unreachable{suffix}")


def masked_url(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***`` (``redis://:***@host:6379/0``)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))
