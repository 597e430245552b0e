"""Chunk messages: several jobs of one model and kind in one broker message (bulk runs).

With a fast model, the broker and Celery's work per message (taking it, the task request, task
events, the acknowledgement) is a visible share of the CPU each image costs. A chunk message
spreads that work over many jobs. Each job in it keeps everything it has as a message of its own:
its id, its ledger entry, its stored result, its stream event and its error code. The worker
expands a chunk into one batcher item per job, so its jobs batch with other producers' jobs.

Wire format, the task kwargs of ``TASK_RUN_CHUNK`` (JSON, like every blipq message)::

    {"jobs": [{"job_id": "<id>", "job": {<the job's payload>}}, ...], "submitted_at": 1.7e9}

The message header ``CHUNK_JOBS_HEADER`` lists the job ids too. Job payloads are validated by the
worker one by one (``decode_job``): a bad job in a chunk fails alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from producer.protocol.keys import (
    CHUNK_JOBS_HEADER,
    MAX_JOBS_PER_MESSAGE,
    TASK_RUN_CHUNK,
    TASK_RUN_JOB,
)

T = TypeVar("T")

MAX_JOB_ID_CHARS = 200
"""Longest job id a chunk entry may carry (uuids are 36; bulk ids are uuids too)."""


def group_messages(
    items: Sequence[T], group_of: Callable[[T], str], per_message: int
) -> list[list[T]]:
    """Items grouped into messages of at most ``per_message``, each of one group (``group_of``:
    the Sender groups by model, which names the queue, and kind).

    Items of one group keep their order; a message is emitted when it is full, the rest at the
    end in the order their groups first appeared. With ``per_message`` 1, one message per item,
    in order.
    """
    if per_message < 1:
        raise ValueError("per_message must be at least 1")
    if per_message == 1:
        return [[item] for item in items]
    messages: list[list[T]] = []
    open_: dict[str, list[T]] = {}
    for item in items:
        group = open_.setdefault(group_of(item), [])
        group.append(item)
        if len(group) >= per_message:
            messages.append(group)
            del open_[group_of(item)]
    messages.extend(open_.values())
    return messages


def encode_chunk(jobs: Sequence[tuple[str, object]], submitted_at: float) -> dict[str, Any]:
    """The task kwargs of a chunk message from (job id, job payload) pairs."""
    return {
        "jobs": [{"job_id": job_id, "job": payload} for job_id, payload in jobs],
        "submitted_at": submitted_at,
    }


@dataclass(frozen=True, slots=True)
class ChunkEntry:
    """One job of a chunk: its id and its payload as sent (validated later, per job)."""

    job_id: str
    payload: object


@dataclass(frozen=True, slots=True)
class Chunk:
    """A decoded chunk: the jobs that can be answered, and what could not be read."""

    entries: list[ChunkEntry] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """Entries nobody can be answered for (no usable job id, a repeated id), described."""
    refusal: str | None = None
    """Set when the chunk as a whole is refused: every entry gets ``invalid_job`` with it."""


def decode_chunk(jobs: object) -> Chunk:
    """Read a chunk message's ``jobs`` kwarg. Never raises: JSON from the wire is data."""
    if not isinstance(jobs, list):
        return Chunk(
            problems=[f"'jobs' is {type(jobs).__name__}, not a list"], refusal="not a chunk"
        )
    entries: list[ChunkEntry] = []
    problems: list[str] = []
    seen: set[str] = set()
    for index, raw in enumerate(jobs):
        job_id = raw.get("job_id") if isinstance(raw, dict) else None
        if not isinstance(job_id, str) or not 0 < len(job_id) <= MAX_JOB_ID_CHARS:
            problems.append(f"entry {index}: no job id (a string of 1-{MAX_JOB_ID_CHARS} chars)")
        elif job_id in seen:
            problems.append(f"entry {index}: job id {job_id!r} repeats an earlier entry")
        else:
            seen.add(job_id)
            assert isinstance(raw, dict)
            entries.append(ChunkEntry(job_id, raw.get("job")))
    refusal = None
    if len(jobs) > MAX_JOBS_PER_MESSAGE:
        refusal = (
            f"a chunk message carries at most {MAX_JOBS_PER_MESSAGE} jobs, this one {len(jobs)}"
        )
    return Chunk(entries, problems, refusal)


def message_job_ids(headers: Mapping[str, Any]) -> list[str]:
    """The blipq jobs a broker message carries, read from its headers alone (the body is never
    decoded): a job's own id, or a chunk message's listed jobs; none for any other task."""
    task = headers.get("task")
    if task == TASK_RUN_JOB:
        ids = [headers.get("id")]
    elif task == TASK_RUN_CHUNK:
        listed = headers.get(CHUNK_JOBS_HEADER)
        ids = listed[:MAX_JOBS_PER_MESSAGE] if isinstance(listed, list) else []
    else:
        return []
    return [i for i in ids if isinstance(i, str) and i]
