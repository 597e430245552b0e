"""A worker as a model process and intake processes (``BLIPQ_INTAKE_PROCESSES``): one command
starts it, the pixels cross through shared memory, and killing any one process loses nothing."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections import Counter
from pathlib import Path

import pytest
import redis

from producer import CaptionJob, Client
from producer.cli.embedded import EmbeddedRedis, EmbeddedS3, WorkerProcess
from producer.protocol.keys import RESULTS_STREAM
from tests.e2e.conftest import REPO, worker_env
from tests.fixtures.images import sample_jpegs

GRACE_S = 60
"""The termination grace period the drain must fit in (the test's own; the deployments give
180 s, docs/operations.md)."""


def _host() -> str:
    return socket.gethostname()


def _children(pid: int) -> dict[int, str]:
    """Child pid -> command line, of a launcher."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat[1]) == pid:
            found[int(entry.name)] = cmdline
    return found


def _model_pid(launcher: int) -> int:
    pids = [p for p, cmd in _children(launcher).items() if "worker.split.modelproc" in cmd]
    assert len(pids) == 1, _children(launcher)
    return pids[0]


def _intake_pids(launcher: int) -> list[int]:
    return [p for p, cmd in _children(launcher).items() if "celery" in cmd]


def _upload(s3_server: EmbeddedS3, bucket: str, count: int, seed: int) -> None:
    s3 = s3_server.client()
    s3.create_bucket(Bucket=bucket)
    for index, data in enumerate(sample_jpegs(count, seed=seed)):
        s3.put_object(Bucket=bucket, Key=f"{index}.jpg", Body=data)


def test_split_worker_captions_like_one_process(
    s3_server: EmbeddedS3, tiny_caption_dir: Path
) -> None:
    """Same jobs, same tiny BLIP: the split worker's captions are the one-process worker's."""
    _upload(s3_server, "split", 6, seed=161)
    server = EmbeddedRedis().start()
    client = Client(redis_url=server.url)
    jobs = [
        CaptionJob(image=f"s3://split/{i % 6}.jpg", model="tiny-caption", max_new_tokens=12)
        for i in range(24)
    ]
    captions: dict[str, list[str]] = {}
    try:
        for mode, processes in (("one", "0"), ("split", "2")):
            env = worker_env(
                server,
                s3_server,
                {"tiny-caption": str(tiny_caption_dir)},
                BLIPQ_INTAKE_PROCESSES=processes,
                BLIPQ_MAX_BATCH_SIZE="4",
                BLIPQ_MAX_WAIT_MS="30",
            )
            worker = WorkerProcess(env, cwd=REPO).start()
            try:
                assert worker.proc is not None
                if processes != "0":
                    assert len(_intake_pids(worker.proc.pid)) == 2
                    _model_pid(worker.proc.pid)
                ids = client.submit_many(jobs)
                results = {r.job_id: r for r in client.results(ids, timeout=180)}
            finally:
                assert worker.stop() == 0, worker.log()[-4000:]
            assert all(r.ok for r in results.values()), [r.error for r in results.values()]
            captions[mode] = [results[i].output.caption for i in ids]  # type: ignore[union-attr]
            if processes != "0":
                assert max(r.batch_size or 1 for r in results.values()) > 1
                assert "bytes per item in shared memory" in worker.log()
    finally:
        client.close()
        server.close()
    assert captions["split"] == captions["one"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("victim", ["model", "intake"])
def test_sigkill_of_one_process_loses_nothing(s3_server: EmbeddedS3, victim: str) -> None:
    _upload(s3_server, f"kill-{victim}", 8, seed=171)
    server = EmbeddedRedis().start()
    env = worker_env(
        server,
        s3_server,
        # 40 ms per batch of 4: a run of 300 jobs lasts a few seconds.
        {"sim": {"source": "sim:40", "family": "sim"}},  # type: ignore[dict-item]
        BLIPQ_INTAKE_PROCESSES="2",
        BLIPQ_MAX_BATCH_SIZE="4",
        BLIPQ_VISIBILITY_TIMEOUT_S="5",
        BLIPQ_REAP_AFTER_S="20",
        BLIPQ_REAP_INTERVAL_S="2",
    )
    worker = WorkerProcess(env, cwd=REPO).start()
    client = Client(redis_url=server.url)
    try:
        assert worker.proc is not None
        launcher = worker.proc.pid
        jobs = [
            CaptionJob(image=f"s3://kill-{victim}/{i % 8}.jpg", model="sim") for i in range(300)
        ]
        ids = client.submit_many(jobs)
        done = {}
        for result in client.results(ids, timeout=60):
            done[result.job_id] = result
            if len(done) >= 40:
                break
        killed = _model_pid(launcher) if victim == "model" else _intake_pids(launcher)[0]
        os.kill(killed, signal.SIGKILL)
        for result in client.results([i for i in ids if i not in done], timeout=300):
            done[result.job_id] = result
        assert set(done) == set(ids)
        assert all(r.ok for r in done.values()), {r.error for r in done.values() if not r.ok}
        # The launcher started the killed process again.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            again = _model_pid(launcher) if victim == "model" else None
            if (again or 0) != killed and len(_intake_pids(launcher)) == 2:
                break
            time.sleep(0.2)
        assert killed not in _children(launcher)
        assert len(_intake_pids(launcher)) == 2
        if victim == "model":
            assert "starting it again" in worker.log()
            assert "lost the model process" in worker.log()
    finally:
        client.close()
        code = worker.stop()
        server.close()
    assert code == 0, worker.log()[-4000:]


def _queued_ids(store: redis.Redis, queue: str) -> list[str]:
    """The job ids of the messages waiting in a queue (kombu envelopes, JSON)."""
    return [json.loads(raw)["headers"]["id"] for raw in store.lrange(queue, 0, -1)]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.timeout(600)
def test_sigterm_drains_a_split_worker(s3_server: EmbeddedS3) -> None:
    """SIGTERM to the launcher mid-run: every job an intake process took is answered, the rest
    stay queued for the next worker, every process exits within the grace period, exit 0."""
    _upload(s3_server, "split-drain", 8, seed=181)
    server = EmbeddedRedis().start()
    env = worker_env(
        server,
        s3_server,
        # 150 ms per batch of up to 4: at the signal, batches are running and waiting.
        {"sim": {"source": "sim:150", "family": "sim"}},  # type: ignore[dict-item]
        BLIPQ_INTAKE_PROCESSES="2",
        BLIPQ_MAX_BATCH_SIZE="4",
        BLIPQ_CONCURRENCY="6",
    )
    first = WorkerProcess(env, cwd=REPO, name="drain-a@%h").start()
    client = Client(redis_url=server.url)
    store = redis.Redis.from_url(server.url)
    try:
        assert first.proc is not None
        launcher = first.proc.pid
        processes = [launcher, *_children(launcher)]
        assert len(processes) == 4  # the launcher, the model process, 2 intake processes
        jobs = [CaptionJob(image=f"s3://split-drain/{i % 8}.jpg", model="sim") for i in range(200)]
        ids = client.submit_many(jobs)
        for answered, _ in enumerate(client.results(ids, timeout=120), 1):
            if answered >= 20:
                break
        os.kill(launcher, signal.SIGTERM)
        signalled = time.monotonic()
        code = first.proc.wait(GRACE_S)
        drained_in = time.monotonic() - signalled
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in processes) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in processes if _alive(pid)]
        assert code == 0, first.log()[-4000:]
        # A dozen held jobs of 150 ms batches: seconds, not a timeout waited out.
        assert drained_in < 20, first.log()[-4000:]

        # What the first worker answered, and what it left: nothing held, nothing lost.
        raws = store.mget([client.sender.result_key(i) for i in ids])
        found = {i: client.sender.to_result(i, raw) for i, raw in zip(ids, raws, strict=True)}
        stored = {i: r for i, r in found.items() if r is not None}
        queued = _queued_ids(store, "blipq.sim")
        assert not store.hlen("unacked"), "a message is still held by the stopped worker"
        assert len(queued) == len(set(queued))
        assert set(stored).isdisjoint(queued)
        assert set(stored) | set(queued) == set(ids)
        assert all(r.ok for r in stored.values()), {r.error for r in stored.values() if not r.ok}
        assert {r.worker for r in stored.values()} <= {f"drain-a-{i}@{_host()}" for i in (0, 1)}
        assert 20 <= len(stored) < len(ids), "the signal came mid-run"

        second = WorkerProcess(env, cwd=REPO, name="drain-b@%h").start()
        try:
            results = {r.job_id: r for r in client.results(ids, timeout=180)}
        finally:
            assert second.stop() == 0, second.log()[-4000:]
        assert set(results) == set(ids)
        assert all(r.ok for r in results.values())
        assert {i: results[i].worker for i in stored} == {i: r.worker for i, r in stored.items()}
        events = Counter(f[b"job_id"].decode() for _, f in store.xrange(RESULTS_STREAM))
        assert set(events) == set(ids) and max(events.values()) == 1
    finally:
        client.close()
        store.close()
        first.stop()
        server.close()
    print(f"split worker drained in {drained_in:.1f}s, {len(stored)} jobs answered by it")
