"""Errors of bulk runs."""

from __future__ import annotations

from producer.protocol.errors import BlipqError, ResultTimeout


class BulkError(BlipqError, ValueError):
    """Bad bulk input, a run id in use by other inputs, or a run another runner holds."""


class BulkStalled(ResultTimeout):
    """No result arrived for ``idle_timeout_s`` while jobs were pending."""
