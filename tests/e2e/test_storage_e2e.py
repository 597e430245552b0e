"""The worker's object reader against a real S3 server: presigned GETs and get_object agree.

Same bytes, same error codes, for awkward keys too; a store that is down is Retryable.
"""

from __future__ import annotations

import gzip
from typing import Any

import pytest

from producer.cli.embedded import EmbeddedS3, free_port
from producer.protocol.errors import JobFailure, Retryable
from producer.protocol.jobs import ErrorCode, ImageRef
from producer.protocol.s3 import make_s3_client
from worker.images import Limits
from worker.settings import Settings
from worker.storage import ObjectReader

BUCKET = "storage"
KEYS = ["plain.jpg", "dir/with space+plus.jpg", "ünïcode/ключ.jpg", "odd?&=#%.jpg"]
LIMITS = Limits(max_bytes=64 * 1024, max_pixels=10**8)


def _reader(s3_server: EmbeddedS3, *, direct: bool, **overrides: Any) -> ObjectReader:
    fields: dict[str, Any] = {
        "s3_endpoint_url": s3_server.endpoint_url,
        "s3_access_key_id": s3_server.access_key,
        "s3_secret_access_key": s3_server.secret_key,
        "s3_connect_timeout_s": 1,
        "s3_read_timeout_s": 2,
    }
    settings = Settings(**{**fields, **overrides})
    return ObjectReader(make_s3_client(settings), LIMITS, direct=direct)


@pytest.fixture(scope="module")
def objects(s3: Any) -> dict[str, bytes]:
    s3.create_bucket(Bucket=BUCKET)
    stored = {key: f"bytes of {key}".encode() * (i + 1) for i, key in enumerate(KEYS)}
    for key, data in stored.items():
        s3.put_object(Bucket=BUCKET, Key=key, Body=data)
    stored["zipped.bin"] = gzip.compress(b"x" * 1000)
    s3.put_object(
        Bucket=BUCKET, Key="zipped.bin", Body=stored["zipped.bin"], ContentEncoding="gzip"
    )
    s3.put_object(Bucket=BUCKET, Key="big.bin", Body=b"\0" * (LIMITS.max_bytes + 1))
    return stored


@pytest.mark.parametrize("direct", [True, False], ids=["presigned", "get_object"])
def test_reads_the_stored_bytes_of_every_key(
    s3_server: EmbeddedS3, objects: dict[str, bytes], direct: bool
) -> None:
    reader = _reader(s3_server, direct=direct)
    assert reader.direct is direct
    for key, data in objects.items():
        # Stored bytes as they are: a gzip Content-Encoding is not undone.
        assert reader.read(ImageRef(BUCKET, key)) == data, key


CASES = {
    "missing object": (ImageRef(BUCKET, "nope.jpg"), {}, ErrorCode.NOT_FOUND),
    "missing bucket": (ImageRef("no-such-bucket-here", "x.jpg"), {}, ErrorCode.NOT_FOUND),
    "over the byte limit": (ImageRef(BUCKET, "big.bin"), {}, ErrorCode.TOO_LARGE),
    "wrong secret": (
        ImageRef(BUCKET, "plain.jpg"),
        {"s3_secret_access_key": "not-the-secret"},
        ErrorCode.ACCESS_DENIED,
    ),
    "unknown key id": (
        ImageRef(BUCKET, "plain.jpg"),
        {"s3_access_key_id": "nobody"},
        ErrorCode.ACCESS_DENIED,
    ),
}


@pytest.mark.parametrize("direct", [True, False], ids=["presigned", "get_object"])
@pytest.mark.parametrize("case", list(CASES))
def test_failures_have_the_same_code_either_way(
    s3_server: EmbeddedS3, objects: dict[str, bytes], case: str, direct: bool
) -> None:
    ref, overrides, code = CASES[case]
    reader = _reader(s3_server, direct=direct, **overrides)
    with pytest.raises(JobFailure) as caught:
        reader.read(ref)
    assert not isinstance(caught.value, Retryable)
    assert caught.value.code == code, caught.value.message


def test_a_bucket_outside_the_allow_list_is_never_requested(s3_server: EmbeddedS3) -> None:
    reader = _reader(s3_server, direct=True)
    reader.allowed = ["somewhere-else"]
    with pytest.raises(JobFailure) as caught:
        reader.read(ImageRef(BUCKET, "plain.jpg"))
    assert caught.value.code == ErrorCode.ACCESS_DENIED


@pytest.mark.parametrize("direct", [True, False], ids=["presigned", "get_object"])
def test_a_store_that_is_down_is_retryable(direct: bool) -> None:
    settings = Settings(
        s3_endpoint_url=f"http://127.0.0.1:{free_port()}",  # nothing listens there
        s3_access_key_id="k",
        s3_secret_access_key="s",
        s3_connect_timeout_s=1,
    )
    reader = ObjectReader(make_s3_client(settings), LIMITS, direct=direct)
    with pytest.raises(Retryable, match="unavailable"):
        reader.read(ImageRef(BUCKET, "plain.jpg"))


def test_an_http_proxy_in_the_environment_means_get_object(
    s3_server: EmbeddedS3, objects: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("http_proxy", "http://proxy.invalid:3128")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert not _reader(s3_server, direct=True).direct
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    reader = _reader(s3_server, direct=True)
    assert reader.direct
    assert reader.read(ImageRef(BUCKET, "plain.jpg")) == objects["plain.jpg"]


def test_tls_trust_follows_boto3s(
    s3_server: EmbeddedS3, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    bundle = tmp_path / "private-ca.pem"
    bundle.write_text("")
    monkeypatch.setenv("AWS_CA_BUNDLE", str(bundle))
    reader = _reader(s3_server, direct=True)
    assert reader._http.connection_pool_kw["ca_certs"] == str(bundle)
    monkeypatch.delenv("AWS_CA_BUNDLE")
    settings = Settings(
        s3_endpoint_url="https://127.0.0.1:9", s3_access_key_id="k", s3_secret_access_key="s"
    )
    s3 = make_s3_client(settings)
    s3._endpoint.http_session._verify = False  # as boto3's verify=False leaves it
    insecure = ObjectReader(s3, LIMITS)
    assert insecure._http.connection_pool_kw["cert_reqs"] == "CERT_NONE"
