"""A job's answer against a real Redis: stored, announced once, bookkeeping cleared, one round trip.

``WorkerResultBackend.answer`` replaces Celery's store (GET, then SET + PUBLISH), the stream
event and the clearing of the start counter and ledger entry (four round trips) with one script.
What producers read must not change: Celery's stored form, the message on the key's channel,
one stream event per job.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery, states
from celery.app.task import Context
from redis.connection import Connection

from producer.cli.embedded import EmbeddedRedis
from producer.client.sender import Sender
from producer.protocol import ledger
from producer.protocol.celeryconf import celery_config
from producer.protocol.errors import JobFailed
from producer.protocol.jobs import ErrorCode, JobResult, decode_result, encode_result
from producer.protocol.keys import (
    DELIVERIES_KEY,
    LEDGER,
    LEDGER_PAYLOADS,
    RESULTS_STREAM,
    TASK_RUN_JOB,
)
from producer.protocol.settings import ClientSettings
from worker.celery.backend import WorkerResultBackend, stored_answer
from worker.settings import Settings


@pytest.fixture
def admin(private_redis: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(private_redis.url)
    yield client
    client.close()


@pytest.fixture
def backend(private_redis: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch) -> WorkerResultBackend:
    monkeypatch.setenv("BLIPQ_REDIS_URL", private_redis.url)
    settings = Settings()
    app = Celery("answer-test", set_as_current=False)
    app.conf.update(celery_config(settings))
    app.conf.result_backend = f"worker.celery.backend:WorkerResultBackend+{private_redis.url}"
    assert isinstance(app.backend, WorkerResultBackend)
    return app.backend


def _result(job_id: str, caption: str) -> dict[str, Any]:
    done = JobResult(job_id=job_id, kind="caption", status="ok", output=None, worker=caption)
    return encode_result(done)


def _pending(admin: redis.Redis, job_id: str) -> None:
    """The state of a job a worker is running: started once, in the ledger."""
    admin.set(DELIVERIES_KEY.format(job_id=job_id), 1)
    pipe = admin.pipeline()
    ledger.record(pipe, [(job_id, {"job": {}}, 100.0)])
    pipe.execute()


def _events(admin: redis.Redis, job_id: str) -> list[dict[str, Any]]:
    entries = admin.xrange(RESULTS_STREAM)
    return [
        json.loads(fields[b"result"])
        for _, fields in entries
        if fields[b"job_id"].decode() == job_id
    ]


def test_an_answer_is_stored_published_announced_and_cleared(
    backend: WorkerResultBackend, admin: redis.Redis
) -> None:
    job_id = str(uuid.uuid4())
    _pending(admin, job_id)
    key = backend.get_key_for_task(job_id).decode()
    listener = admin.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    listener.subscribe(key)
    assert listener.get_message(timeout=5) is None  # the subscription, confirmed (and ignored)

    assert backend.answer(job_id, _result(job_id, "first")) is True

    meta = backend.get_task_meta(job_id)  # Celery reads it as its own
    assert meta["status"] == states.SUCCESS and meta["task_id"] == job_id
    assert meta["result"]["worker"] == "first" and meta["date_done"]
    assert 0 < admin.ttl(key) <= backend.expires
    message = listener.get_message(timeout=5)  # the channel waiters listen on
    assert message is not None and json.loads(message["data"])["result"]["worker"] == "first"
    listener.close()
    assert [e["worker"] for e in _events(admin, job_id)] == ["first"]
    assert not admin.exists(DELIVERIES_KEY.format(job_id=job_id))
    assert admin.zscore(LEDGER, job_id) is None and not admin.hexists(LEDGER_PAYLOADS, job_id)


def test_a_second_answer_keeps_the_stored_success_and_adds_no_event(
    backend: WorkerResultBackend, admin: redis.Redis
) -> None:
    job_id = str(uuid.uuid4())
    assert backend.answer(job_id, _result(job_id, "first")) is True
    _pending(admin, job_id)  # redelivered and run again
    assert backend.answer(job_id, _result(job_id, "second")) is False
    assert backend.get_task_meta(job_id)["result"]["worker"] == "first"
    assert [e["worker"] for e in _events(admin, job_id)] == ["first"]
    assert not admin.exists(DELIVERIES_KEY.format(job_id=job_id))  # cleared all the same
    assert admin.zscore(LEDGER, job_id) is None


def test_an_answer_replaces_a_stored_retry(
    backend: WorkerResultBackend, admin: redis.Redis
) -> None:
    job_id = str(uuid.uuid4())
    backend.mark_as_retry(job_id, RuntimeError("S3 is down"))
    assert backend.get_task_meta(job_id)["status"] == states.RETRY
    assert backend.answer(job_id, _result(job_id, "later")) is True
    assert backend.get_task_meta(job_id)["result"]["worker"] == "later"


def test_celery_storing_a_run_job_success_answers_it(
    backend: WorkerResultBackend, admin: redis.Redis
) -> None:
    """The path of a job of its own: the trace's ``mark_as_done`` with the task's request."""
    job_id = str(uuid.uuid4())
    _pending(admin, job_id)
    request = Context(task=TASK_RUN_JOB, id=job_id, delivery_info={})
    backend.mark_as_done(job_id, _result(job_id, "traced"), request)
    assert backend.get_task_meta(job_id)["result"]["worker"] == "traced"
    assert [e["worker"] for e in _events(admin, job_id)] == ["traced"]
    assert admin.zscore(LEDGER, job_id) is None


def test_an_answer_is_one_round_trip(
    backend: WorkerResultBackend, admin: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = str(uuid.uuid4())
    backend.answer(str(uuid.uuid4()), _result("warm-up", "x"))  # the script is loaded
    sent: list[bytes] = []
    real = Connection.send_packed_command

    def counted(self: Connection, command: Any, check_health: bool = True) -> None:
        sent.append(command if isinstance(command, bytes) else b"".join(command))
        real(self, command, check_health)

    monkeypatch.setattr(Connection, "send_packed_command", counted)
    backend.answer(job_id, _result(job_id, "x"))
    assert len(sent) == 1 and b"EVALSHA" in sent[0]


def test_an_answer_survives_a_script_flush(
    backend: WorkerResultBackend, admin: redis.Redis
) -> None:
    """A restarted Redis has no scripts: the answer loads it again."""
    backend.answer(str(uuid.uuid4()), _result("warm-up", "x"))
    admin.script_flush()
    job_id = str(uuid.uuid4())
    assert backend.answer(job_id, _result(job_id, "after")) is True
    assert backend.get_task_meta(job_id)["result"]["worker"] == "after"


def _error(job_id: str) -> dict[str, Any]:
    failed = JobResult.failure(job_id, "caption", ErrorCode.NOT_FOUND, "no such object")
    return encode_result(failed)


def test_an_error_answer_is_a_celery_failure_that_producers_read_back(
    backend: WorkerResultBackend, admin: redis.Redis, private_redis: EmbeddedRedis
) -> None:
    job_id = str(uuid.uuid4())
    _pending(admin, job_id)
    assert backend.answer(job_id, _error(job_id)) is True
    meta = backend.get_task_meta(job_id)
    assert meta["status"] == states.FAILURE and isinstance(meta["result"], JobFailed)
    assert meta["result"].result["error"]["code"] == "not_found"
    assert [e["status"] for e in _events(admin, job_id)] == ["error"]
    assert admin.zscore(LEDGER, job_id) is None
    sender = Sender(ClientSettings(redis_url=private_redis.url))
    try:
        read = sender.to_result(job_id, admin.get(backend.get_key_for_task(job_id)))
    finally:
        sender.close()
    assert read == decode_result(_error(job_id))


def test_a_stored_failure_is_final(backend: WorkerResultBackend, admin: redis.Redis) -> None:
    job_id = str(uuid.uuid4())
    assert backend.answer(job_id, _error(job_id)) is True
    _pending(admin, job_id)  # redelivered and run again, this time ok
    assert backend.answer(job_id, _result(job_id, "second")) is False
    assert backend.get_task_meta(job_id)["status"] == states.FAILURE
    assert [e["status"] for e in _events(admin, job_id)] == ["error"]
    assert admin.zscore(LEDGER, job_id) is None


def test_celery_storing_a_job_failed_answers_it(
    backend: WorkerResultBackend, admin: redis.Redis
) -> None:
    """The trace's ``mark_as_failure`` of a run_job that raised ``JobFailed``."""
    job_id = str(uuid.uuid4())
    _pending(admin, job_id)
    request = Context(task=TASK_RUN_JOB, id=job_id, delivery_info={})
    backend.mark_as_failure(job_id, JobFailed(_error(job_id)), "Traceback ...", request=request)
    meta = backend.get_task_meta(job_id)
    assert meta["status"] == states.FAILURE and meta["traceback"] is None
    assert stored_answer(meta) == _error(job_id)
    assert [e["status"] for e in _events(admin, job_id)] == ["error"]
    assert admin.zscore(LEDGER, job_id) is None
