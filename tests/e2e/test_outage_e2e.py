"""Redis or S3 out of reach: the client and the CLI say so at once, by name, and never print a
password. Real servers: a Redis that is stopped while a job waits, a port nothing listens on."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from producer import AsyncClient, CaptionJob, Client, RedisUnavailable
from producer.cli.blipq import EXIT_REDIS_UNAVAILABLE, main
from producer.cli.embedded import EmbeddedRedis, EmbeddedS3, free_port
from producer.protocol.settings import ClientSettings


def test_a_result_waited_for_while_redis_goes_down_raises_redis_unavailable() -> None:
    server = EmbeddedRedis().start()
    try:
        settings = ClientSettings(redis_url=server.url, redis_down_s=2.0)
        with Client(settings=settings) as client:
            # No worker: the job waits in its queue until Redis goes away.
            job_id = client.submit(CaptionJob(image="s3://catalog/never.jpg"))
            server.stop()
            started = time.monotonic()
            with pytest.raises(RedisUnavailable) as caught:
                client.result(job_id, timeout=120)
            took = time.monotonic() - started
    finally:
        server.close()
    assert 2.0 <= took < 8.0, took
    assert caught.value.url == server.url and "unreachable" in str(caught.value)


def test_the_async_client_raises_redis_unavailable_too() -> None:
    server = EmbeddedRedis().start()

    async def wait_through_the_outage() -> float:
        settings = ClientSettings(redis_url=server.url, redis_down_s=2.0)
        async with AsyncClient(settings=settings) as client:
            job_id = await client.submit(CaptionJob(image="s3://catalog/never.jpg"))
            server.stop()
            started = time.monotonic()
            with pytest.raises(RedisUnavailable) as caught:
                await client.result(job_id, timeout=120)
            assert caught.value.url == server.url
            return time.monotonic() - started

    try:
        took = asyncio.run(wait_through_the_outage())
    finally:
        server.close()
    assert 2.0 <= took < 8.0, took


def test_a_short_timeout_with_redis_down_is_an_outage_not_a_timeout() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    with Client(settings=ClientSettings(redis_url=url)) as client, pytest.raises(RedisUnavailable):
        list(client.results(["a", "b"], timeout=1.5))


@pytest.mark.parametrize(
    "command",
    [
        ["result", "0f8e2c1a-job", "--timeout", "60"],
        ["caption", "s3://catalog/sku-1.jpg"],
    ],
)
def test_the_cli_prints_one_line_and_exits_5_without_the_password(
    command: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BLIPQ_REDIS_DOWN_S", "1")
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    code = main(["--redis-url", url, *command])
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert code == EXIT_REDIS_UNAVAILABLE == 5
    assert len(err.strip().splitlines()) == 1, err
    assert "hunter2" not in err and ":***@127.0.0.1" in err and "unreachable" in err


def test_bulk_without_s3_credentials_names_the_settings(
    s3_server: EmbeddedS3,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("BLIPQ_S3_ACCESS_KEY_ID", "BLIPQ_S3_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("BLIPQ_S3_ENDPOINT_URL", s3_server.endpoint_url)
    out = tmp_path / "out.jsonl"
    args = ["bulk", "caption", "s3://catalog/p/", "--out", str(out)]
    code = main(["--redis-url", "redis://127.0.0.1:1/0", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert "BLIPQ_S3_ACCESS_KEY_ID" in err and "BLIPQ_S3_SECRET_ACCESS_KEY" in err, err
