"""``python -m benchmarks.redis_capacity``: what one job costs Redis, path by path.

A private Redis (``producer.cli.embedded``), a private S3 server with a few small images, and a
real worker serving the ``null`` model family (no inference: every job costs Redis what a real
one does). Around each path the script runs ``CONFIG RESETSTAT``, then reads ``INFO
commandstats`` (calls and microseconds per command) and the ``INFO cpu`` deltas
(``used_cpu_sys`` + ``used_cpu_user``: the whole server process, parsing and network included):

- ``submit``        ``Sender.send`` of N jobs, no worker running: the ledger writes (ZADD, HSET)
                    and the broker messages (LPUSH), one message per job or chunk messages
- ``worker``        the same jobs taken and answered by the worker: the broker's side (BRPOP,
                    the unacknowledged set, acks), the start counts, and the answer script
                    (result, stream event, ledger clear; EVALSHA); measured as the window from
                    submit to the last result, less the submit path and an idle window of the
                    same length (the worker's polling when there is nothing to do)
- ``reaper``        one ledger sweep over a backlog (``Reaper.reap_once``), per sweep

Jobs per second one Redis core sustains = 1e6 / (Redis CPU microseconds per job, all paths).
Results are JSON on stdout; ``--jobs`` sets N (default 2000), ``--per-message`` the chunk size.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from producer.cli.embedded import EmbeddedRedis, EmbeddedS3, WorkerProcess
from producer.client.sender import Sender
from producer.protocol.jobs import CaptionJob
from producer.protocol.keys import KOMBU_UNACKED, LEDGER
from producer.protocol.settings import ClientSettings

BUCKET = "capacity"
_METER_COMMANDS = ("cmdstat_info", "cmdstat_config")
IMAGES = 8


@dataclass
class Usage:
    """Redis commands and CPU over one window: per command calls and usec, and server CPU."""

    calls: dict[str, int] = field(default_factory=dict)
    usec: dict[str, int] = field(default_factory=dict)
    cpu_us: float = 0.0
    seconds: float = 0.0

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    def minus(self, other: Usage, scale: float = 1.0) -> Usage:
        names = set(self.calls) | set(other.calls)
        return Usage(
            calls={
                n: max(0, round(self.calls.get(n, 0) - scale * other.calls.get(n, 0)))
                for n in names
            },
            usec={
                n: max(0, round(self.usec.get(n, 0) - scale * other.usec.get(n, 0))) for n in names
            },
            cpu_us=max(0.0, self.cpu_us - scale * other.cpu_us),
            seconds=self.seconds,
        )

    def per_job(self, jobs: int) -> dict[str, Any]:
        busy = {n: c for n, c in self.calls.items() if c}
        return {
            "commands_per_job": round(self.total_calls / jobs, 3),
            "redis_cpu_us_per_job": round(self.cpu_us / jobs, 1),
            "command_us_per_job": round(sum(self.usec.values()) / jobs, 1),
            "by_command_per_job": {n: round(c / jobs, 3) for n, c in sorted(busy.items())},
        }


class Meter:
    """``CONFIG RESETSTAT`` at the start of a window, commandstats and CPU at its end, on every
    server metered (by name: ``broker``, ``results``)."""

    def __init__(self, clients: dict[str, redis.Redis]) -> None:
        self.clients = clients

    @staticmethod
    def _cpu(client: redis.Redis) -> float:
        info = client.info("cpu")
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])

    def measure(self, action: Callable[[], object]) -> dict[str, Usage]:
        cpu = {}
        for name, client in self.clients.items():
            client.config_resetstat()
            cpu[name] = self._cpu(client)
        started = time.monotonic()
        action()
        seconds = time.monotonic() - started
        usages = {}
        for name, client in self.clients.items():
            cpu_us = (self._cpu(client) - cpu[name]) * 1e6
            stats = client.info("commandstats")
            # This meter's own INFO and CONFIG calls are not the path's.
            kept = {k: v for k, v in stats.items() if not k.startswith(_METER_COMMANDS)}
            usages[name] = Usage(
                calls={k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in kept.items()},
                usec={k.removeprefix("cmdstat_"): int(v["usec"]) for k, v in kept.items()},
                cpu_us=cpu_us,
                seconds=seconds,
            )
        return usages


def _upload(s3_server: EmbeddedS3) -> None:
    from PIL import Image

    s3 = s3_server.client()
    s3.create_bucket(Bucket=BUCKET)
    for index in range(IMAGES):
        buffer = io.BytesIO()
        Image.new("RGB", (64, 48), (index * 30, 90, 160)).save(buffer, "JPEG")
        s3.put_object(Bucket=BUCKET, Key=f"{index}.jpg", Body=buffer.getvalue())


def _worker_env(results: str, broker: str, s3_server: EmbeddedS3) -> dict[str, str]:
    return {
        "BLIPQ_REDIS_URL": results,
        "BLIPQ_BROKER_URL": broker,
        "BLIPQ_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "BLIPQ_S3_ACCESS_KEY_ID": s3_server.access_key,
        "BLIPQ_S3_SECRET_ACCESS_KEY": s3_server.secret_key,
        "BLIPQ_MODELS": json.dumps({"null": {"source": "null", "family": "null"}}),
        "BLIPQ_SERVE": "null",
        "BLIPQ_MAX_WAIT_MS": "20",
        "BLIPQ_WARMUP": "false",
        "BLIPQ_TORCH_THREADS": "1",
    }


def _jobs(count: int) -> list[tuple[CaptionJob, str]]:
    return [
        (CaptionJob(image=f"s3://{BUCKET}/{i % IMAGES}.jpg", model="null"), str(uuid.uuid4()))
        for i in range(count)
    ]


_POLLS = {"results": "zcard", "broker": "hlen"}


def _wait_done(results: redis.Redis, broker: redis.Redis, timeout: float) -> None:
    """Until every job is answered and acknowledged: the ledger and kombu's unacknowledged set
    are empty (one ZCARD and one HLEN every 50 ms, taken off the worker's counts: ``_POLLS``)."""
    deadline = time.monotonic() + timeout
    while results.zcard(LEDGER) or broker.hlen(KOMBU_UNACKED):
        if time.monotonic() > deadline:
            raise RuntimeError(f"jobs still unanswered after {timeout}s")
        time.sleep(0.05)


def _reaper_sweep(url: str, jobs: int) -> Usage:
    """One sweep over a backlog of ``jobs`` ledgered, queued, unanswered jobs, on one Redis
    (the reaper reads the broker's queues and unacknowledged set beside the ledger)."""
    from worker.delivery.reaper import Reaper

    sender = Sender(ClientSettings(redis_url=url))
    try:
        sender.send(_jobs(jobs), per_message=1)
        reaper = Reaper(
            sender.redis,
            lambda job_id, kwargs: None,
            reap_after_s=0.0,
            interval_s=1.0,
            result_key=sender.result_key,
            clock=lambda: time.time() + 1.0,
        )
        usage = Meter({"one": sender.redis}).measure(reaper.reap_once)["one"]
        sender.redis.flushall()
    finally:
        sender.close()
    return usage


def _path(usages: dict[str, Usage], jobs: int) -> dict[str, Any]:
    out: dict[str, Any] = {name: usage.per_job(jobs) for name, usage in usages.items()}
    out["redis_cpu_us_per_job"] = round(sum(u.cpu_us for u in usages.values()) / jobs, 1)
    out["commands_per_job"] = round(sum(u.total_calls for u in usages.values()) / jobs, 3)
    return out


def run(jobs: int, per_message: int, timeout: float) -> dict[str, Any]:
    """Every path measured on two Redis servers, a broker and a results store, so each path's
    cost is known per server; one Redis doing both costs their sum."""
    servers = {"broker": EmbeddedRedis().start(), "results": EmbeddedRedis().start()}
    s3_server = EmbeddedS3().start()
    admin = {name: redis.Redis.from_url(server.url) for name, server in servers.items()}
    meter = Meter(admin)
    urls = {name: server.url for name, server in servers.items()}
    sender = Sender(ClientSettings(redis_url=urls["results"], broker_url=urls["broker"]))
    worker: WorkerProcess | None = None
    report: dict[str, Any] = {"jobs": jobs, "per_message": per_message, "paths": {}}
    try:
        _upload(s3_server)
        report["paths"]["reaper_sweep"] = _reaper_sweep(urls["results"], jobs).per_job(1)
        sizes = {"single": 1, "chunked": per_message}
        # The submit path alone, with no worker running (its messages stay queued).
        submits = {}
        for label, size in sizes.items():
            submits[label] = meter.measure(
                lambda size=size: sender.send(_jobs(jobs), per_message=size)
            )
            for client in admin.values():
                client.flushall()
        env = _worker_env(urls["results"], urls["broker"], s3_server)
        worker = WorkerProcess(env, name="capacity@%h").start()
        time.sleep(1.0)
        for label, size in sizes.items():
            memory = int(admin["results"].info("memory")["used_memory"])
            whole = meter.measure(
                lambda size=size: (
                    sender.send(_jobs(jobs), per_message=size),
                    _wait_done(admin["results"], admin["broker"], timeout),
                )
            )
            kept = int(admin["results"].info("memory")["used_memory"]) - memory
            idle = meter.measure(lambda seconds=whole["results"].seconds: time.sleep(seconds))
            answered = {}
            for name in servers:
                usage = whole[name].minus(submits[label][name]).minus(idle[name])
                poll = _POLLS[name]
                usage.calls[poll] = max(
                    0, usage.calls.get(poll, 0) - whole[name].calls.get(poll, 0)
                )
                answered[name] = usage
            report["paths"][f"submit_{label}"] = _path(submits[label], jobs)
            report["paths"][f"worker_{label}"] = _path(answered, jobs)
            per_server = {
                name: submits[label][name].cpu_us + answered[name].cpu_us for name in servers
            }
            report[label] = {
                "redis_cpu_us_per_job": {k: round(v / jobs, 1) for k, v in per_server.items()},
                "jobs_per_s_per_redis_core": {
                    "one_redis": round(jobs * 1e6 / sum(per_server.values())),
                    **{k: round(jobs * 1e6 / v) for k, v in per_server.items()},
                },
                "results_bytes_per_job": round(kept / jobs),
                "worker_jobs_per_s": round(jobs / whole["results"].seconds, 1),
            }
    finally:
        if worker is not None:
            worker.stop()
        sender.close()
        for client in admin.values():
            client.close()
        s3_server.close()
        for server in servers.values():
            server.close()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--per-message", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)
    json.dump(run(args.jobs, args.per_message, args.timeout), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
