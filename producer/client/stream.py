"""Follow finished jobs on the results stream with a consumer group (at-least-once, resumable).

``StreamCursor`` is the reading logic both clients share: a consumer first reads back its own
unacknowledged entries (after a crash), then new ones. ``follow`` runs it on redis-py;
``AsyncClient.stream`` on ``redis.asyncio``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis

from producer.protocol.jobs import JobResult, decode_result
from producer.protocol.keys import RESULTS_STREAM, text


@dataclass(frozen=True, slots=True)
class StreamEvent:
    id: str
    result: JobResult


def start_id(from_start: bool) -> str:
    """Where a new consumer group starts: the stream's first entry, or what comes next."""
    return "0" if from_start else "$"


def group_exists(exc: redis.ResponseError) -> bool:
    """Whether XGROUP CREATE failed only because the group is there already."""
    return "BUSYGROUP" in str(exc)


@dataclass
class StreamCursor:
    """What one consumer reads next: ``"0"`` (its own pending entries) until they run out,
    then ``">"`` (entries never delivered to the group)."""

    idle_stop: bool = False
    position: str = "0"

    def events(self, batch: Any) -> list[StreamEvent] | None:
        """The events of one XREADGROUP reply; None when the follow ends (``idle_stop`` and a
        read of new entries found nothing)."""
        entries = batch[0][1] if batch else []
        if not entries:
            if self.position == "0":
                self.position = ">"
                return []
            return None if self.idle_stop else []
        return [
            StreamEvent(text(entry_id), decode_result(json.loads(fields[b"result"])))
            for entry_id, fields in entries
        ]


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
        client.xgroup_create(stream, group, id=start_id(from_start), mkstream=True)
    except redis.ResponseError as exc:
        if not group_exists(exc):
            raise
    cursor = StreamCursor(idle_stop)
    while True:
        batch: Any = client.xreadgroup(
            group, consumer, {stream: cursor.position}, count=count, block=block_ms
        )
        events = cursor.events(batch)
        if events is None:
            return
        for event in events:
            yield event
            client.xack(stream, group, event.id)
