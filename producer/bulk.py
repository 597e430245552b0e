"""Bulk runs: one job per image under an S3 prefix, in a manifest, or in a Python list.

A run has an id. Its state lives in Redis (keys in ``producer.constants``: metadata and counters,
item -> job id, finished items, a runner lease), so a second start of the same run submits only
what was never submitted and hands out only what was not handed out, and ``blipq status RUN_ID``
shows its progress from any machine.

Job ids are derived from the run id and the item (UUID 5), so an item always has the same id: a
runner killed between sending a chunk and recording it finds, on resume, the results of what
already ran and resubmits only the rest. At most ``max_pending`` jobs are in flight at once, so a
large run does not flood a queue that other producers share.

Results are handed out at least once: an item counts as done when the next one is asked for, so a
consumer that dies while handling one gets it again. The CLI's output files make that exactly once:
on resume they are read back, and items already in them are skipped.

Producer side only: no torch, no worker code; the parsing and the progress math are pure.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import quote, urlsplit

import boto3
import redis
from pydantic import Field, SecretStr, TypeAdapter, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.typing import EncodableT, FieldT

from producer.constants import (
    BULK_DONE_KEY,
    BULK_JOBS_KEY,
    BULK_LOCK_KEY,
    BULK_LOCK_TTL_S,
    BULK_RUN_KEY,
    BULK_RUNS_KEY,
)
from producer.errors import BlipqError, ResultTimeout
from producer.jobs import (
    JOB_KINDS,
    AnyJob,
    CaptionOutput,
    Job,
    JobResult,
    MatchOutput,
    ModerationOutput,
    VqaOutput,
    encode_job,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from producer.client import Client

_JOB_ADAPTER: TypeAdapter[AnyJob] = TypeAdapter(Job)
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$")
# Namespace of the job ids of bulk runs: uuid5(namespace, run id + NUL + item).
_JOB_ID_NAMESPACE = uuid.UUID("6f1d3c2e-8f0b-4b8e-9a43-0c1b5e7d2a91")


class BulkError(BlipqError, ValueError):
    """Bad bulk input, a run id in use by other inputs, or a run another runner holds."""


class BulkStalled(ResultTimeout):
    """No result arrived for ``idle_timeout_s`` while jobs were pending."""


# --- inputs --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BulkItem:
    """One unit of a run: ``key`` names it in the run's state and output (unique in a run)."""

    key: str
    job: AnyJob


def build_job(kind: str, fields: Mapping[str, Any]) -> AnyJob:
    """A job of ``kind`` from fields (``image`` included); raise pydantic's ValidationError."""
    if kind not in JOB_KINDS:
        raise BulkError(f"unknown job kind {kind!r}; one of {', '.join(JOB_KINDS)}")
    return _JOB_ADAPTER.validate_python({**fields, "kind": kind})


def items_from(
    jobs: Iterable[AnyJob | str] | Mapping[str, AnyJob | str],
    *,
    kind: str = "caption",
    options: Mapping[str, Any] | None = None,
) -> list[BulkItem]:
    """Items from jobs or image URIs (made into ``kind`` jobs with ``options``).

    A sequence is keyed by image URI (an image may appear once); a mapping by its keys.
    """
    pairs: Iterable[tuple[str | None, AnyJob | str]] = (
        jobs.items() if isinstance(jobs, Mapping) else ((None, job) for job in jobs)
    )
    items: list[BulkItem] = []
    seen: set[str] = set()
    for key, entry in pairs:
        job = (
            build_job(kind, {**(options or {}), "image": entry})
            if isinstance(entry, str)
            else entry
        )
        name = job.image if key is None else key
        if name in seen:
            raise BulkError(f"item {name!r} appears twice; pass a mapping of unique keys to jobs")
        seen.add(name)
        items.append(BulkItem(name, job))
    return items


ManifestFormat = Literal["jsonl", "csv"]


def manifest_format(path: str | Path) -> ManifestFormat:
    """``csv`` for ``*.csv``, ``jsonl`` for ``*.jsonl`` / ``*.ndjson`` / ``*.json``."""
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in {".jsonl", ".ndjson", ".json"}:
        return "jsonl"
    raise BulkError(f"manifest {path}: use a .jsonl or .csv file")


def read_manifest(
    text: str,
    *,
    fmt: ManifestFormat,
    kind: str,
    defaults: Mapping[str, Any] | None = None,
    source: str = "manifest",
) -> list[BulkItem]:
    """Items from a manifest: an ``image`` column plus job fields, which override ``defaults``.

    An optional ``id`` column names items (needed when an image appears on several rows); without
    it the image URI is the item. In CSV, empty cells are absent and a cell starting with ``[``
    is a JSON list (``texts``); a single text is a list of one. Errors name the line.
    """
    rows = _jsonl_rows(text, source) if fmt == "jsonl" else _csv_rows(text, source)
    items: list[BulkItem] = []
    seen: dict[str, str] = {}
    for where, row in rows:
        if row.get("kind", kind) != kind:
            raise BulkError(f"{where}: kind {row['kind']!r} in a {kind} run")
        fields = {name: value for name, value in row.items() if name not in {"id", "kind"}}
        if not isinstance(fields.get("image"), str):
            raise BulkError(f'{where}: needs an "image" (s3://bucket/key)')
        try:
            job = build_job(kind, {**(defaults or {}), **fields})
        except ValidationError as exc:
            raise BulkError(f"{where}: {_describe(exc)}") from exc
        key = str(row["id"]) if row.get("id") not in (None, "") else job.image
        if key in seen:
            raise BulkError(
                f"{where}: item {key!r} is also on {seen[key]}; add an id column to tell rows apart"
            )
        seen[key] = where
        items.append(BulkItem(key, job))
    if not items:
        raise BulkError(f"{source}: no rows")
    return items


def _jsonl_rows(text: str, source: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"{source}:{number}"
        try:
            row = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise BulkError(f"{where}: not JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise BulkError(f"{where}: expected a JSON object")
        yield where, row


def _csv_rows(text: str, source: str) -> Iterator[tuple[str, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or "image" not in reader.fieldnames:
        raise BulkError(f"{source}: the header needs an image column")
    for row in reader:
        where = f"{source}:{reader.line_num}"
        if None in row:
            raise BulkError(f"{where}: more cells than header columns")
        fields: dict[str, Any] = {}
        for name, cell in row.items():
            value = (cell or "").strip()
            if not value:
                continue
            if name == "texts":
                fields[name] = _texts_cell(value, where)
            else:
                fields[name] = value
        yield where, fields


def _texts_cell(value: str, where: str) -> list[str]:
    if not value.startswith("["):
        return [value]
    try:
        texts = json.loads(value)
    except json.JSONDecodeError as exc:
        raise BulkError(f"{where}: texts is not a JSON list ({exc.msg})") from exc
    if not isinstance(texts, list):
        raise BulkError(f"{where}: texts must be a JSON list of strings")
    return texts


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = err["loc"]
        if loc and loc[0] in JOB_KINDS:  # the discriminated union's tag adds nothing here
            loc = loc[1:]
        where = ".".join(str(p) for p in loc) or "job"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


# --- S3 listing ----------------------------------------------------------------------------------


class S3Settings(BaseSettings):
    """The object store a producer lists: the same ``BLIPQ_S3_*`` variables the worker reads."""

    model_config = SettingsConfigDict(env_prefix="BLIPQ_S3_", extra="ignore", frozen=True)

    endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint; unset = AWS."
    )
    region: str | None = Field(default=None, description="S3 region name.")
    access_key_id: str | None = Field(default=None, description="Else the boto3 credential chain.")
    secret_access_key: SecretStr | None = None
    addressing_style: Literal["auto", "path", "virtual"] = "path"


def make_s3_client(settings: S3Settings | None = None) -> S3Client:
    from botocore.config import Config

    settings = settings or S3Settings()
    secret = settings.secret_access_key
    return boto3.session.Session().client(
        "s3",
        endpoint_url=settings.endpoint_url,
        region_name=settings.region or "us-east-1",
        aws_access_key_id=settings.access_key_id,
        aws_secret_access_key=secret.get_secret_value() if secret else None,
        config=Config(s3={"addressing_style": settings.addressing_style}),
    )


def split_prefix(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` -> (bucket, ``some/prefix/``); the prefix may be empty."""
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise BulkError(f"expected s3://bucket/prefix/, got {uri!r:.80}")
    return parts.netloc, parts.path.lstrip("/")


def list_prefix(s3: S3Client, uri: str, suffixes: Sequence[str] = ()) -> list[str]:
    """Image URIs of the objects under a prefix (sorted by key; folder markers skipped)."""
    bucket, prefix = split_prefix(uri)
    wanted = tuple(s.lower() for s in suffixes)
    uris: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if key.endswith("/") or (wanted and not key.lower().endswith(wanted)):
                continue
            uris.append(f"s3://{bucket}/{quote(key, safe='/')}")
    return uris


# --- run ids -------------------------------------------------------------------------------------


def _digest(value: object) -> str:
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def derive_run_id(kind: str, source: str, options: Mapping[str, Any] | None = None) -> str:
    """A stable run id for the same inputs: ``<kind>-<12 hex digits>``.

    ``source`` names the inputs (an ``s3://`` prefix, or a digest of a manifest's or a list's
    content); ``options`` are the job fields given for every item.
    """
    return f"{kind}-{_digest([kind, source, dict(options or {})])[:12]}"


def content_digest(items: Sequence[BulkItem]) -> str:
    """A digest of items (keys and full jobs, in order), as a run source."""
    return "items:" + _digest([[item.key, encode_job(item.job)] for item in items])[:32]


def check_run_id(run_id: str) -> str:
    if not _RUN_ID_RE.match(run_id):
        raise BulkError(
            f"run id {run_id!r:.120}: 1-100 characters of letters, digits and . _ : - "
            "(starting with a letter or digit)"
        )
    return run_id


def job_id_for(run_id: str, key: str) -> str:
    """The job id of an item: the same in every start of the run."""
    return str(uuid.uuid5(_JOB_ID_NAMESPACE, f"{run_id}\0{key}"))


# --- progress (pure) -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a run stands. ``done`` counts finished items, failed ones included."""

    total: int
    submitted: int
    done: int
    failed: int
    rate: float
    """Items finished per second since this start of the run."""
    eta_s: float | None
    """Seconds to finish at ``rate``; None while nothing has finished in this start."""

    @property
    def ok(self) -> int:
        return self.done - self.failed

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 1.0


def compute_progress(
    *,
    total: int,
    submitted: int,
    done: int,
    failed: int,
    session_done: int,
    session_elapsed_s: float,
) -> Progress:
    """Rate from what finished in this start of the run; ETA for what remains at that rate."""
    total = max(total, done)
    rate = session_done / session_elapsed_s if session_elapsed_s > 0 and session_done > 0 else 0.0
    remaining = total - done
    eta: float | None
    if remaining <= 0:
        eta = 0.0
    elif rate > 0:
        eta = remaining / rate
    else:
        eta = None
    return Progress(total, submitted, done, failed, rate, eta)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def render_progress(progress: Progress, width: int = 24) -> str:
    """``[#####-----] 120/240 done (50%), 3 failed, 140 submitted, 12.5/s, ETA 0:00:10``."""
    filled = round(progress.fraction * width)
    return (
        f"[{'#' * filled}{'-' * (width - filled)}] {progress.done}/{progress.total} done "
        f"({progress.fraction:.0%}), {progress.failed} failed, {progress.submitted} submitted, "
        f"{progress.rate:.1f}/s, ETA {format_duration(progress.eta_s)}"
    )


# --- run state in Redis --------------------------------------------------------------------------

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
    """The Redis keys of one run (see ``producer.constants``)."""

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
            "wait for it to end, or take it over with --force (force=True) if it died"
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


# --- the run -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BulkResult:
    """A finished item: its key, its image and its result."""

    key: str
    image: str
    result: JobResult


class _Waiter:
    """Waits for results of a growing set of jobs: subscribe, then MGET, then messages.

    The same publish-on-store logic as ``Client.results``, but keys are added as jobs are sent,
    on one subscription, so a slow item never holds back the others.
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._redis: redis.Redis = client._redis
        self._backend: Any = client._app.backend
        self._pending: dict[str, str] = {}  # result key -> job id
        self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, job_ids: Sequence[str]) -> list[JobResult]:
        """Watch these jobs; return the results of those already finished."""
        keys = {self._backend.get_key_for_task(job_id).decode(): job_id for job_id in job_ids}
        if not keys:
            return []
        self._pending.update(keys)
        try:
            self._pubsub.subscribe(*keys)
            return self._read(list(keys))
        except redis.ConnectionError:
            return self._reconnect()

    def wait(self, timeout: float) -> list[JobResult]:
        """Results that arrive within ``timeout`` seconds (all that are ready, at least one)."""
        if not self._pending:
            time.sleep(timeout)
            return []
        found: list[JobResult] = []
        try:
            message = self._pubsub.get_message(timeout=timeout)
            while message is not None:
                result = self._take(_str(message["channel"]), message["data"])
                if result is not None:
                    found.append(result)
                message = self._pubsub.get_message(timeout=0)
        except redis.ConnectionError:
            time.sleep(min(timeout, 1.0))
            found += self._reconnect()
        return found

    def drop(self, job_id: str) -> None:
        """Stop watching a job."""
        key = self._backend.get_key_for_task(job_id).decode()
        if self._pending.pop(key, None) is not None:
            self._pubsub.unsubscribe(key)

    def _read(self, keys: list[str]) -> list[JobResult]:
        found = []
        for key, raw in zip(keys, self._redis.mget(keys), strict=True):
            result = self._take(key, raw)
            if result is not None:
                found.append(result)
        return found

    def _take(self, key: str, raw: bytes | str | None) -> JobResult | None:
        job_id = self._pending.get(key)
        if job_id is None:
            return None
        result = self._client._to_result(job_id, raw)
        if result is not None:
            del self._pending[key]
            self._pubsub.unsubscribe(key)
        return result

    def _reconnect(self) -> list[JobResult]:
        """Redis restarted or the network blinked: subscribe again and re-read what is stored."""
        self._pubsub.close()
        self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        try:
            keys = list(self._pending)
            self._pubsub.subscribe(*keys)
            return self._read(keys)
        except redis.ConnectionError:
            return []

    def close(self) -> None:
        self._pubsub.close()


class BulkRun:
    """A started bulk run: iterate it for results as they complete; ``progress()`` any time.

    Built by ``Client.bulk``. Holds the run's lease from construction until the iteration ends
    (or ``close()``); ``stop()`` (any thread, e.g. a signal handler) ends the iteration early,
    leaving in-flight jobs to finish for the next start.
    """

    def __init__(
        self,
        client: Client,
        run_id: str,
        items: Sequence[BulkItem],
        *,
        fingerprint: str,
        description: str,
        handled: Mapping[str, str] | None = None,
        max_pending: int = 2000,
        chunk: int | None = None,
        idle_timeout_s: float | None = None,
        force: bool = False,
        poll_s: float = 0.5,
    ) -> None:
        if max_pending < 1:
            raise BulkError("max_pending must be at least 1")
        self.run_id = check_run_id(run_id)
        self._client = client
        self._items = {item.key: item for item in items}
        if len(self._items) != len(items):
            raise BulkError("item keys must be unique in a run")
        self._max_pending = max_pending
        self._chunk = min(chunk or client.settings.submit_chunk, max_pending)
        self._idle_timeout_s = idle_timeout_s
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._started = False
        self._iteration: weakref.ref[Generator[BulkResult]] | None = None
        self._state = RunState(client._redis, self.run_id, client.settings.result_expires_s)
        self._state.acquire(force=force)
        try:
            self.resumed = self._state.register(
                fingerprint,
                {"description": description, "total": str(len(items)), "kind": _kinds(items)},
            )
            self._plan(handled)
        except BaseException:
            self._state.release()
            raise

    def _plan(self, handled: Mapping[str, str] | None) -> None:
        submitted = self._state.submitted()
        finished = self._state.finished()
        if handled is not None:
            # Written by an earlier start that died before recording them: count them now.
            unrecorded = [
                (k, s) for k, s in handled.items() if k in self._items and k not in finished
            ]
            if unrecorded:
                self._state.mark_done(unrecorded)
                finished.update(unrecorded)
        skip = set(finished) if handled is None else set(handled)
        self._finished = finished
        # In flight or finished but not handed out: wait for (or re-read) their stored results.
        self._watch = {k: v for k, v in submitted.items() if k in self._items and k not in skip}
        self._todo = deque(k for k in self._items if k not in submitted and k not in skip)
        self._submitted = len(submitted)
        self._done, self._failed = self._state.counters()
        self._session_base = self._done
        self._session_start = time.monotonic()
        self.skipped = len(skip & self._items.keys())
        self._requeue_expired()
        self._complete = False

    @property
    def total(self) -> int:
        return len(self._items)

    def progress(self) -> Progress:
        return compute_progress(
            total=self.total,
            submitted=self._submitted,
            done=self._done,
            failed=self._failed,
            session_done=self._done - self._session_base,
            session_elapsed_s=time.monotonic() - self._session_start,
        )

    @property
    def complete(self) -> bool:
        """Every item's result was handed out (and, once the iteration ended, recorded)."""
        return self._complete

    def stop(self) -> None:
        """End the iteration at the next result or poll; jobs in flight finish for a later start."""
        self._stop.set()

    def __iter__(self) -> Iterator[BulkResult]:
        if self._started:
            raise BulkError("a BulkRun can be iterated once")
        self._started = True
        iteration = self._run()
        # A weak reference: a loop left with ``break`` drops the generator, which then ends the
        # run at once (records what was handled, gives the lease back), as close() does.
        self._iteration = weakref.ref(iteration)
        return iteration

    def _run(self) -> Generator[BulkResult]:
        waiter = _Waiter(self._client)
        by_job = {job_id_for(self.run_id, key): key for key in self._items}
        acks: list[tuple[str, str]] = []
        last_ack = last_beat = last_result = time.monotonic()
        state = "stopped"
        try:
            ready = self._replay(waiter)
            while not self._stop.is_set():
                ready += self._refill(waiter)
                if not ready and not len(waiter) and not self._todo:
                    state = "complete"
                    self._complete = True
                    break
                for result in ready:
                    key = by_job[result.job_id]
                    yield BulkResult(key, self._items[key].job.image, result)
                    # Handed out and handled (the consumer asked for the next): done.
                    acks.append((key, "ok" if result.ok else "error"))
                    if self._stop.is_set():
                        break
                now = time.monotonic()
                if ready:
                    last_result = now
                if acks and (len(acks) >= 100 or now - last_ack >= 0.5):
                    self._ack(acks)
                    last_ack = now
                if now - last_beat >= 1.0:
                    self._beat()
                    last_beat = now
                if self._stop.is_set():
                    break
                if self._idle_timeout_s is not None and now - last_result > self._idle_timeout_s:
                    state = "stalled"
                    raise BulkStalled(
                        f"run {self.run_id}: no result for {self._idle_timeout_s:.0f}s, "
                        f"{len(waiter)} jobs still pending (queued behind others, or no worker "
                        "serves their model?); start the run again to keep waiting"
                    )
                ready = waiter.wait(self._poll_s)
        finally:
            waiter.close()
            self._finish(acks, state)

    def _replay(self, waiter: _Waiter) -> list[JobResult]:
        """Watch what earlier starts submitted: in flight, or finished and to be re-read."""
        return waiter.add(list(self._watch.values()))

    def _requeue_expired(self) -> None:
        """Finished items to hand out again whose stored result is gone (older than
        ``result_expires_s``): they are sent again, under the same job id."""
        again = [key for key in self._watch if key in self._finished]
        backend: Any = self._client._app.backend
        expired: list[str] = []
        for start in range(0, len(again), 1000):
            keys = again[start : start + 1000]
            pipe = self._client._redis.pipeline(transaction=False)
            for key in keys:
                pipe.exists(backend.get_key_for_task(self._watch[key]).decode())
            expired += [key for key, found in zip(keys, pipe.execute(), strict=True) if not found]
        for key in expired:
            del self._watch[key]
        self._todo.extendleft(reversed(expired))
        self._submitted -= len(expired)  # counted again when they are sent
        self.resubmitted = len(expired)

    def _refill(self, waiter: _Waiter) -> list[JobResult]:
        """Send chunks until ``max_pending`` jobs are in flight; return results found on the way."""
        ready: list[JobResult] = []
        while self._todo and len(waiter) < self._max_pending and not self._stop.is_set():
            size = min(self._chunk, self._max_pending - len(waiter))
            keys = [self._todo.popleft() for _ in range(min(size, len(self._todo)))]
            ids = {key: job_id_for(self.run_id, key) for key in keys}
            # An earlier start may have sent some of these and died before recording them:
            # those whose result is stored are not sent again.
            stored = waiter.add(list(ids.values()))
            have = {result.job_id for result in stored}
            self._send([(self._items[k].job, j) for k, j in ids.items() if j not in have])
            self._state.record_submitted(ids)
            self._submitted += len(ids)
            ready += stored
        return ready

    def _send(self, jobs: Sequence[tuple[AnyJob, str]]) -> None:
        if not jobs:
            return
        client = self._client
        with client._app.producer_or_acquire() as producer, producer.batch(max_size=len(jobs)):
            # One round trip for the job ledger, one for the messages (kombu's publish batch
            # pipelines the chunk's LPUSHes), as Client.submit_many does per chunk.
            client._send_chunk(list(jobs), producer=producer)

    def _ack(self, acks: list[tuple[str, str]]) -> None:
        new_done, new_failed = self._state.mark_done(acks)
        self._done += new_done
        self._failed += new_failed
        acks.clear()

    def _beat(self) -> None:
        self._state.heartbeat()
        if not self._state.renew():
            # The lease lapsed (a long pause) or was taken over with --force: stop sending.
            self._stop.set()

    def _finish(self, acks: list[tuple[str, str]], state: str) -> None:
        try:
            if acks:
                self._ack(acks)
            self._state.heartbeat(state)
            self._state.release()
        except redis.RedisError:
            # Redis is gone: the unrecorded items are handed out again on resume (at least
            # once), and the lease lapses by itself. Never raise out of a closing generator.
            pass

    def close(self) -> None:
        """End the run here: stop an iteration left unfinished, give the lease back."""
        iteration = self._iteration() if self._iteration is not None else None
        if iteration is not None:
            iteration.close()
        elif not self._started:
            self._started = True
            self._finish([], "stopped")

    def __enter__(self) -> BulkRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kinds(items: Sequence[BulkItem]) -> str:
    kinds = sorted({item.job.kind for item in items})
    return ",".join(kinds) or "none"


def start_run(
    client: Client,
    jobs: Iterable[AnyJob | str] | Mapping[str, AnyJob | str],
    *,
    run_id: str | None = None,
    kind: str = "caption",
    options: Mapping[str, Any] | None = None,
    max_pending: int = 2000,
    chunk: int | None = None,
    idle_timeout_s: float | None = None,
    force: bool = False,
) -> BulkRun:
    """Start (or resume) a run over jobs or image URIs; see ``Client.bulk``."""
    return run_items(
        client,
        items_from(jobs, kind=kind, options=options),
        run_id=run_id,
        kind=kind,
        options=options,
        handled=None,
        source=None,
        max_pending=max_pending,
        chunk=chunk,
        idle_timeout_s=idle_timeout_s,
        force=force,
    )


def run_items(
    client: Client,
    items: Sequence[BulkItem],
    *,
    run_id: str | None,
    kind: str,
    options: Mapping[str, Any] | None,
    handled: Mapping[str, str] | None,
    source: str | None,
    max_pending: int,
    chunk: int | None,
    idle_timeout_s: float | None,
    force: bool,
) -> BulkRun:
    """A run over prepared items. ``source`` names the inputs (else a digest of the items)."""
    if not items:
        raise BulkError("nothing to run: no items")
    source = source or content_digest(items)
    run_id = run_id or derive_run_id(_kinds(items), source, options)
    # The fingerprint pins what a run is: the same id with another kind, options or prefix is
    # refused. A manifest or list may grow between starts (new items are added to the run).
    where = source if source.startswith("s3://") else source.split(":", 1)[0]
    identity = {"kind": _kinds(items), "source": where, "options": dict(options or {})}
    description = json.dumps(identity, sort_keys=True, default=str)
    return BulkRun(
        client,
        run_id,
        items,
        fingerprint=_digest(identity),
        description=description,
        handled=handled,
        max_pending=max_pending,
        chunk=chunk,
        idle_timeout_s=idle_timeout_s,
        force=force,
    )


# --- output files --------------------------------------------------------------------------------

FLAT_COLUMNS = (
    "item",
    "image",
    "job_id",
    "kind",
    "status",
    "text",
    "error_code",
    "error_message",
    "model",
    "total_ms",
    "queue_wait_ms",
    "batch_size",
    "worker",
    "output",
)


def result_text(result: JobResult) -> str:
    """The headline of a result: caption, answer, best-matching text or moderation decision."""
    output = result.output
    if isinstance(output, CaptionOutput):
        return output.caption
    if isinstance(output, VqaOutput):
        return output.answer
    if isinstance(output, MatchOutput):
        return output.best().text if output.scores else ""
    if isinstance(output, ModerationOutput):
        return output.decision
    return ""


def record(item: BulkResult) -> dict[str, Any]:
    """The JSON line of a result: ``item``, ``image`` and the JobResult's fields."""
    return {"item": item.key, "image": item.image, **item.result.model_dump(mode="json")}


def flat_row(item: BulkResult) -> dict[str, Any]:
    """One CSV / Parquet row; ``output`` is the full output as JSON, text fields on one line."""
    result = item.result
    output = result.output.model_dump(mode="json") if result.output else None
    return {
        "item": item.key,
        "image": item.image,
        "job_id": result.job_id,
        "kind": result.kind,
        "status": result.status,
        "text": _one_line(result_text(result)),
        "error_code": result.error.code.value if result.error else "",
        "error_message": _one_line(result.error.message) if result.error else "",
        "model": result.model or "",
        "total_ms": result.timings.total_ms,
        "queue_wait_ms": result.timings.queue_wait_ms,
        "batch_size": result.batch_size,
        "worker": result.worker or "",
        "output": json.dumps(output, ensure_ascii=False) if output is not None else "",
    }


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


class ResultWriter(Protocol):
    path: Path

    def written(self) -> dict[str, str]:
        """Items already in the output -> their status (a torn last record is cut off first)."""
        ...

    def write(self, item: BulkResult) -> None: ...

    def close(self, *, complete: bool) -> None: ...


def _complete_lines(path: Path) -> str:
    """The file's text up to its last newline; a torn last line (killed mid-write) is cut off."""
    if not path.exists():
        return ""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with path.open("r+b") as handle:
            handle.truncate(end)
    return data[:end].decode("utf-8")


def _jsonl_written(path: Path) -> dict[str, str]:
    rows = (json.loads(line) for line in _complete_lines(path).splitlines() if line.strip())
    return {str(row["item"]): str(row["status"]) for row in rows}


class JsonlWriter:
    """JSON lines (``record`` by default), appended and flushed as results arrive."""

    def __init__(self, path: Path, encode: Callable[[BulkResult], dict[str, Any]] = record) -> None:
        self.path = path
        self._encode = encode
        self._handle: io.TextIOWrapper | None = None

    def written(self) -> dict[str, str]:
        return _jsonl_written(self.path)

    def write(self, item: BulkResult) -> None:
        if self._handle is None:
            self._handle = self.path.open("a", encoding="utf-8")
        self._handle.write(json.dumps(self._encode(item), ensure_ascii=False) + "\n")
        self._handle.flush()

    def close(self, *, complete: bool) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class CsvWriter:
    """CSV with a header (FLAT_COLUMNS), one line per result, appended and flushed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: io.TextIOWrapper | None = None
        self._writer: Any = None

    def written(self) -> dict[str, str]:
        rows = csv.DictReader(io.StringIO(_complete_lines(self.path)))
        return {row["item"]: row["status"] for row in rows if row.get("item")}

    def write(self, item: BulkResult) -> None:
        if self._writer is None:
            fresh = not self.path.exists() or self.path.stat().st_size == 0
            self._handle = self.path.open("a", encoding="utf-8", newline="")
            self._writer = csv.DictWriter(self._handle, FLAT_COLUMNS, lineterminator="\n")
            if fresh:
                self._writer.writeheader()
        self._writer.writerow(flat_row(item))
        assert self._handle is not None
        self._handle.flush()

    def close(self, *, complete: bool) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = self._writer = None


class ParquetWriter:
    """Parquet needs the whole file at once: rows go to a JSON-lines journal beside it
    (``<out>.partial.jsonl``) as they arrive, and become the Parquet file (merged with an
    existing one) when the run completes."""

    def __init__(self, path: Path) -> None:
        try:
            import pyarrow  # type: ignore[import-untyped]  # noqa: F401
        except ImportError as exc:
            raise BulkError(
                "Parquet output needs pyarrow: pip install 'blipq[parquet]'; or use .jsonl / .csv"
            ) from exc
        self.path = path
        self.journal = path.with_name(path.name + ".partial.jsonl")
        self._rows = JsonlWriter(self.journal, encode=flat_row)

    def _existing(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        import pyarrow.parquet as pq  # type: ignore[import-untyped]

        rows: list[dict[str, Any]] = pq.read_table(self.path).to_pylist()
        return rows

    def written(self) -> dict[str, str]:
        keys = {str(row["item"]): str(row["status"]) for row in self._existing()}
        return {**keys, **_jsonl_written(self.journal)}

    def write(self, item: BulkResult) -> None:
        self._rows.write(item)

    def close(self, *, complete: bool) -> None:
        self._rows.close(complete=complete)
        if not complete or not self.journal.exists():
            return
        import pyarrow as pa  # type: ignore[import-untyped]
        import pyarrow.parquet as pq  # type: ignore[import-untyped]

        rows = self._existing()
        rows += [json.loads(line) for line in _complete_lines(self.journal).splitlines() if line]
        tmp = self.path.with_name(self.path.name + ".tmp")
        pq.write_table(pa.Table.from_pylist(rows, schema=_parquet_schema()), tmp)
        tmp.replace(self.path)
        self.journal.unlink()


def _parquet_schema() -> Any:
    import pyarrow as pa  # type: ignore[import-untyped]

    types = {"total_ms": pa.float64(), "queue_wait_ms": pa.float64(), "batch_size": pa.int64()}
    return pa.schema([(name, types.get(name, pa.string())) for name in FLAT_COLUMNS])


def open_writer(path: str | Path) -> ResultWriter:
    """A writer for ``.jsonl`` / ``.ndjson`` (JSON lines), ``.csv`` or ``.parquet``."""
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix in {".jsonl", ".ndjson"}:
        return JsonlWriter(target)
    if suffix == ".csv":
        return CsvWriter(target)
    if suffix == ".parquet":
        return ParquetWriter(target)
    raise BulkError(f"--out {path}: use a .jsonl, .csv or .parquet file")


# --- CLI: blipq bulk KIND ..., blipq status [RUN_ID] ---------------------------------------------

ClientFactory = Callable[[argparse.Namespace], "Client"]

# Per kind: (flag, job field, argparse keywords). Unset flags leave the job's default (or the
# manifest row's value); a manifest row's fields override the flags.
_KIND_FLAGS: dict[str, list[tuple[str, str, dict[str, Any]]]] = {
    "caption": [
        ("--prompt", "prompt", {"help": 'conditional caption prefix, e.g. "a photography of"'}),
        ("--max-new-tokens", "max_new_tokens", {"type": int}),
        ("--min-new-tokens", "min_new_tokens", {"type": int}),
        ("--num-beams", "num_beams", {"type": int}),
        ("--candidates", "candidates", {"type": int, "help": "best-of-k captions (CapFilt)"}),
        ("--scorer", "scorer", {"help": "ITM model ranking the candidates"}),
    ],
    "vqa": [
        ("--question", "question", {"help": "the question for every image"}),
        ("--max-new-tokens", "max_new_tokens", {"type": int}),
        ("--num-beams", "num_beams", {"type": int}),
    ],
    "match": [
        ("--text", "texts", {"action": "append", "help": "a text to score (repeat the flag)"}),
    ],
    "moderate": [
        ("--policy", "policy", {"help": "policy name the worker serves"}),
    ],
}
_KIND_HELP = {
    "caption": "caption every image",
    "vqa": "ask every image a question",
    "match": "score texts against every image",
    "moderate": "moderate every image against a policy",
}


def add_commands(sub: Any, make_client: ClientFactory) -> None:
    """Register ``bulk`` and ``status`` on the ``blipq`` parser."""
    bulk = sub.add_parser(
        "bulk",
        help="run jobs over an S3 prefix or a manifest, resumably",
        description="Submit one job per image under an S3 prefix (or per manifest row) in chunks, "
        "write results as they arrive (.jsonl, .csv, or .parquet with pyarrow), show progress on "
        "stderr. Run the same command again to resume: what is done is skipped. Exit codes: 0 "
        "complete, 1 complete with failed items, 2 bad input, 3 stalled, 4 stopped early.",
    )
    kinds = bulk.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind in JOB_KINDS:
        parser = kinds.add_parser(kind, help=_KIND_HELP[kind], description=_KIND_HELP[kind])
        _add_run_flags(parser)
        for flag, field, keywords in _KIND_FLAGS[kind]:
            metavar = flag.removeprefix("--").replace("-", "_").upper()
            parser.add_argument(
                flag, dest=f"job_{field}", default=None, metavar=metavar, **keywords
            )
        parser.set_defaults(func=lambda args: cmd_bulk(args, make_client))

    status = sub.add_parser(
        "status",
        help="progress of a bulk run (from any machine)",
        description="Show a bulk run's progress from Redis; without RUN_ID, list recent runs.",
    )
    status.add_argument("run_id", nargs="?", help="the run id `blipq bulk` printed")
    status.add_argument("--json", action="store_true", help="print the run as JSON")
    status.set_defaults(func=lambda args: cmd_status(args, make_client))


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prefix", nargs="?", help="s3://bucket/prefix/ to list (or --manifest)")
    parser.add_argument("--manifest", help=".jsonl or .csv: an image column plus job fields")
    parser.add_argument("--out", required=True, help="results file: .jsonl, .csv or .parquet")
    parser.add_argument("--run-id", help="name of the run (default: derived from the inputs)")
    parser.add_argument(
        "--model", dest="job_model", default=None, metavar="MODEL", help="model for every job"
    )
    parser.add_argument(
        "--suffix", action="append", default=[], help="only keys ending so (e.g. .jpg; repeat)"
    )
    parser.add_argument("--max-pending", type=int, default=2000, help="jobs in flight at most")
    parser.add_argument("--chunk", type=int, default=None, help="jobs per Redis round trip")
    parser.add_argument(
        "--idle-timeout", type=float, default=600.0, help="give up after this long with no result"
    )
    parser.add_argument(
        "--force", action="store_true", help="take the run over from a runner that died"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def _job_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        name.removeprefix("job_"): value
        for name, value in vars(args).items()
        if name.startswith("job_") and value is not None
    }


def _inputs(args: argparse.Namespace, options: Mapping[str, Any]) -> tuple[list[BulkItem], str]:
    """The run's items and its source name, from --manifest or an S3 prefix."""
    if bool(args.manifest) == bool(args.prefix):
        raise BulkError("give an s3://bucket/prefix/ or --manifest FILE (one of them)")
    if args.manifest:
        path = Path(args.manifest)
        data = path.read_bytes()
        items = read_manifest(
            data.decode("utf-8"),
            fmt=manifest_format(path),
            kind=args.kind,
            defaults=options,
            source=str(path),
        )
        return items, f"manifest:{hashlib.sha256(data).hexdigest()[:32]}"
    uris = list_prefix(make_s3_client(), args.prefix, args.suffix)
    if not uris:
        raise BulkError(f"no objects under {args.prefix}")
    try:
        items = items_from(uris, kind=args.kind, options=options)
    except ValidationError as exc:
        raise BulkError(f"invalid job: {_describe(exc)}") from exc
    suffixes = f" suffix={','.join(args.suffix)}" if args.suffix else ""
    return items, f"{args.prefix}{suffixes}"


def cmd_bulk(args: argparse.Namespace, make_client: ClientFactory) -> int:
    from botocore.exceptions import BotoCoreError, ClientError

    options = _job_options(args)
    try:
        writer = open_writer(args.out)
        items, source = _inputs(args, options)
        handled = writer.written()
    except (BulkError, OSError, ValueError, BotoCoreError, ClientError) as exc:
        print(f"blipq bulk: {exc}", file=sys.stderr)
        return 2
    with make_client(args) as client:
        try:
            run = run_items(
                client,
                items,
                run_id=args.run_id,
                kind=args.kind,
                options=options,
                handled=handled,
                source=source,
                max_pending=args.max_pending,
                chunk=args.chunk,
                idle_timeout_s=args.idle_timeout,
                force=args.force,
            )
        except BulkError as exc:
            print(f"blipq bulk: {exc}", file=sys.stderr)
            return 2
        return drive(run, writer, out=sys.stderr, quiet=args.quiet)


class ProgressLine:
    """Progress on a stream: rewritten in place on a terminal, a line every few seconds if not."""

    def __init__(self, out: io.TextIOBase | Any, *, quiet: bool = False) -> None:
        self._out = out
        self._quiet = quiet
        self._tty = bool(getattr(out, "isatty", lambda: False)())
        self._every_s = 0.2 if self._tty else 5.0
        self._last = 0.0

    def update(self, progress: Progress, *, force: bool = False) -> None:
        now = time.monotonic()
        if self._quiet or (not force and now - self._last < self._every_s):
            return
        self._last = now
        line = render_progress(progress)
        self._out.write(f"\r{line}\x1b[K" if self._tty else f"{line}\n")
        self._out.flush()

    def end(self, progress: Progress) -> None:
        self.update(progress, force=True)
        if self._tty and not self._quiet:
            self._out.write("\n")


def drive(run: BulkRun, writer: ResultWriter, *, out: Any, quiet: bool = False) -> int:
    """Run to the end (or a stop signal), writing each result; return the exit code."""
    line = ProgressLine(out, quiet=quiet)
    resumed = f", resumed: {run.skipped} already written" if run.resumed else ""
    print(f"run {run.run_id}: {run.total} items -> {writer.path}{resumed}", file=out)
    if run.resubmitted:
        print(f"{run.resubmitted} finished items lost their stored results: resubmitted", file=out)
    stalled: BulkStalled | None = None
    with _StopOnSignals(run):
        try:
            for item in run:
                writer.write(item)
                line.update(run.progress())
        except BulkStalled as exc:
            stalled = exc
        finally:
            writer.close(complete=run.complete)
    progress = run.progress()
    line.end(progress)
    if stalled is not None:
        print(f"stalled: {stalled}", file=out)
        return 3
    if not run.complete:
        print(
            f"stopped with {progress.done}/{progress.total} done; run the same command again "
            f"(run id {run.run_id}) to resume",
            file=out,
        )
        return 4
    print(f"complete: {progress.ok} ok, {progress.failed} failed -> {writer.path}", file=out)
    return 1 if progress.failed else 0


class _StopOnSignals:
    """SIGTERM and the first SIGINT stop the run gracefully (a second SIGINT interrupts)."""

    def __init__(self, run: BulkRun) -> None:
        self._run = run
        self._saved: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self._run._stop.is_set():
            raise KeyboardInterrupt
        self._run.stop()

    def __enter__(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._saved[signum] = signal.signal(signum, self._handle)

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)


def run_status(client: Client, run_id: str) -> RunStatus | None:
    """A run's status as Redis has it (any machine)."""
    return read_status(client._redis, run_id)


def describe_status(status: RunStatus, now: float | None = None) -> str:
    """The text ``blipq status RUN_ID`` prints."""
    now = now or time.time()
    meta = status.meta
    age = now - float(meta.get("updated_at") or now)
    if status.state == "running" and status.runner is None:
        state = f"running? no runner holds the run (last update {format_duration(age)} ago)"
    elif status.state == "running":
        state = f"running on {status.runner} (updated {age:.0f}s ago)"
    else:
        state = f"{status.state} (last update {format_duration(age)} ago)"
    created = time.strftime(
        "%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(meta.get("created_at") or 0))
    )
    return "\n".join(
        [
            f"run       {status.run_id}",
            f"inputs    {meta.get('description', '?')}",
            f"state     {state}",
            f"progress  {render_progress(status.progress(now))}",
            f"created   {created}",
        ]
    )


def cmd_status(args: argparse.Namespace, make_client: ClientFactory) -> int:
    with make_client(args) as client:
        if args.run_id is None:
            runs = list_runs(client._redis)
            if not runs:
                print("no bulk runs in Redis")
            for status in runs:
                progress = status.progress()
                print(
                    f"{status.run_id:<32} {status.state:<9} "
                    f"{progress.done}/{progress.total} done, {progress.failed} failed"
                )
            return 0
        found = run_status(client, args.run_id)
    if found is None:
        print(f"no run {args.run_id} in Redis (never started, or expired)", file=sys.stderr)
        return 1
    status = found
    if args.json:
        progress = status.progress()
        payload = {
            "run_id": status.run_id,
            "state": status.state,
            "runner": status.runner,
            "meta": status.meta,
            "progress": {
                "total": progress.total,
                "submitted": progress.submitted,
                "done": progress.done,
                "failed": progress.failed,
                "rate": progress.rate,
                "eta_s": progress.eta_s,
            },
        }
        print(json.dumps(payload, indent=2))
    else:
        print(describe_status(status))
    return 0
