"""Flower against a real worker: a real ``celery flower`` process (the producer-side app, no
torch) lists an ok job as SUCCESS and a job whose result is an error as FAILURE in its HTTP API,
and the worker among its workers. Task events are turned on as Flower does it (``control
enable_events``), not by the worker's settings."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from producer import CaptionJob, Client
from producer.cli.embedded import EmbeddedRedis, WorkerProcess, free_port, stop_process
from producer.protocol.celeryconf import make_app
from tests.fixtures.images import sample_jpegs

REPO = Path(__file__).resolve().parents[2]
BUCKET = "flower"
AUTH = ("ops", "flower-test")


def _until(check: Callable[[], Any], timeout: float, what: str, log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = check()
        except httpx.HTTPError:
            found = None
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


@pytest.fixture
def flower(redis_server: EmbeddedRedis) -> Iterator[tuple[httpx.Client, Path]]:
    """A real Flower on a free port, with basic auth, configured by BLIPQ_REDIS_URL."""
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="blipq-flower-", suffix=".log")[1])
    args = [
        sys.executable, "-m", "celery", "-A", "producer.celery_app", "flower",
        f"--port={port}", "--address=127.0.0.1", f"--basic-auth={AUTH[0]}:{AUTH[1]}",
    ]  # fmt: skip
    env = {**os.environ, "BLIPQ_REDIS_URL": redis_server.url}
    with log.open("ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", auth=AUTH, timeout=10)
    try:
        _until(lambda: http.get("/healthcheck").status_code == 200, 60, "Flower to serve", log)
        yield http, log
    finally:
        http.close()
        assert stop_process(proc, 20) in (0, -15), log.read_text()[-3000:]
        # Flower turned task events on in the shared worker: turn them off again.
        with Client(redis_url=redis_server.url) as client:
            make_app(client.settings, name="flower-test").control.disable_events()


def test_flower_shows_an_error_result_as_failure_and_the_worker(
    caption_worker: WorkerProcess,
    client: Client,
    s3,  # type: ignore[no-untyped-def]
    flower: tuple[httpx.Client, Path],
) -> None:
    http, log = flower
    assert http.get("/api/tasks", auth=None).status_code == 401  # the API asks for credentials
    worker = caption_worker.name.replace("%h", socket.gethostname())
    # Online in Flower's event state: its receiver hears the worker, so no task event is missed.
    _until(
        lambda: http.get("/api/workers", params={"status": "true"}).json().get(worker),
        60,
        "the worker's heartbeat in Flower",
        log,
    )
    # Flower turns task events on when it starts and every 5 s after; whether the worker has
    # them on cannot be read from Flower, so ask once more (as Flower does) and await the reply.
    assert make_app(client.settings, name="flower-test").control.enable_events(
        reply=True, timeout=5
    )
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key="ok.jpg", Body=sample_jpegs(1, seed=5)[0])
    ok_id = client.submit(CaptionJob(image=f"s3://{BUCKET}/ok.jpg", model="tiny-caption"))
    bad_id = client.submit(CaptionJob(image=f"s3://{BUCKET}/missing.jpg", model="tiny-caption"))
    results = {r.job_id: r for r in client.results([ok_id, bad_id], timeout=60)}
    assert results[ok_id].ok, results[ok_id].error
    bad_result = results[bad_id]
    assert bad_result.error is not None and bad_result.error.code == "not_found"

    def final_states() -> dict[str, Any] | None:
        tasks = http.get("/api/tasks").json()
        done = {"SUCCESS", "FAILURE"}
        if tasks.get(ok_id, {}).get("state") in done and tasks.get(bad_id, {}).get("state") in done:
            return tasks
        return None

    tasks = _until(final_states, 30, "both jobs' final states in Flower", log)
    ok, bad = tasks[ok_id], tasks[bad_id]
    print("Flower /api/tasks, the failing job:", json.dumps(bad, indent=2, sort_keys=True))
    assert ok["state"] == "SUCCESS" and ok["name"] == "blipq.run_job"
    assert bad["state"] == "FAILURE" and bad["name"] == "blipq.run_job"
    assert bad["exception"].startswith("JobFailed('not_found:"), bad["exception"]
    assert bad["worker"] == worker and ok["worker"] == worker
    assert bad["kwargs"] == f"caption job on s3://{BUCKET}/missing.jpg"
    one = http.get(f"/api/task/info/{bad_id}").json()
    assert one["state"] == "FAILURE" and one["uuid"] == bad_id
    failed = http.get("/api/tasks", params={"state": "FAILURE"}).json()
    assert bad_id in failed and ok_id not in failed

    workers = http.get("/api/workers", params={"refresh": "true"}).json()
    assert worker in workers, sorted(workers)
    queues = {q["name"] for q in workers[worker]["active_queues"]}
    assert "blipq.tiny-caption" in queues, queues
