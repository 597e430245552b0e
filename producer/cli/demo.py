"""``blipq demo``: the whole system on one machine, offline, in about a minute.

Starts a private Redis and a private S3 server, uploads the sample images, starts a real
``celery -A worker.celery.app worker`` process, submits caption jobs through the Client, prints
the results and shuts everything down. Runs from a checkout of the repository.

On a BLIP-2 model (``--model shapes-blip2-opt``, ``shapes-blip2-t5`` or a BLIP-2 folder) the
demo also asks VQA questions; on the shapes-world fixture models every caption and answer about
the shipped shapes samples is checked against their truth and marked right or wrong.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from producer.cli.embedded import EmbeddedRedis, EmbeddedS3, WorkerProcess
from producer.client import Client
from producer.protocol.jobs import AnyJob, CaptionJob, CaptionOutput, JobResult, VqaJob, VqaOutput

REPO = Path(__file__).resolve().parents[2]
SAMPLES = Path(__file__).resolve().parents[1] / "samples"
# Shapes-world images that neither training nor the accuracy gates use (seed 9_000_501), with
# their true captions in truth.json and the true answers to a few questions each in vqa.json.
SHAPES_SAMPLES = SAMPLES / "shapes"
FIXTURE_MODELS = REPO / "tests" / "fixtures" / "models"
SHAPES_MODEL = FIXTURE_MODELS / "shapes-caption"
BUCKET = "demo-images"
PROMPTS = (None, None, "a picture of")
MODEL_NAME = "demo-model"


def _model_source(model: str | None) -> tuple[str, str]:
    if model:
        fixture = FIXTURE_MODELS / model
        if "/" not in model and (fixture / "config.json").is_file():
            return str(fixture), (
                f"the fixture model {model} of this checkout (docs: Fixture models)"
            )
        return model, "given with --model"
    if (SHAPES_MODEL / "config.json").is_file():
        return str(SHAPES_MODEL), (
            "the shapes-world fixture model: a test instrument that knows only coloured "
            "circles, squares and triangles (docs: Fixture models)"
        )
    directory = Path(tempfile.mkdtemp(prefix="blipq-demo-model-"))
    subprocess.run(
        [sys.executable, "-m", "tests.fixtures.tiny", str(directory)], check=True, cwd=REPO
    )
    return str(directory), "a tiny RANDOM-weight model: captions are gibberish, plumbing is real"


def _is_shapes(source: str) -> bool:
    """Whether ``source`` is one of the checkout's shapes-world fixture models."""
    path = Path(source)
    return path.name.startswith("shapes-") and path.resolve().parent == FIXTURE_MODELS.resolve()


def _is_blip2(source: str) -> bool:
    """Whether ``source`` is a local BLIP-2 folder (or a hub id naming BLIP-2)."""
    config = Path(source) / "config.json"
    if config.is_file():
        architectures = json.loads(config.read_text()).get("architectures") or []
        return any(arch.startswith("Blip2") for arch in architectures)
    return "blip2" in source.lower()


def _upload(s3_server: EmbeddedS3) -> list[str]:
    s3 = s3_server.client()
    s3.create_bucket(Bucket=BUCKET)
    uris = []
    for path in sorted(SAMPLES.iterdir()):
        if path.suffix.lower() in {".jpg", ".jpeg", ".png"}:
            s3.put_object(Bucket=BUCKET, Key=path.name, Body=path.read_bytes())
            uris.append(f"s3://{BUCKET}/{path.name}")
    return uris


def _upload_shapes(s3_server: EmbeddedS3) -> dict[str, str]:
    """The shipped shapes-world samples -> their true captions (``samples/shapes/truth.json``)."""
    s3 = s3_server.client()
    truth: dict[str, str] = json.loads((SHAPES_SAMPLES / "truth.json").read_text())
    expected = {}
    for name, caption in truth.items():
        s3.put_object(Bucket=BUCKET, Key=name, Body=(SHAPES_SAMPLES / name).read_bytes())
        expected[f"s3://{BUCKET}/{name}"] = caption
    return expected


def run_demo(model: str | None = None, count: int = 24) -> int:
    source, what = _model_source(model)
    print(f"model: {source}\n       ({what})")
    redis_server = EmbeddedRedis().start()
    s3_server = EmbeddedS3().start()
    worker: WorkerProcess | None = None
    try:
        print(f"redis: {redis_server.url}   s3: {s3_server.endpoint_url}")
        uris = _upload(s3_server)
        shapes, blip2 = _is_shapes(source), _is_blip2(source)
        expected = _upload_shapes(s3_server) if shapes else {}
        uris = list(expected) + uris
        print(
            f"uploaded {len(uris)} images to s3://{BUCKET}/ ({len(expected)} of the shapes world)"
        )
        env = {
            "BLIPQ_REDIS_URL": redis_server.url,
            "BLIPQ_S3_ENDPOINT_URL": s3_server.endpoint_url,
            "BLIPQ_S3_ACCESS_KEY_ID": s3_server.access_key,
            "BLIPQ_S3_SECRET_ACCESS_KEY": s3_server.secret_key,
            "BLIPQ_MODELS": json.dumps(
                {MODEL_NAME: {"source": source, "family": "blip2" if blip2 else "caption"}}
            ),
            "BLIPQ_SERVE": MODEL_NAME,
            "BLIPQ_MAX_WAIT_MS": "30",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        }
        started = time.perf_counter()
        worker = WorkerProcess(env, cwd=REPO).start()
        print(f"worker ready in {time.perf_counter() - started:.1f}s (log: {worker.log_path})")
        # the shapes model knows only shapes-world words: a prompt like "a picture of" is noise
        prompts = (None,) if shapes else PROMPTS
        status = _caption(redis_server.url, uris, count, prompts, expected)
        if blip2:
            questions = _shapes_questions(expected) if shapes else _any_questions(uris)
            status = max(status, _ask(redis_server.url, questions))
        return status
    finally:
        if worker is not None:
            code = worker.stop()
            print(f"worker stopped (exit code {code})")
        s3_server.close()
        redis_server.close()
        print("servers stopped")


def _caption(
    redis_url: str,
    uris: list[str],
    count: int,
    prompts: tuple[str | None, ...] = PROMPTS,
    expected: dict[str, str] | None = None,
) -> int:
    """Caption ``count`` jobs over ``uris``; rows of images in ``expected`` say whether the
    caption is the true one."""
    expected = expected or {}
    jobs = [
        CaptionJob(
            image=uris[i % len(uris)],
            model=MODEL_NAME,
            prompt=prompts[i % len(prompts)],
            max_new_tokens=20,
        )
        for i in range(count)
    ]
    ids, results, elapsed = _run(redis_url, jobs)
    print(f"\n{'image':<24} {'batch':>5} {'ms':>7}  caption")
    failures = right = checked = 0
    for job, job_id in zip(jobs, ids, strict=True):
        result = results[job_id]
        failures += _print_row(job, result, expected.get(job.image))
        if job.image in expected and isinstance(result.output, CaptionOutput):
            checked += 1
            right += result.output.caption == expected[job.image]
    print(f"\n{count} jobs in {elapsed:.2f}s ({count / elapsed:.1f} jobs/s), {failures} failed")
    if checked:
        print(f"shapes-world images: {right} of {checked} captions are the true caption")
    return 1 if failures else 0


def _run(redis_url: str, jobs: Sequence[AnyJob]) -> tuple[list[str], dict[str, JobResult], float]:
    """Submit the jobs, wait for every result: (job ids in order, results by id, seconds)."""
    with Client(redis_url=redis_url) as client:
        started = time.perf_counter()
        ids = client.submit_many(jobs)
        results = {r.job_id: r for r in client.results(ids, timeout=300)}
        return ids, results, time.perf_counter() - started


def _shapes_questions(expected: dict[str, str]) -> list[tuple[str, str, str | None]]:
    """(image, question, true answer) for the shipped shapes samples (``vqa.json``)."""
    truth: dict[str, dict[str, str]] = json.loads((SHAPES_SAMPLES / "vqa.json").read_text())
    return [
        (uri, question, answer)
        for uri in expected
        for question, answer in truth[uri.rsplit("/", 1)[-1]].items()
    ]


def _any_questions(uris: list[str]) -> list[tuple[str, str, str | None]]:
    return [(uri, "what is in the picture?", None) for uri in uris[:4]]


def _ask(redis_url: str, questions: list[tuple[str, str, str | None]]) -> int:
    """VQA jobs on the BLIP-2 model; rows with a truth say whether the answer is right."""
    jobs = [VqaJob(image=uri, model=MODEL_NAME, question=q) for uri, q, _ in questions]
    ids, results, elapsed = _run(redis_url, jobs)
    print(f"\n{'image':<16} {'question':<30} answer")
    failures = right = checked = 0
    for (uri, question, truth), job_id in zip(questions, ids, strict=True):
        result = results[job_id]
        name = uri.rsplit("/", 1)[-1][:16]
        if not (result.ok and isinstance(result.output, VqaOutput)):
            error = result.error
            print(f"{name:<16} {question:<30} ERROR {error.code if error else '?'}")
            failures += 1
            continue
        answer = result.output.answer
        mark = ""
        if truth is not None:
            checked += 1
            right += answer == truth
            mark = "  (right)" if answer == truth else f"  (WRONG: true answer {truth!r})"
        print(f"{name:<16} {question:<30} {answer}{mark}")
    print(f"\n{len(jobs)} questions in {elapsed:.2f}s, {failures} failed")
    if checked:
        print(f"shapes-world images: {right} of {checked} answers are the true answer")
    return 1 if failures else 0


def _print_row(job: CaptionJob, result: JobResult, truth: str | None = None) -> int:
    name = job.image.rsplit("/", 1)[-1][:24]
    if result.ok and isinstance(result.output, CaptionOutput):
        caption = result.output.caption
        if truth is not None:
            caption += "  (right)" if caption == truth else f"  (WRONG: true caption {truth!r})"
        print(f"{name:<24} {result.batch_size:>5} {result.timings.total_ms:>7.0f}  {caption}")
        return 0
    error = result.error
    print(
        f"{name:<24} {'-':>5} {'-':>7}  ERROR {error.code if error else '?'}: "
        f"{error.message if error else ''}"
    )
    return 1


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    sys.exit(run_demo())
