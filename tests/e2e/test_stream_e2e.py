"""Web backends follow results with a consumer group: at-least-once and resumable."""

from __future__ import annotations

from producer import CaptionJob, Client
from producer.cli.embedded import WorkerProcess
from tests.fixtures.images import sample_jpegs


def test_stream_consumer_group_is_resumable(
    caption_worker: WorkerProcess,
    client: Client,
    s3,  # type: ignore[no-untyped-def]
) -> None:
    s3.create_bucket(Bucket="stream")
    s3.put_object(Bucket="stream", Key="a.jpg", Body=sample_jpegs(1, seed=71)[0])
    ids = client.submit_many(
        [CaptionJob(image="s3://stream/a.jpg", model="tiny-caption") for _ in range(6)]
    )
    list(client.results(ids, timeout=120))

    # The consumer takes two events, then "crashes" while handling the second.
    first = client.stream(group="web", consumer="pod-1", from_start=True, idle_stop=True)
    one, two = next(first), next(first)
    first.close()  # type: ignore[attr-defined]

    # On restart, the unfinished event comes back first, then the ones never handed out.
    again = list(client.stream(group="web", consumer="pod-1", idle_stop=True))
    assert again[0].id == two.id
    handled = [one.result.job_id] + [e.result.job_id for e in again]
    assert sorted(j for j in handled if j in ids) == sorted(ids)
    # Everything is acknowledged now: a third start gets nothing.
    assert list(client.stream(group="web", consumer="pod-1", idle_stop=True)) == []
    # A second consumer group sees everything independently.
    other = [
        e.result.job_id
        for e in client.stream(group="audit", consumer="a", from_start=True, idle_stop=True)
        if e.result.job_id in ids
    ]
    assert sorted(other) == sorted(ids)


def test_queue_depths_and_worker_activity(caption_worker: WorkerProcess) -> None:
    from producer.cli.embedded import EmbeddedRedis

    server = EmbeddedRedis().start()  # no worker consumes here: depths are exact
    try:
        with Client(redis_url=server.url) as own:
            own.submit_many([CaptionJob(image="s3://bkt/a.jpg", model="m") for _ in range(5)])
            depths = own.queue_depths()
            # One queue per model: the queue of "m", which no worker serves, shows its backlog.
            assert depths == {"blipq.m": 5}
            assert own.worker_activity(timeout=0.5) == {}
    finally:
        server.close()


def test_cli_queues_sees_the_worker(caption_worker: WorkerProcess, client: Client) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "BLIPQ_REDIS_URL": client.settings.redis_url}
    done = subprocess.run(
        [sys.executable, "-m", "producer.cli", "queues", "--timeout", "2"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "blipq.tiny-caption" in done.stdout
    assert caption_worker.name.split("@")[0] in done.stdout


def test_a_job_sent_with_ignore_result_is_still_answered(
    caption_worker: WorkerProcess,
    client: Client,
    s3,  # type: ignore[no-untyped-def]
) -> None:
    """Celery skips storing the result of such a message; the task answers it all the same."""
    import time
    import uuid

    from producer.protocol.jobs import encode_job
    from producer.protocol.keys import TASK_RUN_JOB

    s3.create_bucket(Bucket="ignored")
    s3.put_object(Bucket="ignored", Key="a.jpg", Body=sample_jpegs(1, seed=72)[0])
    job_id = str(uuid.uuid4())
    job = encode_job(CaptionJob(image="s3://ignored/a.jpg", model="tiny-caption"))
    client.sender.app.send_task(
        TASK_RUN_JOB,
        kwargs={"job": job, "submitted_at": time.time()},
        task_id=job_id,
        queue="blipq.tiny-caption",
        routing_key="blipq.tiny-caption",
        ignore_result=True,
    )
    assert client.result(job_id, timeout=120).status == "ok"
    events = [
        e.result.job_id
        for e in client.stream(group="ignored", consumer="a", from_start=True, idle_stop=True)
    ]
    assert events.count(job_id) == 1
