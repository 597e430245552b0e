"""`blipq bulk cancel`: a stopped run's queued jobs come off the broker and the ledger; the next
start sends them again and every item is done once.

The run starts with no worker serving its model, so its jobs stay queued; a worker is started
only for the resume. Deliveries are counted by the worker's ``Task ... received`` lines.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import redis

from producer import CaptionJob, Client
from producer.bulk import job_id_for
from producer.cli.embedded import EmbeddedRedis, EmbeddedS3, WorkerProcess, free_port
from producer.protocol.chunks import message_job_ids
from producer.protocol.keys import (
    BULK_JOBS_KEY,
    LEDGER,
    LEDGER_PAYLOADS,
    QUEUE_PREFIX,
    TASK_RUN_CHUNK,
)
from tests.e2e.conftest import worker_env
from tests.e2e.test_bulk_e2e import BLIPQ, REPO, blipq, cli_env, deliveries, jsonl, upload


def queued(r: redis.Redis) -> dict[str, list[str]]:
    """Per task name, the job ids of every message waiting in a blipq queue (sub-queues too)."""
    found: dict[str, list[str]] = {}
    for key in r.scan_iter(match=f"{QUEUE_PREFIX}*"):
        for raw in r.lrange(key, 0, -1):
            headers = json.loads(raw)["headers"]
            found.setdefault(headers["task"], []).extend(message_job_ids(headers))
    return found


def wait_submitted(r: redis.Redis, run_id: str, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while r.hlen(BULK_JOBS_KEY.format(run_id=run_id)) < count:
        assert time.monotonic() < deadline, f"run {run_id}: fewer than {count} jobs submitted"
        time.sleep(0.05)


def test_cancel_stopped_run_then_resume_does_every_item_once(
    private_redis: EmbeddedRedis,
    s3_server: EmbeddedS3,
    s3,  # type: ignore[no-untyped-def]
    tiny_caption_dir: Path,
    tmp_path: Path,
) -> None:
    uris = upload(s3, "bulk-cancel", "c/", 30)
    env = cli_env(private_redis, s3_server)
    r = redis.Redis.from_url(private_redis.url)
    out = tmp_path / "captions.jsonl"
    run_id = "cancel-1"
    command = [
        "bulk", "caption", "s3://bulk-cancel/c/", "--out", str(out), "--run-id", run_id,
        "--model", "tiny-caption", "--max-new-tokens", "8", "--max-pending", "12",
        "--chunk", "4", "--quiet",
    ]  # fmt: skip
    ids = {job_id_for(run_id, uri) for uri in uris}
    with Client(redis_url=private_redis.url) as client:
        # Another producer's job in the same queue: cancel leaves it alone.
        other = client.submit(CaptionJob(image=uris[0], model="tiny-caption", max_new_tokens=8))
        # Chunk messages (3 jobs) and single ones (the 4th of each round trip) both get cancelled.
        first = subprocess.Popen([*BLIPQ, *command, "--per-message", "3"], env=env, cwd=REPO)
        try:
            wait_submitted(r, run_id, 12)
            busy = blipq("bulk", "cancel", run_id, env=env)
            assert busy.returncode == 2 and "--force" in busy.stderr, busy.stderr
            first.terminate()  # as Ctrl-C: a graceful stop, its jobs stay queued
            assert first.wait(timeout=60) == 4
        finally:
            if first.poll() is None:
                first.kill()
        before = queued(r)
        sent = {j for jobs in before.values() for j in jobs if j in ids}
        assert len(sent) == 12 and before[TASK_RUN_CHUNK], before
        assert all(r.zscore(LEDGER, j) is not None for j in sent)

        cancel = blipq("bulk", "cancel", run_id, env=env)
        assert cancel.returncode == 0, cancel.stderr
        assert f"run {run_id}: cancelled 12 queued jobs" in cancel.stdout, cancel.stdout
        after = queued(r)
        assert after == {"blipq.run_job": [other]}, after  # the run's messages are gone
        assert not any(r.zscore(LEDGER, j) is not None for j in ids)
        assert not any(r.hexists(LEDGER_PAYLOADS, j) for j in ids)
        assert r.zscore(LEDGER, other) is not None

        status = blipq("status", run_id, env=env).stdout
        assert re.search(r"state\s+cancelled", status), status
        assert re.search(r"cancelled\s+12 queued jobs removed", status), status
        assert "0/30 done" in status and "0 submitted" in status, status
        shown = json.loads(blipq("status", run_id, "--json", env=env).stdout)
        assert shown["state"] == "cancelled" and shown["progress"]["cancelled"] == 12
        again = blipq("bulk", "cancel", run_id, env=env)
        assert again.returncode == 0 and "cancelled 0 queued jobs" in again.stdout

        # A worker now serves the model; the same command resumes (one job per message).
        worker_vars = worker_env(
            private_redis,
            s3_server,
            {"tiny-caption": str(tiny_caption_dir)},
            BLIPQ_MAX_BATCH_SIZE="8",
            BLIPQ_MAX_WAIT_MS="50",
            BLIPQ_METRICS_PORT=str(free_port()),
            BLIPQ_METRICS_ADDR="127.0.0.1",
        )
        worker = WorkerProcess(worker_vars, cwd=REPO).start()
        try:
            resumed = blipq(*command, env=env)
            assert resumed.returncode == 0, resumed.stderr
            assert "complete: 30 ok, 0 failed" in resumed.stderr
            assert client.result(other, timeout=60).ok
        finally:
            assert worker.stop() == 0, worker.log()[-5000:]
    rows = jsonl(out)
    assert sorted(str(row["item"]) for row in rows) == sorted(uris)  # each item once
    counts = deliveries(worker, ids)
    assert set(counts) == ids and max(counts.values()) == 1, counts.most_common(3)
    status = blipq("status", run_id, env=env).stdout
    assert re.search(r"state\s+complete", status) and "cancelled" not in status.split("state")[1]
    assert r.zcard(LEDGER) == 0
    r.close()
