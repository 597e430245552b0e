"""Patches to dependencies, in one place, applied explicitly at start (``apply()``).

Changes to kombu's Redis transport (the first two below; unreadable envelopes and bounded
decompression are described beside their code):

1. After a lost broker connection. When Redis goes away, Celery's consumer collects the
connection, which detaches the transport (``transport.client = None``), then closes it. Anything
that later touches a channel of that old connection — closing it a second time, acking a message
a task finished after the reconnect — builds a new connection pool from ``transport.client`` and
dies with ``AttributeError: 'NoneType' object has no attribute 'hostname'`` (kombu issue #582).
Celery treats that as unrecoverable and the worker shuts down. Measured: 3 of 12 Redis restarts
under load ended the worker this way. Raising redis' ConnectionError instead makes it the error
every caller already handles: a failed close is ignored, a failed ack is logged, and the unacked
message comes back after the visibility timeout (the job's stored result makes the rerun a no-op).

2. One Redis client per channel. kombu builds a new ``redis.Redis`` for every acknowledgement and
every delivery it records as unacknowledged (``Channel.conn_or_acquire``), two per job, on the
same connection pool each time; redis-py's constructor fills a table of a few hundred response
callbacks. That was 5.8 % of the worker's GIL time under a burst of null-model jobs (py-spy
``--gil``). The channel now keeps one client (thread-safe: each command takes a pool connection)
and drops it with its pools, so a channel whose connection is gone still goes through fix 1.
"""

from __future__ import annotations

import base64
import json
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from kombu.transport import redis as kombu_redis

_Channel: Any = kombu_redis.Channel
_transport: Any = kombu_redis
_CLIENT = "_blipq_client"
_originals: dict[str, Any] = {}
"""kombu's own methods, kept by ``apply`` before it replaces them."""


def _connparams(self: Any, asynchronous: bool = False) -> Any:
    if self.connection is None or self.connection.client is None:
        raise redis.ConnectionError("this channel's broker connection is closed")
    return _originals["_connparams"](self, asynchronous)


@contextmanager
def _conn_or_acquire(self: Any, client: Any = None) -> Iterator[Any]:
    if client:
        yield client
        return
    cached = self.__dict__.get(_CLIENT)
    if cached is None:
        cached = self.__dict__[_CLIENT] = self._create_client()
    yield cached


def _disconnect_pools(self: Any) -> None:
    self.__dict__.pop(_CLIENT, None)  # built on the pool that goes now
    _originals["_disconnect_pools"](self)


def _patch(name: str, wrapper: Any) -> None:
    current = getattr(_Channel, name)
    if getattr(current, "_blipq_fix", False):
        return  # applied already: never wrap a wrapper
    _originals[name] = current
    wrapper._blipq_fix = True
    setattr(_Channel, name, wrapper)


def apply() -> None:
    """Apply every patch (idempotent): before the worker's first broker connection."""
    if not getattr(_Channel.Message, "_blipq_fix", False):
        _Channel.Message = _readable_message(_Channel.Message)
    if not getattr(_transport.loads, "_blipq_fix", False):
        _transport.loads = _safe_loads
    _patch("_connparams", _connparams)
    _patch("conn_or_acquire", _conn_or_acquire)
    _patch("_disconnect_pools", _disconnect_pools)


# --- unreadable envelopes -----------------------------------------------------------------------
# kombu's Redis transport builds a Message from the JSON envelope it pops off a queue, inside the
# consumer's event loop: an envelope that is not JSON, not an object, without properties, or with
# headers that are not an object raises there, and Celery ends the worker ("Unrecoverable error").
# Such an envelope becomes a placeholder message instead: no headers, a body describing what
# arrived (capped), and the error it raised, which Celery hands to the consumer's decode-error
# hook (``worker.celery.refused``): recorded on blipq:dead and acknowledged.

_UNREADABLE_PREFIX = 200


def _placeholder(payload: object) -> dict[str, Any]:
    headers = payload.get("headers") if isinstance(payload, dict) else None
    kept = isinstance(payload, dict) and _OVERSIZE in payload and isinstance(headers, dict)
    props = payload.get("properties") if isinstance(payload, dict) else None
    props = props if isinstance(props, dict) else {}
    tag = props.get("delivery_tag")
    info = props.get("delivery_info")
    info = info if isinstance(info, dict) else {}
    described = repr(_shown(payload))[:_UNREADABLE_PREFIX].encode()
    return {
        "body": base64.b64encode(described).decode(),
        "content-type": "application/json",
        "content-encoding": "utf-8",
        # An oversized message keeps the few headers that name its jobs, so they are answered.
        "headers": headers if kept else {},
        "properties": {
            "delivery_tag": tag if isinstance(tag, str) and tag else str(uuid.uuid4()),
            "body_encoding": "base64",
            "delivery_info": {
                "exchange": str(info.get("exchange", "")),
                "routing_key": str(info.get("routing_key", "")),
            },
        },
    }


def _shown(payload: object) -> object:
    """What a dead-letter record shows of an unreadable envelope: its headers and the start of
    its decoded body when it has them, else the envelope itself."""
    body = payload.get("body") if isinstance(payload, dict) else None
    if isinstance(payload, dict) and isinstance(body, str):
        try:
            return {"headers": payload.get("headers"), "body": base64.b64decode(body)[:150]}
        except ValueError:
            pass
    return payload


def _readable_message(base: Any) -> Any:
    class ReadableMessage(base):  # type: ignore[misc,valid-type]
        _blipq_fix = True

        def __init__(self, payload: Any, channel: Any = None, **kwargs: Any) -> None:
            try:
                if isinstance(payload, dict) and _OVERSIZE in payload:
                    raise MessageTooLarge(
                        f"the message is {payload[_OVERSIZE]} bytes on the wire, over "
                        f"BLIPQ_MAX_MESSAGE_BYTES ({_limit['max_bytes']} bytes of body)"
                    )
                super().__init__(payload, channel=channel, **kwargs)
            except Exception:
                error = sys.exc_info()
                super().__init__(_placeholder(payload), channel=channel, **kwargs)
                self.errors.append(error)

    return ReadableMessage


_OVERSIZE = "blipq_oversize"
_WIRE_OVERHEAD = 2**20  # an envelope's own fields, beside its base64 body
_NAMING_HEADERS = ("task", "id", "blipq_jobs")


def _safe_loads(raw: Any, *args: Any, **kwargs: Any) -> Any:
    # base64 carries 3 bytes of body in 4 characters
    if len(raw) > _limit["max_bytes"] * 4 // 3 + _WIRE_OVERHEAD:
        return _oversized(raw)
    try:
        return _json_loads(raw, *args, **kwargs)
    except ValueError:
        return {"blipq_unreadable": str(raw)[:_UNREADABLE_PREFIX]}


def _oversized(raw: str | bytes) -> dict[str, Any]:
    """An envelope too large to parse whole: only its headers and properties are read (kombu
    writes them after the body), so the jobs it names can be answered; the body is never
    decoded."""
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    found: dict[str, Any] = {_OVERSIZE: len(raw)}
    decoder = json.JSONDecoder()
    for field in ("headers", "properties"):
        at = text.rfind(f'"{field}": {{', len(text) - _WIRE_OVERHEAD)
        if at < 0:
            continue
        try:
            value, _ = decoder.raw_decode(text, at + len(field) + 4)
        except ValueError:
            continue
        if isinstance(value, dict):
            found[field] = value
    headers = found.get("headers")
    if isinstance(headers, dict):
        found["headers"] = {k: headers[k] for k in _NAMING_HEADERS if k in headers}
    return found


_safe_loads._blipq_fix = True  # type: ignore[attr-defined]
_json_loads = _transport.loads


# --- bounded decompression ----------------------------------------------------------------------
# kombu inflates a message whose ``compression`` header names a codec as it builds the Message,
# before Celery sees it, with no bound: a few KiB of zlib can inflate to gigabytes. Every decoder
# kombu has is replaced by one that stops at ``max_bytes`` (zlib, gzip, bzip2, lzma/xz) or, for
# codecs without a bounded streaming decoder here (brotli, zstd), refuses outright; blipq's own
# producers never compress. The error lands in the Message's errors, and the worker answers the
# message's jobs with ``invalid_job`` (``worker.celery.refused``).


class MessageTooLarge(ValueError):
    """A compressed message body inflates beyond the configured limit."""


_limit = {"max_bytes": 16 * 2**20}


def _bounded(make: Any) -> Any:
    def decode(body: bytes) -> bytes:
        limit = _limit["max_bytes"]
        decompressor = make()
        out = decompressor.decompress(body, limit + 1)
        if len(out) > limit:  # asked for one byte more than the limit, and got it
            raise MessageTooLarge(f"the message body inflates beyond {limit} bytes")
        return bytes(out)

    return decode


def _refuse_codec(name: str) -> Any:
    def decode(body: bytes) -> bytes:
        raise MessageTooLarge(f"compression {name!r} is not accepted (no bounded decoder)")

    return decode


def limit_decompression(max_bytes: int) -> None:
    """Bound every compression codec kombu knows to ``max_bytes`` of output (idempotent)."""
    import bz2
    import lzma
    import zlib

    from kombu import compression

    _limit["max_bytes"] = max_bytes
    bounded = {
        "application/x-gzip": _bounded(lambda: zlib.decompressobj(zlib.MAX_WBITS | 32)),
        "application/x-bz2": _bounded(bz2.BZ2Decompressor),
        "application/x-lzma": _bounded(lzma.LZMADecompressor),
    }
    decoders: dict[str, Any] = vars(compression)["_decoders"]
    for content_type in list(decoders):
        decoders[content_type] = bounded.get(content_type) or _refuse_codec(content_type)
