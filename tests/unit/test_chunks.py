"""Chunk messages: grouping and the wire format (producer), and the worker's expansion of a chunk
into jobs with fakes for Redis, the result backend and the engine (no servers)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from celery import states
from celery.exceptions import Reject

from producer import CaptionJob, ErrorCode, JobResult
from producer.protocol.chunks import ChunkEntry, decode_chunk, encode_chunk, group_messages
from producer.protocol.errors import InvalidJob, Retryable
from producer.protocol.jobs import CaptionOutput, decode_job, encode_job, encode_result
from producer.protocol.keys import LEDGER, MAX_JOBS_PER_MESSAGE, TASK_RUN_JOB
from worker.celery.chunks import ChunkRunner
from worker.delivery.policy import DeliveryPolicy, DiedRunning

# --- producer side ---------------------------------------------------------------------------


def test_one_per_message_keeps_order() -> None:
    assert group_messages(["a", "b", "c"], lambda _: "k", 1) == [["a"], ["b"], ["c"]]


def test_messages_hold_one_kind_in_order_and_at_most_per_message() -> None:
    items = [("caption", 1), ("vqa", 2), ("caption", 3), ("caption", 4), ("vqa", 5), ("match", 6)]
    groups = group_messages(items, lambda item: item[0], 2)
    assert groups == [
        [("caption", 1), ("caption", 3)],  # full: sent first
        [("vqa", 2), ("vqa", 5)],
        [("caption", 4)],  # the rest, by the kind's first appearance
        [("match", 6)],
    ]
    flat = sorted(item for group in groups for item in group)
    assert flat == sorted(items)
    assert all(len({kind for kind, _ in g}) == 1 for g in groups)


def test_per_message_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        group_messages([1], lambda _: "k", 0)


def test_chunk_round_trip() -> None:
    payload = encode_job(CaptionJob(image="s3://b-1/a.jpg"))
    kwargs = encode_chunk([("id-1", payload), ("id-2", {"kind": "caption"})], 12.5)
    assert kwargs["submitted_at"] == 12.5
    chunk = decode_chunk(kwargs["jobs"])
    assert chunk.entries == [ChunkEntry("id-1", payload), ChunkEntry("id-2", {"kind": "caption"})]
    assert chunk.problems == [] and chunk.refusal is None


@pytest.mark.parametrize(
    ("jobs", "ids", "problem"),
    [
        ([{"job": {}}, {"job_id": "ok", "job": {}}], ["ok"], "entry 0: no job id"),
        ([{"job_id": 7}], [], "entry 0: no job id"),
        (["x", {"job_id": "", "job": {}}], [], "entry 1: no job id"),
        ([{"job_id": "x" * 201}], [], "no job id"),
        ([{"job_id": "a"}, {"job_id": "a"}], ["a"], "entry 1: job id 'a' repeats"),
    ],
)
def test_entries_nobody_can_be_answered_for_are_reported(
    jobs: list[Any], ids: list[str], problem: str
) -> None:
    chunk = decode_chunk(jobs)
    assert [e.job_id for e in chunk.entries] == ids
    assert any(problem in p for p in chunk.problems), chunk.problems
    assert chunk.refusal is None


def test_a_chunk_that_is_not_a_list_is_refused() -> None:
    chunk = decode_chunk({"job_id": "a"})
    assert chunk.entries == [] and chunk.refusal and "not a list" in chunk.problems[0]


def test_an_oversized_chunk_is_refused_with_its_ids() -> None:
    jobs = [{"job_id": f"j{i}", "job": {}} for i in range(MAX_JOBS_PER_MESSAGE + 1)]
    chunk = decode_chunk(jobs)
    assert len(chunk.entries) == MAX_JOBS_PER_MESSAGE + 1
    assert chunk.refusal is not None and str(MAX_JOBS_PER_MESSAGE) in chunk.refusal


# --- worker side: fakes ------------------------------------------------------------------------


@dataclass
class FakeDeliveries:
    starts: dict[str, int] = field(default_factory=dict)
    completed_ids: list[str] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)
    dead: list[tuple[str, object, str]] = field(default_factory=list)

    def begin(self, job_id: str) -> int:
        earlier = self.starts.get(job_id, 0)
        if not earlier:
            self.starts[job_id] = 1
        return earlier

    def finished(self, job_id: str) -> None:
        self.finished_ids.append(job_id)
        self.starts.pop(job_id, None)

    def completed(self, job_id: str) -> None:
        self.completed_ids.append(job_id)
        self.starts.pop(job_id, None)

    def dead_letter(self, job_id: str, payload: object, reason: str) -> None:
        self.dead.append((job_id, payload, reason))


@dataclass
class FakePublisher:
    published: set[str] = field(default_factory=set)
    events: list[str] = field(default_factory=list)

    def publish(self, result: dict[str, Any]) -> bool:
        job_id = result["job_id"]
        if job_id in self.published:
            return False
        self.published.add(job_id)
        self.events.append(job_id)
        return True


class FakeRedis:
    def __init__(self) -> None:
        self.keys: dict[str, object] = {}

    def set(self, key: str, value: object, *, nx: bool = False, ex: int | None = None) -> bool:
        if nx and key in self.keys:
            return False
        self.keys[key] = value
        return True

    def zadd(self, key: str, mapping: dict[str, float], *, xx: bool = False) -> int:
        scores = self.keys.setdefault(key, {})
        assert isinstance(scores, dict)
        scores.update({m: v for m, v in mapping.items() if m in scores or not xx})
        return 0


class FakeQuarantine:
    def __init__(self) -> None:
        self.inside = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        self.inside += 1
        yield


@dataclass
class FakeSettings:
    s3_max_attempts: int = 7
    result_expires_s: int = 3600


class FakeEngine:
    """Runs a job the way Engine.handle answers it: ok, or a failure with its error code."""

    worker_name = "test:1"

    def __init__(self) -> None:
        self.redis = FakeRedis()
        self.deliveries = FakeDeliveries()
        self.publisher = FakePublisher()
        self.quarantine = FakeQuarantine()
        self.settings = FakeSettings()
        self.policy = DeliveryPolicy(max_attempts=7, max_deliveries=3, worker=self.worker_name)
        self.handled: list[str] = []
        self._lock = threading.Lock()

    def handle(self, job_id: str, payload: object, submitted_at: float | None) -> JobResult:
        with self._lock:
            self.handled.append(job_id)
        try:
            job = decode_job(payload)
        except InvalidJob as exc:
            return JobResult.failure(job_id, "caption", ErrorCode.INVALID_JOB, exc.message)
        if "flaky" in job.image:
            raise Retryable("S3 is down")
        if "crashes" in job.image:
            raise DiedRunning("the model process died running this job's batch")
        if "broken" in job.image:
            raise RuntimeError("Redis went away")  # handle never raises this; a bug would
        output = CaptionOutput(caption=job.image, continuation=job.image)
        return JobResult(job_id=job_id, kind="caption", status="ok", output=output)


class FakeBackend:
    """Stores results; ``answer`` also announces and clears, as ``WorkerResultBackend`` does."""

    def __init__(self, publisher: FakePublisher, deliveries: FakeDeliveries) -> None:
        self.stored: dict[str, dict[str, Any]] = {}
        self._publisher = publisher
        self._deliveries = deliveries

    def answer(self, job_id: str, result: dict[str, Any]) -> bool:
        stored = self.stored.get(job_id, {}).get("status") == states.SUCCESS
        if not stored:
            self.store_result(job_id, result, states.SUCCESS)
        self._publisher.publish(result)
        self._deliveries.completed(job_id)
        return not stored

    def store_result(self, job_id: str, result: dict[str, Any], state: str) -> None:
        self.stored[job_id] = {"status": state, "result": result}

    def get_key_for_task(self, job_id: str) -> str:
        return f"meta-{job_id}"

    def mget(self, keys: list[str]) -> list[dict[str, Any] | None]:
        return [self.stored.get(key.removeprefix("meta-")) for key in keys]

    def decode_result(self, raw: dict[str, Any]) -> dict[str, Any]:
        return raw


@pytest.fixture
def parts() -> Iterator[tuple[ChunkRunner, FakeEngine, FakeBackend, list[dict[str, Any]]]]:
    engine, sent = FakeEngine(), []
    backend = FakeBackend(engine.publisher, engine.deliveries)

    def send_task(name: str, **options: Any) -> None:
        sent.append({"name": name, **options})

    runner = ChunkRunner(engine, threads=4, backend=backend, send_task=send_task)  # type: ignore[arg-type]
    yield runner, engine, backend, sent
    runner.close()


def _chunk(*images: str) -> list[dict[str, Any]]:
    jobs = [encode_job(CaptionJob(image=f"s3://b-1/{image}")) for image in images]
    return encode_chunk([(f"job-{i}", job) for i, job in enumerate(jobs)], 100.0)["jobs"]


def test_every_job_of_a_chunk_gets_its_own_result_and_event(parts: Any) -> None:
    runner, engine, backend, sent = parts
    jobs = _chunk("a.jpg", "b.jpg", "c.jpg")
    jobs.insert(1, {"job_id": "bad", "job": {"kind": "caption", "image": "http://x"}})
    assert runner.run("chunk-1", jobs, 100.0, "blipq.caption-base") == 4
    assert set(backend.stored) == {"job-0", "bad", "job-1", "job-2"}
    assert all(m["status"] == states.SUCCESS for m in backend.stored.values())
    assert backend.stored["job-1"]["result"]["output"]["caption"] == "s3://b-1/b.jpg"
    bad = backend.stored["bad"]["result"]
    assert bad["status"] == "error" and bad["error"]["code"] == "invalid_job"  # it fails alone
    assert sorted(engine.publisher.events) == sorted(backend.stored)
    assert sorted(engine.deliveries.completed_ids) == sorted(backend.stored)
    assert engine.deliveries.starts == {}  # every start finished
    assert engine.quarantine.inside == 4  # each job ran under the shared quarantine
    assert sent == []


def test_a_redelivered_chunk_answers_stored_jobs_and_sends_the_rest_alone(parts: Any) -> None:
    runner, engine, backend, sent = parts
    jobs = _chunk("a.jpg", "b.jpg", "c.jpg")
    # The first delivery: job-0 was answered (and announced), then the worker died.
    engine.redis.set("blipq:chunk:chunk-2", 1)
    done = JobResult(job_id="job-0", kind="caption", status="ok")
    backend.store_result("job-0", encode_result(done), states.SUCCESS)
    engine.publisher.publish(encode_result(done))
    engine.deliveries.starts["job-1"] = 1  # in flight when the worker died: a suspect
    engine.redis.keys[LEDGER] = {"job-1": 100.0, "job-2": 100.0}  # job-0 was cleared
    before = time.time()

    assert runner.run("chunk-2", jobs, 100.0, "blipq.caption-base") == 1
    assert engine.handled == []  # nothing runs again in the chunk
    assert engine.publisher.events == ["job-0"]  # no second event
    assert engine.deliveries.completed_ids == ["job-0"]
    assert [(s["name"], s["task_id"], s["queue"]) for s in sent] == [
        (TASK_RUN_JOB, "job-1", "blipq.caption-base"),
        (TASK_RUN_JOB, "job-2", "blipq.caption-base"),
    ]
    assert sent[0]["kwargs"] == {"job": jobs[1]["job"], "submitted_at": 100.0}
    assert engine.deliveries.starts == {"job-1": 1}  # run_job counts it; the split did not
    # Sent on at the far end of the queue: their ledger wait restarts, so the reaper does not take
    # them for lost while they wait there behind messages submitted after them.
    ledger = engine.redis.keys[LEDGER]
    assert isinstance(ledger, dict) and set(ledger) == {"job-1", "job-2"}
    assert all(score >= before for score in ledger.values())


def test_a_job_started_before_is_sent_alone_for_run_job_to_judge(parts: Any) -> None:
    runner, engine, backend, sent = parts
    engine.deliveries.starts["job-1"] = 2
    assert runner.run("chunk-3", _chunk("a.jpg", "b.jpg"), 100.0, "blipq.caption-base") == 1
    assert set(backend.stored) == {"job-0"}
    assert [s["task_id"] for s in sent] == ["job-1"]
    assert engine.deliveries.starts == {"job-1": 2}  # not counted here
    assert not engine.redis.keys.get(LEDGER)  # its wait restarts only if it is in the ledger


def test_a_transient_failure_is_retried_as_a_message_of_its_own(parts: Any) -> None:
    runner, engine, backend, sent = parts
    assert runner.run("chunk-4", _chunk("a.jpg", "flaky.jpg"), 100.0, "blipq.caption-base") == 1
    assert set(backend.stored) == {"job-0"}
    assert [(s["task_id"], s["retries"], s["countdown"]) for s in sent] == [("job-1", 1, 1.0)]
    assert engine.deliveries.finished_ids == ["job-1"]


def test_a_job_whose_batch_killed_the_model_process_is_sent_alone_as_a_suspect(
    parts: Any,
) -> None:
    """A split worker's model process died in the job's batch: this start did not finish, so
    its start count stays and run_job judges it (alone, or poison), with no backoff."""
    runner, engine, backend, sent = parts
    assert runner.run("chunk-6", _chunk("a.jpg", "crashes.jpg"), 100.0, "blipq.caption-base") == 1
    assert set(backend.stored) == {"job-0"}
    assert [(s["task_id"], s["retries"], s["countdown"]) for s in sent] == [("job-1", 0, None)]
    assert engine.deliveries.starts == {"job-1": 1} and engine.deliveries.finished_ids == []


def test_a_transient_failure_with_no_retries_left_is_a_result(parts: Any) -> None:
    runner, engine, backend, sent = parts
    engine.policy = DeliveryPolicy(max_attempts=1, max_deliveries=3, worker="test:1")
    runner.run("chunk-5", _chunk("flaky.jpg"), 100.0, "blipq.caption-base")
    result = backend.stored["job-0"]["result"]
    assert result["error"]["code"] == ErrorCode.STORAGE_UNAVAILABLE.value and sent == []


def test_a_job_without_a_result_puts_the_chunk_back(parts: Any) -> None:
    runner, _engine, backend, _sent = parts
    with pytest.raises(Reject) as info:
        runner.run("chunk-6", _chunk("a.jpg", "broken.jpg"), 100.0, "blipq.caption-base")
    assert info.value.requeue
    assert set(backend.stored) == {"job-0"}  # the others were answered before the reject


def test_a_refused_chunk_answers_each_job_with_invalid_job(parts: Any) -> None:
    runner, engine, backend, _sent = parts
    jobs = [{"job_id": f"j{i}", "job": {}} for i in range(MAX_JOBS_PER_MESSAGE + 1)]
    jobs.append({"no": "id"})
    runner.run("chunk-7", jobs, None, "blipq.caption-base")
    assert len(backend.stored) == MAX_JOBS_PER_MESSAGE + 1
    assert {m["result"]["error"]["code"] for m in backend.stored.values()} == {"invalid_job"}
    assert engine.handled == []
    [(chunk_id, payload, reason)] = engine.deliveries.dead
    assert chunk_id == "chunk-7" and "no job id" in reason and payload
