"""Routing by model with real workers: one queue per model, so every job reaches a worker that
serves the model it names.

Three workers share one Redis: one serves the trained shapes caption model, one a tiny random
caption model, one a tiny BLIP-2 (caption and VQA from its one queue). A mixed load of all three
finishes with no ``unknown_model``; each job is received by the worker of its model only; a job
for a model nobody serves waits, visibly, in its own queue, and its backlog does not stop the
reaper from recovering a job lost from another queue.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from producer import CaptionJob, Client, VqaJob
from producer.cli.embedded import EmbeddedRedis, EmbeddedS3, WorkerProcess
from producer.protocol import ledger
from producer.protocol.jobs import AnyJob, encode_job
from producer.protocol.keys import LEDGER
from tests.e2e.conftest import REPO, worker_env
from tests.fixtures.images import sample_jpegs
from tests.fixtures.tiny_blip2 import build_blip2_opt

BUCKET = "routing"
SHAPES = "shapes-caption"
TINY = "tiny-caption"
BLIP2 = "tiny-blip2"
UNSERVED = "caption-large"  # a real model name that no worker here serves


@pytest.fixture(scope="module")
def workers(
    private_redis: EmbeddedRedis,
    s3_server: EmbeddedS3,
    s3,  # type: ignore[no-untyped-def]
    tiny_caption_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, WorkerProcess]]:
    s3.create_bucket(Bucket=BUCKET)
    for i, body in enumerate(sample_jpegs(4, seed=151)):
        s3.put_object(Bucket=BUCKET, Key=f"{i}.jpg", Body=body)
    blip2_dir = build_blip2_opt(tmp_path_factory.mktemp("routing-blip2"))
    models = {
        SHAPES: str(REPO / "tests" / "fixtures" / "models" / SHAPES),
        TINY: str(tiny_caption_dir),
        BLIP2: str(blip2_dir),
    }
    started: dict[str, WorkerProcess] = {}
    try:
        for name, source in models.items():
            env = worker_env(
                private_redis,
                s3_server,
                {name: source},
                BLIPQ_MAX_BATCH_SIZE="8",
                BLIPQ_MAX_WAIT_MS="50",
                # A reaper that looks every second for jobs lost two seconds ago.
                BLIPQ_REAP_AFTER_S="2",
                BLIPQ_REAP_INTERVAL_S="1",
            )
            started[name] = WorkerProcess(env, name=f"{name}@routing", cwd=REPO).start()
        yield started
    finally:
        for worker in started.values():
            assert worker.stop() == 0, worker.log()[-5000:]


def _mixed_jobs() -> list[AnyJob]:
    jobs: list[AnyJob] = []
    for i in range(8):
        image = f"s3://{BUCKET}/{i % 4}.jpg"
        jobs.append(CaptionJob(image=image, model=SHAPES, max_new_tokens=8))
        jobs.append(CaptionJob(image=image, model=TINY, max_new_tokens=8))
        if i % 2:
            jobs.append(CaptionJob(image=image, model=BLIP2, max_new_tokens=6))
        else:
            jobs.append(VqaJob(image=image, model=BLIP2, question="what?", max_new_tokens=4))
    return jobs


def test_a_mixed_load_reaches_the_workers_of_its_models(
    workers: dict[str, WorkerProcess], private_redis: EmbeddedRedis
) -> None:
    jobs = _mixed_jobs()
    with Client(redis_url=private_redis.url) as client:
        ids = client.submit_many(jobs[:12]) + client.submit_many(jobs[12:], per_message=4)
        results = {r.job_id: r for r in client.results(ids, timeout=240)}
    failures = {i: r.error for i, r in results.items() if not r.ok}
    assert not failures, failures  # no unknown_model, nor any other error
    for job, job_id in zip(jobs, ids, strict=True):
        assert results[job_id].model == job.model
    # Each job was received by the worker of its model and by no other (logged per message;
    # a chunk message's jobs are run by the worker that received the chunk).
    logs = {name: worker.log() for name, worker in workers.items()}
    for job, job_id in zip(jobs[:12], ids[:12], strict=True):
        holders = [name for name, log in logs.items() if job_id in log]
        assert holders == [job.model], (job_id, holders)


def test_a_job_for_an_unserved_model_waits_visibly_and_holds_back_no_other_queue(
    workers: dict[str, WorkerProcess], private_redis: EmbeddedRedis
) -> None:
    store = redis.Redis.from_url(private_redis.url)
    with Client(redis_url=private_redis.url) as client:
        waiting = client.submit(CaptionJob(image=f"s3://{BUCKET}/0.jpg", model=UNSERVED))
        # A job a consumer took off the tiny-caption queue and lost: on the ledger, in no queue
        # and held by no consumer, submitted after the one waiting for caption-large.
        lost = str(uuid.uuid4())
        kwargs = {"job": encode_job(CaptionJob(image=f"s3://{BUCKET}/1.jpg", model=TINY))}
        pipe = store.pipeline(transaction=False)
        ledger.record(pipe, [(lost, {**kwargs, "submitted_at": time.time()}, time.time())])
        pipe.execute()
        started = time.monotonic()
        result = client.result(lost, timeout=60)
        took = time.monotonic() - started
        assert result.ok, result.error
        assert f"reaper: job {lost} was lost" in "".join(w.log() for w in workers.values())
        # Reap after 2 s, sweeps every 1 s: re-sent within a few sweeps, not held back by the
        # older message still waiting in the queue of a model no worker serves.
        assert took < 20, took

        depths = client.queue_depths()
        assert depths[f"blipq.{UNSERVED}"] == 1
        assert {f"blipq.{SHAPES}", f"blipq.{TINY}", f"blipq.{BLIP2}"} <= set(depths)
        assert store.zscore(LEDGER, waiting) is not None  # still waiting, not failed
        consumers = client.queue_consumers(timeout=2)
        assert consumers.get(f"blipq.{UNSERVED}", 0) == 0
        assert all(consumers[f"blipq.{m}"] == 1 for m in (SHAPES, TINY, BLIP2)), consumers

    env = {**os.environ, "BLIPQ_REDIS_URL": private_redis.url}
    done = subprocess.run(
        [sys.executable, "-m", "producer.cli", "queues", "--timeout", "2"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    rows = {line.split()[0]: line for line in done.stdout.splitlines() if line.startswith("blipq.")}
    assert rows[f"blipq.{UNSERVED}"].split()[1:3] == ["1", "0"], done.stdout
    assert "no live worker serves this model" in rows[f"blipq.{UNSERVED}"]
    assert "no live worker" not in rows[f"blipq.{TINY}"], done.stdout
    store.close()
