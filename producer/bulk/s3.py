"""Listing the images under an S3 prefix (the same ``BLIPQ_S3_*`` settings the worker reads)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal
from urllib.parse import quote, urlsplit

import boto3
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from producer.bulk.errors import BulkError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


class S3Settings(BaseSettings):
    """The object store a producer lists: the same ``BLIPQ_S3_*`` variables the worker reads."""

    model_config = SettingsConfigDict(env_prefix="BLIPQ_S3_", extra="ignore", frozen=True)

    endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint; unset = AWS."
    )
    region: str | None = Field(default=None, description="S3 region name.")
    access_key_id: str | None = Field(default=None, description="Else the boto3 credential chain.")
    secret_access_key: SecretStr | None = None
    addressing_style: Literal["auto", "path", "virtual"] = "path"


def make_s3_client(settings: S3Settings | None = None) -> S3Client:
    from botocore.config import Config

    settings = settings or S3Settings()
    secret = settings.secret_access_key
    return boto3.session.Session().client(
        "s3",
        endpoint_url=settings.endpoint_url,
        region_name=settings.region or "us-east-1",
        aws_access_key_id=settings.access_key_id,
        aws_secret_access_key=secret.get_secret_value() if secret else None,
        config=Config(s3={"addressing_style": settings.addressing_style}),
    )


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
