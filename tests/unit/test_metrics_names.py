"""The worker's metrics follow Prometheus' conventions: parsed from the exposition text with
prometheus_client's parser (always), and checked by ``promtool check metrics`` where promtool is
installed (Debian: ``apt-get install prometheus``)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from producer.protocol.jobs import ErrorCode, JobResult, Timings
from worker.metrics import DEFAULT_PORT, Metrics


def _exposition() -> str:
    metrics = Metrics()
    timings = Timings(queue_wait_ms=40.0, fetch_ms=12.0, inference_ms=30.0, total_ms=90.0)
    for i in range(8):
        ok = JobResult(job_id=str(i), kind="caption", status="ok", model="m", timings=timings)
        metrics.observe(ok)
    metrics.observe_batch("m", 8, 0.030)  # the eight ran in one forward pass
    failed = JobResult.failure("9", "vqa", ErrorCode.NOT_FOUND, "gone", model="m")
    metrics.observe(failed)
    metrics.model_load.labels("m").set(1.5)
    return generate_latest(metrics.registry).decode()


def _families() -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(_exposition())}


def test_names_units_and_labels_follow_prometheus_conventions() -> None:
    families = _families()
    ours = {name: f for name, f in families.items() if name.startswith("blipq_")}
    assert ours
    for name, family in ours.items():
        assert re.fullmatch(r"blipq_[a-z][a-z0-9_]*", name), name
        assert not re.search(r"_(ms|milliseconds|millis)$", name), f"{name}: use seconds"
        if family.type == "counter":  # type: ignore[attr-defined]
            assert all(s.name.endswith("_total") for s in family.samples), name  # type: ignore[attr-defined]
        if family.type == "histogram" and name != "blipq_batch_size":  # type: ignore[attr-defined]
            assert name.endswith("_seconds"), f"{name}: a duration histogram in seconds"
    for name in ("blipq_queue_wait_seconds", "blipq_fetch_seconds", "blipq_inference_seconds"):
        assert name in ours
    # The standard collectors of a Python process.
    assert "process_cpu_seconds" in families and "process_resident_memory_bytes" in families
    assert "python_info" in families and "python_gc_collections" in families


def _labels(name: str) -> set[str]:
    family = _families()[name]
    return {k for s in family.samples for k in s.labels if k != "le"}  # type: ignore[attr-defined]


def test_errors_and_per_item_histograms_carry_kind_and_model() -> None:
    assert _labels("blipq_errors") == {"kind", "model", "code"}
    for name in ("blipq_queue_wait_seconds", "blipq_fetch_seconds", "blipq_job_seconds"):
        assert {"kind", "model"} <= _labels(name), name


def test_a_batch_is_observed_once_and_items_once_each() -> None:
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(_exposition())
        for s in f.samples
    }
    assert samples["blipq_inference_seconds_count", (("model", "m"),)] == 1
    assert samples["blipq_inference_seconds_sum", (("model", "m"),)] == pytest.approx(0.03)
    assert samples["blipq_batch_size_sum", (("model", "m"),)] == 8
    item = (("kind", "caption"), ("model", "m"))
    assert samples["blipq_job_seconds_count", item] == 8
    assert samples["blipq_queue_wait_seconds_sum", item] == pytest.approx(8 * 0.040)
    error = (("code", "not_found"), ("kind", "vqa"), ("model", "m"))
    assert samples["blipq_errors_total", error] == 1


def test_the_default_port_is_not_node_exporters() -> None:
    assert DEFAULT_PORT != 9100


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_check_metrics_finds_no_problem() -> None:
    checked = subprocess.run(
        ["promtool", "check", "metrics"],
        input=_exposition(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert checked.returncode == 0 and not checked.stdout.strip(), checked.stdout + checked.stderr
