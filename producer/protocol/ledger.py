"""The job ledger: what was submitted and has no result yet (see ``constants.LEDGER``).

Kombu's Redis transport takes a message off the queue (BRPOP) and only then records it as
unacknowledged; a worker killed in between loses the message. The ledger closes that gap:
producers record each job before sending it, workers clear it once the result is stored, and
a reaper in the workers sends again whatever is old, unfinished, and nowhere to be found.
"""

from __future__ import annotations

import json
from typing import Any

from producer.protocol.keys import LEDGER, LEDGER_PAYLOADS


def record(pipe: Any, entries: list[tuple[str, dict[str, Any], float]]) -> None:
    """Queue the ledger writes of (job id, task kwargs, submitted at) on a Redis pipeline."""
    if not entries:
        return
    pipe.zadd(LEDGER, {job_id: submitted for job_id, _, submitted in entries})
    pipe.hset(
        LEDGER_PAYLOADS,
        mapping={
            job_id: json.dumps(kwargs, separators=(",", ":")) for job_id, kwargs, _ in entries
        },
    )


def forget(pipe: Any, job_id: str) -> None:
    pipe.zrem(LEDGER, job_id)
    pipe.hdel(LEDGER_PAYLOADS, job_id)
