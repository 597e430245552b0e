"""One root exception, a retryable signal, and the permanent failures that carry an error code."""

from __future__ import annotations


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
