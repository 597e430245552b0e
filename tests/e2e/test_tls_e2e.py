"""Redis with TLS and a password, for real: a private TLS-only redis-server, a real worker and
the producer clients, all on one ``rediss://`` URL that verifies the server against a private CA.

The server listens only on its TLS port (``--port 0``) and wants a password, so a job that comes
back proves that the broker connection, the result backend, the worker's own Redis client
(stream events, delivery counters, the reaper) and every producer path (submit, wait, follow the
stream, asyncio) speak TLS with the password. If the ``redis-server`` binary is built without
TLS these tests skip and say so; any other failure to start fails them.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch
from PIL import Image

from producer import AsyncClient, CaptionJob, Client
from producer.cli.embedded import (
    EmbeddedS3,
    WorkerProcess,
    _redis_binary,
    free_port,
    stop_process,
)
from tests.e2e.conftest import REPO, worker_env
from tests.fixtures.images import sample_jpegs

pytestmark = pytest.mark.e2e

PASSWORD = "tls-Pa55/word+with:odd@chars"  # percent-encoded in the URL
MAX_NEW = 8


class TlsRedis:
    """A redis-server that accepts only TLS connections (no plain-text port), with a password."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="blipq-redis-tls-"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.files: dict[str, Path] = {}

    @property
    def url(self) -> str:
        """The URL producers and workers use: TLS, the password, the private CA, verified."""
        return self.url_with()

    def url_with(
        self,
        password: str | None = PASSWORD,
        *,
        ca_file: Path | None = None,
        scheme: str = "rediss",
    ) -> str:
        auth = f":{urllib.parse.quote(password, safe='')}@" if password is not None else ""
        query = ""
        if scheme == "rediss":
            params = {"ssl_cert_reqs": "required"}
            if ca_file is not None or self.files:
                params["ssl_ca_certs"] = str(ca_file or self.files["ca.crt"])
            query = "?" + urllib.parse.urlencode(params)
        return f"{scheme}://{auth}127.0.0.1:{self.port}/0{query}"

    def start(self) -> TlsRedis:
        self.files = make_certificates(self.dir)
        args = [
            _redis_binary(),
            "--port", "0",  # no plain-text port at all
            "--tls-port", str(self.port),
            "--bind", "127.0.0.1",
            "--tls-cert-file", str(self.files["server.crt"]),
            "--tls-key-file", str(self.files["server.key"]),
            "--tls-ca-cert-file", str(self.files["ca.crt"]),
            "--tls-auth-clients", "no",  # the server is verified; clients use the password
            "--requirepass", PASSWORD,
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "no",
        ]  # fmt: skip
        log_path = self.dir / "server.log"
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        probe = redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=2)
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    self._exited(args[0], log_path.read_text(errors="replace"))
                if _pings(probe):
                    return self
                time.sleep(0.1)
        finally:
            probe.close()
        raise RuntimeError(f"redis-server (TLS) did not answer within 20 s: {log_path}")

    def _exited(self, binary: str, log: str) -> None:
        last = log.strip().splitlines()[-1] if log.strip() else "(no output)"
        if "tls" in log.lower():
            self.close()
            pytest.skip(f"{binary} cannot serve TLS (built without TLS support?): {last}")
        raise RuntimeError(f"redis-server (TLS) exited while starting: {last}")

    def close(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10)
        shutil.rmtree(self.dir, ignore_errors=True)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def _openssl(directory: Path, *args: str) -> None:
    openssl = shutil.which("openssl") or "/usr/bin/openssl"
    done = subprocess.run(
        [openssl, *args], cwd=directory, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"openssl {' '.join(args)} failed:\n{done.stderr}"


def make_certificates(directory: Path, ca_name: str = "blipq test CA") -> dict[str, Path]:
    """A throwaway CA and a server certificate it signed, for 127.0.0.1 and localhost."""
    _openssl(
        directory, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-keyout", "ca.key", "-out", "ca.crt", "-subj", f"/CN={ca_name}",
    )  # fmt: skip
    _openssl(
        directory, "req", "-newkey", "rsa:2048", "-nodes",
        "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1",
    )  # fmt: skip
    (directory / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "basicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
    )
    _openssl(
        directory, "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "1", "-extfile", "server.ext", "-out", "server.crt",
    )  # fmt: skip
    return {name: directory / name for name in ("ca.crt", "server.crt", "server.key")}


@pytest.fixture(scope="module")
def tls_redis() -> Iterator[TlsRedis]:
    server = TlsRedis().start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def tls_worker(
    tls_redis: TlsRedis, s3_server: EmbeddedS3, tiny_caption_dir: Path
) -> Iterator[WorkerProcess]:
    env = worker_env(
        tls_redis,  # type: ignore[arg-type]  (a server with a .url, as worker_env needs)
        s3_server,
        {"tiny-caption": str(tiny_caption_dir)},
        BLIPQ_MAX_WAIT_MS="20",
        BLIPQ_WARMUP="false",
    )
    worker = WorkerProcess(env, cwd=REPO).start()
    yield worker
    assert worker.stop() == 0, worker.log()[-5000:]


def reference_caption(model_dir: Path, data: bytes) -> str:
    """The model card's way, in this process: processor + greedy generate."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(model_dir)
    model = BlipForConditionalGeneration.from_pretrained(model_dir).eval()
    image = Image.open(io.BytesIO(data)).convert("RGB")
    with torch.inference_mode():
        inputs = processor(images=image, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, num_beams=1, do_sample=False)
    return str(processor.decode(out[0], skip_special_tokens=True)).strip()


def test_caption_job_end_to_end_over_tls_with_a_password(
    tls_redis: TlsRedis,
    tls_worker: WorkerProcess,
    s3,  # type: ignore[no-untyped-def]
    tiny_caption_dir: Path,
) -> None:
    images = sample_jpegs(3, seed=4242)
    s3.create_bucket(Bucket="tls")
    for index, data in enumerate(images):
        s3.put_object(Bucket="tls", Key=f"{index}.jpg", Body=data)
    jobs = [
        CaptionJob(image=f"s3://tls/{i}.jpg", model="tiny-caption", max_new_tokens=MAX_NEW)
        for i in range(len(images))
    ]
    with Client(redis_url=tls_redis.url) as client:
        # submit + wait (ResultWaiter: pub/sub and MGET on the TLS connection)
        first = client.result(client.submit(jobs[0]), timeout=90)
        assert first.ok, first.error
        assert first.output is not None
        assert first.output.caption == reference_caption(tiny_caption_dir, images[0])
        # submit_many (kombu's pipelined publish) + results
        ids = client.submit_many(jobs[1:])
        results = {r.job_id: r for r in client.results(ids, timeout=90)}
        assert set(results) == set(ids) and all(r.ok for r in results.values())
        # The worker's own Redis client published one event per job on the results stream.
        events = list(client.stream(group="tls", consumer="t", from_start=True, idle_stop=True))
        assert sorted(e.result.job_id for e in events) == sorted([first.job_id, *ids])
        assert client.queue_depths()["blipq.tiny-caption"] == 0  # the broker URL, over TLS

    async def wait_async() -> None:
        async with AsyncClient(redis_url=tls_redis.url) as aclient:
            assert await aclient.ping()
            job_id = await aclient.submit(jobs[0])
            result = await aclient.result(job_id, timeout=90)
            assert result.ok and result.output == first.output

    asyncio.run(wait_async())
    log = tls_worker.log()
    # Verified TLS, not kombu's insecure fallback for a rediss:// URL without options.
    assert "insecure" not in log.lower(), log[-3000:]
    assert f"rediss://:**@127.0.0.1:{tls_redis.port}/0" in log  # Celery's banner: the broker
    assert PASSWORD not in log and urllib.parse.quote(PASSWORD, safe="") not in log


def test_plain_text_and_unverified_connections_are_refused(tls_redis: TlsRedis) -> None:
    # Plain text to the TLS port: the server expects a TLS handshake and drops the connection.
    plain = redis.Redis.from_url(
        tls_redis.url_with(scheme="redis"), socket_connect_timeout=2, socket_timeout=5
    )
    with pytest.raises(redis.ConnectionError):
        plain.ping()
    plain.close()
    # TLS, but a CA that did not sign the server's certificate: verification fails.
    other = tls_redis.dir / "other-ca"
    other.mkdir(exist_ok=True)
    wrong_ca = make_certificates(other, ca_name="some other CA")["ca.crt"]
    unverified = redis.Redis.from_url(
        tls_redis.url_with(ca_file=wrong_ca), socket_connect_timeout=2, socket_timeout=5
    )
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        unverified.ping()
    unverified.close()


def test_a_wrong_or_missing_password_is_a_clear_error(tls_redis: TlsRedis) -> None:
    job = CaptionJob(image="s3://tls/0.jpg", model="tiny-caption")
    with (
        Client(redis_url=tls_redis.url_with("not-the-password")) as client,
        pytest.raises(redis.AuthenticationError, match="invalid username-password pair"),
    ):
        client.submit(job)
    # No password: redis-py's HELLO is refused ("HELLO must be called with the client already
    # authenticated, ..."), still an AuthenticationError.
    with (
        Client(redis_url=tls_redis.url_with(None)) as client,
        pytest.raises(redis.AuthenticationError, match="authenticated"),
    ):
        client.submit(job)


def test_a_worker_with_a_wrong_password_says_so_and_never_consumes(tls_redis: TlsRedis) -> None:
    wrong = "wrong-" + PASSWORD
    env = {
        "BLIPQ_REDIS_URL": tls_redis.url_with(wrong),
        "BLIPQ_MODELS": '{"null": {"source": "null", "family": "null"}}',
        "BLIPQ_SERVE": "null",
        "BLIPQ_TORCH_THREADS": "1",
    }
    worker = WorkerProcess(env, cwd=REPO)
    # Started = it has tried the broker once (it never gets to " ready.").
    worker._ready = lambda: "Cannot connect to" in worker.log()  # type: ignore[method-assign]
    try:
        worker.start(timeout=120)
        time.sleep(0.5)
        assert worker.proc is not None and worker.proc.poll() is None  # it keeps retrying
    finally:
        worker.stop()
    log = worker.log()
    assert " ready." not in log
    expected = (
        f"Cannot connect to rediss://:**@127.0.0.1:{tls_redis.port}/0: "
        "invalid username-password pair"
    )
    assert expected in log, log[-3000:]
    assert urllib.parse.quote(wrong, safe="") not in log and wrong not in log  # masked
