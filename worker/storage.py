"""GET images from S3-compatible storage within limits; every failure gets an error code.

Permanent failures (no such object or bucket, access denied, too large) are ``ImageFailure``
with a code, so a bad object fails its own job and nothing else. Transient ones (connection
refused, timeouts, 5xx, throttling) are ``Retryable``; the task layer retries those with backoff.

The object is read over a URL that boto3 presigns (its credentials, endpoint, region and
addressing), with urllib3 doing the GET. boto3's own ``get_object`` spends 1.3-1.5 ms of
Python per call in event hooks, parameter and response handling; presigning plus urllib3 take
0.5 ms, and a GPU worker's Python is what bounds its images/s (benchmarks/throughput.py
``--null-model``). Where an HTTP proxy applies to the endpoint, or ``BLIPQ_S3_DIRECT_GET`` is
false, ``get_object`` is used instead.
"""

from __future__ import annotations

import logging
import os
import re
import urllib.request
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import urllib3
from botocore.exceptions import BotoCoreError, ClientError
from botocore.httpsession import get_cert_path

from producer.protocol.errors import JobFailure, Retryable
from producer.protocol.jobs import ErrorCode, ImageRef
from producer.protocol.s3 import make_s3_client
from worker.images import ImageFailure, Limits

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from worker.settings import Settings

log = logging.getLogger(__name__)

_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "NoSuchVersion", "404", "NotFound"}
_DENIED = {
    "AccessDenied",
    "403",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AllAccessDisabled",
    "Forbidden",
}
_TRANSIENT = {"SlowDown", "RequestTimeout", "ServiceUnavailable", "InternalError"}
_ERROR_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")
_PRESIGN_EXPIRES_S = 300  # used at once; long enough for any clock skew


class ObjectReader:
    """Reads whole objects for the worker's threads (thread-safe)."""

    def __init__(
        self,
        s3: S3Client,
        limits: Limits,
        *,
        allowed_buckets: list[str] | None = None,
        direct: bool = True,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 20.0,
        pool_size: int = 10,
    ) -> None:
        self.s3 = s3
        self.limits = limits
        self.allowed = allowed_buckets
        self.direct = direct and not _proxied(s3.meta.endpoint_url)
        if direct and not self.direct:
            log.info("an HTTP proxy applies to %s: reading with get_object", s3.meta.endpoint_url)
        # One retry of a connection error or a 5xx, as botocore's standard mode would;
        # longer outages are the task layer's (Retryable, with backoff).
        retries = urllib3.Retry(
            total=1,
            status_forcelist=(500, 502, 503, 504),
            backoff_factor=0.05,
            raise_on_status=False,
            respect_retry_after_header=False,  # a throttled GET is the task layer's to pace
        )
        self._http = urllib3.PoolManager(
            maxsize=pool_size,
            timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s),
            retries=retries,
            **_trust(s3),
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> ObjectReader:
        return cls(
            make_s3_client(settings, max_pool=settings.worker_concurrency),
            Limits(settings.max_image_bytes, settings.max_image_pixels),
            allowed_buckets=settings.s3_allowed_buckets,
            direct=settings.s3_direct_get,
            connect_timeout_s=settings.s3_connect_timeout_s,
            read_timeout_s=settings.s3_read_timeout_s,
            pool_size=max(10, settings.worker_concurrency),
        )

    def read(self, ref: ImageRef) -> bytes:
        """The object's bytes, refusing objects over the byte limit before reading them."""
        if self.allowed is not None and ref.bucket not in self.allowed:
            raise ImageFailure(
                f"bucket {ref.bucket!r} is not in the allowed buckets",
                code=ErrorCode.ACCESS_DENIED,
            )
        data = self._read_direct(ref) if self.direct else self._read_boto3(ref)
        if len(data) > self.limits.max_bytes:
            raise ImageFailure(
                f"{ref.uri} exceeds the {self.limits.max_bytes}-byte limit",
                code=ErrorCode.TOO_LARGE,
            )
        return data

    def _params(self, ref: ImageRef) -> dict[str, Any]:
        params: dict[str, Any] = {"Bucket": ref.bucket, "Key": ref.key}
        if ref.version_id:
            params["VersionId"] = ref.version_id
        return params

    def _read_direct(self, ref: ImageRef) -> bytes:
        try:
            url = self.s3.generate_presigned_url(
                "get_object", Params=self._params(ref), ExpiresIn=_PRESIGN_EXPIRES_S
            )
        except BotoCoreError as exc:  # no credentials, a bad endpoint
            raise Retryable(f"cannot sign a GET of {ref.uri}: {exc}") from exc
        try:
            # decode_content=False: the stored bytes, as get_object returns them.
            response = self._http.request("GET", url, preload_content=False, decode_content=False)
            try:
                if response.status != 200:
                    raise _classify(_error_code(response.read(4096)), response.status, ref)
                self._check_length(response.headers.get("Content-Length"), ref)
                data: bytes = response.read(self.limits.max_bytes + 1)
            finally:
                response.release_conn()
        except urllib3.exceptions.HTTPError as exc:  # refused, reset, timed out
            raise Retryable(f"object store unavailable reading {ref.uri}: {exc}") from exc
        return data

    def _read_boto3(self, ref: ImageRef) -> bytes:
        try:
            response = self.s3.get_object(**self._params(ref))
            body = response["Body"]
            try:
                self._check_length(response.get("ContentLength"), ref)
                data: bytes = body.read(self.limits.max_bytes + 1)
            finally:
                body.close()
        except ClientError as exc:
            error = exc.response.get("Error", {})
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            raise _classify(str(error.get("Code", "")), status, ref) from exc
        except BotoCoreError as exc:  # connection refused, timeouts, ...
            raise Retryable(f"object store unavailable reading {ref.uri}: {exc}") from exc
        return data

    def _check_length(self, length: object, ref: ImageRef) -> None:
        size = int(str(length)) if str(length or "").isdigit() else 0
        if size > self.limits.max_bytes:
            raise ImageFailure(
                f"{ref.uri} is {size} bytes; the limit is {self.limits.max_bytes}",
                code=ErrorCode.TOO_LARGE,
            )


def _error_code(body: bytes) -> str:
    """The <Code> of an S3 XML error body ('' when there is none, e.g. after a HEAD)."""
    match = _ERROR_CODE.search(body)
    return match.group(1).decode(errors="replace") if match else ""


def _classify(code: str, status: int, ref: ImageRef) -> JobFailure:
    if code in _NOT_FOUND or status == 404:
        what = "bucket" if code == "NoSuchBucket" else "object"
        return ImageFailure(f"{what} not found: {ref.uri}", code=ErrorCode.NOT_FOUND)
    if code in _DENIED or status == 403:
        return ImageFailure(f"access denied to {ref.uri} ({code})", code=ErrorCode.ACCESS_DENIED)
    if status >= 500 or status == 429 or code in _TRANSIENT:
        return Retryable(f"object store error {code or status} reading {ref.uri}")
    return ImageFailure(f"cannot read {ref.uri}: {code} {status}", code=ErrorCode.INVALID_IMAGE)


def _trust(s3: S3Client) -> dict[str, Any]:
    """TLS verification as boto3 does it for this client (``AWS_CA_BUNDLE``, ``ca_bundle`` in
    the AWS config, ``verify=``), so a private CA trusted for get_object is trusted here too."""
    session = getattr(getattr(s3, "_endpoint", None), "http_session", None)
    verify = getattr(session, "_verify", True)  # botocore keeps no public handle on it
    if verify is False:
        return {"cert_reqs": "CERT_NONE"}
    path = str(get_cert_path(verify))
    return {"ca_cert_dir": path} if os.path.isdir(path) else {"ca_certs": path}


def _proxied(endpoint_url: str) -> bool:
    """Whether the environment routes requests to this endpoint through an HTTP proxy."""
    parts = urlsplit(endpoint_url)
    proxies = urllib.request.getproxies()
    if parts.scheme not in proxies:
        return False
    return not urllib.request.proxy_bypass(parts.hostname or "")
