"""The object store both sides reach: one settings object (``BLIPQ_S3_*``) and one way to build
a boto3 client from it. The worker reads images with it; ``blipq bulk`` lists prefixes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import boto3
from botocore.config import Config
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


class S3Settings(BaseSettings):
    """Where the images live and how to reach them: ``BLIPQ_S3_*`` environment variables.

    The worker's ``Settings`` include these fields, so producers and workers read one set."""

    model_config = SettingsConfigDict(env_prefix="BLIPQ_", extra="ignore", frozen=True)

    s3_endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint; unset = AWS."
    )
    s3_region: str | None = Field(default=None, description="S3 region name.")
    s3_access_key_id: str | None = Field(
        default=None, description="Else the normal boto3 credential chain."
    )
    s3_secret_access_key: SecretStr | None = Field(
        default=None, description="Secret for s3_access_key_id (never logged or returned)."
    )
    s3_addressing_style: Literal["auto", "path", "virtual"] = Field(
        default="path", description="path suits MinIO/SeaweedFS/Ceph; virtual suits AWS."
    )
    s3_connect_timeout_s: float = Field(
        default=5.0, gt=0, description="Seconds to connect to the object store."
    )
    s3_read_timeout_s: float = Field(
        default=20.0, gt=0, description="Seconds without data before a GET is abandoned."
    )


def make_s3_client(settings: S3Settings | None = None, *, max_pool: int = 10) -> S3Client:
    """A thread-safe boto3 S3 client; credentials from settings or the normal boto3 chain.

    Transient retries across an outage are the caller's (the worker retries with backoff);
    botocore's standard mode covers a blip within one request.
    """
    settings = settings or S3Settings()
    secret = settings.s3_secret_access_key
    config = Config(
        connect_timeout=settings.s3_connect_timeout_s,
        read_timeout=settings.s3_read_timeout_s,
        retries={"max_attempts": 2, "mode": "standard"},
        max_pool_connections=max(10, max_pool),
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
