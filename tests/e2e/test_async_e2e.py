"""AsyncClient through a real worker: submit, wait and follow without blocking the event loop."""

from __future__ import annotations

import asyncio
import time

import pytest

from producer import AsyncClient, CaptionJob, MatchJob, ResultTimeout, VqaJob
from producer.cli.embedded import EmbeddedRedis, WorkerProcess
from tests.fixtures.images import sample_jpegs


@pytest.fixture(scope="module")
def images(s3) -> list[str]:  # type: ignore[no-untyped-def]
    s3.create_bucket(Bucket="async")
    uris = []
    for index, data in enumerate(sample_jpegs(4, seed=91)):
        s3.put_object(Bucket="async", Key=f"{index}.jpg", Body=data)
        uris.append(f"s3://async/{index}.jpg")
    return uris


def test_submit_and_wait_concurrently(
    caption_worker: WorkerProcess, redis_server: EmbeddedRedis, images: list[str]
) -> None:
    async def main() -> None:
        async with AsyncClient(redis_url=redis_server.url) as client:
            caption = CaptionJob(image=images[0], model="tiny-caption", max_new_tokens=8)
            job_id = await client.submit(caption)
            assert await client.peek("no-such-job") is None
            result = await client.result(job_id, timeout=60)
            assert (result.job_id, result.ok, result.kind) == (job_id, True, "caption")
            assert await client.peek(job_id) == result

            # Every kind, many waiters at once: the loop stays free while they wait.
            jobs = [
                *(CaptionJob(image=uri, model="tiny-caption", max_new_tokens=8) for uri in images),
                *(VqaJob(image=uri, model="tiny-vqa", question="what color?") for uri in images),
                MatchJob(image=images[1], model="tiny-match", texts=["a square", "a dog"]),
            ]
            ids = await client.submit_many(jobs)
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            beat = asyncio.create_task(ticker())
            started = time.monotonic()
            got = await asyncio.gather(*(client.result(i, timeout=60) for i in ids))
            elapsed = time.monotonic() - started
            beat.cancel()
            assert [r.job_id for r in got] == ids and all(r.ok for r in got)
            assert {r.kind for r in got} == {"caption", "vqa", "match"}
            assert ticks >= elapsed / 0.01 * 0.3  # the ticker kept running while we waited

            # results(): as they complete, any order; all of them.
            more = await client.submit_many(jobs[:4])
            streamed = [r.job_id async for r in client.results(more, timeout=60)]
            assert sorted(streamed) == sorted(more)

    asyncio.run(main())


def test_result_timeout(redis_server: EmbeddedRedis) -> None:
    async def main() -> None:
        async with AsyncClient(redis_url=redis_server.url) as client:
            started = time.monotonic()
            with pytest.raises(ResultTimeout):
                await client.result("never-submitted", timeout=0.5)
            assert 0.4 < time.monotonic() - started < 5

    asyncio.run(main())


def test_async_stream_is_resumable(
    caption_worker: WorkerProcess, redis_server: EmbeddedRedis, images: list[str]
) -> None:
    async def main() -> None:
        async with AsyncClient(redis_url=redis_server.url) as client:
            job = CaptionJob(image=images[2], model="tiny-caption", max_new_tokens=8)
            ids = await client.submit_many([job] * 5)
            [r async for r in client.results(ids, timeout=60)]

            # Two events handed out, then the consumer "crashes" while handling the second.
            first = client.stream(group="async-web", consumer="pod-1", from_start=True)
            one, two = await anext(first), await anext(first)
            await first.aclose()  # type: ignore[attr-defined]

            again = [
                e async for e in client.stream(group="async-web", consumer="pod-1", idle_stop=True)
            ]
            assert again[0].id == two.id  # the unfinished event comes back first
            handled = [one.result.job_id] + [e.result.job_id for e in again]
            assert sorted(j for j in handled if j in ids) == sorted(ids)
            rest = client.stream(group="async-web", consumer="pod-1", idle_stop=True)
            assert [e async for e in rest] == []  # everything acknowledged

    asyncio.run(main())
