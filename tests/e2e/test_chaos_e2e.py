"""SIGKILL a worker mid-batch again and again while a second worker stays alive:
every job ends with exactly one result and exactly one event on the results stream."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import redis

from producer import CaptionJob, Client, JobResult
from producer.cli.embedded import EmbeddedRedis, EmbeddedS3, WorkerProcess
from producer.protocol.keys import RESULTS_STREAM
from tests.e2e.conftest import REPO, worker_env
from tests.fixtures.images import sample_jpegs

WAVES = 20
PER_WAVE = 100


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_repeated_sigkill_loses_and_duplicates_nothing(
    s3_server: EmbeddedS3, tiny_caption_dir: Path
) -> None:
    s3 = s3_server.client()
    s3.create_bucket(Bucket="chaos")
    for index, data in enumerate(sample_jpegs(8, seed=111)):
        s3.put_object(Bucket="chaos", Key=f"{index}.jpg", Body=data)
    server = EmbeddedRedis().start()
    env = worker_env(
        server,
        s3_server,
        {"tiny-caption": str(tiny_caption_dir)},
        BLIPQ_VISIBILITY_TIMEOUT_S="5",
        BLIPQ_MAX_WAIT_MS="20",
        BLIPQ_WARMUP="false",
        # A consumer killed between taking a message and recording it loses the message
        # (kombu's Redis transport); the reaper sends such jobs again after this long.
        BLIPQ_REAP_AFTER_S="20",
        BLIPQ_REAP_INTERVAL_S="2",
    )
    steady = WorkerProcess(env, cwd=REPO, name="steady@%h").start()
    victim = WorkerProcess(env, cwd=REPO, name="victim@%h").start()
    client = Client(redis_url=server.url)
    ids: list[str] = []
    kills = held = 0
    try:
        for wave in range(WAVES):
            jobs = [
                CaptionJob(
                    image=f"s3://chaos/{i % 8}.jpg",
                    model="tiny-caption",
                    max_new_tokens=16,
                    min_new_tokens=16,
                )
                for i in range(PER_WAVE)
            ]
            ids += client.submit_many(jobs)
            # Kill only once the victim holds messages (on a loaded machine it may take a
            # while to get any), at a varying point of its work on them.
            deadline = time.monotonic() + 30
            while " received" not in victim.log() and time.monotonic() < deadline:
                time.sleep(0.05)
            held += " received" in victim.log()
            time.sleep(0.1 + 0.05 * (wave % 5))
            assert victim.proc is not None
            os.kill(victim.proc.pid, signal.SIGKILL)
            victim.proc.wait()
            kills += 1
            victim = WorkerProcess(env, cwd=REPO, name="victim@%h").start()
        results: dict[str, JobResult] = {}
        for result in client.results(ids, timeout=600):
            assert result.job_id not in results
            results[result.job_id] = result
    finally:
        client.close()
        victim.stop()
        steady.stop()
    assert kills >= 20 and len(ids) >= 2000
    assert set(results) == set(ids)
    assert all(r.ok for r in results.values()), Counter(
        r.error.code for r in results.values() if r.error
    )
    events = redis.Redis.from_url(server.url).xrange(RESULTS_STREAM)
    announced = Counter(fields[b"job_id"].decode() for _, fields in events)
    server.close()
    assert set(announced) == set(ids)
    assert max(announced.values()) == 1, announced.most_common(3)
    assert held == kills  # every kill hit a victim that held messages
