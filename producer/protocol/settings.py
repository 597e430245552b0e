"""Connection settings shared by producers and workers (env prefix ``BLIPQ_``)."""

from __future__ import annotations

import redis
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from producer.protocol.connect import is_sentinel, redis_client
from producer.protocol.keys import (
    DEFAULT_REDIS_URL,
    JOBS_PER_MESSAGE,
    MAX_JOBS_PER_MESSAGE,
    RESULT_EXPIRES_S,
    SUBMIT_CHUNK,
)


class ClientSettings(BaseSettings):
    """What a producer needs: where the broker and the results live."""

    model_config = SettingsConfigDict(env_prefix="BLIPQ_", extra="ignore", frozen=True)

    redis_url: str = Field(
        default=DEFAULT_REDIS_URL,
        description="Redis URL for results and events (and the broker unless broker_url is set). "
        "Use rediss:// for TLS and redis://:password@host for a password; "
        "sentinel://host:port;sentinel://host:port with redis_master_name for Redis Sentinel.",
    )
    redis_master_name: str | None = Field(
        default=None,
        min_length=1,
        description="The Sentinel master's name, for sentinel:// URLs (redis_url, broker_url).",
    )
    broker_url: str | None = Field(
        default=None, description="Broker URL if not the Redis above (e.g. amqp://host// )."
    )
    result_expires_s: int = Field(
        default=RESULT_EXPIRES_S, ge=60, description="Seconds a result is kept."
    )
    submit_chunk: int = Field(
        default=SUBMIT_CHUNK, ge=1, le=10_000, description="Jobs per round trip in submit_many."
    )
    jobs_per_message: int = Field(
        default=JOBS_PER_MESSAGE,
        ge=1,
        le=MAX_JOBS_PER_MESSAGE,
        description="Jobs per broker message in submit_many and bulk runs (chunk messages; "
        "1 = one message per job). Each job keeps its own id, result and event. Only once every "
        "worker understands chunks; see Performance.",
    )

    redis_down_s: float = Field(
        default=10.0,
        gt=0,
        description="Seconds Client.result/results wait on an unreachable Redis before raising "
        "RedisUnavailable (a restart shorter than this is ridden out; `blipq` exits 5).",
    )

    @model_validator(mode="after")
    def _sentinel_needs_a_master(self) -> ClientSettings:
        urls = (self.redis_url, self.broker_url or "")
        if any(is_sentinel(url) for url in urls) and not self.redis_master_name:
            raise ValueError(
                "a sentinel:// URL needs the name of the master the Sentinels watch: "
                "set BLIPQ_REDIS_MASTER_NAME (Sentinel's `sentinel monitor <name> ...`)"
            )
        return self

    def redis(self) -> redis.Redis:
        """A redis-py client of the results Redis (through Sentinel for sentinel:// URLs)."""
        return redis_client(self.redis_url, self.redis_master_name)

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or self.redis_url
