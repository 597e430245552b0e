"""Redis Sentinel failover under load: the primary SIGKILLed mid-run, a replica promoted.

A private primary, one replica and three Sentinels (``redis-server --sentinel``) on free
loopback ports; a worker serving the null model and a producer, both on a ``sentinel://`` URL
with ``BLIPQ_REDIS_MASTER_NAME`` (broker, result backend and blipq's own clients all through
Sentinel). Replication is asynchronous: what the old primary acknowledged and had not yet sent
to the replica is gone after the failover. The test counts the results the old primary had
stored that the promoted replica lacks, and the jobs the reaper sent again; every job must
still end with one result and one stream event.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from producer import AsyncClient, CaptionJob, Client, JobResult
from producer.cli.embedded import (
    EmbeddedRedis,
    EmbeddedS3,
    WorkerProcess,
    _redis_binary,
    free_port,
    stop_process,
)
from producer.protocol.keys import RESULTS_STREAM
from producer.protocol.settings import ClientSettings
from tests.e2e.conftest import REPO, worker_env
from tests.fixtures.images import sample_jpegs

MASTER = "blipq"
JOBS = 1200
KILL_AFTER = 300  # results stored before the primary is killed


class Sentinels:
    """Three Sentinels watching one primary (quorum 2, down after 1 s)."""

    def __init__(self, primary_port: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="blipq-sentinel-"))
        self.ports = [free_port() for _ in range(3)]
        self.procs: list[subprocess.Popen[bytes]] = []
        for port in self.ports:
            conf = self.dir / f"{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {primary_port} 2\n"
                f"sentinel down-after-milliseconds {MASTER} 1000\n"
                f"sentinel failover-timeout {MASTER} 10000\n"
                f"sentinel parallel-syncs {MASTER} 1\n"
            )
            log = (self.dir / f"{port}.log").open("ab")
            self.procs.append(
                subprocess.Popen(
                    [_redis_binary(), str(conf), "--sentinel"], stdout=log, stderr=subprocess.STDOUT
                )
            )

    @property
    def url(self) -> str:
        return ";".join(f"sentinel://127.0.0.1:{port}" for port in self.ports)

    def wait_ready(self, timeout: float = 30) -> None:
        """Until every Sentinel knows the replica and the other two Sentinels."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = []
            for port in self.ports:
                try:
                    info = redis.Redis(port=port, decode_responses=True).sentinel_master(MASTER)
                    states.append(
                        int(info["num-slaves"]) >= 1 and int(info["num-other-sentinels"]) >= 2
                    )
                except redis.RedisError:
                    states.append(False)
            if all(states):
                return
            time.sleep(0.2)
        raise RuntimeError(f"sentinels not ready: {self.logs()[-3000:]}")

    def master_port(self) -> int:
        _host, port = redis.Redis(port=self.ports[0]).sentinel_get_master_addr_by_name(MASTER)
        return int(port)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.dir.glob("*.log"))

    def close(self) -> None:
        for proc in self.procs:
            stop_process(proc, 5)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def replicated() -> Iterator[tuple[EmbeddedRedis, EmbeddedRedis, Sentinels]]:
    primary = EmbeddedRedis().start()
    replica = EmbeddedRedis(extra=("--replicaof", "127.0.0.1", str(primary.port))).start()
    deadline = time.monotonic() + 20
    while redis.Redis(port=replica.port).info("replication")["master_link_status"] != "up":
        assert time.monotonic() < deadline, "the replica did not sync"
        time.sleep(0.1)
    sentinels = Sentinels(primary.port)
    try:
        sentinels.wait_ready()
        yield primary, replica, sentinels
    finally:
        sentinels.close()
        replica.close()
        primary.close()


def _submit(client: Client, pending: list[tuple[CaptionJob, str]], done: threading.Event) -> None:
    """Send in rounds of 50, each round sent again until it goes through (same ids: harmless)."""
    for start in range(0, len(pending), 50):
        part = pending[start : start + 50]
        deadline = time.monotonic() + 60
        while True:
            try:
                client.sender.send(part)
                break
            except Exception:  # the old primary is gone and no new one is elected yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        time.sleep(0.1)
    done.set()


@pytest.mark.slow
@pytest.mark.timeout(300)
async def _peek(url: str, job_ids: list[str]) -> list[JobResult | None]:
    settings = ClientSettings(redis_url=url, redis_master_name=MASTER)
    async with AsyncClient(settings=settings) as client:
        return [await client.peek(job_id) for job_id in job_ids]


def test_primary_killed_mid_run_fails_over_and_loses_nothing(
    replicated: tuple[EmbeddedRedis, EmbeddedRedis, Sentinels], s3_server: EmbeddedS3
) -> None:
    primary, replica, sentinels = replicated
    s3 = s3_server.client()
    bucket = f"sentinel-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    for index, data in enumerate(sample_jpegs(4, seed=18)):
        s3.put_object(Bucket=bucket, Key=f"{index}.jpg", Body=data)
    env = worker_env(
        primary,
        s3_server,
        {"null": {"source": "null", "family": "null"}},  # type: ignore[dict-item]
        BLIPQ_REDIS_URL=sentinels.url,
        BLIPQ_REDIS_MASTER_NAME=MASTER,
        BLIPQ_LOG_EVERY_TASK="false",
        BLIPQ_WARMUP="false",
        BLIPQ_MAX_WAIT_MS="20",
        # Messages held by the worker when the primary died come back this soon; jobs whose
        # messages the failover lost are sent again by the reaper.
        BLIPQ_VISIBILITY_TIMEOUT_S="10",
        BLIPQ_REAP_AFTER_S="15",
        BLIPQ_REAP_INTERVAL_S="2",
    )
    worker = WorkerProcess(env, cwd=REPO).start()
    client = Client(settings=ClientSettings(redis_url=sentinels.url, redis_master_name=MASTER))
    pending = [
        (CaptionJob(image=f"s3://{bucket}/{i % 4}.jpg", model="null"), str(uuid.uuid4()))
        for i in range(JOBS)
    ]
    ids = [job_id for _, job_id in pending]
    keys = [client.sender.result_key(job_id) for job_id in ids]
    sent = threading.Event()
    submitter = threading.Thread(target=_submit, args=(client, pending, sent), daemon=True)
    lost = None
    try:
        submitter.start()
        admin = redis.Redis(port=primary.port)
        while sum(v is not None for v in admin.mget(keys)) < KILL_AFTER:
            time.sleep(0.05)
        # What failover can lose: results the old primary had stored (read just before the
        # kill) that are not on the promoted replica. Nothing can answer a job again that soon
        # (the visibility timeout and the reaper take 10 s or more), so a missing one was lost.
        before = {i for i, v in zip(ids, admin.mget(keys), strict=True) if v is not None}
        assert primary.proc is not None
        primary.proc.kill()
        primary.proc.wait()
        deadline = time.monotonic() + 30
        while sentinels.master_port() != replica.port:
            assert time.monotonic() < deadline, sentinels.logs()[-3000:]
            time.sleep(0.1)
        promoted = redis.Redis(port=replica.port).mget(keys)
        lost = len(before - {i for i, v in zip(ids, promoted, strict=True) if v is not None})
        store = client.sender.redis
        deadline = time.monotonic() + 200
        stored = 0
        while time.monotonic() < deadline:
            try:
                stored = sum(v is not None for v in store.mget(keys))
            except redis.RedisError:
                stored = 0
            if stored == JOBS and sent.is_set():
                break
            time.sleep(0.5)
        assert stored == JOBS, f"{stored} of {JOBS} results after the failover"
        assert sentinels.master_port() == replica.port
        results = [r for r in client.results(ids, timeout=30)]
        events = store.xrange(RESULTS_STREAM)
        # AsyncClient reaches the promoted primary through the Sentinels too.
        peeked = asyncio.run(_peek(sentinels.url, ids[:5]))
        assert [r.job_id for r in peeked if r is not None and r.ok] == ids[:5]
    finally:
        client.close()
        code = worker.stop()
    log = worker.log()
    assert code == 0, log[-3000:]
    assert len(results) == JOBS and all(r.ok for r in results)
    announced = Counter(fields[b"job_id"].decode() for _, fields in events)
    assert set(announced) == set(ids)
    assert max(announced.values()) == 1, announced.most_common(3)
    resent = log.count("was lost by a consumer; sending it again")
    print(
        f"results lost in the failover: {lost} of {len(before)}; sent again by the reaper: {resent}"
    )
    assert lost is not None
