"""AsyncClient: the Client for asyncio programs (web backends), on ``redis.asyncio``.

Waiting never blocks the event loop: ``result`` / ``results`` use the same publish-on-store logic
as ``Client.results`` (subscribe to the result keys ``celery-task-meta-<id>``, then read what is
already stored with MGET, then wait for messages), and ``stream`` follows the results stream with
a consumer group, over ``redis.asyncio``.

Sending is Celery's synchronous ``send_task`` (kombu has no asyncio producer), run in a worker
thread (``asyncio.to_thread``): one Redis round trip per call (per chunk for ``submit_many``)
that does not hold up the loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Sequence

import redis

from producer.client.stream import StreamCursor, StreamEvent
from producer.client.sync import Client
from producer.client.waiting import SWEEP_S
from producer.protocol.connect import async_redis_client
from producer.protocol.errors import RedisUnavailable, ResultTimeout
from producer.protocol.jobs import AnyJob, JobResult
from producer.protocol.keys import RESULTS_STREAM, text
from producer.protocol.settings import ClientSettings

# How many result keys one results() call subscribes to at a time (as Client.results).
_SUBSCRIBE_CHUNK = 1000


class AsyncClient:
    """The producer's asyncio handle on blipq. Share one per event loop."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        broker_url: str | None = None,
        settings: ClientSettings | None = None,
    ) -> None:
        # The sync client sends (in a thread) and knows Celery's result keys and encoding.
        self._sync = Client(redis_url, broker_url=broker_url, settings=settings)
        self.settings = self._sync.settings
        self._sender = self._sync.sender
        self._redis = async_redis_client(self.settings.redis_url, self.settings.redis_master_name)

    @classmethod
    def from_env(cls) -> AsyncClient:
        """Build a client from ``BLIPQ_*`` environment variables."""
        return cls(settings=ClientSettings())

    # --- sending ---------------------------------------------------------------------------------

    async def submit(self, job: AnyJob, *, job_id: str | None = None) -> str:
        """Send one job (Celery's send in a thread); return its id."""
        return await asyncio.to_thread(self._sync.submit, job, job_id=job_id)

    async def submit_many(
        self, jobs: Iterable[AnyJob], *, per_message: int | None = None
    ) -> list[str]:
        """Send many jobs, one Redis round trip per ``submit_chunk`` (in a thread);
        ``per_message`` as in ``Client.submit_many``."""
        return await asyncio.to_thread(self._sync.submit_many, list(jobs), per_message=per_message)

    # --- results ---------------------------------------------------------------------------------

    async def peek(self, job_id: str) -> JobResult | None:
        """The result if the job has finished, else None; never waits."""
        raw = await self._redis.get(self._key(job_id))
        return self._sender.to_result(job_id, raw)

    async def result(self, job_id: str, timeout: float | None = None) -> JobResult:
        """Wait for the result of one job; raise ResultTimeout after ``timeout`` seconds."""
        async for result in self.results([job_id], timeout=timeout):
            return result
        raise ResultTimeout(f"no result for job {job_id} within {timeout}s")  # pragma: no cover

    async def results(
        self, job_ids: Sequence[str], timeout: float | None = None
    ) -> AsyncIterator[JobResult]:
        """Yield results as they complete (any order); ResultTimeout if some are still missing.

        As ``Client.results``: RedisUnavailable once Redis has been unreachable for
        ``redis_down_s`` seconds (or at the timeout if it is unreachable then); a shorter restart
        is ridden out: resubscribe and re-read.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        for start in range(0, len(job_ids), _SUBSCRIBE_CHUNK):
            chunk = job_ids[start : start + _SUBSCRIBE_CHUNK]
            pending = {self._key(job_id): job_id for job_id in chunk}
            retry_s = 0.1
            reached: list[float] = []  # when _wait_for last subscribed: Redis answered then
            down_since: float | None = None
            while pending:
                try:
                    async for result in self._wait_for(pending, deadline, reached):
                        yield result
                except redis.ConnectionError as exc:
                    now = time.monotonic()
                    if down_since is None or (reached and reached[-1] > down_since):
                        down_since = now
                    past_deadline = deadline is not None and now > deadline
                    if now - down_since >= self.settings.redis_down_s or past_deadline:
                        raise RedisUnavailable(
                            self.settings.redis_url, f"{now - down_since:.1f} s: {exc}"
                        ) from exc
                    await asyncio.sleep(retry_s)
                    retry_s = min(retry_s * 2, 2.0)

    async def _wait_for(
        self, pending: dict[str, str], deadline: float | None, reached: list[float]
    ) -> AsyncIterator[JobResult]:
        """Subscribe, read what is already stored, then wait; ``pending`` shrinks as we go."""
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            keys = list(pending)
            await pubsub.subscribe(*keys)
            reached.append(time.monotonic())
            for result in await self._read(pending):
                yield result
            last_read = time.monotonic()
            while pending:
                wait = 1.0 if deadline is None else deadline - time.monotonic()
                if wait <= 0:
                    raise ResultTimeout(f"{len(pending)} results still pending")
                message = await pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=min(wait, 1.0)
                )
                if message is None:
                    # A result published while a silent reconnect was under way is never
                    # delivered (see producer.client.waiting): after a silence, read the keys again.
                    if time.monotonic() - last_read >= SWEEP_S:
                        for stored in await self._read(pending):
                            yield stored
                        last_read = time.monotonic()
                    continue
                key = text(message["channel"])
                job_id = pending.get(key)
                done = self._sender.to_result(job_id, message["data"]) if job_id else None
                if done is not None:
                    del pending[key]
                    yield done
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _read(self, pending: dict[str, str]) -> list[JobResult]:
        """The stored results of pending jobs (removed from ``pending``)."""
        keys = list(pending)
        found = []
        for key, raw in zip(keys, await self._redis.mget(keys), strict=True):
            result = self._sender.to_result(pending[key], raw)
            if result is not None:
                del pending[key]
                found.append(result)
        return found

    def _key(self, job_id: str) -> str:
        return self._sender.result_key(job_id)

    # --- following -------------------------------------------------------------------------------

    async def stream(
        self,
        *,
        group: str,
        consumer: str,
        from_start: bool = False,
        block_ms: int = 1000,
        count: int = 100,
        idle_stop: bool = False,
    ) -> AsyncIterator[StreamEvent]:
        """Follow finished jobs on the results stream as one consumer of a consumer group.

        As ``Client.stream``: at-least-once and resumable; an event is acknowledged when the next
        one is requested, and a restarted consumer first gets back what it had not finished.
        """
        cursor = StreamCursor(group, consumer, RESULTS_STREAM, count, block_ms, idle_stop)
        with cursor.group_may_exist():
            await self._redis.xgroup_create(**cursor.group_args(from_start))
        while True:
            events = cursor.events(await self._redis.xreadgroup(**cursor.read_args()))
            if events is None:
                return
            for event in events:
                yield event
                await self._redis.xack(RESULTS_STREAM, group, event.id)

    async def queue_depths(self) -> dict[str, int]:
        """Messages waiting in each blipq queue (in a thread, as ``Client.queue_depths``)."""
        return await asyncio.to_thread(self._sync.queue_depths)

    async def ping(self) -> bool:
        return bool(await self._redis.ping())

    async def aclose(self) -> None:
        await self._redis.aclose()
        await asyncio.to_thread(self._sync.close)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
