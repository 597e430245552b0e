"""Chunk messages through a real worker: one message, many jobs, each answered on its own.

Messages are counted where they land: the worker logs ``Task <name>[<id>] received`` once per
delivered message.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue

from producer import CaptionJob, Client, ErrorCode, JobResult, VqaJob
from producer.bulk import start_run
from producer.cli.embedded import EmbeddedRedis, EmbeddedS3, WorkerProcess
from producer.protocol.chunks import encode_chunk
from producer.protocol.jobs import AnyJob, encode_job, encode_result
from producer.protocol.keys import (
    CHUNK_JOBS_HEADER,
    CHUNK_STARTED_KEY,
    DEAD_LETTER,
    DELIVERIES_KEY,
    LEDGER,
    RESULTS_STREAM,
    TASK_RUN_CHUNK,
)
from tests.e2e.conftest import REPO, worker_env
from tests.fixtures.images import sample_jpegs

BUCKET = "chunks"
_RECEIVED = re.compile(r"Task (blipq\.run_\w+)\[([0-9a-zA-Z-]+)\] received")


@pytest.fixture(scope="module")
def images(s3: Any) -> None:
    """The test images in s3://chunks/: 0-3.jpg, and text.jpg (not a picture)."""
    s3.create_bucket(Bucket=BUCKET)
    for index, data in enumerate(sample_jpegs(4, seed=77)):
        s3.put_object(Bucket=BUCKET, Key=f"{index}.jpg", Body=data)
    s3.put_object(Bucket=BUCKET, Key="text.jpg", Body=b"not a picture\n" * 50)


def _mixed_jobs() -> list[AnyJob]:
    """Good and bad jobs of two kinds, interleaved."""
    past = datetime.now(UTC) - timedelta(seconds=1)
    jobs: list[AnyJob] = []
    for i in range(12):
        jobs.append(CaptionJob(image=f"s3://{BUCKET}/{i % 4}.jpg", model="tiny-caption"))
        if i % 4 == 1:
            jobs.append(
                VqaJob(image=f"s3://{BUCKET}/{i % 4}.jpg", model="tiny-vqa", question="what?")
            )
    jobs[3:3] = [
        CaptionJob(image=f"s3://{BUCKET}/missing.jpg", model="tiny-caption"),  # not_found
        CaptionJob(image=f"s3://{BUCKET}/text.jpg", model="tiny-caption"),  # invalid_image
        VqaJob(image=f"s3://{BUCKET}/0.jpg", model="tiny-caption", question="what?"),  # no VQA
        CaptionJob(image=f"s3://{BUCKET}/1.jpg", model="tiny-caption", deadline=past),  # expired
    ]
    return jobs


def _comparable(result: JobResult) -> tuple[Any, ...]:
    """What must not depend on how the job travelled (not timings, batch sizes)."""
    output = result.output.model_dump() if result.output is not None else None
    return (result.kind, result.status, result.error.code if result.error else None, output)


def _received(worker: WorkerProcess) -> Counter[str]:
    return Counter(name for name, _ in _RECEIVED.findall(worker.log()))


def _events(store: redis.Redis) -> Counter[str]:
    """Stream events per job id."""
    return Counter(f[b"job_id"].decode() for _, f in store.xrange(RESULTS_STREAM))


def _wait(condition: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_chunked_submit_many_gives_each_job_its_own_result_equal_to_unchunked(
    caption_worker: WorkerProcess,
    client: Client,
    redis_client: redis.Redis,
    images: None,
) -> None:
    jobs = _mixed_jobs()
    before = _received(caption_worker)
    single_ids = client.submit_many(jobs, per_message=1)
    single = {r.job_id: r for r in client.results(single_ids, timeout=120)}
    chunk_ids = client.submit_many(jobs, per_message=5)
    chunked = {r.job_id: r for r in client.results(chunk_ids, timeout=120)}

    assert len(set(chunk_ids)) == len(jobs) == len(chunked)
    codes = Counter(r.error.code.value for r in chunked.values() if r.error)
    assert codes == {"not_found": 1, "invalid_image": 1, "unknown_model": 1, "expired": 1}
    assert sum(r.ok for r in chunked.values()) == len(jobs) - 4
    for a, b in zip(single_ids, chunk_ids, strict=True):
        assert _comparable(chunked[b]) == _comparable(single[a]), (single[a], chunked[b])
        assert chunked[b].job_id == b
    # Unchunked: one message per job. Chunked: 16 caption jobs in three chunks of 5 and the
    # last one alone, 3 VQA jobs in one chunk.
    received = _received(caption_worker) - before
    assert received == {"blipq.run_job": len(jobs) + 1, "blipq.run_chunk": 4}, received
    # Chunked jobs batched (the tiny worker's batches hold up to 8).
    assert max(r.batch_size for r in chunked.values()) > 1
    # One stream event per job; ledger entries and start counters cleared (after the result is
    # stored and announced); nothing stored under the chunks' own ids.
    _wait(lambda: not any(redis_client.exists(DELIVERIES_KEY.format(job_id=i)) for i in chunk_ids))
    events = _events(redis_client)
    assert all(events[job_id] == 1 for job_id in chunk_ids)
    assert not any(redis_client.zscore(LEDGER, job_id) for job_id in chunk_ids)
    chunk_message_ids = [
        i for n, i in _RECEIVED.findall(caption_worker.log()) if n.endswith("chunk")
    ]
    assert not any(redis_client.exists(f"celery-task-meta-{i}") for i in chunk_message_ids)


def _send_chunk(client: Client, chunk_id: str, jobs: list[tuple[str, object]]) -> None:
    """A chunk message as Client.submit_many sends one, with a chosen chunk id (no ledger)."""
    client.sender.app.send_task(
        TASK_RUN_CHUNK,
        kwargs=encode_chunk(jobs, time.time()),
        task_id=chunk_id,
        queue="blipq.tiny-caption",
        routing_key="blipq.tiny-caption",
        headers={CHUNK_JOBS_HEADER: [job_id for job_id, _ in jobs]},
        ignore_result=True,
    )


def test_a_bad_payload_in_a_chunk_fails_alone(
    caption_worker: WorkerProcess, client: Client, images: None
) -> None:
    good = encode_job(CaptionJob(image=f"s3://{BUCKET}/2.jpg", model="tiny-caption"))
    ids = [f"raw-{uuid.uuid4()}" for _ in range(3)]
    bad = {"kind": "caption", "image": "s3://x/y.jpg", "model": "tiny-caption", "num_beams": 99}
    _send_chunk(client, str(uuid.uuid4()), [(ids[0], good), (ids[1], bad), (ids[2], "pickle?")])
    results = {r.job_id: r for r in client.results(ids, timeout=60)}
    assert results[ids[0]].ok
    for job_id in ids[1:]:
        error = results[job_id].error
        assert error is not None and error.code.value == "invalid_job", results[job_id]


def test_a_redelivered_chunk_does_not_answer_a_job_twice(
    caption_worker: WorkerProcess, client: Client, redis_client: redis.Redis, images: None
) -> None:
    jobs = [CaptionJob(image=f"s3://{BUCKET}/{i}.jpg", model="tiny-caption") for i in range(3)]
    # Job 0 was answered by the chunk's first delivery, whose worker then died: its result is
    # stored and announced, and the chunk's start marker is set.
    answered = client.submit(jobs[0])
    first = client.result(answered, timeout=60)
    stored_before = redis_client.get(f"celery-task-meta-{answered}")
    chunk_id = str(uuid.uuid4())
    redis_client.set(CHUNK_STARTED_KEY.format(chunk_id=chunk_id), 1)
    others = [str(uuid.uuid4()) for _ in jobs[1:]]
    before = _received(caption_worker)
    entries = [(answered, encode_job(jobs[0]))]
    entries += [(i, encode_job(j)) for i, j in zip(others, jobs[1:], strict=True)]
    _send_chunk(client, chunk_id, entries)
    results = {r.job_id: r for r in client.results(others, timeout=60)}
    assert all(r.ok for r in results.values())
    # The redelivery sent the unanswered jobs on alone, and did not run job 0 again.
    _wait(lambda: (_received(caption_worker) - before)["blipq.run_job"] >= 2)
    received = _received(caption_worker) - before
    assert received == {"blipq.run_chunk": 1, "blipq.run_job": 2}, received
    assert redis_client.get(f"celery-task-meta-{answered}") == stored_before
    assert client.result(answered, timeout=5) == first
    # A result is stored before it is announced: wait for the last announcements.
    _wait(lambda: not any(redis_client.exists(DELIVERIES_KEY.format(job_id=i)) for i in others))
    events = _events(redis_client)
    assert [events[i] for i in [answered, *others]] == [1, 1, 1]
    assert json.loads(stored_before)["result"] == encode_result(first)  # type: ignore[arg-type]


def test_chunked_bulk_run(caption_worker: WorkerProcess, client: Client, images: None) -> None:
    uris = [f"s3://{BUCKET}/{i % 4}.jpg" for i in range(10)] + [f"s3://{BUCKET}/gone.jpg"]
    items = {f"item-{i}": uri for i, uri in enumerate(uris)}
    before = _received(caption_worker)
    with start_run(
        client.sender,
        items,
        kind="caption",
        options={"model": "tiny-caption"},
        per_message=4,
        chunk=8,
    ) as run:
        results = {item.key: item.result for item in run}
    assert run.complete and set(results) == set(items)
    assert [k for k, r in results.items() if not r.ok] == ["item-10"]
    received = _received(caption_worker) - before
    # Round trips of 8 (then 3): messages of 4, 4, then 3.
    assert received == {"blipq.run_chunk": 3}, received


def test_a_pickled_chunk_is_refused_and_each_of_its_jobs_answered(
    caption_worker: WorkerProcess, client: Client, redis_client: redis.Redis
) -> None:
    chunk_id, ids = str(uuid.uuid4()), [str(uuid.uuid4()) for _ in range(3)]
    queue = Queue(
        "blipq.tiny-caption", Exchange("blipq.tiny-caption"), routing_key="blipq.tiny-caption"
    )
    body = pickle.dumps(((), {"jobs": [{"job_id": i, "job": {}} for i in ids]}, {}))
    with Connection(client.settings.redis_url) as conn:
        conn.Producer().publish(
            body,
            serializer=None,
            content_type="application/x-python-serialize",
            content_encoding="binary",
            headers={"task": TASK_RUN_CHUNK, "id": chunk_id, "lang": "py", CHUNK_JOBS_HEADER: ids},
            exchange=queue.exchange,
            routing_key="blipq.tiny-caption",
            declare=[queue],
        )
    results = {r.job_id: r for r in client.results(ids, timeout=60)}
    for result in results.values():
        assert result.error is not None and result.error.code.value == "invalid_job", result
    _wait(
        lambda: any(
            json.loads(raw)["job_id"] == chunk_id for raw in redis_client.lrange(DEAD_LETTER, 0, -1)
        )
    )
    [record] = [
        json.loads(raw)
        for raw in redis_client.lrange(DEAD_LETTER, 0, -1)
        if json.loads(raw)["job_id"] == chunk_id
    ]
    assert record["payload"]["jobs"] == ids


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_worker_killed_mid_chunk_answers_no_job_twice(
    s3_server: EmbeddedS3, tiny_caption_dir: Path, images: None
) -> None:
    server = EmbeddedRedis().start()
    env = worker_env(
        server,
        s3_server,
        {"tiny-caption": str(tiny_caption_dir)},
        BLIPQ_VISIBILITY_TIMEOUT_S="5",  # the killed worker's chunks come back after 5 s
        BLIPQ_MAX_BATCH_SIZE="2",
        BLIPQ_MAX_WAIT_MS="20",
        BLIPQ_WARMUP="false",
    )
    victim = WorkerProcess(env, cwd=REPO, name="victim@%h").start()
    client = Client(redis_url=server.url)
    store = redis.Redis.from_url(server.url)
    survivor: WorkerProcess | None = None
    try:
        n = 16
        jobs = [
            CaptionJob(
                image=f"s3://{BUCKET}/{i % 4}.jpg",
                model="tiny-caption",
                max_new_tokens=n,
                min_new_tokens=n,
            )
            for i in range(200)
        ]
        ids = client.submit_many(jobs, per_message=50)
        keys = [f"celery-task-meta-{job_id}" for job_id in ids]
        _wait(lambda: sum(raw is not None for raw in store.mget(keys)) >= 10, timeout=120)
        assert victim.proc is not None
        os.kill(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait()
        answered = {i: raw for i, raw in zip(ids, store.mget(keys), strict=True) if raw}
        assert len(answered) < len(ids), "the worker finished before it was killed"

        survivor = WorkerProcess(env, cwd=REPO, name="survivor@%h").start()
        results = {r.job_id: r for r in client.results(ids, timeout=240)}
        assert set(results) == set(ids) and all(r.ok for r in results.values())
        assert survivor.stop() == 0  # drained: every result stored is announced by now
        # What was answered before the kill was not answered again: same stored result, one
        # event, and the survivor never ran it.
        assert {i: store.get(f"celery-task-meta-{i}") for i in answered} == answered
        events = _events(store)
        assert set(events) == set(ids) and max(events.values()) == 1
        log = survivor.log()
        alone = {i for name, i in _RECEIVED.findall(log) if name == "blipq.run_job"}
        assert alone and not alone & answered.keys()
        assert alone | answered.keys() == set(ids)
        assert "was redelivered" in log
        print(f"killed mid-chunk: {len(answered)} of {len(ids)} answered, {len(alone)} sent alone")
    finally:
        client.close()
        store.close()
        victim.stop()
        if survivor is not None:
            survivor.stop()
        server.close()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_poison_job_in_a_chunk_is_dead_lettered_alone(s3_server: EmbeddedS3) -> None:
    """The poison drill (``test_poison_e2e``) with the poison job inside a chunk message."""
    from tests.e2e.test_poison_e2e import MAX_DELIVERIES, Supervisor, drill_env

    s3 = s3_server.client()
    s3.create_bucket(Bucket="chunk-drill")
    images = sample_jpegs(5, seed=67)
    for index, data in enumerate(images[:4]):
        s3.put_object(Bucket="chunk-drill", Key=f"{index}.jpg", Body=data)
    s3.put_object(Bucket="chunk-drill", Key="poison-pill.jpg", Body=images[4])
    poison = "s3://chunk-drill/poison-pill.jpg"  # the drill model kills its worker on this one

    def _jobs(count: int) -> list[CaptionJob]:
        return [
            CaptionJob(image=f"s3://chunk-drill/{i % 4}.jpg", model="drill") for i in range(count)
        ]

    server = EmbeddedRedis().start()
    env = drill_env(server, s3_server)
    supervisor = Supervisor(env)
    client = Client(redis_url=server.url)
    store = redis.Redis.from_url(server.url)
    try:
        jobs = _jobs(40)
        jobs.insert(25, CaptionJob(image=poison, model="drill"))  # the middle of the third chunk
        ids = client.submit_many(jobs, per_message=10)
        poison_id = ids[25]
        results = {r.job_id: r for r in client.results(ids, timeout=180)}
        deaths_at_poison = len(supervisor.deaths)
        later = client.submit_many(_jobs(10), per_message=10)
        later_results = {r.job_id: r for r in client.results(later, timeout=60)}
    finally:
        code = supervisor.stop()
        client.close()
    logs = "\n".join(supervisor.logs)
    poisoned = results.pop(poison_id)
    assert poisoned.error is not None and poisoned.error.code is ErrorCode.POISON, poisoned
    # The chunk's start made the jobs in flight suspects; the poison job, sent on alone when the
    # chunk came back, killed a worker on each of its MAX_DELIVERIES starts alone and was then
    # dead-lettered: 1 + MAX_DELIVERIES deaths.
    starts = 1 + MAX_DELIVERIES
    assert supervisor.deaths[:deaths_at_poison] == [-9] * starts, (supervisor.deaths, logs)
    assert logs.count("fault injection") == starts
    assert "was redelivered" in logs
    others = {**results, **later_results}
    assert len(others) == 50 and all(r.ok for r in others.values()), Counter(
        r.error.code for r in others.values() if r.error
    )
    events = _events(store)
    assert set(events) == {*others, poison_id} and max(events.values()) == 1
    dead = [json.loads(raw) for raw in store.lrange(DEAD_LETTER, 0, -1)]
    assert [(d["job_id"], d["payload"]["image"]) for d in dead] == [(poison_id, poison)]
    assert len(supervisor.deaths) == deaths_at_poison and code == 0
    store.close()
    server.close()
