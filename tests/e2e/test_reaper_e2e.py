"""The reaper against a real Redis: it re-sends exactly the jobs a consumer lost."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from producer import CaptionJob, Client
from producer.cli.embedded import EmbeddedRedis
from producer.protocol.keys import CHUNK_JOBS_HEADER, DELIVERIES_KEY, LEDGER
from worker.delivery.reaper import Reaper, Resend

QUEUE = "blipq.caption-base"  # the queue of CaptionJob's default model


@pytest.fixture
def server() -> Iterator[EmbeddedRedis]:
    s = EmbeddedRedis().start()
    yield s
    s.close()


def old_jobs_reaper(r: redis.Redis, resend: Resend) -> Reaper:
    """A reaper whose clock is so far ahead that every job in the ledger is old."""
    return Reaper(
        r,
        resend,
        reap_after_s=60,
        interval_s=1,
        result_key=lambda i: f"celery-task-meta-{i}",
        clock=lambda: 10**12,
    )


def test_reaper_resends_only_lost_jobs(server: EmbeddedRedis) -> None:
    r = redis.Redis.from_url(server.url)
    with Client(redis_url=server.url) as client:
        ids = client.submit_many([CaptionJob(image=f"s3://bkt/{i}.jpg") for i in range(6)])
    assert r.zcard(LEDGER) == 6 and r.llen(QUEUE) == 6
    resent: list[tuple[str, dict[str, Any]]] = []
    reaper = old_jobs_reaper(r, lambda job_id, kwargs: resent.append((job_id, kwargs)))
    assert reaper.reap_once() == []  # all still queued: nothing is lost

    # Consumers take the four oldest (FIFO: from the right end).
    taken = [json.loads(r.rpop(QUEUE)) for _ in range(4)]  # type: ignore[arg-type]
    assert [m["headers"]["id"] for m in taken] == ids[:4]
    r.hset("unacked", "tag-1", json.dumps([taken[0], "", QUEUE]))  # held by a live consumer
    r.hset("unacked", "tag-2", json.dumps([taken[1], "", QUEUE]))  # running: held, and
    r.set(DELIVERIES_KEY.format(job_id=ids[1]), 1)  # its start counted
    r.set(f"celery-task-meta-{ids[2]}", json.dumps({"status": "SUCCESS", "result": {}}))  # done
    # ids[3] was taken by a consumer that died before recording it anywhere: lost.

    assert reaper.reap_once() == [ids[3]]
    assert resent[0][0] == ids[3]
    assert resent[0][1]["job"]["image"] == "s3://bkt/3.jpg"
    assert r.zscore(LEDGER, ids[2]) is None  # the finished one is cleared from the ledger
    assert reaper.reap_once() == []  # re-sent jobs get a fresh wait, not a second resend... yet


def test_reaper_reads_the_jobs_of_chunk_messages(server: EmbeddedRedis) -> None:
    r = redis.Redis.from_url(server.url)
    with Client(redis_url=server.url) as client:
        ids = client.submit_many(
            [CaptionJob(image=f"s3://bkt/{i}.jpg") for i in range(9)], per_message=3
        )
    assert r.zcard(LEDGER) == 9 and r.llen(QUEUE) == 3  # three chunk messages
    resent: list[tuple[str, dict[str, Any]]] = []
    reaper = old_jobs_reaper(r, lambda job_id, kwargs: resent.append((job_id, kwargs)))
    assert reaper.reap_once() == []  # a chunk at the queue's tail: its jobs are still queued

    first = json.loads(r.rpop(QUEUE))  # type: ignore[arg-type]
    assert first["headers"][CHUNK_JOBS_HEADER] == ids[:3]
    r.hset("unacked", "tag-1", json.dumps([first, "", QUEUE]))  # held: all three jobs are
    # The second chunk was taken by a consumer that died before recording it: its jobs are lost
    # and are sent again one by one, as messages of their own.
    r.rpop(QUEUE)
    assert sorted(reaper.reap_once()) == sorted(ids[3:6])
    assert [kwargs["job"]["image"] for _, kwargs in sorted(resent)] == [
        f"s3://bkt/{i}.jpg" for i in sorted(range(3, 6), key=lambda i: ids[i])
    ]


def test_a_backlog_in_another_queue_does_not_hold_back_a_lost_job(server: EmbeddedRedis) -> None:
    """Each job is judged against its own queue: an older message waiting in the queue of a model
    no worker serves says nothing about a job lost from the caption-base queue."""
    r = redis.Redis.from_url(server.url)
    with Client(redis_url=server.url) as client:
        waiting = client.submit(CaptionJob(image="s3://bkt/old.jpg", model="unserved"))
        ids = client.submit_many([CaptionJob(image=f"s3://bkt/{i}.jpg") for i in range(2)])
    assert r.llen("blipq.unserved") == 1
    resent: list[str] = []
    reaper = old_jobs_reaper(r, lambda job_id, _: resent.append(job_id))
    r.rpop(QUEUE)  # ids[0] taken by a consumer that died before recording it: lost
    assert reaper.reap_once() == [ids[0]]  # judged against ids[1], still in its own queue
    assert resent == [ids[0]]
    assert waiting not in resent  # still waiting in its queue: not lost


def test_a_job_with_an_unfinished_earlier_start_is_resent_when_lost(server: EmbeddedRedis) -> None:
    """A start counter does not mean running: a job whose worker was killed comes back to its
    queue after the visibility timeout with its counter still set, and a consumer can lose it
    again between BRPOP and recording it. Only a job held unacknowledged is running."""
    r = redis.Redis.from_url(server.url)
    with Client(redis_url=server.url) as client:
        ids = client.submit_many([CaptionJob(image=f"s3://bkt/{i}.jpg") for i in range(3)])
    resent: list[tuple[str, dict[str, Any]]] = []
    reaper = old_jobs_reaper(r, lambda job_id, kwargs: resent.append((job_id, kwargs)))
    taken = [json.loads(r.rpop(QUEUE)) for _ in range(3)]  # type: ignore[arg-type]
    for job_id in ids:
        r.set(DELIVERIES_KEY.format(job_id=job_id), 1)  # each was started once, never finished
    r.hset("unacked", "tag-1", json.dumps([taken[1], "", QUEUE]))  # running (or waiting) again
    r.hset("unacked", "tag-2", json.dumps([taken[2], "", QUEUE]))
    # ids[0] came back after its worker was killed and was lost again: BRPOP took it, nothing
    # recorded it. It must not wait for its counter to expire (a day by default).

    assert reaper.reap_once() == [ids[0]]
    assert resent[0][0] == ids[0] and resent[0][1]["job"]["image"] == "s3://bkt/0.jpg"
    # The counter stays: the resent message's run is counted as the job's next start.
    assert r.get(DELIVERIES_KEY.format(job_id=ids[0])) == b"1"

    r.hdel("unacked", "tag-2")  # ids[2]'s worker acked it: finished, result stored
    r.set(f"celery-task-meta-{ids[2]}", json.dumps({"status": "SUCCESS", "result": {}}))
    assert reaper.reap_once() == []  # ids[0]: a fresh wait; ids[1]: held; ids[2]: done
    assert r.zscore(LEDGER, ids[2]) is None


def test_a_message_on_its_way_to_the_unacked_set_is_not_resent(server: EmbeddedRedis) -> None:
    """The unacked set and the queue are read at different moments: a message taken off its
    queue in between, and recorded as unacknowledged only after, looks lost at first."""
    r = redis.Redis.from_url(server.url)
    with Client(redis_url=server.url) as client:
        ids = client.submit_many([CaptionJob(image=f"s3://bkt/{i}.jpg") for i in range(2)])
    taken = [json.loads(r.rpop(QUEUE)) for _ in range(2)]  # type: ignore[arg-type]
    resent: list[str] = []
    reaper = old_jobs_reaper(r, lambda job_id, _: resent.append(job_id))

    class Landing(threading.Event):
        """The reaper's pause before it looks again: the consumer records ids[1] meanwhile."""

        def wait(self, timeout: float | None = None) -> bool:
            r.hset("unacked", "tag-1", json.dumps([taken[1], "", QUEUE]))
            return False

    reaper._stop = Landing()
    assert reaper.reap_once() == [ids[0]]  # ids[0] is really lost
    assert resent == [ids[0]]


def test_reaper_reads_queues_and_held_messages_on_a_separate_broker(server: EmbeddedRedis) -> None:
    """Ledger and results on one Redis, queues and the unacknowledged set on another."""
    broker_server = EmbeddedRedis().start()
    try:
        r = redis.Redis.from_url(server.url)
        broker = redis.Redis.from_url(broker_server.url)
        with Client(redis_url=server.url, broker_url=broker_server.url) as client:
            ids = client.submit_many([CaptionJob(image=f"s3://bkt/{i}.jpg") for i in range(4)])
        assert r.zcard(LEDGER) == 4 and r.llen(QUEUE) == 0 and broker.llen(QUEUE) == 4
        resent: list[str] = []
        reaper = Reaper(
            r,
            lambda job_id, kwargs: resent.append(job_id),
            reap_after_s=60,
            interval_s=1,
            result_key=lambda i: f"celery-task-meta-{i}",
            clock=lambda: 10**12,
            broker=broker,
        )
        assert reaper.reap_once() == []  # all still queued on the broker: nothing is lost
        taken = [json.loads(broker.rpop(QUEUE)) for _ in range(2)]  # type: ignore[arg-type]
        broker.hset("unacked", "tag-1", json.dumps([taken[0], "", QUEUE]))  # held
        # ids[1] was taken by a consumer that died before recording it: lost.
        assert reaper.reap_once() == [ids[1]] and resent == [ids[1]]
    finally:
        broker_server.close()
