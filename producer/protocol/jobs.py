"""The wire protocol: one frozen model per job kind, image references, results, error codes.

Producers and workers both import this module; it must stay free of torch and of worker code.
Everything on the wire is JSON (``encode_*`` / ``decode_*``); pickle is never used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from producer.protocol.errors import InvalidJob

# Limits a job can never exceed, whatever the worker allows: they bound what a producer can ask.
MAX_PROMPT_CHARS = 500
MAX_NEW_TOKENS = 256
MAX_QUESTION_CHARS = 500
MAX_MATCH_TEXTS = 64
MAX_HISTORY_TURNS = 20
MAX_CANDIDATES = 16

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,61}[a-z0-9]$")
_IP_RE = re.compile(r"^\d+\.\d+\.\d+\.\d+$")


class ErrorCode(StrEnum):
    """The closed set of error codes a result can carry."""

    NOT_FOUND = "not_found"
    """The object or bucket does not exist."""
    ACCESS_DENIED = "access_denied"
    """The worker's credentials may not read the object, or the bucket is not allowed."""
    INVALID_IMAGE = "invalid_image"
    """The bytes are not a decodable image (corrupt, truncated, unsupported format)."""
    TOO_LARGE = "too_large"
    """The object exceeds the byte limit or the image exceeds the pixel limit."""
    INVALID_JOB = "invalid_job"
    """The job payload failed validation (wrong or missing field, bad value)."""
    UNKNOWN_MODEL = "unknown_model"
    """The job names a model this worker does not serve."""
    MODEL_ERROR = "model_error"
    """The model failed on this item."""
    STORAGE_UNAVAILABLE = "storage_unavailable"
    """The object store could not be reached; retried before it is reported."""
    TIMEOUT = "timeout"
    """The job did not finish within its time limit."""
    EXPIRED = "expired"
    """The job's deadline (``deadline`` or ``ttl_s``) passed before a worker ran it."""
    POISON = "poison"
    """The job was delivered too often without finishing (it kills workers); dead-lettered."""
    INTERNAL = "internal"
    """A bug in blipq: the message says where."""


# Transient errors are retried by the worker before a result is written; the rest never are.


@dataclass(frozen=True, slots=True)
class ImageRef:
    """A parsed ``s3://bucket/key[?versionId=...]`` reference."""

    bucket: str
    key: str
    version_id: str | None = None

    @property
    def uri(self) -> str:
        suffix = f"?versionId={self.version_id}" if self.version_id else ""
        return f"s3://{self.bucket}/{self.key}{suffix}"


def parse_image_uri(uri: str) -> ImageRef:
    """Parse an s3:// URI; raise ValueError with a message a user can act on."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise ValueError(f"image must be an s3://bucket/key URI, got {uri!r:.80}")
    parts = urlsplit(uri)
    bucket = parts.netloc
    if not _BUCKET_RE.match(bucket) or _IP_RE.match(bucket) or ".." in bucket:
        # Also refuses addresses posing as buckets: the worker only ever talks to its own
        # configured endpoint, and a job can never name a host.
        raise ValueError(f"invalid bucket name {bucket!r} in {uri!r:.80}")
    key = unquote(parts.path.lstrip("/"))
    if not key or key.endswith("/"):
        raise ValueError(f"image URI {uri!r:.80} has no object key")
    if any(segment in (".", "..") for segment in key.split("/")):
        # An S3 store takes such a key literally, but a path-style endpoint or a proxy in front
        # of it may resolve it to another object (s3://allowed/../other/secret.jpg): refused.
        raise ValueError(f"image URI {uri!r:.80} has a '.' or '..' path segment in its key")
    query = parse_qs(parts.query, strict_parsing=False) if parts.query else {}
    unknown = set(query) - {"versionId"}
    if unknown or parts.fragment:
        raise ValueError(f"image URI {uri!r:.80} may only carry ?versionId=")
    version = query.get("versionId", [None])[0]
    return ImageRef(bucket=bucket, key=key, version_id=version)


class _Job(BaseModel):
    """Fields every job has. Frozen, and unknown fields are refused."""

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)

    image: str
    model: str = Field(min_length=1, max_length=100)
    deadline: datetime | None = Field(
        default=None, description="Do not run after this moment (timezone-aware)."
    )
    ttl_s: float | None = Field(
        default=None, gt=0, le=30 * 86_400, description="Do not run this long after submission."
    )

    @field_validator("image")
    @classmethod
    def _check_image(cls, value: str) -> str:
        parse_image_uri(value)
        return value

    @field_validator("deadline")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("deadline must be timezone-aware (e.g. datetime.now(UTC) + ...)")
        return value

    def expired(self, now: float, submitted_at: float | None) -> bool:
        """Whether the job's deadline has passed (``now`` and ``submitted_at``: Unix time)."""
        if self.deadline is not None and now > self.deadline.timestamp():
            return True
        return bool(self.ttl_s and submitted_at and now > submitted_at + self.ttl_s)

    @property
    def image_ref(self) -> ImageRef:
        return parse_image_uri(self.image)


class CaptionJob(_Job):
    """Caption an image. With ``prompt``, BLIP continues the prompt (conditional captioning)."""

    kind: Literal["caption"] = "caption"
    model: str = Field(default="caption-base", min_length=1, max_length=100)
    prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    max_new_tokens: int = Field(default=30, ge=1, le=MAX_NEW_TOKENS)
    min_new_tokens: int = Field(default=0, ge=0, le=MAX_NEW_TOKENS)
    num_beams: int = Field(default=1, ge=1, le=8)
    candidates: int = Field(
        default=0,
        ge=0,
        le=MAX_CANDIDATES,
        description="Best-of-k (CapFilt): also sample k nucleus captions (top_p 0.9), score all "
        "with an ITM model, return them best first.",
    )
    scorer: str | None = Field(
        default=None,
        max_length=100,
        description="ITM model that ranks candidates (default: the worker's caption_scorer).",
    )

    @field_validator("prompt")
    @classmethod
    def _empty_prompt_is_none(cls, value: str | None) -> str | None:
        return value or None

    @model_validator(mode="after")
    def _check_token_bounds(self) -> CaptionJob:
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError("min_new_tokens must not exceed max_new_tokens")
        return self


class VqaJob(_Job):
    """Answer a question about an image (BlipForQuestionAnswering)."""

    kind: Literal["vqa"] = "vqa"
    model: str = Field(default="vqa-base", min_length=1, max_length=100)
    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    max_new_tokens: int = Field(default=10, ge=1, le=MAX_NEW_TOKENS)
    num_beams: int = Field(default=1, ge=1, le=8)
    history: list[tuple[str, str]] = Field(
        default_factory=list,
        max_length=MAX_HISTORY_TURNS,
        description="Earlier (question, answer) turns for chat on BLIP-2 models.",
    )


class MatchJob(_Job):
    """Score how well each text describes the image: ITM probability and ITC cosine."""

    kind: Literal["match"] = "match"
    model: str = Field(default="itm-base", min_length=1, max_length=100)
    texts: list[Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]] = Field(
        min_length=1, max_length=MAX_MATCH_TEXTS
    )


class ModerationJob(_Job):
    """Zero-shot moderation of an image against a named policy (categories and thresholds)."""

    kind: Literal["moderate"] = "moderate"
    model: str = Field(default="itm-base", min_length=1, max_length=100)
    policy: str = Field(default="default", min_length=1, max_length=100)


AnyJob = CaptionJob | VqaJob | MatchJob | ModerationJob
Job = Annotated[AnyJob, Field(discriminator="kind")]
JOB_KINDS: tuple[str, ...] = ("caption", "vqa", "match", "moderate")

_JOB_ADAPTER: TypeAdapter[AnyJob] = TypeAdapter(Job)


_JOB_CLASSES: dict[str, type[AnyJob]] = {
    "caption": CaptionJob,
    "vqa": VqaJob,
    "match": MatchJob,
    "moderate": ModerationJob,
}


def model_of(payload: object) -> str:
    """The model a job payload names (its kind's default when it names none; the caption
    default when even its kind is unknown): what routes it to a queue, even when invalid."""
    fields = payload if isinstance(payload, dict) else {}
    model = fields.get("model")
    if isinstance(model, str) and model.strip():
        return model.strip()
    cls = _JOB_CLASSES.get(str(fields.get("kind", "caption")), CaptionJob)
    return str(cls.model_fields["model"].default)


def encode_job(job: AnyJob) -> dict[str, Any]:
    """The JSON-ready payload of a job (defaults included, so a worker never guesses)."""
    return job.model_dump(mode="json")


def decode_job(payload: object) -> AnyJob:
    """Validate a payload from the wire; raise InvalidJob (keeping the payload) if it is bad."""
    try:
        return _JOB_ADAPTER.validate_python(payload)
    except ValidationError as exc:
        raise InvalidJob(describe_validation(exc), raw=payload) from exc


def describe_validation(exc: ValidationError, *, strip_kind: bool = False) -> str:
    """The first errors of a validation as ``field: message`` pairs; ``strip_kind`` drops the
    job kind that a discriminated union puts in front of each field."""
    parts = []
    for err in exc.errors()[:5]:
        loc = err["loc"]
        if strip_kind and loc and loc[0] in JOB_KINDS:
            loc = loc[1:]
        where = ".".join(str(p) for p in loc) or "job"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


# --- results -------------------------------------------------------------------------------------


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class JobError(_Record):
    code: ErrorCode
    message: str


class Timings(_Record):
    """Milliseconds spent in each stage of one job."""

    queue_wait_ms: float = 0.0
    fetch_ms: float = 0.0
    inference_ms: float = 0.0
    total_ms: float = 0.0


class ScoredCaption(_Record):
    caption: str
    itm: float
    source: Literal["beam", "sample"]


class CaptionOutput(_Record):
    caption: str
    """The full caption; with a prompt it starts with the prompt, as BLIP returns it."""
    continuation: str
    """What the model added after the prompt (equals ``caption`` without a prompt)."""
    prompt: str | None = None
    candidates: list[ScoredCaption] | None = None
    """With ``candidates=k``: the beam caption and the sampled ones, deduplicated, best first."""


class VqaOutput(_Record):
    answer: str
    question: str


class MatchScore(_Record):
    text: str
    itm: float
    """Image-text matching probability (softmax of the ITM head, index 1)."""
    itc: float
    """Cosine similarity of the image and text embeddings (contrastive head)."""


class MatchOutput(_Record):
    scores: list[MatchScore]
    """One entry per input text, in input order."""

    def best(self) -> MatchScore:
        return max(self.scores, key=lambda score: score.itm)


class CategoryScore(_Record):
    name: str
    parent: str | None = None
    score: float
    review_threshold: float
    block_threshold: float
    flagged: Literal["none", "review", "block"]


class ModerationOutput(_Record):
    policy: str
    version: str
    decision: Literal["allow", "review", "block"]
    categories: list[CategoryScore]


AnyOutput = CaptionOutput | VqaOutput | MatchOutput | ModerationOutput


class JobResult(_Record):
    """The record stored for every job under its id, success or failure."""

    job_id: str
    kind: str
    status: Literal["ok", "error"]
    output: AnyOutput | None = None
    error: JobError | None = None
    model: str | None = None
    timings: Timings = Timings()
    batch_size: int = 0
    worker: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def failure(
        cls, job_id: str, kind: str, code: ErrorCode, message: str, **extra: Any
    ) -> JobResult:
        return cls(
            job_id=job_id,
            kind=kind,
            status="error",
            error=JobError(code=code, message=message),
            **extra,
        )


def encode_result(result: JobResult) -> dict[str, Any]:
    return result.model_dump(mode="json")


def decode_result(payload: object) -> JobResult:
    return JobResult.model_validate(payload)
