"""A real poison job: one that kills its worker process every time it runs.

The worker serves a drill model (the null family with ``crash_on``: fault injection that
SIGKILLs the worker when a batch holds a job whose image URI contains the marker). A supervisor
thread restarts the worker whenever it dies, as Kubernetes or systemd would. Only deaths of the
job running alone count against it: its first start (in a batch, beside other jobs) makes it a
suspect, then it must be started alone exactly ``BLIPQ_MAX_DELIVERIES`` times (each start kills
a worker, its message comes back after the visibility timeout), then get a ``poison`` error
result and land in the dead-letter list, while every other job submitted around it completes.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from producer import CaptionJob, Client, ErrorCode, JobResult, ResultTimeout
from producer.cli.embedded import EmbeddedRedis, EmbeddedS3, WorkerProcess
from producer.protocol.keys import DEAD_LETTER, DELIVERIES_KEY, LEDGER, RESULTS_STREAM
from tests.e2e.conftest import REPO, worker_env
from tests.fixtures.images import sample_jpegs

MAX_DELIVERIES = 3
POISON = "s3://drill/poison-pill.jpg"


class Supervisor:
    """Keeps one worker running: restarts it each time it dies, and counts the deaths."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.worker = WorkerProcess(env, cwd=REPO, name="drill@%h").start()
        self.deaths: list[int] = []  # exit codes of the workers that died
        self.logs: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            proc = self.worker.proc
            if proc is None or proc.poll() is None:
                continue
            self.deaths.append(proc.returncode)
            self.logs.append(self.worker.log())
            self.worker = WorkerProcess(self.env, cwd=REPO, name="drill@%h").start()

    def stop(self) -> int | None:
        self._stop.set()
        self._thread.join()
        code = self.worker.stop()
        self.logs.append(self.worker.log())
        return code


@pytest.fixture
def private_redis() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis().start()
    yield server
    server.close()


def _upload(s3_server: EmbeddedS3, bucket: str = "drill") -> None:
    s3 = s3_server.client()
    s3.create_bucket(Bucket=bucket)
    images = sample_jpegs(5, seed=66)
    for index, data in enumerate(images[:4]):
        s3.put_object(Bucket=bucket, Key=f"{index}.jpg", Body=data)
    s3.put_object(Bucket=bucket, Key=POISON.removeprefix("s3://drill/"), Body=images[4])


def drill_env(redis_server: EmbeddedRedis, s3_server: EmbeddedS3) -> dict[str, str]:
    """A worker serving ``drill``: the null model, which kills its worker on a ``poison-pill``."""
    return worker_env(
        redis_server,
        s3_server,
        {"drill": {"source": "null", "family": "null", "crash_on": "poison-pill"}},  # type: ignore[dict-item]
        BLIPQ_MAX_DELIVERIES=str(MAX_DELIVERIES),
        # A killed worker's messages come back this long after they were taken.
        BLIPQ_VISIBILITY_TIMEOUT_S="5",
        BLIPQ_MAX_WAIT_MS="20",
        BLIPQ_WARMUP="false",
        # A worker killed between taking a message and recording it loses the message
        # (kombu's Redis transport); the reaper sends such jobs again after this long.
        BLIPQ_REAP_AFTER_S="20",
        BLIPQ_REAP_INTERVAL_S="2",
    )


def _jobs(count: int, bucket: str = "drill") -> list[CaptionJob]:
    return [CaptionJob(image=f"s3://{bucket}/{i % 4}.jpg", model="drill") for i in range(count)]


@pytest.mark.slow
@pytest.mark.timeout(240)
def _only_the_poison_job_lost(
    store: Any, answered: list[JobResult], poison_id: str, poison_image: str
) -> None:
    """The 50 other jobs completed, each once on the results stream; the dead-letter list holds
    the poison job's payload, once, and its start counter is gone."""
    others = {r.job_id: r for r in answered}
    assert len(others) == 50
    assert all(r.ok for r in others.values()), Counter(
        r.error.code for r in others.values() if r.error
    )
    events = Counter(f[b"job_id"].decode() for _, f in store.xrange(RESULTS_STREAM))
    assert set(events) == {*others, poison_id} and max(events.values()) == 1
    dead = [json.loads(raw) for raw in store.lrange(DEAD_LETTER, 0, -1)]
    assert [(d["job_id"], d["payload"]["image"]) for d in dead] == [(poison_id, poison_image)]
    assert not store.exists(DELIVERIES_KEY.format(job_id=poison_id))


def test_a_job_that_kills_its_worker_is_dead_lettered_and_the_queue_flows(
    private_redis: EmbeddedRedis, s3_server: EmbeddedS3
) -> None:
    _upload(s3_server)
    env = drill_env(private_redis, s3_server)
    supervisor = Supervisor(env)
    client = Client(redis_url=private_redis.url)
    store = redis.Redis.from_url(private_redis.url)
    started = time.monotonic()
    try:
        before = client.submit_many(_jobs(20))
        poison_id = client.submit(CaptionJob(image=POISON, model="drill"))
        after = client.submit_many(_jobs(20))
        results: dict[str, JobResult] = {}
        ids = [*before, poison_id, *after]
        try:
            for result in client.results(ids, timeout=150):
                assert result.job_id not in results
                results[result.job_id] = result
        except ResultTimeout:
            missing = [i for i in ids if i not in results]
            pytest.fail(f"no result for {_explain(store, missing, supervisor)}")
        deaths_at_poison = len(supervisor.deaths)
        # The queue flows on: jobs sent after the poison job was dead-lettered just run.
        later = client.submit_many(_jobs(10))
        later_results = list(client.results(later, timeout=60))
    finally:
        code = supervisor.stop()
        client.close()
    elapsed = time.monotonic() - started
    logs = "\n".join(supervisor.logs)

    poisoned = results.pop(poison_id)
    assert poisoned.error is not None and poisoned.error.code is ErrorCode.POISON, poisoned
    assert f"died {MAX_DELIVERIES} times running alone" in poisoned.error.message
    # Every start of the poison job killed a worker: the first, in a batch, then MAX_DELIVERIES
    # alone; and there were no more starts than that.
    starts = 1 + MAX_DELIVERIES
    assert supervisor.deaths[:deaths_at_poison] == [-9] * starts, (supervisor.deaths, logs)
    assert logs.count("fault injection") == starts
    _only_the_poison_job_lost(store, [*results.values(), *later_results], poison_id, POISON)
    assert len(supervisor.deaths) == deaths_at_poison  # no death after the dead-lettering
    assert code == 0
    store.close()
    print(f"poison drill: {len(supervisor.deaths)} worker deaths, {elapsed:.1f}s")


def _explain(store: redis.Redis, job_ids: list[str], supervisor: Supervisor) -> str:
    """Where each job without a result is: start counter, ledger, held, queued, worker logs."""
    held = " ".join(raw.decode(errors="replace") for raw in store.hvals("unacked"))
    queued = " ".join(raw.decode(errors="replace") for raw in store.lrange("blipq.drill", 0, -1))
    logs = "\n".join([*supervisor.logs, supervisor.worker.log()])
    lines = []
    for job_id in job_ids:
        mentions = [line for line in logs.splitlines() if job_id in line]
        lines.append(
            f"{job_id}: starts={store.get(DELIVERIES_KEY.format(job_id=job_id))!r} "
            f"ledger={store.zscore(LEDGER, job_id)} held={job_id in held} "
            f"queued={job_id in queued} deaths={supervisor.deaths} log={mentions}"
        )
    return "\n".join(lines)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_job_that_kills_the_model_process_of_a_split_worker_is_dead_lettered(
    private_redis: EmbeddedRedis, s3_server: EmbeddedS3
) -> None:
    """The same drill against ``blipq-worker`` with 2 intake processes: the poison job kills the
    model process (the launcher starts it again), never an intake process. Each death is seen
    by the intake process holding the job of the batch that was running; only deaths while it
    runs alone count, and the jobs that shared its first batch run once more, alone, and
    complete."""
    _upload(s3_server, bucket="split-drill")
    env = drill_env(private_redis, s3_server)
    # Jobs wait in the intake processes while the model process restarts: no redelivery of a
    # message still held.
    env.update(BLIPQ_INTAKE_PROCESSES="2", BLIPQ_VISIBILITY_TIMEOUT_S="600")
    env["BLIPQ_REAP_AFTER_S"] = "600"
    worker = WorkerProcess(env, cwd=REPO, name="split-drill@%h").start()
    client = Client(redis_url=private_redis.url)
    store = redis.Redis.from_url(private_redis.url)
    poison = POISON.replace("s3://drill/", "s3://split-drill/")
    started = time.monotonic()
    try:
        before = client.submit_many(_jobs(20, "split-drill"))
        poison_id = client.submit(CaptionJob(image=poison, model="drill"))
        after = client.submit_many(_jobs(20, "split-drill"))
        ids = [*before, poison_id, *after]
        results: dict[str, JobResult] = {}
        try:
            for result in client.results(ids, timeout=200):
                assert result.job_id not in results
                results[result.job_id] = result
        except ResultTimeout:
            missing = [i for i in ids if i not in results]
            pytest.fail(f"no result for {missing}:\n{worker.log()[-6000:]}")
        deaths_at_poison = worker.log().count("fault injection")
        later = client.submit_many(_jobs(10, "split-drill"))
        later_results = list(client.results(later, timeout=60))
        assert worker.proc is not None
        intakes_alive = worker.proc.poll() is None
    finally:
        code = worker.stop()
        client.close()
    elapsed = time.monotonic() - started
    log = worker.log()

    poisoned = results.pop(poison_id)
    assert poisoned.error is not None and poisoned.error.code is ErrorCode.POISON, poisoned
    assert f"died {MAX_DELIVERIES} times running alone" in poisoned.error.message
    # Its first start (in a batch) and MAX_DELIVERIES starts alone each killed the model
    # process, and nothing else did; no intake process died.
    starts = 1 + MAX_DELIVERIES
    assert deaths_at_poison == starts, log[-6000:]
    assert log.count("fault injection") == starts
    restarts = [line for line in log.splitlines() if "starting it again" in line]
    assert len(restarts) == starts, restarts
    # Each death was judged at once by the intake process that held the job, not sent back
    # through the queue as a Celery retry (which would spend one of its transient retries).
    mentions = [line for line in log.splitlines() if poison_id in line]
    assert sum("judged again here" in line for line in mentions) == starts, mentions
    assert not any(" retry: " in line for line in mentions), mentions
    assert all("model process exited -9" in line for line in restarts), restarts
    _only_the_poison_job_lost(store, [*results.values(), *later_results], poison_id, poison)
    assert intakes_alive and code == 0, log[-4000:]
    store.close()
    print(f"split poison drill: {starts} model process deaths, {elapsed:.1f}s")
