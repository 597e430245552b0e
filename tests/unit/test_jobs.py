from __future__ import annotations

import pytest
from pydantic import ValidationError

from producer import CaptionJob, ErrorCode, InvalidJob, JobResult, parse_image_uri
from producer.protocol.jobs import (
    CaptionOutput,
    Timings,
    decode_job,
    decode_result,
    encode_job,
    encode_result,
)


def test_caption_job_defaults_and_round_trip() -> None:
    job = CaptionJob(image="s3://catalog/sku-1.jpg")
    payload = encode_job(job)
    assert payload["kind"] == "caption"
    assert payload["model"] == "caption-base"
    assert payload["prompt"] is None
    assert decode_job(payload) == job


def test_conditional_caption_job() -> None:
    job = CaptionJob(image="s3://b-1/k.png", prompt="a photography of", max_new_tokens=20)
    assert job.prompt == "a photography of"
    assert job.image_ref.bucket == "b-1"


@pytest.mark.parametrize(
    "fields",
    [
        {"image": "http://example.com/x.jpg"},
        {"image": "s3://bucket/"},
        {"image": "s3://bucket"},
        {"image": "s3:///key.jpg"},
        {"image": "s3://UPPER/key.jpg"},
        {"image": "s3://bucket/k.jpg?x=1"},
        {"image": "s3://bucket/k.jpg", "max_new_tokens": -1},
        {"image": "s3://bucket/k.jpg", "max_new_tokens": 0},
        {"image": "s3://bucket/k.jpg", "min_new_tokens": 9, "max_new_tokens": 5},
        {"image": "s3://bucket/k.jpg", "num_beams": 0},
        {"image": "s3://bucket/k.jpg", "colour": "red"},
        {"image": "s3://bucket/k.jpg", "prompt": "x" * 501},
        {"image": "s3://bucket/k.jpg", "model": ""},
    ],
)
def test_invalid_jobs_are_refused_before_sending(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        CaptionJob(**fields)  # type: ignore[arg-type]


def test_jobs_are_frozen() -> None:
    job = CaptionJob(image="s3://bucket/k.jpg")
    with pytest.raises(ValidationError):
        job.prompt = "x"  # type: ignore[misc]


def test_empty_prompt_means_unconditional() -> None:
    assert CaptionJob(image="s3://bucket/k.jpg", prompt="  ").prompt is None


@pytest.mark.parametrize(
    "payload",
    [
        None,
        "text",
        [],
        {},
        {"kind": "caption"},
        {"kind": "paint", "image": "s3://bkt/k"},
        {"kind": "caption", "image": "s3://bkt/k", "extra": 1},
    ],
)
def test_decode_job_keeps_the_raw_payload(payload: object) -> None:
    with pytest.raises(InvalidJob) as info:
        decode_job(payload)
    assert info.value.code == ErrorCode.INVALID_JOB
    assert info.value.raw is payload
    assert info.value.message


def test_parse_image_uri_with_version() -> None:
    ref = parse_image_uri("s3://my.bucket/dir/a%20b.jpg?versionId=v9")
    assert (ref.bucket, ref.key, ref.version_id) == ("my.bucket", "dir/a b.jpg", "v9")
    assert ref.uri == "s3://my.bucket/dir/a b.jpg?versionId=v9"


@pytest.mark.parametrize(
    "uri",
    [
        "s3://allowed/../other/secret.jpg",
        "s3://allowed/a/../../other/secret.jpg",
        "s3://allowed/./a.jpg",
        "s3://allowed/a/%2e%2e/b.jpg",  # percent-encoded: refused after decoding
        "s3://allowed/a/..",
    ],
)
def test_keys_with_dot_segments_are_refused(uri: str) -> None:
    with pytest.raises(ValueError, match="path segment"):
        parse_image_uri(uri)
    with pytest.raises(InvalidJob) as info:  # the worker's read path: an invalid_job answer
        decode_job({"kind": "caption", "image": uri})
    assert info.value.code == ErrorCode.INVALID_JOB


@pytest.mark.parametrize(
    "uri", ["s3://bkt/a..b.jpg", "s3://bkt/.hidden/x.jpg", "s3://bkt/x/...jpg"]
)
def test_dots_inside_a_segment_are_ordinary_keys(uri: str) -> None:
    assert parse_image_uri(uri).key == uri.removeprefix("s3://bkt/")


def test_result_round_trip() -> None:
    result = JobResult(
        job_id="j1",
        kind="caption",
        status="ok",
        output=CaptionOutput(
            caption="a photography of a cat", continuation="a cat", prompt="a photography of"
        ),
        model="caption-base",
        timings=Timings(queue_wait_ms=1.5, fetch_ms=2, inference_ms=30, total_ms=40),
        batch_size=8,
    )
    assert decode_result(encode_result(result)) == result
    failure = JobResult.failure("j2", "caption", ErrorCode.NOT_FOUND, "object not found")
    back = decode_result(encode_result(failure))
    assert not back.ok
    assert back.error is not None and back.error.code is ErrorCode.NOT_FOUND
