"""Follow finished jobs on the results stream with a consumer group (at-least-once, resumable).

``StreamCursor`` is the reading logic both clients share: a consumer first reads back its own
unacknowledged entries (after a crash), then new ones. ``follow`` runs it on redis-py;
``AsyncClient.stream`` on ``redis.asyncio``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis

from producer.protocol.jobs import JobResult, decode_result
from producer.protocol.keys import RESULTS_STREAM, text


@dataclass(frozen=True, slots=True)
class StreamEvent:
    id: str
    result: JobResult


@dataclass
class StreamCursor:
    """One consumer of a consumer group on a results stream: the reading logic both clients
    share. It reads ``"0"`` (its own pending entries) until they run out, then ``">"``
    (entries never delivered to the group)."""

    group: str
    consumer: str
    stream: str = RESULTS_STREAM
    count: int = 100
    block_ms: int = 1000
    idle_stop: bool = False
    position: str = "0"

    def group_args(self, from_start: bool) -> dict[str, Any]:
        """XGROUP CREATE's arguments: the group starts at the first entry, or what comes next."""
        return {"name": self.stream, "groupname": self.group, "id": "0" if from_start else "$",
                "mkstream": True}  # fmt: skip

    @contextmanager
    def group_may_exist(self) -> Iterator[None]:
        """Around XGROUP CREATE: a group that is there already is fine."""
        try:
            yield
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read_args(self) -> dict[str, Any]:
        """XREADGROUP's arguments for the next read."""
        return {"groupname": self.group, "consumername": self.consumer,
                "streams": {self.stream: self.position}, "count": self.count,
                "block": self.block_ms}  # fmt: skip

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
    cursor = StreamCursor(group, consumer, stream, count, block_ms, idle_stop)
    with cursor.group_may_exist():
        client.xgroup_create(**cursor.group_args(from_start))
    while (events := cursor.events(client.xreadgroup(**cursor.read_args()))) is not None:
        for event in events:
            yield event
            client.xack(stream, group, event.id)
