"""A web backend on blipq: submit jobs over HTTP, poll for results, or have them pushed (SSE).

    pip install 'blipq[web]'
    BLIPQ_REDIS_URL=redis://redis:6379/0 BLIPQ_WEB_GROUP=web-pod-1 \\
        uvicorn examples.fastapi_app:app --host 0.0.0.0 --port 8000

``POST /jobs``
    A job as JSON, ``kind`` first: ``{"kind": "caption", "image": "s3://bucket/key.jpg"}``
    (any field of CaptionJob / VqaJob / MatchJob / ModerationJob). 202 ``{"job_id": ...}``;
    422 with pydantic's errors for an invalid job.
``GET /jobs/{job_id}[?wait=S]``
    200 with the JobResult once the job has finished (``status`` ok or error); 202
    ``{"job_id", "status": "pending"}`` while it is queued or running; 404 for an id this service
    never submitted (or whose result has expired). ``wait`` long-polls up to S seconds
    (at most ``BLIPQ_WEB_MAX_WAIT_S``) before answering 202.
``GET /events[?job_id=...&job_id=...]``
    Server-sent events (sse-starlette): one ``result`` event per finished job (``id:`` the
    results-stream entry id, ``data:`` the JobResult as JSON), optionally only for the given job
    ids; a comment (``: connected``) when the stream opens and ``: keepalive`` every
    ``BLIPQ_WEB_KEEPALIVE_S``. A client that reconnects with ``Last-Event-ID`` (browsers'
    EventSource do) first gets the events after that id, replayed from the results stream, then
    the live ones, none twice. Open streams end when the server shuts down, so SIGTERM does not
    wait for clients to hang up. ``BLIPQ_WEB_CORS_ORIGINS`` (a JSON list) allows browsers on
    other origins.
``GET /health``
    Redis reachable, and the queue depths.

One background task per server follows the ``blipq:results`` stream with the AsyncClient as
the consumer group ``BLIPQ_WEB_GROUP`` (default ``web-<hostname>``) and fans each event out to
the server's open SSE connections. Give every server process its own group: processes sharing a
group split the events between them. The group persists in Redis, so a restarted server first
replays the events it had not acknowledged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

import redis.asyncio as aioredis
from fastapi import FastAPI, Header, Query, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import ASGIApp, Receive, Scope, Send

from producer import AsyncClient, ResultTimeout
from producer.client.stream import StreamEvent
from producer.protocol.jobs import Job, decode_result
from producer.protocol.keys import RESULTS_STREAM
from producer.protocol.settings import ClientSettings

log = logging.getLogger("blipq.web")

WEB_JOB_KEY = "blipq:web:job:{job_id}"
"""Set when this app submits a job, expiring with its result (``result_expires_s``): GET
/jobs/{id} answers 202 (pending) for these and 404 for ids it never submitted."""


class WebSettings(BaseSettings):
    """The example server's own settings (``BLIPQ_WEB_*``); Redis comes from ``BLIPQ_REDIS_URL``."""

    model_config = SettingsConfigDict(env_prefix="BLIPQ_WEB_", extra="ignore", frozen=True)

    group: str = Field(
        default_factory=lambda: f"web-{socket.gethostname()}",
        min_length=1,
        description="Consumer group on the results stream: one per server process.",
    )
    consumer: str = Field(default="sse", min_length=1, description="Consumer name in the group.")
    max_wait_s: float = Field(default=30.0, ge=0, description="Longest long-poll of GET /jobs.")
    keepalive_s: float = Field(default=15.0, gt=0, description="SSE keepalive comment interval.")
    queue_size: int = Field(
        default=1000, ge=1, description="Events buffered per SSE connection; the oldest go first."
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description='Origins allowed to call the API from a browser (JSON: ["https://a.example"]).',
    )
    replay_max: int = Field(
        default=10_000, ge=0, description="Most events replayed to a client after Last-Event-ID."
    )


class Hub:
    """Fans results-stream events out to the open SSE connections of this server."""

    def __init__(self, queue_size: int) -> None:
        self._queue_size = queue_size
        self._subscribers: set[asyncio.Queue[StreamEvent]] = set()

    def subscribe(self) -> asyncio.Queue[StreamEvent]:
        queue: asyncio.Queue[StreamEvent] = asyncio.Queue(self._queue_size)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[StreamEvent]) -> None:
        self._subscribers.discard(queue)

    def publish(self, event: StreamEvent) -> None:
        for queue in self._subscribers:
            if queue.full():  # a slow client loses its oldest event, never stalls the others
                queue.get_nowait()
            queue.put_nowait(event)


@dataclass
class State:
    settings: WebSettings
    client: AsyncClient
    redis: aioredis.Redis
    hub: Hub
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


async def follow_results(state: State) -> None:
    """Read the results stream as this server's consumer group, forever; retry if Redis blinks."""
    delay = 0.5
    while True:
        try:
            async for event in state.client.stream(
                group=state.settings.group, consumer=state.settings.consumer
            ):
                state.hub.publish(event)
                delay = 0.5
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("following the results stream failed; retrying in %.1fs", delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    client_settings = ClientSettings()
    settings = WebSettings()
    state = State(
        settings=settings,
        client=AsyncClient(settings=client_settings),
        redis=aioredis.Redis.from_url(client_settings.redis_url),
        hub=Hub(settings.queue_size),
    )
    state.tasks.append(asyncio.create_task(follow_results(state)))
    app.state.blipq = state
    try:
        yield
    finally:
        for task in state.tasks:
            task.cancel()
        await asyncio.gather(*state.tasks, return_exceptions=True)
        await state.redis.aclose()
        await state.client.aclose()


app = FastAPI(title="blipq example", lifespan=lifespan)


class ConfiguredCors:
    """CORS for ``BLIPQ_WEB_CORS_ORIGINS``, read when the server builds its middleware (at its
    first request), not at import; no origins, no CORS headers."""

    def __init__(self, app: ASGIApp) -> None:
        origins = WebSettings().cors_origins
        self.app: ASGIApp = app
        if origins:
            self.app = CORSMiddleware(
                app,
                allow_origins=origins,
                allow_methods=["GET", "POST"],
                allow_headers=["Content-Type", "Last-Event-ID"],
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


app.add_middleware(ConfiguredCors)


def _state(request: Request) -> State:
    state: State = request.app.state.blipq
    return state


@app.post("/jobs", status_code=202)
async def create_job(job: Job, request: Request) -> dict[str, str]:
    state = _state(request)
    job_id = str(uuid.uuid4())
    # Recorded first, so a GET racing the POST's answer never sees 404 for a real job.
    marker = WEB_JOB_KEY.format(job_id=job_id)
    await state.redis.set(marker, "1", ex=state.client.settings.result_expires_s)
    await state.client.submit(job, job_id=job_id)
    return {"job_id": job_id}


@app.get("/jobs/{job_id}")
async def get_job(
    job_id: str, request: Request, wait: Annotated[float, Query(ge=0)] = 0.0
) -> JSONResponse:
    state = _state(request)
    result = await state.client.peek(job_id)
    if result is None and wait > 0:
        try:
            result = await state.client.result(job_id, timeout=min(wait, state.settings.max_wait_s))
        except ResultTimeout:
            result = None
    if result is not None:
        return JSONResponse(result.model_dump(mode="json"))
    if await state.redis.exists(WEB_JOB_KEY.format(job_id=job_id)):
        return JSONResponse({"job_id": job_id, "status": "pending"}, status_code=202)
    return JSONResponse({"detail": f"unknown job {job_id}"}, status_code=404)


def _stream_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


async def _replay(state: State, after: str) -> list[StreamEvent]:
    """The results-stream events after ``after`` (a Last-Event-ID), oldest first."""
    try:
        _stream_id(after)
    except ValueError:
        return []  # not a stream entry id: nothing to replay
    entries: Any = await state.redis.xrange(
        RESULTS_STREAM, min=f"({after}", count=state.settings.replay_max
    )
    replayed = []
    for entry_id, fields in entries or []:
        try:
            result = decode_result(json.loads(fields[b"result"]))
        except (KeyError, TypeError, ValueError):
            continue
        text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        replayed.append(StreamEvent(text, result))
    return replayed


def _sse(event: StreamEvent) -> ServerSentEvent:
    return ServerSentEvent(id=event.id, event="result", data=event.result.model_dump_json())


@app.get("/events")
async def events(
    request: Request,
    job_id: Annotated[list[str] | None, Query()] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> EventSourceResponse:
    state = _state(request)
    wanted = set(job_id or ())
    queue = state.hub.subscribe()  # before the replay: nothing falls between the two

    async def body() -> AsyncIterator[ServerSentEvent]:
        try:
            yield ServerSentEvent(comment="connected")
            newest = (0, 0)
            for event in await _replay(state, last_event_id) if last_event_id else []:
                newest = _stream_id(event.id)
                if not wanted or event.result.job_id in wanted:
                    yield _sse(event)
            while True:
                event = await queue.get()
                if _stream_id(event.id) <= newest:
                    continue  # replayed already
                if not wanted or event.result.job_id in wanted:
                    yield _sse(event)
        finally:
            state.hub.unsubscribe(queue)

    return EventSourceResponse(
        body(),
        ping=state.settings.keepalive_s,
        ping_message_factory=lambda: ServerSentEvent(comment="keepalive"),
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@app.get("/health")
async def health(request: Request) -> dict[str, Any]:
    state = _state(request)
    return {"redis": await state.client.ping(), "queues": await state.client.queue_depths()}
