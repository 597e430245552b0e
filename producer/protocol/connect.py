"""Redis clients from blipq's settings: a plain URL, or the master a set of Sentinels names.

Every redis-py client blipq makes (the Sender's, the engine's, the reaper's, the stream
follower's, bulk runs') is built here, so that a ``sentinel://`` URL works everywhere Celery's
own connections (kombu's broker transport, the result backend) take it. A Sentinel URL lists the
Sentinels as Celery does, ``sentinel://[:password@]host:port[/db];sentinel://host:port;...``;
the password and database of the first entry are the master's. The master's name comes from
``BLIPQ_REDIS_MASTER_NAME``. A client from ``master_for`` asks the Sentinels for the current
master on every new connection, so after a failover its next command reaches the new primary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse

import redis
import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.sentinel import Sentinel

SENTINEL_SCHEME = "sentinel://"

SENTINEL_SOCKET_TIMEOUT_S = 1.0
"""How long a question to one Sentinel may take before the next one is asked."""


def is_sentinel(url: str) -> bool:
    return url.startswith(SENTINEL_SCHEME)


@dataclass(frozen=True)
class SentinelURL:
    """The parts of a ``sentinel://`` URL: the Sentinels, and the master's password and db."""

    nodes: tuple[tuple[str, int], ...]
    password: str | None
    db: int

    @classmethod
    def parse(cls, url: str) -> SentinelURL:
        nodes = []
        password: str | None = None
        db = 0
        for index, part in enumerate(p for p in url.split(";") if p.strip()):
            parsed = urlparse(part.strip())
            if parsed.scheme != "sentinel" or not parsed.hostname:
                raise ValueError(f"not a sentinel://host:port URL: {part!r}")
            nodes.append((parsed.hostname, parsed.port or 26379))
            if index == 0:
                password = unquote(parsed.password) if parsed.password else None
                path = parsed.path.strip("/")
                db = int(path) if path else 0
        return cls(tuple(nodes), password, db)


def redis_client(url: str, master_name: str | None = None, **kwargs: Any) -> redis.Redis:
    """A redis-py client for ``url``: ``Redis.from_url``, or the Sentinels' master."""
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **kwargs)
    if not master_name:
        raise ValueError("a sentinel:// URL needs the master's name: set BLIPQ_REDIS_MASTER_NAME")
    parts = SentinelURL.parse(url)
    sentinel = Sentinel(list(parts.nodes), socket_timeout=SENTINEL_SOCKET_TIMEOUT_S)  # type: ignore[no-untyped-call]
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        master_name, db=parts.db, password=parts.password, **kwargs
    )
    return client


def async_redis_client(url: str, master_name: str | None = None, **kwargs: Any) -> aioredis.Redis:
    """The asyncio twin of ``redis_client``."""
    if not is_sentinel(url):
        return aioredis.Redis.from_url(url, **kwargs)
    if not master_name:
        raise ValueError("a sentinel:// URL needs the master's name: set BLIPQ_REDIS_MASTER_NAME")
    parts = SentinelURL.parse(url)
    sentinel = AsyncSentinel(list(parts.nodes), socket_timeout=SENTINEL_SOCKET_TIMEOUT_S)  # type: ignore[no-untyped-call]
    client: aioredis.Redis = sentinel.master_for(
        master_name, db=parts.db, password=parts.password, **kwargs
    )
    return client
