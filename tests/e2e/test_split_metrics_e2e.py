"""A split worker's metrics, all on one port: the intake processes' per-job figures and the
model process's per-batch ones, summed over processes by the launcher, with each process's
memory and CPU time."""

from __future__ import annotations

import time
import urllib.error
from pathlib import Path

from producer import CaptionJob, Client
from producer.cli.embedded import EmbeddedRedis, EmbeddedS3, WorkerProcess, free_port
from tests.e2e.conftest import REPO, worker_env
from tests.e2e.test_metrics_e2e import scrape
from tests.fixtures.images import sample_jpegs

JOBS = 40


def scrape_when_served(
    port: str, deadline: float
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    while True:
        try:
            return scrape(port)
        except urllib.error.URLError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_one_port_serves_every_process_of_a_split_worker(
    s3_server: EmbeddedS3, private_redis: EmbeddedRedis, tiny_caption_dir: Path
) -> None:
    s3 = s3_server.client()
    s3.create_bucket(Bucket="split-metrics")
    for index, data in enumerate(sample_jpegs(3, seed=93)):
        s3.put_object(Bucket="split-metrics", Key=f"{index}.jpg", Body=data)
    port = str(free_port())
    env = worker_env(
        private_redis,
        s3_server,
        {"tiny-caption": str(tiny_caption_dir)},
        BLIPQ_INTAKE_PROCESSES="2",
        BLIPQ_MAX_BATCH_SIZE="4",
        BLIPQ_MAX_WAIT_MS="50",
        BLIPQ_METRICS_PORT=port,
        BLIPQ_METRICS_ADDR="127.0.0.1",
    )
    worker = WorkerProcess(env, cwd=REPO).start()
    client = Client(redis_url=private_redis.url)
    try:
        deadline = time.monotonic() + 120
        while worker.log().count(" ready.") < 2 and time.monotonic() < deadline:
            time.sleep(0.2)  # both intake processes consume
        # The launcher serves the port once it sees the model process listening: it checks
        # every 0.2 s, so an intake can report ready a moment before the port opens.
        before = scrape_when_served(port, deadline)
        jobs = [
            CaptionJob(image=f"s3://split-metrics/{i % 3}.jpg", model="tiny-caption")
            for i in range(JOBS)
        ]
        jobs.append(CaptionJob(image="s3://split-metrics/none.jpg", model="tiny-caption"))
        results = list(client.results(client.submit_many(jobs), timeout=180))
        after = scrape(port)
    finally:
        client.close()
        code = worker.stop()
    assert code == 0, worker.log()[-4000:]
    assert sum(r.ok for r in results) == JOBS
    intakes = {r.worker for r in results}
    assert len(intakes) == 2, intakes  # both intake processes ran jobs: their counts add up

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    item = {"kind": "caption", "model": "tiny-caption"}
    # Per job, from the intake processes.
    assert delta("blipq_jobs_total", status="ok", **item) == JOBS
    assert delta("blipq_jobs_total", status="error", **item) == 1
    assert delta("blipq_errors_total", code="not_found", **item) == 1
    assert delta("blipq_job_seconds_count", **item) == JOBS + 1
    assert delta("blipq_fetch_seconds_count", **item) == JOBS
    # Per batch, from the model process: every ok job in exactly one forward pass.
    model = {"model": "tiny-caption"}
    assert delta("blipq_batch_size_sum", **model) == JOBS
    passes = delta("blipq_inference_seconds_count", **model)
    assert passes == delta("blipq_batch_size_count", **model)
    assert JOBS / 4 <= passes < JOBS  # batches of at most 4, and some items shared a pass
    assert after[("blipq_model_load_seconds", (("model", "tiny-caption"),))] > 0
    # Each process by role, from /proc.
    roles = {"model", "intake-0", "intake-1"}
    for role in roles:
        assert after[("blipq_process_resident_memory_bytes", (("process", role),))] > 10e6
        assert after[("blipq_process_cpu_seconds_total", (("process", role),))] > 0
