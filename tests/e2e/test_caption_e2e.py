"""Caption jobs end to end: producers -> Redis -> celery worker -> S3 -> batch -> Redis."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import redis
import torch
from PIL import Image

from producer import CaptionJob, Client, ErrorCode, JobResult
from producer.cli.embedded import EmbeddedRedis, WorkerProcess
from producer.protocol.keys import RESULTS_STREAM
from tests.fixtures.images import sample_jpegs

PROMPTS = [None, "a photography of", "a picture of the red", None, "there is"]
MAX_NEW = 10


def reference_captions(model_dir: Path, images: list[bytes]) -> dict[tuple[int, str | None], str]:
    """One image at a time, the way the model card does it: processor + generate."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(model_dir)
    model = BlipForConditionalGeneration.from_pretrained(model_dir).eval()
    refs = {}
    with torch.inference_mode():
        for index, data in enumerate(images):
            image = Image.open(io.BytesIO(data)).convert("RGB")
            for prompt in set(PROMPTS):
                inputs = processor(images=image, text=prompt, return_tensors="pt")
                out = model.generate(**inputs, max_new_tokens=MAX_NEW, num_beams=1, do_sample=False)
                refs[index, prompt] = processor.decode(out[0], skip_special_tokens=True).strip()
    return refs


def test_caption_jobs_from_three_producers(
    caption_worker: WorkerProcess,
    client: Client,
    redis_client: redis.Redis,
    s3,  # type: ignore[no-untyped-def]
    tiny_caption_dir: Path,
) -> None:
    images = sample_jpegs(22, seed=7)
    s3.create_bucket(Bucket="catalog")
    for index, data in enumerate(images):
        s3.put_object(Bucket="catalog", Key=f"sku/{index}.jpg", Body=data)
    s3.put_object(Bucket="catalog", Key="sku/corrupt.jpg", Body=images[0][:200] + b"\x00" * 50)

    plan: list[tuple[int, str | None]] = [(i % 22, PROMPTS[i % len(PROMPTS)]) for i in range(66)]
    bad = {"missing": "s3://catalog/sku/nope.jpg", "corrupt": "s3://catalog/sku/corrupt.jpg"}
    submitted: dict[str, tuple[int, str | None] | str] = {}
    lock = threading.Lock()

    def produce(part: int) -> None:
        with Client(redis_url=client.settings.redis_url) as own:
            mine = plan[part::3]
            jobs = [
                CaptionJob(
                    image=f"s3://catalog/sku/{i}.jpg",
                    model="tiny-caption",
                    prompt=p,
                    max_new_tokens=MAX_NEW,
                )
                for i, p in mine
            ]
            if part == 0:
                jobs += [
                    CaptionJob(image=uri, model="tiny-caption", max_new_tokens=MAX_NEW)
                    for uri in bad.values()
                ]
            ids = own.submit_many(jobs) if part != 2 else [own.submit(j) for j in jobs]
            with lock:
                for job_id, entry in zip(ids, [*mine, *bad.keys()], strict=False):
                    submitted[job_id] = entry

    threads = [threading.Thread(target=produce, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(submitted) == 68

    results: dict[str, JobResult] = {
        r.job_id: r for r in client.results(list(submitted), timeout=240)
    }
    assert set(results) == set(submitted)

    refs = reference_captions(tiny_caption_dir, images)
    by_entry = {entry: results[job_id] for job_id, entry in submitted.items()}
    for job_id, entry in submitted.items():
        result = results[job_id]
        if isinstance(entry, str):
            continue
        assert result.ok, result.error
        assert result.output is not None
        assert result.output.caption == refs[entry], (entry, result.output, refs[entry])
        prompt = entry[1]
        if prompt:
            assert result.output.caption.startswith(prompt.lower())
            assert result.output.caption == f"{prompt.lower()} {result.output.continuation}".strip()
        else:
            assert result.output.continuation == result.output.caption
        assert result.model == "tiny-caption"
        assert result.timings.total_ms >= result.timings.inference_ms > 0

    missing, corrupt = by_entry["missing"], by_entry["corrupt"]
    assert missing.status == "error" and missing.error is not None
    assert missing.error.code is ErrorCode.NOT_FOUND
    assert corrupt.status == "error" and corrupt.error is not None
    assert corrupt.error.code is ErrorCode.INVALID_IMAGE
    assert max(r.batch_size for r in results.values()) > 1

    # Every finished job is on the results stream, once.
    events = redis_client.xrange(RESULTS_STREAM, count=10_000)
    seen = [fields[b"job_id"].decode() for _, fields in events]
    assert sorted(set(seen) & set(submitted)) == sorted(submitted)
    assert len([s for s in seen if s in submitted]) == len(submitted)
    sample = json.loads(events[-1][1][b"result"])
    assert sample["job_id"] in submitted


def test_single_job_result_and_cli_round_trip(
    caption_worker: WorkerProcess,
    client: Client,
    s3,  # type: ignore[no-untyped-def]
) -> None:
    s3.create_bucket(Bucket="single")
    s3.put_object(Bucket="single", Key="one.jpg", Body=sample_jpegs(1, seed=99)[0])
    job_id = client.submit(CaptionJob(image="s3://single/one.jpg", model="tiny-caption"))
    result = client.result(job_id, timeout=60)
    assert result.ok and result.job_id == job_id
    assert result.output is not None and result.output.caption
    assert result.batch_size >= 1


def test_submit_many_is_one_round_trip_per_chunk(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Spy on redis-py: the LPUSHes of a chunk go out in one pipeline, never one by one."""
    import redis.client

    from producer.protocol.settings import ClientSettings

    counts = {"pipelines": 0, "direct_lpush": 0}
    execute, lpush = redis.client.Pipeline.execute, redis.client.Redis.lpush

    def counting_execute(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        counts["pipelines"] += 1
        return execute(self, *args, **kwargs)

    def counting_lpush(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not isinstance(self, redis.client.Pipeline):
            counts["direct_lpush"] += 1
        return lpush(self, *args, **kwargs)

    monkeypatch.setattr(redis.client.Pipeline, "execute", counting_execute)
    monkeypatch.setattr(redis.client.Redis, "lpush", counting_lpush)
    server = EmbeddedRedis().start()  # its own server: no worker consumes these jobs
    try:
        settings = ClientSettings(redis_url=server.url, submit_chunk=100)
        with Client(settings=settings) as own:
            jobs = [CaptionJob(image=f"s3://bkt/{i}.jpg", model="spy") for i in range(250)]
            ids = own.submit_many(jobs)
        assert redis.Redis.from_url(server.url).llen("blipq.spy") == 250
    finally:
        server.close()
    assert len(set(ids)) == 250
    assert counts["direct_lpush"] == 0
    # Per chunk: one pipeline for the ledger, one for the messages; plus kombu's declarations.
    assert counts["pipelines"] <= 2 * 3 + 2


def test_cli_caption_wait_and_result(
    caption_worker: WorkerProcess,
    redis_server,  # type: ignore[no-untyped-def]
    s3,  # type: ignore[no-untyped-def]
) -> None:
    import os
    import subprocess
    import sys

    s3.create_bucket(Bucket="cli-images")
    s3.put_object(Bucket="cli-images", Key="a.jpg", Body=sample_jpegs(1, seed=5)[0])
    env = {**os.environ, "BLIPQ_REDIS_URL": redis_server.url}
    blipq = [sys.executable, "-m", "producer.cli"]
    args = [
        "caption",
        "s3://cli-images/a.jpg",
        "--model",
        "tiny-caption",
        "--prompt",
        "a picture of",
    ]
    done = subprocess.run(
        [*blipq, *args, "--wait"], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["status"] == "ok"
    assert printed["output"]["caption"].startswith("a picture of")

    again = subprocess.run(
        [*blipq, "result", printed["job_id"]], env=env, capture_output=True, text=True, check=False
    )
    assert again.returncode == 0 and json.loads(again.stdout) == printed

    missing = subprocess.run(
        [*blipq, "caption", "s3://cli-images/none.jpg", "--model", "tiny-caption", "--wait"],
        env=env,
        check=False,
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 1
    assert json.loads(missing.stdout)["error"]["code"] == "not_found"

    bad = subprocess.run(
        [*blipq, "caption", "http://x/y.jpg"], env=env, capture_output=True, text=True, check=False
    )
    assert bad.returncode == 2 and "s3://" in bad.stderr
