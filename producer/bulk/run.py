"""The run: ``BulkRun`` sends chunks, hands results out as they complete, records them."""

from __future__ import annotations

import json
import threading
import time
import weakref
from collections import deque
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from producer.bulk.errors import BulkError, BulkStalled
from producer.bulk.inputs import BulkItem, items_from
from producer.bulk.progress import Progress, compute_progress
from producer.bulk.run_ids import check_run_id, content_digest, derive_run_id, digest, job_id_for
from producer.bulk.state import RunState
from producer.client.waiting import ResultWaiter
from producer.protocol.jobs import AnyJob, JobResult
from producer.protocol.keys import MAX_JOBS_PER_MESSAGE

if TYPE_CHECKING:
    from producer.client.sender import Sender


@dataclass(frozen=True, slots=True)
class BulkResult:
    """A finished item: its key, its image and its result."""

    key: str
    image: str
    result: JobResult


class BulkRun:
    """A started bulk run: iterate it for results as they complete; ``progress()`` any time.

    Built by ``start_run``. Holds the run's lease from construction until the iteration ends
    (or ``close()``); ``stop()`` (any thread, e.g. a signal handler) ends the iteration early,
    leaving in-flight jobs to finish for the next start.
    """

    def __init__(
        self,
        sender: Sender,
        run_id: str,
        items: Sequence[BulkItem],
        *,
        fingerprint: str,
        description: str,
        inputs_file: str | None = None,
        handled: Mapping[str, str] | None = None,
        max_pending: int = 2000,
        chunk: int | None = None,
        per_message: int | None = None,
        idle_timeout_s: float | None = None,
        force: bool = False,
        poll_s: float = 0.5,
    ) -> None:
        if max_pending < 1:
            raise BulkError("max_pending must be at least 1")
        self.run_id = check_run_id(run_id)
        self._sender = sender
        self._items = {item.key: item for item in items}
        if len(self._items) != len(items):
            raise BulkError("item keys must be unique in a run")
        self._max_pending = max_pending
        self._chunk = min(chunk or sender.settings.submit_chunk, max_pending)
        self._per_message = per_message or sender.settings.jobs_per_message
        if not 1 <= self._per_message <= MAX_JOBS_PER_MESSAGE:
            raise BulkError(f"per_message must be 1-{MAX_JOBS_PER_MESSAGE}")
        self._idle_timeout_s = idle_timeout_s
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._started = False
        self._iteration: weakref.ref[Generator[BulkResult]] | None = None
        self._state = RunState(sender.redis, self.run_id, sender.settings.result_expires_s)
        self._state.acquire(force=force)
        try:
            meta = {"description": description, "total": str(len(items)), "kind": _kinds(items)}
            if inputs_file is not None:  # shown by `blipq status`; not part of the fingerprint
                meta["inputs_file"] = inputs_file
            self.resumed = self._state.register(fingerprint, meta)
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
        waiter = self._sender.waiter()
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

    def _replay(self, waiter: ResultWaiter) -> list[JobResult]:
        """Watch what earlier starts submitted: in flight, or finished and to be re-read."""
        return waiter.add(list(self._watch.values()))

    def _requeue_expired(self) -> None:
        """Finished items to hand out again whose stored result is gone (older than
        ``result_expires_s``): they are sent again, under the same job id."""
        again = [key for key in self._watch if key in self._finished]
        expired: list[str] = []
        for start in range(0, len(again), 1000):
            keys = again[start : start + 1000]
            pipe = self._sender.redis.pipeline(transaction=False)
            for key in keys:
                pipe.exists(self._sender.result_key(self._watch[key]))
            expired += [key for key, found in zip(keys, pipe.execute(), strict=True) if not found]
        for key in expired:
            del self._watch[key]
        self._todo.extendleft(reversed(expired))
        self._submitted -= len(expired)  # counted again when they are sent
        self.resubmitted = len(expired)

    def _refill(self, waiter: ResultWaiter) -> list[JobResult]:
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
        # One round trip for the job ledger, one for the messages, per chunk of the run.
        self._sender.send(jobs, per_message=self._per_message)

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
    sender: Sender,
    jobs: Iterable[AnyJob | str] | Mapping[str, AnyJob | str],
    *,
    run_id: str | None = None,
    kind: str = "caption",
    options: Mapping[str, Any] | None = None,
    max_pending: int = 2000,
    chunk: int | None = None,
    per_message: int | None = None,
    idle_timeout_s: float | None = None,
    force: bool = False,
) -> BulkRun:
    """Start (or resume) a bulk run over jobs or image URIs: iterate it for results, poll
    ``progress()``. Image URIs become ``kind`` jobs with ``options``; a mapping names items.
    The same ``run_id`` (default: derived from the inputs) skips what an earlier start did.
    ``per_message``: jobs per broker message (default ``jobs_per_message``).

    ``sender`` is a client's: ``start_run(client.sender, uris)``.
    """
    return run_items(
        sender,
        items_from(jobs, kind=kind, options=options),
        run_id=run_id,
        kind=kind,
        options=options,
        handled=None,
        source=None,
        max_pending=max_pending,
        chunk=chunk,
        per_message=per_message,
        idle_timeout_s=idle_timeout_s,
        force=force,
    )


def run_items(
    sender: Sender,
    items: Sequence[BulkItem],
    *,
    run_id: str | None,
    kind: str,
    options: Mapping[str, Any] | None,
    handled: Mapping[str, str] | None,
    source: str | None,
    max_pending: int,
    chunk: int | None,
    per_message: int | None,
    idle_timeout_s: float | None,
    force: bool,
    inputs_file: str | None = None,
) -> BulkRun:
    """A run over prepared items. ``source`` names the inputs (else a digest of the items);
    ``inputs_file``, the manifest they were read from (shown by ``blipq status``)."""
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
        sender,
        run_id,
        items,
        fingerprint=digest(identity),
        description=description,
        inputs_file=inputs_file,
        handled=handled,
        max_pending=max_pending,
        chunk=chunk,
        per_message=per_message,
        idle_timeout_s=idle_timeout_s,
        force=force,
    )
