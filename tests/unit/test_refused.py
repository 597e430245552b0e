"""The checks a worker makes of every message before Celery builds a request from it."""

from __future__ import annotations

import bz2
import lzma
import zlib
from datetime import UTC, datetime, timedelta

import pytest
from kombu import compression

from producer.protocol.keys import TASK_RUN_CHUNK, TASK_RUN_JOB
from worker.celery import patches
from worker.celery.refused import body_problem, header_problem

NOW = datetime(2026, 1, 1, tzinfo=UTC)
JOB = {"kind": "caption", "image": "s3://bkt/a.jpg"}


@pytest.mark.parametrize(
    ("task", "body", "problem"),
    [
        (TASK_RUN_JOB, ["a", "b"], "not Celery's [args, kwargs, embed]"),
        (TASK_RUN_JOB, "text", "not Celery's"),
        (TASK_RUN_JOB, {"job": JOB}, "not Celery's"),
        (TASK_RUN_JOB, [[JOB], {}, {}], "no positional arguments"),
        (TASK_RUN_JOB, ["x", {}, {}], "args are a string"),
        (TASK_RUN_JOB, [[], [JOB], {}], "kwargs are a list"),
        (TASK_RUN_JOB, [[], {"job": JOB, "colour": 1}, {}], "no keyword arguments ['colour']"),
        (TASK_RUN_JOB, [[], {"job": JOB, "submitted_at": "now"}, {}], "submitted_at"),
        (TASK_RUN_JOB, [[], {"job": JOB, "submitted_at": True}, {}], "submitted_at"),
        (TASK_RUN_JOB, [[], {"job": JOB}, "embed"], "embed is a string"),
        (TASK_RUN_JOB, [[], {"job": JOB}, {"chain": [{"task": "x"}]}], "no chain"),
        (TASK_RUN_CHUNK, [[], {"jobs": "abc"}, {}], "jobs are a string"),
        (TASK_RUN_CHUNK, [[], {"job": JOB}, {}], "no keyword arguments ['job']"),
    ],
)
def test_bodies_that_are_not_a_call_of_the_task_are_refused(
    task: str, body: object, problem: str
) -> None:
    found = body_problem(task, body)
    assert found is not None and problem in found, found


@pytest.mark.parametrize(
    ("task", "body"),
    [
        (TASK_RUN_JOB, [[], {"job": JOB, "submitted_at": 1.5e9}, {"callbacks": None}]),
        (TASK_RUN_JOB, ((), {}, None)),
        (TASK_RUN_CHUNK, [[], {"jobs": [], "submitted_at": None}, {}]),
    ],
)
def test_blipq_messages_pass(task: str, body: object) -> None:
    assert body_problem(task, body) is None


@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        ({"id": 5}, "message id"),
        ({"id": "x" * 201}, "message id"),
        ({"id": "a", "retries": "many"}, "retries"),
        ({"id": "a", "retries": -1}, "negative"),
        ({"id": "a", "timelimit": "soon"}, "timelimit"),
        ({"id": "a", "timelimit": [1, "x"]}, "timelimit"),
        ({"id": "a", "eta": 12}, "eta header"),
        ({"id": "a", "expires": "tomorrow"}, "expires header"),
        ({"id": "a", "expires": (NOW - timedelta(seconds=1)).isoformat()}, "expired"),
    ],
)
def test_headers_that_cannot_be_honoured_are_refused(
    headers: dict[str, object], problem: str
) -> None:
    found = header_problem(headers, NOW)
    assert found is not None and problem in found, found


def test_good_headers_pass() -> None:
    later = (NOW + timedelta(minutes=5)).isoformat()
    headers = {"id": "a", "retries": 2, "timelimit": [None, 30], "eta": later, "expires": later}
    assert header_problem(headers, NOW) is None


@pytest.mark.parametrize(
    ("content_type", "compress"),
    [
        ("application/x-gzip", zlib.compress),
        ("application/x-bz2", bz2.compress),
        ("application/x-lzma", lzma.compress),
    ],
)
def test_decompression_stops_at_the_limit(content_type: str, compress: object) -> None:
    patches.limit_decompression(4096)
    try:
        assert callable(compress)
        assert compression.decompress(compress(b"x" * 4096), content_type) == b"x" * 4096
        with pytest.raises(patches.MessageTooLarge, match="inflates beyond 4096"):
            compression.decompress(compress(b"x" * 4097), content_type)
    finally:
        patches.limit_decompression(16 * 2**20)


def test_codecs_without_a_bounded_decoder_are_refused() -> None:
    patches.limit_decompression(4096)
    refused = [t for t in vars(compression)["_decoders"] if "gzip" not in t and "bz2" not in t]
    for content_type in refused:
        if "lzma" in content_type:
            continue
        with pytest.raises(patches.MessageTooLarge, match="not accepted"):
            compression.decompress(b"\x00" * 16, content_type)
