"""SIGTERM is a warm shutdown: stop taking work, finish what is held, exit 0, lose nothing."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from producer import CaptionJob, Client
from producer.cli.embedded import EmbeddedRedis, EmbeddedS3, WorkerProcess
from tests.e2e.conftest import REPO, worker_env
from tests.fixtures.images import sample_jpegs


def test_sigterm_drains_and_a_second_worker_finishes_the_rest(
    s3_server: EmbeddedS3,
    s3,  # type: ignore[no-untyped-def]
    tiny_caption_dir: Path,
) -> None:
    # A Redis of its own: no other test's worker may take these jobs.
    redis_server = EmbeddedRedis().start()
    client = Client(redis_url=redis_server.url)
    try:
        _drain(redis_server, s3_server, client, s3, tiny_caption_dir)
    finally:
        client.close()
        redis_server.close()


def _drain(
    redis_server: EmbeddedRedis,
    s3_server: EmbeddedS3,
    client: Client,
    s3,  # type: ignore[no-untyped-def]
    tiny_caption_dir: Path,
) -> None:
    s3.create_bucket(Bucket="drain")
    for index, data in enumerate(sample_jpegs(6, seed=61)):
        s3.put_object(Bucket="drain", Key=f"{index}.jpg", Body=data)
    env = worker_env(
        redis_server,
        s3_server,
        {"drain-caption": str(tiny_caption_dir)},
        BLIPQ_MAX_BATCH_SIZE="4",
        BLIPQ_MAX_WAIT_MS="20",
        BLIPQ_CONCURRENCY="8",
    )
    jobs = [
        CaptionJob(
            image=f"s3://drain/{i % 6}.jpg",
            model="drain-caption",
            max_new_tokens=20,
            min_new_tokens=20,
        )
        for i in range(60)
    ]

    first = WorkerProcess(env, cwd=REPO).start()
    ids = client.submit_many(jobs)
    # Wait until the worker is busy (some results exist), then ask it to stop.
    done: dict[str, object] = {}
    for result in client.results(ids, timeout=120):
        done[result.job_id] = result
        if len(done) >= 4:
            break
    assert first.proc is not None
    os.kill(first.proc.pid, signal.SIGTERM)
    started = time.monotonic()
    assert first.proc.wait(60) == 0, first.log()[-3000:]
    drained_in = time.monotonic() - started

    second = WorkerProcess(env, cwd=REPO).start()
    try:
        results = {r.job_id: r for r in client.results(ids, timeout=180)}
    finally:
        assert second.stop() == 0
    assert set(results) == set(ids)
    assert all(r.ok for r in results.values())
    by_worker = {r.worker for r in results.values()}
    assert len(by_worker) == 2, "the first worker finished some, the second the rest"
    assert drained_in < 60
