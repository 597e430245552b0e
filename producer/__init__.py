"""blipq producer: build jobs, submit them, read results. Light: no torch, no worker code."""

from __future__ import annotations

from producer.client import Client
from producer.client.aio import AsyncClient
from producer.protocol.errors import (
    BlipqError,
    InvalidJob,
    JobFailed,
    JobFailure,
    RedisUnavailable,
    ResultTimeout,
)
from producer.protocol.jobs import (
    CaptionJob,
    CaptionOutput,
    CategoryScore,
    ErrorCode,
    ImageRef,
    JobError,
    JobResult,
    MatchJob,
    MatchOutput,
    MatchScore,
    ModerationJob,
    ModerationOutput,
    ScoredCaption,
    Timings,
    VqaJob,
    VqaOutput,
    parse_image_uri,
)

__all__ = [
    "AsyncClient",
    "BlipqError",
    "CaptionJob",
    "CaptionOutput",
    "CategoryScore",
    "Client",
    "ErrorCode",
    "ImageRef",
    "InvalidJob",
    "JobError",
    "JobFailed",
    "JobFailure",
    "JobResult",
    "MatchJob",
    "MatchOutput",
    "MatchScore",
    "ModerationJob",
    "ModerationOutput",
    "RedisUnavailable",
    "ResultTimeout",
    "ScoredCaption",
    "Timings",
    "VqaJob",
    "VqaOutput",
    "parse_image_uri",
]
