"""Delivery guarantees through a real worker: deadlines, one event per job, poison jobs."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import redis

from producer import CaptionJob, Client, ErrorCode
from producer.cli.embedded import WorkerProcess
from producer.protocol.keys import DEAD_LETTER, DELIVERIES_KEY, RESULTS_STREAM
from tests.fixtures.images import sample_jpegs


def test_expired_jobs_are_not_run(
    caption_worker: WorkerProcess,
    client: Client,
    s3,  # type: ignore[no-untyped-def]
) -> None:
    s3.create_bucket(Bucket="deadlines")
    s3.put_object(Bucket="deadlines", Key="a.jpg", Body=sample_jpegs(1, seed=8)[0])
    past = datetime.now(UTC) - timedelta(seconds=1)
    jobs = [
        CaptionJob(image="s3://deadlines/a.jpg", model="tiny-caption", deadline=past),
        CaptionJob(image="s3://deadlines/a.jpg", model="tiny-caption", ttl_s=3600),
        CaptionJob(
            image="s3://deadlines/a.jpg",
            model="tiny-caption",
            deadline=datetime.now(UTC) + timedelta(hours=1),
        ),
    ]
    expired, fresh, later = (client.result(i, timeout=60) for i in client.submit_many(jobs))
    assert expired.error is not None and expired.error.code is ErrorCode.EXPIRED
    assert fresh.ok and later.ok


def test_a_job_is_announced_once_even_if_it_finishes_twice(
    caption_worker: WorkerProcess,
    client: Client,
    redis_client: redis.Redis,
    s3,  # type: ignore[no-untyped-def]
) -> None:
    s3.create_bucket(Bucket="twice")
    s3.put_object(Bucket="twice", Key="a.jpg", Body=sample_jpegs(1, seed=9)[0])
    job = CaptionJob(image="s3://twice/a.jpg", model="tiny-caption")
    job_id = client.submit(job)
    first = client.result(job_id, timeout=60)
    # The same message again (as a redelivery after a crash would bring it): same id.
    client.submit(job, job_id=job_id)
    import time

    deadline = time.monotonic() + 30
    while redis_client.exists(DELIVERIES_KEY.format(job_id=job_id)) or redis_client.llen(
        "blipq.tiny-caption"
    ):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    assert client.result(job_id, timeout=5) == first
    events = [f for _, f in redis_client.xrange(RESULTS_STREAM) if f[b"job_id"].decode() == job_id]
    assert len(events) == 1


def test_poison_job_is_dead_lettered_after_bounded_deliveries(
    caption_worker: WorkerProcess, client: Client, redis_client: redis.Redis
) -> None:
    # Simulate the history of a job that killed its worker on its first start (a suspect) and
    # then three times running alone: four unfinished starts.
    # (A quick check of the decision; test_poison_e2e.py has the real thing: a job that SIGKILLs
    # its worker every time, restarted workers, redelivery by the visibility timeout.)
    job = CaptionJob(image="s3://poison/a.jpg", model="tiny-caption")
    job_id = "poison-job-1"
    redis_client.set(DELIVERIES_KEY.format(job_id=job_id), 4)
    client.submit(job, job_id=job_id)
    result = client.result(job_id, timeout=60)
    assert result.error is not None and result.error.code is ErrorCode.POISON
    assert "blipq:dead" in result.error.message
    records = [json.loads(r) for r in redis_client.lrange(DEAD_LETTER, 0, -1)]
    assert [r["payload"]["image"] for r in records if r["job_id"] == job_id] == [
        "s3://poison/a.jpg"
    ]
    # The start counter is cleared right after the result is stored (a bounded wait).
    assert eventually(lambda: not redis_client.exists(DELIVERIES_KEY.format(job_id=job_id)))


def test_a_job_redelivered_after_a_crash_runs_alone_and_completes(
    caption_worker: WorkerProcess,
    client: Client,
    redis_client: redis.Redis,
    s3,  # type: ignore[no-untyped-def]
) -> None:
    # The history of a job that was in flight when its worker died: one unfinished start.
    s3.create_bucket(Bucket="suspect")
    s3.put_object(Bucket="suspect", Key="a.jpg", Body=sample_jpegs(1, seed=10)[0])
    job_id = "suspect-job-1"
    redis_client.set(DELIVERIES_KEY.format(job_id=job_id), 1)
    client.submit(CaptionJob(image="s3://suspect/a.jpg", model="tiny-caption"), job_id=job_id)
    result = client.result(job_id, timeout=60)
    assert result.ok, result.error
    assert f"job {job_id}: 1 earlier start(s) did not finish; running it alone" in (
        caption_worker.log()
    )
    assert eventually(lambda: not redis_client.exists(DELIVERIES_KEY.format(job_id=job_id)))


def eventually(condition, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
