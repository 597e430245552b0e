"""The FastAPI example as a real server (uvicorn subprocess) over real HTTP (httpx), real worker."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx
import pytest

from producer.cli.embedded import EmbeddedRedis, WorkerProcess, free_port
from tests.fixtures.images import sample_jpegs

REPO = Path(__file__).resolve().parents[2]


@contextmanager
def web_server(redis_url: str, group: str, **extra: str) -> Iterator[str]:
    """``uvicorn examples.fastapi_app:app`` on a free loopback port; yields its base URL."""
    port = free_port()
    env = {
        **os.environ,
        "BLIPQ_REDIS_URL": redis_url,
        "BLIPQ_WEB_GROUP": group,
        "BLIPQ_WEB_KEEPALIVE_S": "1",
        **extra,
    }
    args = [
        sys.executable, "-m", "uvicorn", "examples.fastapi_app:app",
        "--host", "127.0.0.1", "--port", str(port), "--timeout-graceful-shutdown", "5",
    ]  # fmt: skip
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, _read(log)
                try:
                    if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the web server did not start:\n" + _read(log)
                time.sleep(0.2)
            yield base
        finally:
            proc.terminate()
            try:
                code = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
            # uvicorn re-raises the SIGTERM it caught once it has shut down cleanly.
            assert code in (0, -signal.SIGTERM), _read(log)
            assert "Application shutdown complete." in _read(log)


def _read(log: IO[bytes]) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def server(caption_worker: WorkerProcess, redis_server: EmbeddedRedis) -> Iterator[str]:
    with web_server(redis_server.url, group=f"web-test-{free_port()}") as base:
        yield base


@pytest.fixture(scope="module")
def images(s3) -> list[str]:  # type: ignore[no-untyped-def]
    s3.create_bucket(Bucket="web")
    uris = []
    for index, data in enumerate(sample_jpegs(3, seed=17)):
        s3.put_object(Bucket="web", Key=f"{index}.jpg", Body=data)
        uris.append(f"s3://web/{index}.jpg")
    return uris


def test_post_then_get_result(server: str, images: list[str]) -> None:
    with httpx.Client(base_url=server, timeout=60) as http:
        health = http.get("/health").json()
        assert health["redis"] is True and "blipq.tiny-caption" in health["queues"]

        job = {"kind": "caption", "image": images[0], "model": "tiny-caption", "max_new_tokens": 8}
        posted = http.post("/jobs", json=job)
        assert posted.status_code == 202
        job_id = posted.json()["job_id"]
        got = http.get(f"/jobs/{job_id}", params={"wait": 30})
        assert got.status_code == 200, got.text
        body = got.json()
        assert (body["job_id"], body["status"], body["kind"]) == (job_id, "ok", "caption")
        assert body["output"]["caption"]
        assert http.get(f"/jobs/{job_id}").json() == body  # stored: no wait needed

        match = {"kind": "match", "image": images[1], "model": "tiny-match", "texts": ["a", "b"]}
        match_id = http.post("/jobs", json=match).json()["job_id"]
        scores = http.get(f"/jobs/{match_id}", params={"wait": 30}).json()["output"]["scores"]
        assert [s["text"] for s in scores] == ["a", "b"]

        missing = {"kind": "caption", "image": "s3://web/nope.jpg", "model": "tiny-caption"}
        failed = http.get(
            f"/jobs/{http.post('/jobs', json=missing).json()['job_id']}", params={"wait": 30}
        ).json()
        assert (failed["status"], failed["error"]["code"]) == ("error", "not_found")

        assert http.get("/jobs/not-a-job").status_code == 404
        invalid = http.post("/jobs", json={"kind": "caption", "image": "http://x/y.jpg"})
        assert invalid.status_code == 422 and "image" in invalid.text
        assert http.post("/jobs", json={"kind": "vqa", "image": images[0]}).status_code == 422


def test_server_sent_events_push_results(server: str, images: list[str]) -> None:
    jobs = [
        {"kind": "caption", "image": uri, "model": "tiny-caption", "max_new_tokens": 8}
        for uri in images
    ] + [{"kind": "vqa", "image": images[0], "model": "tiny-vqa", "question": "what color?"}]
    timeout = httpx.Timeout(60, read=60)
    with (
        httpx.Client(base_url=server, timeout=timeout) as http,
        http.stream("GET", "/events") as response,
        http.stream("GET", "/events", params={"job_id": ["other-1", "other-2"]}) as filtered,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        others = filtered.iter_lines()
        # Subscribed (the first frame is a comment): events from now on reach us.
        assert next(lines) == next(others) == ": connected"
        ids = {http.post("/jobs", json=job).json()["job_id"] for job in jobs}
        events = read_events(lines, until=ids)
        # The filtered stream let none of them through: its next frame is a keepalive.
        assert next(others) == ""  # (the blank line ending the first comment frame)
        assert next(others) == ": keepalive"
    assert set(events) == ids
    for job_id, (event_id, event_type, data) in events.items():
        assert event_type == "result" and "-" in event_id  # a stream entry id: <ms>-<seq>
        assert data["job_id"] == job_id and data["status"] == "ok"
    assert {data["kind"] for _, _, data in events.values()} == {"caption", "vqa"}


def read_events(
    lines: Iterator[str], until: set[str]
) -> dict[str, tuple[str, str, dict[str, object]]]:
    """Parse SSE frames until an event has arrived for every job in ``until``."""
    found: dict[str, tuple[str, str, dict[str, object]]] = {}
    frame: dict[str, str] = {}
    for line in lines:
        if line.startswith(":"):
            continue  # a comment (keepalive)
        if line:
            name, _, value = line.partition(": ")
            frame[name] = value
            continue
        if "data" in frame:
            data = json.loads(frame["data"])
            if data["job_id"] in until:
                found[data["job_id"]] = (frame.get("id", ""), frame.get("event", ""), data)
        frame = {}
        if set(found) == until:
            break
    return found


def test_pending_job_is_202_until_a_worker_runs_it() -> None:
    own = EmbeddedRedis().start()  # no worker consumes here: the job stays queued
    try:
        with web_server(own.url, group="web-pending") as base, httpx.Client(base_url=base) as http:
            job = {"kind": "caption", "image": "s3://web/0.jpg", "model": "tiny-caption"}
            job_id = http.post("/jobs", json=job).json()["job_id"]
            started = time.monotonic()
            pending = http.get(f"/jobs/{job_id}", params={"wait": 0.5})
            assert pending.status_code == 202
            assert pending.json() == {"job_id": job_id, "status": "pending"}
            assert time.monotonic() - started >= 0.5  # it long-polled first
            assert http.get("/health").json()["queues"]["blipq.tiny-caption"] == 1
    finally:
        own.close()


def test_a_reconnecting_client_gets_what_it_missed_after_last_event_id(
    server: str, images: list[str]
) -> None:
    job = {"kind": "caption", "image": images[0], "model": "tiny-caption", "max_new_tokens": 8}
    timeout = httpx.Timeout(60, read=60)
    with httpx.Client(base_url=server, timeout=timeout) as http:
        with http.stream("GET", "/events") as response:
            lines = response.iter_lines()
            assert next(lines) == ": connected"
            first = http.post("/jobs", json=job).json()["job_id"]
            seen = read_events(lines, until={first})
        last_id = seen[first][0]
        # Disconnected: two jobs finish meanwhile.
        missed = {http.post("/jobs", json=job).json()["job_id"] for _ in range(2)}
        for job_id in missed:
            assert http.get(f"/jobs/{job_id}", params={"wait": 30}).status_code == 200
        headers = {"Last-Event-ID": last_id}
        with http.stream("GET", "/events", headers=headers) as response:
            lines = response.iter_lines()
            assert next(lines) == ": connected"
            replayed = read_events(lines, until=missed)
    assert set(replayed) == missed

    def order(entry_id: str) -> tuple[int, ...]:
        return tuple(int(part) for part in entry_id.split("-"))

    assert all(order(event_id) > order(last_id) for event_id, _, _ in replayed.values())
    assert first not in replayed


def test_sigterm_with_a_client_connected_exits_promptly_and_cors_is_configurable(
    redis_server: EmbeddedRedis,
) -> None:
    origin = "https://app.example"
    with contextlib.ExitStack() as stack, httpx.Client(timeout=httpx.Timeout(30)) as http:
        base = stack.enter_context(
            web_server(
                redis_server.url,
                group=f"web-term-{free_port()}",
                BLIPQ_WEB_CORS_ORIGINS=json.dumps([origin]),
                BLIPQ_WEB_KEEPALIVE_S="30",
            )
        )
        preflight = http.options(
            f"{base}/jobs",
            headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
        )
        assert preflight.headers.get("access-control-allow-origin") == origin
        other = http.options(
            f"{base}/jobs",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in other.headers
        with http.stream("GET", f"{base}/events") as response:
            lines = response.iter_lines()
            assert next(lines) == ": connected"
            started = time.monotonic()
            stack.close()  # SIGTERM, then wait for the exit (asserted clean in web_server)
            took = time.monotonic() - started
    # uvicorn's graceful timeout here is 5 s: an open stream must not hold the exit that long.
    assert took < 4.0, took
