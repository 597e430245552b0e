"""What a producer costs Redis per job: no subscription per send, no connection per wait.

Against a real Redis; results are stored the way a worker stores them (the result backend's
``store_result``, which sets the key and publishes it).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
from celery import states

from producer import CaptionJob, Client
from producer.cli.embedded import EmbeddedRedis
from producer.protocol.errors import ResultTimeout
from producer.protocol.jobs import JobResult, encode_result

JOB = CaptionJob(image="s3://bucket/a.jpg", model="nobody-serves-this")


@pytest.fixture
def counts(private_redis: EmbeddedRedis) -> Iterator[Callable[[str], int]]:
    """How many times each command ran on the private Redis."""
    admin = redis.Redis.from_url(private_redis.url)

    def calls(command: str) -> int:
        return int(admin.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))

    yield calls
    admin.close()


def _store_later(client: Client, job_id: str, delay_s: float) -> threading.Thread:
    """Store a result as a worker would, a little later (so it arrives as a message)."""
    backend = client.sender.app.backend  # looked up here: Celery's backends are per thread

    def store() -> None:
        time.sleep(delay_s)
        result = encode_result(JobResult(job_id=job_id, kind="caption", status="ok", output=None))
        backend.store_result(job_id, result, states.SUCCESS)

    thread = threading.Thread(target=store)
    thread.start()
    return thread


def test_sending_jobs_subscribes_to_nothing(
    private_redis: EmbeddedRedis, counts: Callable[[str], int]
) -> None:
    with Client(redis_url=private_redis.url) as client:
        before = counts("subscribe")
        client.submit(JOB)
        client.submit_many([JOB] * 3)
        # Celery's backend subscribed to each result's channel as it sent the job.
        assert counts("subscribe") == before


def test_waiting_for_results_reuses_one_connection(
    private_redis: EmbeddedRedis, counts: Callable[[str], int]
) -> None:
    with Client(redis_url=private_redis.url) as client:

        def one_round() -> None:
            job_id = str(uuid.uuid4())
            client.submit(JOB, job_id=job_id)
            thread = _store_later(client, job_id, 0.05)
            assert client.result(job_id, timeout=10).job_id == job_id
            thread.join()

        one_round()
        hellos, subscribes = counts("hello"), counts("subscribe")
        for _ in range(5):
            one_round()
        # A waiter of its own per wait said HELLO on a connection of its own every time.
        assert counts("hello") == hellos
        assert counts("subscribe") == subscribes + 5  # one per wait, for its job


def test_a_wait_that_times_out_leaves_no_subscription(private_redis: EmbeddedRedis) -> None:
    admin = redis.Redis.from_url(private_redis.url)
    with Client(redis_url=private_redis.url) as client:
        job_id = client.submit(JOB)
        with pytest.raises(ResultTimeout):
            client.result(job_id, timeout=0.3)
        key = client.sender.app.backend.get_key_for_task(job_id)
        deadline = time.monotonic() + 5
        while admin.pubsub_numsub(key)[0][1] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert admin.pubsub_numsub(key) == [(key, 0)]
        # The next wait works (a fresh waiter) and finds the result once it is stored.
        thread = _store_later(client, job_id, 0.05)
        assert client.result(job_id, timeout=10).job_id == job_id
        thread.join()
    admin.close()
