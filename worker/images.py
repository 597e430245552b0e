"""Fetch an image from S3 within limits and decode it to an RGB Pillow image.

Every failure becomes an ``ImageFailure`` with an error code, so a bad object fails its own job
and nothing else. Transient store failures (connection refused, 5xx, throttling) are
``Retryable``; the task layer retries those with backoff.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from PIL import Image, ImageOps, UnidentifiedImageError

from producer.errors import JobFailure, Retryable
from producer.jobs import ErrorCode, ImageRef

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from worker.settings import Settings

_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "NoSuchVersion", "404", "NotFound"}
_DENIED = {
    "AccessDenied",
    "403",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AllAccessDisabled",
    "Forbidden",
}


class ImageFailure(JobFailure):
    """A permanent failure to get a usable image; ``code`` says which kind."""


@dataclass(frozen=True, slots=True)
class Limits:
    max_bytes: int
    max_pixels: int


def make_s3_client(settings: Settings) -> S3Client:
    """A thread-safe boto3 S3 client; credentials from settings or the normal boto3 chain."""
    secret = settings.s3_secret_access_key
    config = Config(
        connect_timeout=settings.s3_connect_timeout_s,
        read_timeout=settings.s3_read_timeout_s,
        # Transient retries are ours (task layer, with backoff across the outage); botocore's
        # own standard-mode retries cover a blip within one request.
        retries={"max_attempts": 2, "mode": "standard"},
        max_pool_connections=max(10, settings.worker_concurrency),
        s3={"addressing_style": settings.s3_addressing_style},
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region or "us-east-1",
        aws_access_key_id=settings.s3_access_key_id,
        aws_secret_access_key=secret.get_secret_value() if secret else None,
        config=config,
    )


def fetch(s3: S3Client, ref: ImageRef, limits: Limits, allowed: list[str] | None) -> bytes:
    """GET the object's bytes, refusing objects over the byte limit before reading them."""
    if allowed is not None and ref.bucket not in allowed:
        raise ImageFailure(
            f"bucket {ref.bucket!r} is not in the allowed buckets", code=ErrorCode.ACCESS_DENIED
        )
    kwargs: dict[str, Any] = {"Bucket": ref.bucket, "Key": ref.key}
    if ref.version_id:
        kwargs["VersionId"] = ref.version_id
    try:
        response = s3.get_object(**kwargs)
        length = int(response.get("ContentLength") or 0)
        body = response["Body"]
        if length > limits.max_bytes:
            body.close()
            raise ImageFailure(
                f"{ref.uri} is {length} bytes; the limit is {limits.max_bytes}",
                code=ErrorCode.TOO_LARGE,
            )
        data: bytes = body.read(limits.max_bytes + 1)
        body.close()
    except ClientError as exc:
        raise _classify(exc, ref) from exc
    except BotoCoreError as exc:  # connection refused, timeouts, ...
        raise Retryable(f"object store unavailable reading {ref.uri}: {exc}") from exc
    if len(data) > limits.max_bytes:
        raise ImageFailure(
            f"{ref.uri} exceeds the {limits.max_bytes}-byte limit", code=ErrorCode.TOO_LARGE
        )
    return data


def _classify(exc: ClientError, ref: ImageRef) -> JobFailure:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    if code in _NOT_FOUND or status == 404:
        what = "bucket" if code == "NoSuchBucket" else "object"
        return ImageFailure(f"{what} not found: {ref.uri}", code=ErrorCode.NOT_FOUND)
    if code in _DENIED or status == 403:
        return ImageFailure(f"access denied to {ref.uri} ({code})", code=ErrorCode.ACCESS_DENIED)
    if status >= 500 or code in {"SlowDown", "RequestTimeout", "ServiceUnavailable"}:
        return Retryable(f"object store error {code or status} reading {ref.uri}")
    return ImageFailure(f"cannot read {ref.uri}: {code} {status}", code=ErrorCode.INVALID_IMAGE)


MIN_DRAFT_SIDE = 512
"""Never draft below this: smaller JPEGs decode in a few milliseconds anyway, and tiny models
(32-96 px inputs) then see exactly the pixels a full decode gives."""


def decode(data: bytes, limits: Limits, draft_side: int | None = None) -> Image.Image:
    """Decode bytes to an RGB image: EXIF orientation applied, first frame, alpha on white.

    ``draft_side``: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, far
    cheaper than a full decode) as long as both sides stay at least this long. The worker asks
    for twice the model's input side (at least ``MIN_DRAFT_SIDE``), so the resize to the input
    still averages over 2+ pixels.
    """
    if not data:
        raise ImageFailure("the object is empty (0 bytes)", code=ErrorCode.INVALID_IMAGE)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > limits.max_pixels:
                raise ImageFailure(
                    f"image is {width}x{height} pixels; the limit is {limits.max_pixels}",
                    code=ErrorCode.TOO_LARGE,
                )
            image.seek(0)
            if draft_side and image.format == "JPEG":
                image.draft(None, (draft_side, draft_side))
            image.load()
    except ImageFailure:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageFailure(f"decompression bomb refused: {exc}", code=ErrorCode.TOO_LARGE) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageFailure(f"not a decodable image: {exc}", code=ErrorCode.INVALID_IMAGE) from exc
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright RGB: EXIF rotation, palette/greyscale/CMYK/16-bit converted, alpha over white."""
    ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of an upright image
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in {"RGBA", "LA", "PA"}:
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    if image.mode in {"I;16", "I;16B", "I;16L", "I"}:
        # 16-bit greyscale: scale to 8 bits rather than clip.
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB") if image.mode != "RGB" else image
