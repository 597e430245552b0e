"""Real parts: a private Redis, a private SeaweedFS S3 server, real celery worker processes.

A test that needs a server fails when the server cannot start; nothing here skips.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from producer import Client
from producer.cli.embedded import EmbeddedRedis, EmbeddedS3, WorkerProcess, free_port
from tests.fixtures.tiny import build_caption_model, build_match_model, build_vqa_model

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis().start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def private_redis() -> Iterator[EmbeddedRedis]:
    """A Redis of this test module's own: what it holds and counts is this module's alone."""
    server = EmbeddedRedis().start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[EmbeddedS3]:
    server = EmbeddedS3().start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def s3(s3_server: EmbeddedS3):  # type: ignore[no-untyped-def]
    return s3_server.client()


@pytest.fixture(scope="session")
def tiny_caption_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_caption_model(tmp_path_factory.mktemp("tiny-caption"))


def worker_env(
    redis_server: EmbeddedRedis, s3_server: EmbeddedS3, models: dict[str, str], **extra: str
) -> dict[str, str]:
    env = {
        "BLIPQ_REDIS_URL": redis_server.url,
        "BLIPQ_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "BLIPQ_S3_ACCESS_KEY_ID": s3_server.access_key,
        "BLIPQ_S3_SECRET_ACCESS_KEY": s3_server.secret_key,
        "BLIPQ_MODELS": json.dumps(models),
        "BLIPQ_SERVE": ",".join(models),
        "BLIPQ_TORCH_THREADS": "1",
        # Tests count deliveries by Celery's "Task ... received" lines.
        "BLIPQ_LOG_EVERY_TASK": "true",
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        # One process unless a test asks for the split (auto splits a worker on a CUDA machine).
        "BLIPQ_INTAKE_PROCESSES": "0",
    }
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def tiny_vqa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_vqa_model(tmp_path_factory.mktemp("tiny-vqa"))


@pytest.fixture(scope="session")
def tiny_match_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_match_model(tmp_path_factory.mktemp("tiny-match"))


@pytest.fixture(scope="session")
def caption_worker(
    redis_server: EmbeddedRedis,
    s3_server: EmbeddedS3,
    tiny_caption_dir: Path,
    tiny_vqa_dir: Path,
    tiny_match_dir: Path,
) -> Iterator[WorkerProcess]:
    """One worker serving a tiny model of each kind (queues blipq.caption, .vqa, .match)."""
    models = {
        "tiny-caption": str(tiny_caption_dir),
        "tiny-vqa": str(tiny_vqa_dir),
        "tiny-match": str(tiny_match_dir),
    }
    env = worker_env(
        redis_server,
        s3_server,
        models,
        BLIPQ_MAX_BATCH_SIZE="8",
        BLIPQ_MAX_WAIT_MS="50",
        BLIPQ_METRICS_PORT=str(free_port()),
        BLIPQ_METRICS_ADDR="127.0.0.1",
        BLIPQ_MAX_IMAGE_BYTES="3000000",
    )
    worker = WorkerProcess(env, cwd=REPO).start()
    yield worker
    code = worker.stop()
    assert code == 0, worker.log()[-5000:]


@pytest.fixture
def client(redis_server: EmbeddedRedis) -> Iterator[Client]:
    with Client(redis_url=redis_server.url) as c:
        yield c


@pytest.fixture
def redis_client(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(redis_server.url)
    yield r
    r.close()
