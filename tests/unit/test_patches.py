"""worker.celery.patches: kombu's Redis channel after a lost connection, one client a channel."""

from __future__ import annotations

import pytest
import redis
from kombu.transport import redis as kombu_redis

from worker.celery import patches

patches.apply()


class _DetachedTransport:
    client = None  # what kombu's Connection._do_close_transport leaves behind


def test_a_detached_channel_raises_the_error_celery_recovers_from() -> None:
    channel = object.__new__(kombu_redis.Channel)
    channel.connection = _DetachedTransport()
    with pytest.raises(redis.ConnectionError, match="closed"):
        channel._connparams()


def test_the_fix_is_applied_once() -> None:
    patched = kombu_redis.Channel._connparams
    patches.apply()  # a second apply must not wrap the wrapper
    assert kombu_redis.Channel._connparams is patched
    # ... nor make the wrapper call itself: it still calls kombu's own method.
    assert patches._originals["_connparams"] is not patched
    assert not getattr(patches._originals["_connparams"], "_blipq_fix", False)


def test_a_channel_keeps_one_client_until_its_pools_go() -> None:
    channel = object.__new__(kombu_redis.Channel)
    channel._sentinel_manager = channel._async_sentinel_manager = None
    built: list[object] = []

    def create_client(asynchronous: bool = False) -> object:
        built.append(object())
        return built[-1]

    channel._create_client = create_client  # type: ignore[method-assign]
    given = object()
    with channel.conn_or_acquire(given) as client:
        assert client is given  # a caller's own client is used as it is
    for _ in range(3):  # an acknowledgement, a delivery recorded, ...
        with channel.conn_or_acquire() as client:
            assert client is built[0]
    channel._disconnect_pools()  # the connection went: so does the client built on its pool
    with channel.conn_or_acquire() as client:
        assert client is built[1]
    assert len(built) == 2


def test_every_fix_is_applied_once() -> None:
    patched = {
        name: getattr(kombu_redis.Channel, name)
        for name in ("_connparams", "conn_or_acquire", "_disconnect_pools")
    }
    patches.apply()
    for name, method in patched.items():
        assert getattr(kombu_redis.Channel, name) is method
        assert not getattr(patches._originals[name], "_blipq_fix", False)
