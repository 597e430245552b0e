"""Cancelling a run: its still-queued messages come off the broker, their jobs off the ledger.

A stopped run (Ctrl-C, SIGTERM, a runner that died) leaves up to ``max_pending`` jobs queued,
which workers would still run. ``cancel_run`` takes them back: it scans the model queues (and
their priority sub-queues) of a Redis broker for messages carrying the run's unfinished job ids
(a job's task id, or a chunk message's ``blipq_jobs`` header), removes each with LREM, forgets
the removed jobs in the ledger (so no reaper sends them again) and marks their items cancelled:
no longer submitted, so the next start of the run sends them again under the same job ids.
Jobs a worker has already taken finish normally.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from producer.bulk.errors import BulkError
from producer.bulk.run_ids import check_run_id
from producer.bulk.state import RunState, read_status
from producer.protocol.chunks import message_job_ids
from producer.protocol.connect import is_sentinel, redis_client
from producer.protocol.keys import QUEUE_PREFIX, model_of_queue, text

if TYPE_CHECKING:
    from producer.client.sender import Sender

_PAGE = 1000
"""Messages read per LRANGE while scanning a queue."""


@dataclass(frozen=True, slots=True)
class Cancelled:
    """What ``cancel_run`` did: ``removed`` jobs taken off the broker (their items cancelled),
    ``in_flight`` unfinished jobs that were not queued (taken by a worker: they finish)."""

    run_id: str
    removed: int
    in_flight: int


def cancel_run(sender: Sender, run_id: str, *, force: bool = False) -> Cancelled:
    """Remove a run's queued jobs from a Redis broker and the ledger; mark their items cancelled.

    Refused (BulkError) while a runner holds the run's lease, unless ``force``; the lease is held
    while cancelling, so no runner starts meanwhile. A second cancel removes nothing.
    """
    run_id = check_run_id(run_id)
    url = sender.settings.effective_broker_url
    if not (url.startswith(("redis://", "rediss://", "unix://")) or is_sentinel(url)):
        raise BulkError("cancel reads the broker's queues: it needs a Redis broker")
    if read_status(sender.redis, run_id) is None:
        raise BulkError(f"no run {run_id} in Redis (never started, or expired)")
    state = RunState(sender.redis, run_id, sender.settings.result_expires_s)
    state.acquire(force=force)
    try:
        finished = state.finished()
        unfinished = {
            job_id: item for item, job_id in state.submitted().items() if item not in finished
        }
        broker = redis_client(url, sender.settings.redis_master_name)
        removed = 0
        try:
            for queue in _queues(broker):
                taken = _remove_queued(broker, queue, unfinished.keys())
                if taken:
                    # Forgotten in the ledger at once, so that no reaper sends them again.
                    state.mark_cancelled([unfinished[j] for j in taken], forget=taken)
                    removed += len(taken)
        finally:
            broker.close()
        if unfinished:
            state.heartbeat("cancelled")
        return Cancelled(run_id, removed, len(unfinished) - removed)
    finally:
        state.release()


def _queues(broker: redis.Redis) -> list[str]:
    """The blipq queues and priority sub-queues that hold messages now."""
    names = (text(key) for key in broker.scan_iter(match=f"{QUEUE_PREFIX}*", count=1000))
    return sorted(name for name in names if model_of_queue(name) is not None)


def _remove_queued(broker: redis.Redis, queue: str, job_ids: Collection[str]) -> list[str]:
    """Remove the messages of ``queue`` that carry any of ``job_ids``; return those ids of the
    messages removed (a message a worker took meanwhile is not removed, nor counted)."""
    matched: list[tuple[Any, list[str]]] = []  # raw messages, as LRANGE returned them
    start = 0
    # Messages are pushed at the head and taken from the tail: reading from the head, a message
    # still queued is never skipped (a push may show one twice; LREM removes it once).
    while True:
        page = broker.lrange(queue, start, start + _PAGE - 1)
        for raw in page:
            ids = [j for j in _message_ids(raw) if j in job_ids]
            if ids:
                matched.append((raw, ids))
        if len(page) < _PAGE:
            break
        start += _PAGE
    if not matched:
        return []
    pipe = broker.pipeline(transaction=False)
    for raw, _ in matched:
        pipe.lrem(queue, 1, raw)
    taken: list[str] = []
    for (_, ids), count in zip(matched, pipe.execute(), strict=True):
        if count:
            taken += ids
    return list(dict.fromkeys(taken))


def _message_ids(raw: bytes | str) -> list[str]:
    try:
        return message_job_ids(json.loads(raw)["headers"])
    except (ValueError, KeyError, TypeError):
        return []
