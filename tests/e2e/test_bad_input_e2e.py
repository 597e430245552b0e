"""Bad input through a real worker: each case gets an error result with a documented code, the
worker lives, and the good jobs submitted in the same burst all succeed."""

from __future__ import annotations

import io
import json
import os
import pickle
import time
import uuid
from pathlib import Path

import pytest
from kombu import Connection, Exchange, Queue
from PIL import Image

from producer import CaptionJob, Client, JobResult, ModerationJob, VqaJob
from producer.cli.embedded import EmbeddedRedis, EmbeddedS3, WorkerProcess
from producer.protocol.keys import TASK_RUN_JOB
from tests.e2e.conftest import REPO, worker_env
from tests.fixtures.images import encode, make_image

BUCKET = "bad-input"


def _png_bomb() -> bytes:
    # 20000 x 20000 pixels (400 M) in a file of a few dozen kilobytes.
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(make_image(3), "JPEG", exif=exif.tobytes())


def _gif() -> bytes:
    frames = [Image.new("P", (40, 30), i * 60) for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


OBJECTS: dict[str, bytes] = {
    "good.jpg": encode(make_image(1), quality=90),
    "empty.jpg": b"",
    "truncated.jpg": encode(make_image(2), quality=90)[:400],
    "random.jpg": os.urandom(4000),
    "text.jpg": b"I am a text file, not a picture.\n" * 40,
    "drawing.svg": b'<svg xmlns="http://www.w3.org/2000/svg"><circle r="4"/></svg>',
    "bomb.png": _png_bomb(),
    "huge.jpg": os.urandom(3_100_000),
    "cmyk.jpg": encode(make_image(4).convert("CMYK"), "JPEG"),
    "sixteen.png": encode(Image.new("I;16", (50, 40), 50000), "PNG"),
    "palette.png": encode(make_image(5).convert("P"), "PNG"),
    "alpha.png": encode(make_image(6).convert("RGBA"), "PNG"),
    "grey.jpg": encode(make_image(7).convert("L"), "JPEG"),
    "animated.gif": _gif(),
    "rotated.jpg": _exif_rotated(),
}

OK_OBJECTS = [
    "good.jpg",
    "cmyk.jpg",
    "sixteen.png",
    "palette.png",
    "alpha.png",
    "grey.jpg",
    "animated.gif",
    "rotated.jpg",
]
IMAGE_ERRORS = {
    "s3://bad-input/nope.jpg": "not_found",
    "s3://no-such-bucket-here/x.jpg": "not_found",
    "s3://bad-input/empty.jpg": "invalid_image",
    "s3://bad-input/truncated.jpg": "invalid_image",
    "s3://bad-input/random.jpg": "invalid_image",
    "s3://bad-input/text.jpg": "invalid_image",
    "s3://bad-input/drawing.svg": "invalid_image",
    "s3://bad-input/bomb.png": "too_large",
    "s3://bad-input/huge.jpg": "too_large",
}
GOOD = {"image": "s3://bad-input/good.jpg", "model": "tiny-caption", "kind": "caption"}
RAW_ERRORS: dict[str, object] = {
    "not-s3": {**GOOD, "image": "https://example.com/cat.jpg"},
    "another-host": {**GOOD, "image": "s3://169.254.169.254/latest/meta-data"},
    "long-prompt": {**GOOD, "prompt": "a " * 400},
    "long-question": {**GOOD, "kind": "vqa", "model": "tiny-vqa", "question": "why " * 200},
    "extra-field": {**GOOD, "colour": "red"},
    "missing-field": {"kind": "caption", "model": "tiny-caption"},
    "not-a-dict": ["s3://bad-input/good.jpg"],
    "unknown-kind": {**GOOD, "kind": "paint"},
    "dot-dot-key": {**GOOD, "image": "s3://bad-input/../other/secret.jpg"},
    "quoted-dot-dot-key": {**GOOD, "image": "s3://bad-input/a/%2E%2E/secret.jpg"},
}


def _send_raw(client: Client, payload: object, queue: str = "blipq.tiny-caption") -> str:
    job_id = str(uuid.uuid4())
    client.sender.app.send_task(  # the producer's validation is bypassed on purpose
        TASK_RUN_JOB,
        kwargs={"job": payload, "submitted_at": time.time()},
        task_id=job_id,
        queue=queue,
        routing_key=queue,
    )
    return job_id


def _publish_refused(redis_url: str) -> dict[str, str]:
    """A pickled message (whose unpickling would create a file) and a non-JSON one."""
    ids = {"pickle": str(uuid.uuid4()), "not-json": str(uuid.uuid4())}
    queue = Queue(
        "blipq.tiny-caption", Exchange("blipq.tiny-caption"), routing_key="blipq.tiny-caption"
    )

    class Exploit:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, ("touch /tmp/blipq-pickle-was-loaded",))

    with Connection(redis_url) as conn:
        producer = conn.Producer()
        common = {"exchange": queue.exchange, "routing_key": queue.name, "declare": [queue]}
        producer.publish(
            pickle.dumps(((), {"job": Exploit()}, {})),
            serializer=None,
            content_type="application/x-python-serialize",
            content_encoding="binary",
            headers={"task": TASK_RUN_JOB, "id": ids["pickle"], "lang": "py"},
            **common,
        )
        producer.publish(
            b"{this is not json",
            serializer=None,
            content_type="application/json",
            content_encoding="utf-8",
            headers={"task": TASK_RUN_JOB, "id": ids["not-json"], "lang": "py"},
            **common,
        )
    return ids


def test_each_bad_input_fails_alone_with_its_code(
    caption_worker: WorkerProcess,
    client: Client,
    s3,  # type: ignore[no-untyped-def]
) -> None:
    if os.path.exists("/tmp/blipq-pickle-was-loaded"):
        os.remove("/tmp/blipq-pickle-was-loaded")
    s3.create_bucket(Bucket=BUCKET)
    for key, data in OBJECTS.items():
        s3.put_object(Bucket=BUCKET, Key=key, Body=data)

    expected: dict[str, str] = {}
    jobs = [CaptionJob(image=f"s3://{BUCKET}/{key}", model="tiny-caption") for key in OK_OBJECTS]
    jobs += [CaptionJob(image=uri, model="tiny-caption") for uri in IMAGE_ERRORS]
    jobs += [
        CaptionJob(image=f"s3://{BUCKET}/good.jpg", model="tiny-caption", prompt=""),
        VqaJob(image=f"s3://{BUCKET}/good.jpg", model="tiny-caption", question="what?"),
    ]
    ids = client.submit_many(jobs)
    for job_id in ids[: len(OK_OBJECTS)]:
        expected[job_id] = "ok"
    for job_id, code in zip(ids[len(OK_OBJECTS) :], IMAGE_ERRORS.values(), strict=False):
        expected[job_id] = code
    expected[ids[-2]] = "ok"  # an empty prompt is an unconditional caption
    expected[ids[-1]] = "unknown_model"
    policy = client.submit(
        ModerationJob(image=f"s3://{BUCKET}/good.jpg", model="tiny-match", policy="no-such-policy")
    )
    expected[policy] = "invalid_job"
    for name, payload in RAW_ERRORS.items():
        queue = "blipq.tiny-vqa" if name == "long-question" else "blipq.tiny-caption"
        expected[_send_raw(client, payload, queue)] = "invalid_job"
    for job_id in _publish_refused(client.settings.redis_url).values():
        expected[job_id] = "invalid_job"
    assert len(expected) >= 20 + len(OK_OBJECTS)

    results: dict[str, JobResult] = {
        r.job_id: r for r in client.results(list(expected), timeout=180)
    }
    got = {job_id: (r.error.code.value if r.error else "ok") for job_id, r in results.items()}
    assert got == expected, [(k, got[k], expected[k]) for k in expected if got[k] != expected[k]]
    for result in results.values():
        if result.error:
            assert result.error.message  # every refusal says why
            assert "blipq-local-secret" not in result.error.message
    assert not os.path.exists("/tmp/blipq-pickle-was-loaded")
    assert caption_worker.proc is not None and caption_worker.proc.poll() is None


@pytest.fixture(scope="module")
def locked_worker(s3_server: EmbeddedS3, tiny_caption_dir: Path) -> object:
    """A worker with wrong credentials and a bucket allow-list, on a Redis of its own."""
    redis_server = EmbeddedRedis().start()
    env = worker_env(redis_server, s3_server, {"tiny-caption": str(tiny_caption_dir)})
    env["BLIPQ_S3_SECRET_ACCESS_KEY"] = "wrong-secret"
    env["BLIPQ_S3_ALLOWED_BUCKETS"] = f"{BUCKET},other-bucket"
    worker = WorkerProcess(env, cwd=REPO).start()
    yield redis_server
    assert worker.stop() == 0
    redis_server.close()


def test_access_denied_and_bucket_allow_list(
    locked_worker: EmbeddedRedis,
    s3,  # type: ignore[no-untyped-def]
) -> None:
    s3.create_bucket(Bucket="not-allowed")
    s3.put_object(Bucket="not-allowed", Key="a.jpg", Body=OBJECTS["good.jpg"])
    with Client(redis_url=locked_worker.url) as client:
        denied, not_allowed = client.submit_many(
            [
                CaptionJob(image=f"s3://{BUCKET}/good.jpg", model="tiny-caption"),
                CaptionJob(image="s3://not-allowed/a.jpg", model="tiny-caption"),
            ]
        )
        first, second = client.result(denied, timeout=60), client.result(not_allowed, timeout=60)
    assert first.error is not None and first.error.code == "access_denied"
    assert "wrong-secret" not in json.dumps(first.model_dump(mode="json"))
    assert second.error is not None and second.error.code == "access_denied"
    assert "allowed" in second.error.message
