"""The worker's Prometheus metrics, scraped over HTTP."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from producer import CaptionJob, Client
from producer.cli.embedded import WorkerProcess
from tests.fixtures.images import sample_jpegs


def scrape(port: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[s.name, tuple(sorted(s.labels.items()))] = s.value
    return samples


def test_metrics_count_jobs_batches_and_errors(
    caption_worker: WorkerProcess,
    client: Client,
    s3,  # type: ignore[no-untyped-def]
) -> None:
    s3.create_bucket(Bucket="metrics")
    s3.put_object(Bucket="metrics", Key="a.jpg", Body=sample_jpegs(1, seed=91)[0])
    port = caption_worker.env["BLIPQ_METRICS_PORT"]
    before = scrape(port)
    jobs = [CaptionJob(image="s3://metrics/a.jpg", model="tiny-caption")] * 10
    jobs.append(CaptionJob(image="s3://metrics/none.jpg", model="tiny-caption"))
    list(client.results(client.submit_many(jobs), timeout=120))
    after = scrape(port)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("blipq_jobs_total", kind="caption", model="tiny-caption", status="ok") == 10
    assert delta("blipq_jobs_total", kind="caption", model="tiny-caption", status="error") == 1
    assert delta("blipq_errors_total", kind="caption", model="tiny-caption", code="not_found") == 1
    assert delta("blipq_batch_size_sum", model="tiny-caption") >= 10
    # The forward pass is observed once per batch: fewer observations than jobs when batched.
    passes = delta("blipq_inference_seconds_count", model="tiny-caption")
    assert 1 <= passes == delta("blipq_batch_size_count", model="tiny-caption") <= 10
    item = {"kind": "caption", "model": "tiny-caption"}
    assert delta("blipq_job_seconds_count", **item) == 11
    assert delta("blipq_fetch_seconds_count", **item) == 10
    assert after[("process_resident_memory_bytes", ())] > 0
    assert after[("blipq_model_load_seconds", (("model", "tiny-caption"),))] > 0
