"""Malformed wire messages against a real worker: each is answered (``invalid_job`` under every
job id its headers name) or, naming none, recorded on ``blipq:dead``; the worker stays up and
the next good job succeeds.

The messages are kombu envelopes pushed raw onto the queue (LPUSH), as any client of the broker
could send them, bypassing the producer's checks and Celery's message building.
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
import uuid
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis

from producer import CaptionJob, Client, ErrorCode
from producer.cli.embedded import WorkerProcess
from producer.protocol.jobs import encode_job
from producer.protocol.keys import CHUNK_JOBS_HEADER, DEAD_LETTER, TASK_RUN_CHUNK, TASK_RUN_JOB
from tests.fixtures.images import sample_jpegs

BUCKET = "wire"
QUEUE = "blipq.tiny-caption"
MIB = 2**20


def _good() -> dict[str, Any]:
    return encode_job(CaptionJob(image=f"s3://{BUCKET}/a.jpg", model="tiny-caption"))


def _headers(job_id: object, task: object = TASK_RUN_JOB, **extra: Any) -> dict[str, Any]:
    return {
        "lang": "py",
        "task": task,
        "id": job_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": job_id,
        "parent_id": None,
        "argsrepr": "()",
        "kwargsrepr": "{}",
        "origin": "wire-test",
        "ignore_result": False,
        **extra,
    }


def _body(value: object) -> bytes:
    return json.dumps(value).encode()


def _push(
    store: redis.Redis,
    headers: object,
    body: bytes,
    *,
    content_type: str = "application/json",
) -> None:
    """One message as kombu's Redis transport stores it (body base64-encoded)."""
    envelope = {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": content_type,
        "headers": headers,
        "properties": {
            "correlation_id": str(uuid.uuid4()),
            "reply_to": str(uuid.uuid4()),
            "delivery_mode": 2,
            "delivery_info": {"exchange": QUEUE, "routing_key": QUEUE},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    store.lpush(QUEUE, json.dumps(envelope))


def _answered_corpus() -> list[tuple[str, list[str], dict[str, Any], bytes, dict[str, Any]]]:
    """(name, job ids, headers, body, push options) of messages whose jobs must get
    ``invalid_job``."""
    good = _good()
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    cases: list[tuple[str, object, dict[str, Any], dict[str, Any]]] = [
        ("two-element list", ["a", "b"], {}, {}),
        ("bare string", "just a string", {}, {}),
        ("an object", {"job": good}, {}, {}),
        ("positional args", [[good], {}, {}], {}, {}),
        ("unexpected kwarg", [[], {"job": good, "colour": "red"}, {}], {}, {}),
        ("submitted_at a string", [[], {"job": good, "submitted_at": "yesterday"}, {}], {}, {}),
        ("kwargs a list", [[], [good], {}], {}, {}),
        ("embed a string", [[], {"job": good}, "embed"], {}, {}),
        ("callbacks", [[], {"job": good}, {"callbacks": [{"task": "celery.accumulate"}]}], {}, {}),
        ("expired", [[], {"job": good}, {}], {"expires": past}, {}),
        ("expires not a date", [[], {"job": good}, {}], {"expires": "tomorrow-ish"}, {}),
        ("eta not a date", [[], {"job": good}, {}], {"eta": 12}, {}),
        ("retries a word", [[], {"job": good}, {}], {"retries": "many"}, {}),
        ("timelimit a word", [[], {"job": good}, {}], {"timelimit": "soon"}, {}),
        ("job wrong types", [[], {"job": {**good, "max_new_tokens": "many"}}, {}], {}, {}),
    ]
    corpus = []
    for name, body, extra, options in cases:
        job_id = str(uuid.uuid4())
        corpus.append((name, [job_id], _headers(job_id, **extra), _body(body), options))
    # Only blipq's task names: Celery's built-in tasks and unknown names are refused.
    for task in ("celery.accumulate", "celery.chord_unlock", "no.such.task", ["a", "list"]):
        job_id = str(uuid.uuid4())
        corpus.append((str(task), [job_id], _headers(job_id, task=task), _body([[], {}, {}]), {}))
    job_id = str(uuid.uuid4())
    no_task = {k: v for k, v in _headers(job_id).items() if k != "task"}
    corpus.append(("no task header", [job_id], no_task, _body([[], {"job": good}, {}]), {}))
    chunk_id, ids = str(uuid.uuid4()), [str(uuid.uuid4()) for _ in range(2)]
    corpus.append(
        (
            "chunk jobs a string",
            ids,
            _headers(chunk_id, task=TASK_RUN_CHUNK, **{CHUNK_JOBS_HEADER: ids}),
            _body([[], {"jobs": "not a list"}, {}]),
            {},
        )
    )
    job_id = str(uuid.uuid4())
    corpus.append(("not JSON", [job_id], _headers(job_id), b"\xff\xfe{[", {}))
    job_id = str(uuid.uuid4())
    corpus.append(
        ("yaml", [job_id], _headers(job_id), b"job: x", {"content_type": "application/x-yaml"})
    )
    # A zlib bomb: a good job padded with 17 MiB of JSON whitespace, about 17 KiB compressed,
    # over the 16 MiB default limit: refused before it is inflated past the limit.
    job_id = str(uuid.uuid4())
    bomb = zlib.compress(_body([[], {"job": good}, {}])[:-1] + b" " * (17 * MIB) + b"]", 9)
    corpus.append(
        ("zlib bomb", [job_id], _headers(job_id, compression="application/x-gzip"), bomb, {})
    )
    job_id = str(uuid.uuid4())
    corpus.append(
        (
            "unknown compression",
            [job_id],
            _headers(job_id, compression="application/x-made-up"),
            b"\x00" * 64,
            {},
        )
    )
    return corpus


def _dead_lettered_corpus(marker: str) -> list[tuple[str, object, bytes]]:
    """(name, headers, body) of messages that name no job to answer: recorded on blipq:dead."""
    cases: list[tuple[str, object]] = [
        ("no id", {k: v for k, v in _headers("x").items() if k != "id"}),
        ("id a number", _headers(12345)),
        ("id too long", _headers("x" * 300)),
        ("headers a list", ["task", TASK_RUN_JOB]),
        ("no headers", None),
    ]
    return [
        # The marker first, inside the capped body prefix the dead-letter record keeps.
        (name, headers, _body([[], {"submitted_at": f"{marker}-{i}", "job": _good()}, {}]))
        for i, (name, headers) in enumerate(cases)
    ]


def test_every_malformed_message_is_answered_or_dead_lettered_and_the_worker_lives(
    caption_worker: WorkerProcess,
    client: Client,
    redis_client: redis.Redis,
    s3,  # type: ignore[no-untyped-def]
) -> None:
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key="a.jpg", Body=sample_jpegs(1, seed=163)[0])
    log_start = len(caption_worker.log())
    marker = f"wire-marker-{uuid.uuid4().hex}"
    answered = _answered_corpus()
    dead = _dead_lettered_corpus(marker)
    assert len(answered) + len(dead) >= 15  # and three unreadable envelopes below
    for _, _, headers, body, options in answered:
        _push(redis_client, headers, body, **options)
    for _, headers, body in dead:
        _push(redis_client, headers, body)
    # Envelopes that are not kombu's: not JSON, a JSON string, an object without properties.
    unreadable = [f"not json {marker}", json.dumps(marker), json.dumps({"body": marker})]
    for raw in unreadable:
        redis_client.lpush(QUEUE, raw)
    # A good job compressed (zlib, well under the limit) is inflated and run.
    compressed = str(uuid.uuid4())
    _push(
        redis_client,
        _headers(compressed, compression="application/x-gzip"),
        zlib.compress(_body([[], {"job": _good(), "submitted_at": time.time()}, {}])),
    )

    expected = {job_id: name for name, ids, *_ in answered for job_id in ids}
    results = {r.job_id: r for r in client.results(list(expected), timeout=120)}
    for job_id, name in expected.items():
        error = results[job_id].error
        assert error is not None and error.code is ErrorCode.INVALID_JOB, (name, error)
        assert error.message, name
    bomb_id = next(ids[0] for name, ids, *_ in answered if name == "zlib bomb")
    assert "inflates beyond" in str(results[bomb_id].error), results[bomb_id].error
    assert client.result(compressed, timeout=60).ok

    deadline = time.monotonic() + 30
    while True:
        records = [json.loads(raw) for raw in redis_client.lrange(DEAD_LETTER, 0, -1)]
        marked = [r for r in records if marker in json.dumps(r)]
        if len(marked) >= len(dead) + len(unreadable) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    found = " ".join(json.dumps(r) for r in marked)
    missing = [name for i, (name, *_) in enumerate(dead) if f"{marker}-{i}" not in found]
    assert not missing and len(marked) == len(dead) + len(unreadable), (missing, marked)
    # bodies capped, in every record that keeps a body
    assert all(len(r["payload"].get("body_prefix", "")) < 1000 for r in records), records
    refused_tasks = {r["payload"].get("task") for r in records}
    assert {"celery.accumulate", "celery.chord_unlock", "no.such.task"} <= refused_tasks
    assert not any(r["job_id"] in expected and "wire-marker" in json.dumps(r) for r in records)

    # The worker is the same process, never restarted its consumer, and runs the next job.
    assert caption_worker.proc is not None and caption_worker.proc.poll() is None
    log = caption_worker.log()[log_start:]
    assert "Unrecoverable error" not in log and "consumer: Connection to broker lost" not in log
    after = client.submit(CaptionJob(image=f"s3://{BUCKET}/a.jpg", model="tiny-caption"))
    assert client.result(after, timeout=60).ok
    assert redis_client.llen(QUEUE) == 0


def test_a_stored_value_that_is_not_a_job_result_is_an_error_result(
    client: Client, redis_client: redis.Redis
) -> None:
    """What Client.result and .results hand back for a result key written by something else."""
    stored = {
        "not JSON": b"\x80\x04garbage",
        "a string result": json.dumps({"status": "SUCCESS", "result": "hello"}),
        "a list result": json.dumps({"status": "SUCCESS", "result": [1, 2]}),
        "revoked": json.dumps({"status": "REVOKED", "result": {"exc_message": ["expired"]}}),
        "failure": json.dumps({"status": "FAILURE", "result": "boom"}),
        "a number": b"7",
    }
    ids = {}
    for name, value in stored.items():
        job_id = str(uuid.uuid4())
        redis_client.set(client.sender.result_key(job_id), value)
        ids[job_id] = name
    for job_id, name in ids.items():
        result = client.result(job_id, timeout=5)
        assert result.job_id == job_id and result.error is not None, name
        assert result.error.code is ErrorCode.INTERNAL, name
    many = {r.job_id: r for r in client.results(list(ids), timeout=5)}
    assert set(many) == set(ids)
    assert all(r.error is not None for r in many.values())


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _big_messages() -> list[tuple[str, str, dict[str, Any], bytes]]:
    bomb, plain, huge = (str(uuid.uuid4()) for _ in range(3))
    inflated = _body([[], {"job": _good(), "submitted_at": time.time()}, {}])
    inflated += b" " * (1024 * MIB - len(inflated))  # valid JSON once inflated: 1 GiB of it
    job = {**_good(), "prompt": "x" * (15 * 10**6)}
    return [
        ("1 GiB zlib bomb", bomb, _headers(bomb, compression="application/x-gzip"),
         zlib.compress(inflated, 9)),
        ("plain 20 MB body", plain, _headers(plain), b" " * (20 * 10**6)),
        ("15 MB job field", huge, _headers(huge),
         _body([[], {"job": job, "submitted_at": time.time()}, {}])),
    ]  # fmt: skip


def test_no_message_grows_the_worker_past_the_message_bound(
    caption_worker: WorkerProcess,
    client: Client,
    redis_client: redis.Redis,
    s3,  # type: ignore[no-untyped-def]
) -> None:
    """Peak memory while a 1 GiB zlib bomb (1 MiB on the wire), a plain 20 MB body and a job with
    a 15 MB field are each taken, refused or answered: at most the message bound + 100 MB."""
    with contextlib.suppress(
        s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists
    ):
        s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key="a.jpg", Body=sample_jpegs(1, seed=163)[0])
    assert caption_worker.proc is not None
    pid = caption_worker.proc.pid
    bound = 16 * MIB  # BLIPQ_MAX_MESSAGE_BYTES' default, which the fixture worker runs with
    # Each peak is measured from just before its message: "5" resets VmHWM to the current RSS
    # (proc(5), clear_refs).
    for name, job_id, headers, body in _big_messages():
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        before_kib = _kib(pid, "VmRSS")
        _push(redis_client, headers, body)
        del body
        result = client.result(job_id, timeout=180)
        assert not result.ok and caption_worker.proc.poll() is None, (name, result)
        grown_mib = (_kib(pid, "VmHWM") - before_kib) / 1024
        print(f"{name}: worker peak RSS {grown_mib:.0f} MiB over its RSS before")
        assert grown_mib <= bound / MIB + 100, (name, grown_mib)
    after = client.submit(CaptionJob(image=f"s3://{BUCKET}/a.jpg", model="tiny-caption"))
    assert client.result(after, timeout=60).ok
