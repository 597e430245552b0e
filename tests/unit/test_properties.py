"""Property-based: random payloads and random bytes never crash validation or decoding."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producer.protocol.errors import InvalidJob
from producer.protocol.jobs import ErrorCode, decode_job
from worker.images import ImageFailure, Limits, decode

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
job_like = st.fixed_dictionaries(
    {},
    optional={
        "kind": st.sampled_from(["caption", "vqa", "match", "moderate", "paint", ""]),
        "image": st.one_of(st.text(max_size=60), st.just("s3://bucket-a/key.jpg")),
        "model": st.text(max_size=20),
        "prompt": st.one_of(st.none(), st.text(max_size=30)),
        "question": st.text(max_size=30),
        "texts": st.lists(st.text(max_size=10), max_size=3),
        "max_new_tokens": st.integers(-5, 600),
        "extra": json_values,
    },
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(json_values, job_like))
def test_any_payload_validates_or_fails_with_invalid_job(payload: object) -> None:
    try:
        job = decode_job(payload)
    except InvalidJob as exc:
        assert exc.code == ErrorCode.INVALID_JOB and exc.message
        assert exc.raw is payload
    else:
        assert job.kind in {"caption", "vqa", "match", "moderate"}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000))
def test_any_bytes_decode_or_fail_with_a_code(data: bytes) -> None:
    limits = Limits(max_bytes=10_000, max_pixels=1_000_000)
    try:
        image = decode(data, limits)
    except ImageFailure as exc:
        assert exc.code in {ErrorCode.INVALID_IMAGE, ErrorCode.TOO_LARGE} and exc.message
    else:
        assert image.mode == "RGB"


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=200), st.integers(8, 600))
def test_corrupted_real_images_fail_with_a_code(noise: bytes, cut: int) -> None:
    from tests.fixtures.images import encode, make_image

    data = bytearray(encode(make_image(cut), quality=80))
    data[cut : cut + len(noise)] = noise
    try:
        decode(bytes(data), Limits(max_bytes=10_000_000, max_pixels=10_000_000))
    except ImageFailure as exc:
        assert exc.code in {ErrorCode.INVALID_IMAGE, ErrorCode.TOO_LARGE}
