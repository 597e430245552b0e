"""Faults with real servers and real workers: Redis restarts, the object store goes away."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer import CaptionJob, Client, JobResult
from producer.cli.embedded import EmbeddedRedis, EmbeddedS3, WorkerProcess
from tests.e2e.conftest import REPO, worker_env
from tests.fixtures.images import sample_jpegs


@pytest.fixture
def private_redis() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis().start()
    yield server
    server.close()


def _upload(s3_server: EmbeddedS3, bucket: str, count: int) -> None:
    s3 = s3_server.client()
    s3.create_bucket(Bucket=bucket)
    for index, data in enumerate(sample_jpegs(count, seed=101)):
        s3.put_object(Bucket=bucket, Key=f"{index}.jpg", Body=data)


@pytest.mark.slow
def test_redis_restart_mid_run_loses_nothing(
    private_redis: EmbeddedRedis, s3_server: EmbeddedS3, tiny_caption_dir: Path
) -> None:
    _upload(s3_server, "redis-restart", 5)
    env = worker_env(
        private_redis,
        s3_server,
        {"tiny-caption": str(tiny_caption_dir)},
        BLIPQ_VISIBILITY_TIMEOUT_S="10",
        # A BRPOP whose reply dies with the connection loses its message (measured: 1 job in
        # about 6 restarts); the reaper sends it again, here within the test's time.
        BLIPQ_REAP_AFTER_S="20",
        BLIPQ_REAP_INTERVAL_S="2",
    )
    worker = WorkerProcess(env, cwd=REPO).start()
    client = Client(redis_url=private_redis.url)
    try:
        jobs = [
            CaptionJob(
                image=f"s3://redis-restart/{i % 5}.jpg",
                model="tiny-caption",
                max_new_tokens=12,
                min_new_tokens=12,
            )
            for i in range(150)
        ]
        ids = client.submit_many(jobs)
        results: dict[str, JobResult] = {}
        restarted = False
        for result in client.results(ids, timeout=200):
            results[result.job_id] = result
            if len(results) == 20 and not restarted:
                private_redis.stop()  # data is on disk (append-only file)
                time.sleep(2)
                private_redis.start()
                restarted = True
        assert restarted
        assert set(results) == set(ids)
        assert all(r.ok for r in results.values()), [r.error for r in results.values() if r.error]
    finally:
        client.close()
        assert worker.stop() == 0, worker.log()[-3000:]


@pytest.mark.slow
def test_object_store_outage_is_retried_then_reported(
    private_redis: EmbeddedRedis, tiny_caption_dir: Path
) -> None:
    s3_server = EmbeddedS3().start()
    try:
        _upload(s3_server, "outage", 4)
        models = {"tiny-caption": str(tiny_caption_dir)}
        patient = WorkerProcess(worker_env(private_redis, s3_server, models), cwd=REPO).start()
        client = Client(redis_url=private_redis.url)
        s3_server.stop()  # the store is down for 30 s while jobs arrive
        back = threading.Timer(30, s3_server.start)
        back.start()
        ids = client.submit_many(
            [CaptionJob(image=f"s3://outage/{i % 4}.jpg", model="tiny-caption") for i in range(20)]
        )
        results = list(client.results(ids, timeout=240))
        back.join()
        assert len(results) == 20 and all(r.ok for r in results), [r.error for r in results][:3]
        assert patient.stop() == 0

        # A worker whose retries run out reports storage_unavailable, not silence.
        impatient_env = worker_env(private_redis, s3_server, models, BLIPQ_S3_MAX_ATTEMPTS="2")
        impatient = WorkerProcess(impatient_env, cwd=REPO).start()
        s3_server.stop()
        job_id = client.submit(CaptionJob(image="s3://outage/0.jpg", model="tiny-caption"))
        result = client.result(job_id, timeout=120)
        assert result.error is not None and result.error.code == "storage_unavailable"
        assert "gave up after 2 attempts" in result.error.message
        assert impatient.stop() == 0
        client.close()
    finally:
        s3_server.close()
