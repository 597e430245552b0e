"""The null model family (the benchmark's no-op model): one empty caption per input."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

from PIL import Image

from producer.protocol.jobs import CaptionJob, CaptionOutput
from worker.batcher import Batcher, BatchPolicy
from worker.models import Placement
from worker.models.null import NullItem, NullRunner
from worker.models.registry import kinds_of, load_runner
from worker.settings import Settings


def _runner(source: str = "null") -> NullRunner:
    settings = Settings(models={"null": {"source": source, "family": "null"}}, serve=["null"])
    (spec,) = settings.served()
    assert kinds_of(spec.family) == ("caption",)
    runner = load_runner(spec, Placement.from_settings(settings), warmup=True)
    assert isinstance(runner, NullRunner)
    return runner


def test_prepare_resizes_to_the_input_size_and_keeps_a_tiny_item() -> None:
    runner = _runner()
    job = CaptionJob(image="s3://bench/a.jpg", model="null")
    item = runner.prepare(job, Image.new("RGB", (1600, 1200), (10, 20, 30)))
    assert isinstance(item, NullItem)
    assert item.size == (384, 384)
    assert item.job is job
    assert _runner("null:224").prepare(job, Image.new("RGB", (640, 480))).size == (224, 224)


def test_one_output_per_input_through_the_batcher() -> None:
    runner = _runner()
    batches: list[int] = []

    def run(key: Hashable, items: list[Any]) -> Sequence[Any]:
        batches.append(len(items))
        return runner.run_batch(items)

    batcher = Batcher(run, lambda key: BatchPolicy(max_size=4, max_wait_s=10.0))
    image = Image.new("RGB", (700, 500), (200, 100, 50))
    jobs = [
        CaptionJob(
            image=f"s3://bench/{i}.jpg", model="null", prompt="a photo of" if i % 3 else None
        )
        for i in range(10)
    ]
    futures = []
    for job in jobs:
        item = runner.prepare(job, image)
        futures.append(batcher.submit(runner.group_key(item), item))
    while batcher.poll(force=True):
        pass
    assert sum(batches) == len(jobs)
    assert max(batches) <= 4
    for job, future in zip(jobs, futures, strict=True):
        output = future.result(0).output
        assert isinstance(output, CaptionOutput)
        assert output.caption == output.continuation == ""
        assert output.prompt == job.prompt


def test_a_lone_item_runs_at_once_when_nothing_else_is_on_its_way() -> None:
    runner = _runner()
    coming = {"n": 1}
    clock = {"now": 100.0}
    batcher = Batcher(
        lambda key, items: runner.run_batch(items),
        lambda key: BatchPolicy(max_size=8, max_wait_s=0.010),
        clock=lambda: clock["now"],
        idle=lambda key: coming["n"] == 0,
    )
    image = Image.new("RGB", (640, 480))
    item = runner.prepare(CaptionJob(image="s3://bench/a.jpg", model="null"), image)
    first = batcher.submit(runner.group_key(item), item)
    assert not batcher.poll()  # another item is still being prepared: wait for it
    coming["n"] = 0
    assert batcher.poll()  # nothing else is coming: no max_wait for a batch that cannot fill
    assert first.result(0).output.caption == ""
    assert batcher.batch_sizes == {1: 1}


def test_fault_injection_is_off_by_default_and_only_for_the_null_family() -> None:
    import pytest
    from pydantic import ValidationError

    assert _runner().spec.crash_on is None
    with pytest.raises(ValidationError, match="fault injection for the null family only"):
        Settings(models={"cap": {"source": "/m", "family": "caption", "crash_on": "x"}})


def test_crash_on_kills_the_worker_only_for_a_batch_with_a_marked_image(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import os
    import signal

    settings = Settings(
        models={"drill": {"source": "null", "family": "null", "crash_on": "poison"}},
        serve=["drill"],
    )
    (spec,) = settings.served()
    runner = load_runner(spec, Placement.from_settings(settings), warmup=True)  # no crash
    kills: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: kills.append((pid, sig)))
    image = Image.new("RGB", (32, 32))
    ok = [
        runner.prepare(CaptionJob(image=f"s3://drill/{i}.jpg", model="drill"), image)
        for i in (1, 2)
    ]
    assert len(runner.run_batch(ok)) == 2 and kills == []
    bad = runner.prepare(CaptionJob(image="s3://drill/poison-1.jpg", model="drill"), image)
    runner.run_batch([ok[0], bad])
    assert kills == [(os.getpid(), signal.SIGKILL)]
