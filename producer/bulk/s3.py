"""Listing the images under an S3 prefix (``producer.protocol.s3``: the worker's settings)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

from producer.bulk.errors import BulkError
from producer.protocol.s3 import S3Settings, make_s3_client

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


def split_prefix(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` -> (bucket, ``some/prefix/``); the prefix may be empty."""
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise BulkError(f"expected s3://bucket/prefix/, got {uri!r:.80}")
    return parts.netloc, parts.path.lstrip("/")


def list_prefix(s3: S3Client, uri: str, suffixes: Sequence[str] = ()) -> list[str]:
    """Image URIs of the objects under a prefix (sorted by key; folder markers skipped)."""
    bucket, prefix = split_prefix(uri)
    wanted = tuple(s.lower() for s in suffixes)
    uris: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if key.endswith("/") or (wanted and not key.lower().endswith(wanted)):
                continue
            uris.append(f"s3://{bucket}/{quote(key, safe='/')}")
    return uris


__all__ = ["S3Settings", "list_prefix", "make_s3_client", "split_prefix"]
