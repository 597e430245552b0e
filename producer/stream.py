"""Follow finished jobs on the results stream with a consumer group (at-least-once, resumable)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis

from producer.constants import RESULTS_STREAM
from producer.jobs import JobResult, decode_result


@dataclass(frozen=True, slots=True)
class StreamEvent:
    id: str
    result: JobResult


def follow(
    client: redis.Redis,
    *,
    group: str,
    consumer: str,
    from_start: bool = False,
    block_ms: int = 1000,
    count: int = 100,
    stream: str = RESULTS_STREAM,
    idle_stop: bool = False,
) -> Iterator[StreamEvent]:
    """Yield results as they are published; each is acknowledged when the next is asked for.

    A consumer that crashes mid-event gets that event again on restart (its pending entries are
    read first), so processing is at-least-once. ``idle_stop`` ends the iteration when a read
    finds nothing (for batch jobs and tests); otherwise it follows forever.
    """
    try:
        client.xgroup_create(stream, group, id="0" if from_start else "$", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    cursor = "0"  # first this consumer's own unacknowledged entries, then new ones
    while True:
        batch: Any = client.xreadgroup(
            group, consumer, {stream: cursor}, count=count, block=block_ms
        )
        entries = batch[0][1] if batch else []
        if not entries:
            if cursor == "0":
                cursor = ">"
                continue
            if idle_stop:
                return
            continue
        for entry_id, fields in entries:
            event_id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            yield StreamEvent(event_id, decode_result(json.loads(fields[b"result"])))
            client.xack(stream, group, event_id)
