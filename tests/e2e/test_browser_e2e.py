"""A real browser against the FastAPI example: headless Chromium on another origin opens an
``EventSource`` on ``/events``, submits a job with ``fetch`` (CORS, preflighted), and receives the
job's result as an SSE event. Runs where Debian's ``chromium`` is installed (``.ci/run`` installs
it when it can)."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from producer.cli.embedded import EmbeddedRedis, WorkerProcess, free_port
from tests.e2e.test_fastapi_example_e2e import web_server
from tests.fixtures.images import sample_jpegs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

PAGE = """<!doctype html><meta charset="utf-8"><title>blipq events</title>
<script>
const api = "%(api)s";
const report = (what, body) => fetch("/report/" + what,
  {method: "POST", body: typeof body === "string" ? body : JSON.stringify(body)});
const events = new EventSource(api + "/events");
events.onerror = () => report("error", {readyState: events.readyState});
events.onopen = async () => {
  const posted = await fetch(api + "/jobs", {method: "POST",
    headers: {"Content-Type": "application/json"}, body: JSON.stringify(%(job)s)});
  report("posted", await posted.text());
};
events.addEventListener("result", (event) => report("result", event.data));
</script>"""


class _Collector(ThreadingHTTPServer):
    """Serves the page (the browser's origin) and collects what the page reports."""

    page = ""
    reports: list[tuple[str, str]]
    got: threading.Event


class _Handler(BaseHTTPRequestHandler):
    server: _Collector

    def do_GET(self) -> None:
        body = self.server.page.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        size = int(self.headers.get("Content-Length") or 0)
        self.server.reports.append(
            (self.path.removeprefix("/report/"), self.rfile.read(size).decode())
        )
        self.server.got.set()
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def collector() -> Iterator[_Collector]:
    server = _Collector(("127.0.0.1", free_port()), _Handler)
    server.reports, server.got = [], threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_a_browser_eventsource_on_another_origin_receives_the_result(
    caption_worker: WorkerProcess,
    redis_server: EmbeddedRedis,
    s3,  # type: ignore[no-untyped-def]
    collector: _Collector,
) -> None:
    s3.create_bucket(Bucket="browser")
    s3.put_object(Bucket="browser", Key="0.jpg", Body=sample_jpegs(1, seed=29)[0])
    origin = f"http://127.0.0.1:{collector.server_address[1]}"
    job = {"kind": "caption", "image": "s3://browser/0.jpg", "model": "tiny-caption",
           "max_new_tokens": 8}  # fmt: skip
    cors = {"BLIPQ_WEB_CORS_ORIGINS": json.dumps([origin])}
    with (
        web_server(redis_server.url, group=f"browser-{free_port()}", **cors) as api,
        tempfile.TemporaryDirectory() as profile,
    ):
        collector.page = PAGE % {"api": api, "job": json.dumps(job)}
        assert CHROMIUM is not None
        browser = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--user-data-dir={profile}", f"{origin}/"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            deadline = 90.0
            while not any(kind == "result" for kind, _ in collector.reports):
                assert collector.got.wait(deadline), ("no report from the page", collector.reports)
                collector.got.clear()
                assert browser.poll() is None, browser.stderr.read() if browser.stderr else ""
        finally:
            browser.kill()
            browser.wait(10)
    reports = dict(collector.reports)
    job_id = json.loads(reports["posted"])["job_id"]
    result = json.loads(reports["result"])
    assert (result["job_id"], result["status"]) == (job_id, "ok"), result
    assert result["output"]["caption"]
