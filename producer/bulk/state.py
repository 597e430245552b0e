"""A run's state in Redis: metadata and counters, item -> job id, finished items, the lease."""

from __future__ import annotations

import dataclasses
import os
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import redis
from redis.typing import EncodableT, FieldT

from producer.bulk.errors import BulkError
from producer.bulk.progress import Progress, compute_progress
from producer.protocol import ledger
from producer.protocol.keys import (
    BULK_DONE_KEY,
    BULK_JOBS_KEY,
    BULK_LOCK_KEY,
    BULK_LOCK_TTL_S,
    BULK_RUN_KEY,
    BULK_RUNS_KEY,
)

# KEYS: done hash, meta hash, jobs hash, lock. ARGV: now, ttl, then item, status pairs.
# Marks items done once (HSETNX) and counts only the new ones; returns {new done, new failed}.
_MARK_DONE = """
local new_done, new_failed = 0, 0
for i = 3, #ARGV, 2 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
    new_done = new_done + 1
    if ARGV[i + 1] == 'error' then new_failed = new_failed + 1 end
  end
end
if new_done > 0 then redis.call('HINCRBY', KEYS[2], 'done', new_done) end
if new_failed > 0 then redis.call('HINCRBY', KEYS[2], 'failed', new_failed) end
redis.call('HSET', KEYS[2], 'updated_at', ARGV[1])
for k = 1, 3 do redis.call('EXPIRE', KEYS[k], ARGV[2]) end
return {new_done, new_failed}
"""
# KEYS: lock. ARGV: token, ttl. Renews the lease if this runner holds it.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True, slots=True)
class RunStatus:
    """A run as Redis has it (``blipq status``)."""

    run_id: str
    meta: dict[str, str]
    submitted: int
    runner: str | None
    """The runner holding the lease now, or None."""

    def _num(self, name: str) -> float:
        try:
            return float(self.meta.get(name) or 0)
        except ValueError:
            return 0.0

    @property
    def state(self) -> str:
        return self.meta.get("state", "unknown")

    @property
    def cancelled(self) -> int:
        """Items whose queued jobs ``blipq bulk cancel`` removed since the run last started."""
        return int(self._num("cancelled"))

    def progress(self, now: float | None = None) -> Progress:
        done = int(self._num("done"))
        started = self._num("session_started_at")
        # A live run is measured until now; a stopped one until its last activity.
        end = (now or time.time()) if self.state == "running" else self._num("updated_at")
        progress = compute_progress(
            total=int(self._num("total")),
            submitted=self.submitted,
            done=done,
            failed=int(self._num("failed")),
            session_done=done - int(self._num("session_done_base")),
            session_elapsed_s=max(0.0, end - started),
        )
        if self.state != "running" and progress.done < progress.total:
            # Nothing is moving it now: no ETA (the rate is the last start's).
            return dataclasses.replace(progress, eta_s=None)
        return progress


class RunState:
    """The Redis keys of one run (see ``producer.protocol.keys``)."""

    def __init__(self, client: redis.Redis, run_id: str, expires_s: int) -> None:
        self.redis = client
        self.run_id = run_id
        self.expires_s = expires_s
        self.meta_key = BULK_RUN_KEY.format(run_id=run_id)
        self.jobs_key = BULK_JOBS_KEY.format(run_id=run_id)
        self.done_key = BULK_DONE_KEY.format(run_id=run_id)
        self.lock_key = BULK_LOCK_KEY.format(run_id=run_id)
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._mark = client.register_script(_MARK_DONE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def acquire(self, *, force: bool = False) -> None:
        """Take the run's lease, or raise BulkError naming the runner that holds it."""
        if self.redis.set(self.lock_key, self.token, nx=True, ex=BULK_LOCK_TTL_S):
            return
        holder = _text(self.redis.get(self.lock_key))
        if force:
            self.redis.set(self.lock_key, self.token, ex=BULK_LOCK_TTL_S)
            return
        ttl = self.redis.ttl(self.lock_key)
        raise BulkError(
            f"run {self.run_id} is being run by {holder} (lease ends in {ttl}s unless renewed); "
            "wait for it to end, or take it over with --force if it died"
        )

    def renew(self) -> bool:
        return bool(self._renew(keys=[self.lock_key], args=[self.token, BULK_LOCK_TTL_S]))

    def release(self) -> None:
        self._release(keys=[self.lock_key], args=[self.token])

    def register(self, fingerprint: str, meta: Mapping[str, str]) -> bool:
        """Create or resume the run; True when it existed. BulkError if other inputs own the id."""
        existing = _text(self.redis.hget(self.meta_key, "fingerprint"))
        if existing is not None and existing != fingerprint:
            stored = _text(self.redis.hget(self.meta_key, "description")) or "?"
            raise BulkError(
                f"run {self.run_id} exists with other inputs ({stored}); choose another run id"
            )
        now = time.time()
        done = int(_text(self.redis.hget(self.meta_key, "done")) or 0)
        pipe = self.redis.pipeline()
        pipe.hsetnx(self.meta_key, "created_at", f"{now:.3f}")
        fields: dict[FieldT, EncodableT] = dict(meta.items())
        fields.update(
            fingerprint=fingerprint,
            state="running",
            runner=self.token,
            session_started_at=f"{now:.3f}",
            session_done_base=str(done),
            cancelled="0",  # this start sends the cancelled items again
            updated_at=f"{now:.3f}",
        )
        pipe.hset(self.meta_key, mapping=fields)
        pipe.zadd(BULK_RUNS_KEY, {self.run_id: now})
        for key in (self.meta_key, self.jobs_key, self.done_key):
            pipe.expire(key, self.expires_s)
        pipe.execute()
        return existing is not None

    def submitted(self) -> dict[str, str]:
        return {_str(k): _str(v) for k, v in self.redis.hscan_iter(self.jobs_key, count=1000)}

    def finished(self) -> dict[str, str]:
        return {_str(k): _str(v) for k, v in self.redis.hscan_iter(self.done_key, count=1000)}

    def counters(self) -> tuple[int, int]:
        done, failed = self.redis.hmget(self.meta_key, ["done", "failed"])
        return int(_text(done) or 0), int(_text(failed) or 0)

    def record_submitted(self, ids: Mapping[str, str]) -> None:
        pipe = self.redis.pipeline()
        mapping: dict[FieldT, EncodableT] = dict(ids.items())
        pipe.hset(self.jobs_key, mapping=mapping)
        pipe.expire(self.jobs_key, self.expires_s)
        pipe.execute()

    def mark_done(self, statuses: Sequence[tuple[str, str]]) -> tuple[int, int]:
        """Mark items finished (``ok`` / ``error``); returns how many were new, and new failures."""
        args: list[str] = [f"{time.time():.3f}", str(self.expires_s)]
        for key, status in statuses:
            args += [key, status]
        new_done, new_failed = self._mark(
            keys=[self.done_key, self.meta_key, self.jobs_key], args=args
        )
        return int(new_done), int(new_failed)

    def mark_cancelled(self, items: Sequence[str], forget: Sequence[str]) -> None:
        """Record items whose queued jobs were removed: no longer submitted (the next start sends
        them again), counted as ``cancelled``; their jobs (``forget``) leave the ledger."""
        pipe = self.redis.pipeline()
        for job_id in forget:
            ledger.forget(pipe, job_id)
        if items:
            pipe.hdel(self.jobs_key, *items)
            pipe.hincrby(self.meta_key, "cancelled", len(items))
        pipe.execute()

    def heartbeat(self, state: str = "running") -> None:
        now = time.time()
        pipe = self.redis.pipeline()
        pipe.hset(self.meta_key, mapping={"state": state, "updated_at": f"{now:.3f}"})
        pipe.zadd(BULK_RUNS_KEY, {self.run_id: now})
        for key in (self.meta_key, self.jobs_key, self.done_key):
            pipe.expire(key, self.expires_s)
        pipe.execute()


def read_status(client: redis.Redis, run_id: str) -> RunStatus | None:
    """A run's metadata, counters and lease holder; None if Redis has no such run."""
    meta_key = BULK_RUN_KEY.format(run_id=run_id)
    pipe = client.pipeline()
    pipe.hgetall(meta_key)
    pipe.hlen(BULK_JOBS_KEY.format(run_id=run_id))
    pipe.get(BULK_LOCK_KEY.format(run_id=run_id))
    raw_meta, submitted, holder = pipe.execute()
    if not raw_meta:
        return None
    meta = {_str(k): _str(v) for k, v in raw_meta.items()}
    return RunStatus(run_id, meta, int(submitted), _text(holder))


def list_runs(client: redis.Redis, limit: int = 20) -> list[RunStatus]:
    """The most recently active runs, newest first (expired ones are dropped from the index)."""
    runs: list[RunStatus] = []
    for raw in client.zrevrange(BULK_RUNS_KEY, 0, -1):
        run_id = _text(raw) or ""
        status = read_status(client, run_id)
        if status is None:
            client.zrem(BULK_RUNS_KEY, run_id)
            continue
        if len(runs) < limit:
            runs.append(status)
    return runs


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _text(value: object) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)
