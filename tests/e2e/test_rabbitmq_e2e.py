"""RabbitMQ as the broker (Redis stays the result store), against a real RabbitMQ server."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from kombu import Connection

from producer import CaptionJob, CaptionOutput, Client
from producer.cli.embedded import EmbeddedRedis, EmbeddedS3, WorkerProcess
from tests.e2e.conftest import REPO, worker_env
from tests.fixtures.images import sample_jpegs

AMQP_URL = os.environ.get("BLIPQ_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def _reachable(url: str) -> bool:
    host_port = url.rsplit("@", maxsplit=1)[-1].split("/", maxsplit=1)[0]
    host, _, port = host_port.partition(":")
    try:
        with socket.create_connection((host, int(port or 5672)), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture
def amqp_url() -> str:
    if not _reachable(AMQP_URL):
        if os.environ.get("CI"):
            pytest.fail(f"no RabbitMQ at {AMQP_URL}: CI must have one (rabbitmq-server -detached)")
        pytest.skip(f"no RabbitMQ reachable at {AMQP_URL} (set BLIPQ_TEST_AMQP_URL)")
    return AMQP_URL


def test_caption_jobs_through_rabbitmq(
    amqp_url: str,
    s3_server: EmbeddedS3,
    s3,  # type: ignore[no-untyped-def]
    tiny_caption_dir: Path,
) -> None:
    redis_server = EmbeddedRedis().start()
    s3.create_bucket(Bucket="rabbit")
    s3.put_object(Bucket="rabbit", Key="a.jpg", Body=sample_jpegs(1, seed=81)[0])
    name = f"rabbit-{uuid.uuid4().hex[:6]}"  # its own queue: nothing left from an earlier run
    env = worker_env(redis_server, s3_server, {name: str(tiny_caption_dir)})
    env["BLIPQ_BROKER_URL"] = amqp_url
    worker = WorkerProcess(env, cwd=REPO).start()
    try:
        with Client(redis_url=redis_server.url, broker_url=amqp_url) as client:
            jobs = [CaptionJob(image="s3://rabbit/a.jpg", model=name, max_new_tokens=8)] * 12
            jobs.append(CaptionJob(image="s3://rabbit/missing.jpg", model=name))
            ids = client.submit_many(jobs)
            results = {r.job_id: r for r in client.results(ids, timeout=120)}
        outputs = [results[i].output for i in ids[:-1]]
        assert all(isinstance(o, CaptionOutput) for o in outputs)
        assert len({o.caption for o in outputs if isinstance(o, CaptionOutput)}) == 1
        assert results[ids[-1]].error is not None
        assert results[ids[-1]].error.code == "not_found"
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]
        redis_server.close()
        with Connection(amqp_url) as conn:  # the model's queue, left on the shared broker
            conn.default_channel.queue_delete(f"blipq.{name}")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_quorum_queue_and_a_worker_killed_mid_run_loses_nothing(
    amqp_url: str,
    s3_server: EmbeddedS3,
    s3,  # type: ignore[no-untyped-def]
) -> None:
    """The worker declares a quorum queue; a worker SIGKILLed while it holds messages loses
    none of them (RabbitMQ requeues what a dead connection held unacknowledged)."""
    import redis
    from amqp.exceptions import PreconditionFailed

    from producer.protocol.keys import RESULTS_STREAM

    redis_server = EmbeddedRedis().start()
    s3.create_bucket(Bucket="quorum")
    for index, data in enumerate(sample_jpegs(4, seed=82)):
        s3.put_object(Bucket="quorum", Key=f"{index}.jpg", Body=data)
    name = f"quorum-{uuid.uuid4().hex[:6]}"
    env = worker_env(
        redis_server,
        s3_server,
        {name: {"source": "null", "family": "null"}},  # type: ignore[dict-item]
        BLIPQ_BROKER_URL=amqp_url,
        BLIPQ_LOG_EVERY_TASK="false",
        BLIPQ_WARMUP="false",
        BLIPQ_MAX_WAIT_MS="200",
    )
    worker = WorkerProcess(env, cwd=REPO).start()
    try:
        # A quorum queue: declaring it as a classic one is refused.
        with Connection(amqp_url) as conn, pytest.raises(PreconditionFailed, match="x-queue-type"):
            conn.channel().queue_declare(
                f"blipq.{name}",
                durable=True,
                auto_delete=False,
                arguments={"x-queue-type": "classic"},
            )
        with Client(redis_url=redis_server.url, broker_url=amqp_url) as client:
            jobs = [CaptionJob(image=f"s3://quorum/{i % 4}.jpg", model=name) for i in range(400)]
            ids = client.submit_many(jobs)
            store = redis.Redis.from_url(redis_server.url)
            keys = [client.sender.result_key(i) for i in ids]
            deadline = time.monotonic() + 60
            while sum(v is not None for v in store.mget(keys)) < 50:
                assert time.monotonic() < deadline, worker.log()[-3000:]
                time.sleep(0.02)
            assert worker.proc is not None
            worker.proc.kill()  # mid-run: it holds prefetched, unacknowledged messages
            worker.proc.wait()
            killed_at = sum(v is not None for v in store.mget(keys))
            worker = WorkerProcess(env, cwd=REPO).start()
            results = {r.job_id: r for r in client.results(ids, timeout=120)}
        assert killed_at < len(ids)
        assert set(results) == set(ids) and all(r.ok for r in results.values())
        announced = Counter(f[b"job_id"].decode() for _, f in store.xrange(RESULTS_STREAM))
        assert set(announced) == set(ids) and max(announced.values()) == 1
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]
        redis_server.close()
        with Connection(amqp_url) as conn:
            conn.default_channel.queue_delete(f"blipq.{name}")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_poison_drill_on_a_quorum_queue(
    amqp_url: str,
    s3_server: EmbeddedS3,
    s3,  # type: ignore[no-untyped-def]
) -> None:
    """A job that kills its worker every time, on RabbitMQ: started once in a batch, then
    BLIPQ_MAX_DELIVERIES times alone (RabbitMQ requeues it when its worker's connection dies),
    then a poison result and one dead-letter record; the jobs around it complete."""
    import json

    import redis

    from producer import ErrorCode
    from producer.protocol.keys import DEAD_LETTER, RESULTS_STREAM
    from tests.e2e.test_poison_e2e import Supervisor

    redis_server = EmbeddedRedis().start()
    s3.create_bucket(Bucket="quorum-drill")
    for index, data in enumerate(sample_jpegs(3, seed=83)):
        s3.put_object(Bucket="quorum-drill", Key=f"{index}.jpg", Body=data)
    s3.put_object(Bucket="quorum-drill", Key="poison-pill.jpg", Body=sample_jpegs(1, seed=84)[0])
    name = f"drill-{uuid.uuid4().hex[:6]}"
    env = worker_env(
        redis_server,
        s3_server,
        {name: {"source": "null", "family": "null", "crash_on": "poison-pill"}},  # type: ignore[dict-item]
        BLIPQ_BROKER_URL=amqp_url,
        BLIPQ_MAX_DELIVERIES="3",
        BLIPQ_MAX_WAIT_MS="20",
        BLIPQ_WARMUP="false",
    )
    supervisor = Supervisor(env)
    store = redis.Redis.from_url(redis_server.url)
    try:
        with Client(redis_url=redis_server.url, broker_url=amqp_url) as client:
            jobs = [
                CaptionJob(image=f"s3://quorum-drill/{i % 3}.jpg", model=name) for i in range(20)
            ]
            before = client.submit_many(jobs)
            poison_id = client.submit(
                CaptionJob(image="s3://quorum-drill/poison-pill.jpg", model=name)
            )
            after = client.submit_many(jobs)
            ids = [*before, poison_id, *after]
            results = {r.job_id: r for r in client.results(ids, timeout=150)}
    finally:
        code = supervisor.stop()
        with Connection(amqp_url) as conn:
            conn.default_channel.queue_delete(f"blipq.{name}")
    poisoned = results.pop(poison_id)
    assert poisoned.error is not None and poisoned.error.code is ErrorCode.POISON, poisoned
    assert supervisor.deaths == [-9] * (1 + 3), supervisor.deaths  # first start, then 3 alone
    assert len(results) == 40 and all(r.ok for r in results.values())
    events = Counter(f[b"job_id"].decode() for _, f in store.xrange(RESULTS_STREAM))
    assert set(events) == set(ids) and max(events.values()) == 1
    dead = [json.loads(raw) for raw in store.lrange(DEAD_LETTER, 0, -1)]
    assert [d["job_id"] for d in dead] == [poison_id]
    assert code == 0
    redis_server.close()
