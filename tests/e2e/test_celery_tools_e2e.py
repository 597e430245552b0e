"""What Celery's own tools see of blipq jobs, against a real worker: a job whose result is an
error is a failed task (``task-failed`` on the event stream Flower reads, FAILURE to
``AsyncResult``), and producers still read its JobResult from the stored record."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from producer import CaptionJob, Client
from producer.cli.embedded import WorkerProcess
from producer.protocol.celeryconf import make_app
from producer.protocol.errors import JobFailed
from tests.fixtures.images import sample_jpegs

BUCKET = "celery-tools"


def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_an_error_result_is_a_failed_task_on_the_event_stream(
    caption_worker: WorkerProcess,
    client: Client,
    s3,  # type: ignore[no-untyped-def]
) -> None:
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key="ok.jpg", Body=sample_jpegs(1, seed=3)[0])
    app = make_app(client.settings, name="events-test")
    # What Flower does when it starts: turn task events on in every worker.
    replies = app.control.enable_events(reply=True, timeout=5)
    assert replies, "no worker answered enable_events"
    events: list[dict[str, Any]] = []
    with app.connection() as connection:
        receiver = app.events.Receiver(connection, handlers={"*": events.append})
        thread = threading.Thread(
            target=receiver.capture,
            kwargs={"limit": None, "timeout": None, "wakeup": False},
            daemon=True,
        )
        thread.start()
        try:
            # The receiver's queue is bound once it hears the worker's first heartbeat.
            _until(lambda: any(e["type"] == "worker-heartbeat" for e in events), 15, "a heartbeat")
            ok_id = client.submit(CaptionJob(image=f"s3://{BUCKET}/ok.jpg", model="tiny-caption"))
            bad_id = client.submit(
                CaptionJob(image=f"s3://{BUCKET}/missing.jpg", model="tiny-caption")
            )
            results = {r.job_id: r for r in client.results([ok_id, bad_id], timeout=60)}

            def final(job_id: str) -> dict[str, Any] | None:
                done = ("task-succeeded", "task-failed")
                return next(
                    (e for e in events if e.get("uuid") == job_id and e["type"] in done), None
                )

            _until(lambda: final(ok_id) is not None and final(bad_id) is not None, 30, "events")
        finally:
            receiver.should_stop = True
            thread.join(10)
            app.control.disable_events(reply=True, timeout=5)

    # Producers read the JobResult as before, ok or error.
    assert results[ok_id].ok, results[ok_id].error
    bad = results[bad_id]
    assert not bad.ok and bad.error is not None and bad.error.code == "not_found"

    # Flower's view: Succeeded and Failed, the failure naming the error code and message.
    ok_event, bad_event = final(ok_id), final(bad_id)
    assert ok_event is not None and ok_event["type"] == "task-succeeded"
    assert bad_event is not None and bad_event["type"] == "task-failed"
    assert bad_event["exception"].startswith("JobFailed('not_found:")
    # Results name their worker as Celery does, so a result can be found in Flower.
    assert results[ok_id].worker == results[bad_id].worker == ok_event["hostname"]
    assert ok_event["hostname"] == caption_worker.name.replace("%h", socket.gethostname())
    print("task-failed event:", {k: bad_event[k] for k in ("uuid", "hostname", "exception")})

    # Celery's result API: FAILURE, its exception carrying the JobResult; SUCCESS for the other.
    failed = app.AsyncResult(bad_id)
    assert failed.state == "FAILURE"
    assert isinstance(failed.result, JobFailed)
    assert failed.result.result["error"]["code"] == "not_found"
    assert app.AsyncResult(ok_id).state == "SUCCESS"
    app.close()
